"""`make demo`: build a small Llama, round-trip it through the Hugging Face checkpoint format,
run a sharded forward pass and a short greedy continuation with the KV cache.

    python -m experiments.demo [--preset tiny] [--new-tokens 16]

Runs on a laptop CPU in seconds; on a GPU/TPU host the same code uses every local device.
(Later stages replace this with the post-training pipeline.)
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax import KVCache, Llama, LlamaConfig, sharding
from llama_jax.checkpoint import load_hf_checkpoint, save_hf_checkpoint
from llama_jax.config import human_count
from llama_jax.tokenizer import tiny_tokenizer


@functools.partial(jax.jit, static_argnums=(0, 3))
def greedy(config: LlamaConfig, params, cache: KVCache, new_tokens: int, prompt):
  """Prefill the prompt, then decode `new_tokens` greedily inside one compiled loop."""
  model = Llama(config)
  logits, cache = model.apply({"params": params}, prompt, cache=cache)
  first = jnp.argmax(logits[:, -1], axis=-1)

  def step(carry, _):
    token, cache = carry
    logits, cache = model.apply({"params": params}, token[:, None], cache=cache)
    nxt = jnp.argmax(logits[:, -1], axis=-1)
    return (nxt, cache), token

  _, tokens = jax.lax.scan(step, (first, cache), None, length=new_tokens)
  return tokens.T


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="tiny")
  parser.add_argument("--new-tokens", type=int, default=16)
  args = parser.parse_args(argv)

  tokenizer = tiny_tokenizer("llama3")
  config = LlamaConfig.preset(args.preset, vocab_size=tokenizer.vocab_size)
  mesh = sharding.make_mesh(fsdp=-1)
  print(f"devices: {jax.device_count()} × {jax.devices()[0].platform}; mesh {dict(mesh.shape)}")
  print(
    f"model {args.preset}: {human_count(config.num_params())} parameters, "
    f"{config.num_layers} layers, d_model {config.d_model}, "
    f"{config.num_heads} heads / {config.num_kv_heads} kv heads"
  )

  params = sharding.init_params(config, jax.random.key(0), mesh)
  with tempfile.TemporaryDirectory() as hf_dir:
    t0 = time.perf_counter()
    save_hf_checkpoint(hf_dir, config, params)
    config, params = load_hf_checkpoint(hf_dir, mesh=mesh, vocab_size=config.vocab_size)
    print(f"HF checkpoint round trip (safetensors + config.json): {time.perf_counter() - t0:.2f}s")

  prompts = ["What is 12 plus 7?", "Name the capital of France."]
  encoded = [tokenizer.encode(p, bos=True) for p in prompts]
  width = max(map(len, encoded))
  tokens = np.zeros((len(prompts), width), np.int32)  # left-padded, segment id 0 = padding
  segments = np.zeros_like(tokens)
  for row, ids in enumerate(encoded):
    tokens[row, width - len(ids) :], segments[row, width - len(ids) :] = ids, 1

  forward = sharding.make_forward(config, mesh)
  t0 = time.perf_counter()
  logits = jax.block_until_ready(forward(params, tokens, None, segments))
  print(
    f"forward: tokens {tokens.shape} -> logits {logits.shape} {logits.dtype}, "
    f"sharded {logits.sharding.spec}, {time.perf_counter() - t0:.2f}s (incl. compile)"
  )

  cache = KVCache.init(config, len(prompts), width + args.new_tokens)
  t0 = time.perf_counter()
  out = np.asarray(greedy(config, params, cache, args.new_tokens, tokens))
  print(
    f"greedy decode: {args.new_tokens} new tokens × {len(prompts)} prompts in "
    f"{time.perf_counter() - t0:.2f}s (incl. compile; random weights, so the text is noise)"
  )
  for prompt, row in zip(prompts, out, strict=True):
    print(f"  {prompt!r} -> {tokenizer.decode(row.tolist())!r}")


if __name__ == "__main__":
  main()
