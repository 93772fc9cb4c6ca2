"""Decode throughput of llama_jax vs `transformers` generate on the same model, same run.

    python -m benchmarks.generate [--preset small_50m] [--batches 8,1] [--prompt-len 32]
                                  [--new-tokens 128] [--iters 3] [--dtype float32]
                                  [--no-baseline]

Greedy decoding of `--new-tokens` tokens (no stop ids, so every row decodes them all) after
a prompt of `--prompt-len` random tokens, per batch size. Both models hold the same weights
(llama_jax loads the checkpoint `transformers` wrote). For each side the script times the
whole generation and a prefill-only run (1 new token), best of `--iters`; decode tokens/s
is B·(N−1) / (t_generate − t_prefill), whole-generation tokens/s B·N / t_generate (less
sensitive to noise in the short prefill timing). `--no-baseline` skips transformers (no
torch import) and uses randomly initialized llama_jax weights.

On a GPU/TPU whose HBM bandwidth is in `HBM_BANDWIDTH`, it also prints the batch-1
memory-bandwidth roofline: each decoded token reads every weight once plus the KV cache of
the tokens before it, so tokens/s ≤ bandwidth / (weight bytes + mean KV bytes per token).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np

# Peak HBM bandwidth in bytes/s by `jax.Device.device_kind` (vendor data sheets).
HBM_BANDWIDTH = {
  "NVIDIA H100 80GB HBM3": 3.35e12,  # H100 SXM
  "NVIDIA H100 PCIe": 2.0e12,
  "NVIDIA H200": 4.8e12,
  "NVIDIA A100-SXM4-80GB": 2.039e12,
  "NVIDIA A100-SXM4-40GB": 1.555e12,
  "TPU v4": 1.2e12,
  "TPU v5 lite": 8.19e11,
  "TPU v5p": 2.765e12,
}


def hbm_bandwidth(device_kind: str) -> float | None:
  """Peak bandwidth of a device kind, matching a table entry exactly or as a prefix."""
  if device_kind in HBM_BANDWIDTH:
    return HBM_BANDWIDTH[device_kind]
  matches = [bw for kind, bw in HBM_BANDWIDTH.items() if device_kind.startswith(kind)]
  return matches[0] if matches else None


def decode_bytes_per_token(config, context: float) -> float:
  """Bytes read to decode one token at batch 1: all weights + K and V of `context` tokens."""
  itemsize = np.dtype(config.param_dtype).itemsize
  kv_itemsize = np.dtype(config.dtype).itemsize
  kv = 2 * config.num_layers * context * config.num_kv_heads * config.head_dim * kv_itemsize
  return config.num_params() * itemsize + kv


def best_time(fn, iters: int) -> float:
  """Best wall time of `iters` calls after a warm-up (compile) call."""
  fn()
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return min(times)


def same_weights(args):
  """(config, params, torch model or None) with the same weights."""
  from llama_jax import LlamaConfig
  from llama_jax.parallel.sharding import init_params

  config = LlamaConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype)
  if args.no_baseline:
    return config, init_params(config, jax.random.key(0)), None

  import torch
  import transformers

  from llama_jax.checkpoint import config_to_hf, load_hf_checkpoint

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)

  hf_config = transformers.LlamaConfig(
    **{k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "torch_dtype")}
  )
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(hf_config).float().eval()
  hf_model.generation_config.eos_token_id = None  # decode every token, as llama_jax does
  hf_model.generation_config.pad_token_id = 0
  with tempfile.TemporaryDirectory() as path:
    hf_model.save_pretrained(path)
    config, params = load_hf_checkpoint(path, dtype=args.dtype)
  return config, params, hf_model.to(getattr(torch, args.dtype))


def _ours(config, params, prompts, new_tokens: int, iters: int):
  """(seconds to generate, seconds to prefill, tokens [B, N]) for greedy decoding."""
  from llama_jax.generation import GenerationConfig, SamplingConfig, generate_tokens

  def run(n):
    gen = GenerationConfig(max_new_tokens=n, sampling=SamplingConfig(temperature=0.0))
    return lambda: jax.block_until_ready(generate_tokens(config, params, prompts, 0, gen))

  tokens = np.asarray(run(new_tokens)().tokens[:, 0])
  return best_time(run(new_tokens), iters), best_time(run(1), iters), tokens


def _theirs(hf_model, prompts, new_tokens: int, iters: int):
  import torch

  ids = torch.as_tensor(np.asarray(prompts))
  mask = torch.ones_like(ids)

  def run(n):
    kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
    return lambda: hf_model.generate(ids, attention_mask=mask, **kw)

  with torch.no_grad():
    tokens = run(new_tokens)()[:, ids.shape[1] :].numpy()
    return best_time(run(new_tokens), iters), best_time(run(1), iters), tokens


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small_50m")
  parser.add_argument("--batches", default="8,1", help="comma-separated batch sizes")
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--no-baseline", action="store_true", help="llama_jax only, no torch")
  parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
  args = parser.parse_args(argv)

  config, params, hf_model = same_weights(args)
  device = jax.devices()[0]
  threads = "" if hf_model is None else f", torch threads {__import__('torch').get_num_threads()}"
  print(
    f"model {args.preset}: {config.num_params() / 1e6:.1f}M params, {args.dtype}, prompt "
    f"{args.prompt_len} + {args.new_tokens} new tokens, greedy; {device.platform} "
    f"({device.device_kind}){threads}"
  )
  n = args.new_tokens
  batches = [int(b) for b in args.batches.split(",")]
  prompts = {
    b: np.random.RandomState(b).randint(3, config.vocab_size, (b, args.prompt_len)).tolist()
    for b in batches
  }
  # All transformers runs first: XLA's CPU threads keep running after a JAX call and would
  # slow down torch's (on a small CPU the two thread pools fight over the cores).
  theirs = (
    {} if hf_model is None else {b: _theirs(hf_model, prompts[b], n, args.iters) for b in batches}
  )
  rows = []
  for b in batches:
    t_gen, t_pre, ours = _ours(config, params, prompts[b], n, args.iters)
    result = {"batch": b, "ours": (t_gen, t_pre)}
    if b in theirs:
      h_gen, h_pre, their_tokens = theirs[b]
      result |= {"theirs": (h_gen, h_pre), "agree": float((ours == their_tokens).mean())}
    rows.append(result)

  # Timer noise can exceed the decode time of a tiny model; never divide by it.
  decode_rate = lambda b, t: b * (n - 1) / max(t[0] - t[1], 1e-6)
  overall_rate = lambda b, t: b * n / t[0]
  header = f"{'batch':>6}{'s/generate':>12}{'s/prefill':>11}{'generate tok/s':>16}"
  print(f"{'':14}{header}{'decode tok/s':>14}")
  for r in rows:
    for name in ("ours", "theirs"):
      if name in r:
        label = "llama_jax" if name == "ours" else "transformers"
        t, b = r[name], r["batch"]
        print(f"{label:14}{b:>6}{t[0]:>12.4f}{t[1]:>11.4f}{overall_rate(b, t):>16,.1f}"
              f"{decode_rate(b, t):>14,.1f}")  # fmt: skip
    if "theirs" in r:
      b, ours, theirs_t = r["batch"], r["ours"], r["theirs"]
      decode_ratio = decode_rate(b, ours) / decode_rate(b, theirs_t)
      overall_ratio = overall_rate(b, ours) / overall_rate(b, theirs_t)
      print(
        f"batch {b}: ratio (llama_jax / transformers decode tokens/s): {decode_ratio:.2f} "
        f"(whole generation: {overall_ratio:.2f}); greedy tokens identical: {r['agree']:.1%}"
      )

  bandwidth = hbm_bandwidth(device.device_kind) if device.platform != "cpu" else None
  one = [r for r in rows if r["batch"] == 1]
  if bandwidth is None or not one:
    print(f"roofline: no known HBM bandwidth for {device.platform} ({device.device_kind})")
    return
  per_token = decode_bytes_per_token(config, args.prompt_len + n / 2)
  roofline = bandwidth / per_token
  measured = decode_rate(1, one[0]["ours"])
  print(
    f"batch-1 roofline: {per_token / 1e6:.1f} MB read per token at "
    f"{bandwidth / 1e12:.2f} TB/s -> {roofline:,.0f} tokens/s; llama_jax {measured:,.0f} "
    f"tokens/s = {measured / roofline:.1%} of the roofline"
  )


if __name__ == "__main__":
  main()
