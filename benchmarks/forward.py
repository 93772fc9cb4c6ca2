"""Forward-pass throughput of llama_jax vs `transformers` (PyTorch) on the same model, same run.

    python -m benchmarks.forward [--preset small_50m] [--batch 8] [--seq 256] [--iters 5]

Both models hold the same float32 weights (llama_jax loads the HF checkpoint that
`transformers` wrote); the script checks that their logits agree before timing. Prints
tokens/s for each and the ratio. CPU by default; on a GPU host JAX uses the GPU.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np


def _time(fn, iters: int) -> float:
  fn()  # warm-up / compile
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - start) / iters


def main(argv=None):
  import torch
  import transformers

  from llama_jax import LlamaConfig
  from llama_jax.checkpoint import config_to_hf, load_hf_checkpoint
  from llama_jax.testing import apply

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small_50m")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--iters", type=int, default=5)
  args = parser.parse_args(argv)

  config = LlamaConfig.preset(args.preset)
  hf_config = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(config).items()
                                          if k not in ("architectures", "torch_dtype")})
  torch.manual_seed(0)
  hf_model = transformers.LlamaForCausalLM(hf_config).float().eval()
  with tempfile.TemporaryDirectory() as path:
    hf_model.save_pretrained(path)
    config, params = load_hf_checkpoint(path)

  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (args.batch, args.seq))
  torch_tokens = torch.as_tensor(tokens)
  ours = lambda: jax.block_until_ready(apply(config, params, tokens))
  with torch.no_grad():
    theirs = lambda: hf_model(torch_tokens).logits
    err = np.abs(np.asarray(ours()) - theirs().numpy()).max()
    t_hf = _time(theirs, args.iters)
  t_jax = _time(ours, args.iters)

  n_tok = args.batch * args.seq
  print(f"model {args.preset}: {config.num_params() / 1e6:.1f}M params, batch {args.batch} × "
        f"{args.seq} tokens, {jax.devices()[0].platform}, torch threads {torch.get_num_threads()}")
  print(f"max |Δlogit| llama_jax vs transformers: {err:.2e}")
  print(f"{'':14}{'s/step':>10}{'tokens/s':>12}")
  print(f"{'llama_jax':14}{t_jax:>10.3f}{n_tok / t_jax:>12,.0f}")
  print(f"{'transformers':14}{t_hf:>10.3f}{n_tok / t_hf:>12,.0f}")
  print(f"ratio (llama_jax / transformers tokens/s): {t_hf / t_jax:.2f}")


if __name__ == "__main__":
  main()
