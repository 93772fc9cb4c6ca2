"""Useful tokens/s of the rollout engine vs the static decoder, same model, same KV memory.

    python -m benchmarks.engine [--preset small_50m] [--prompts 256] [--batch 64]
                                [--prompt-len 32] [--median 16] [--longest 128] [--iters 2]
                                [--page-size 16] [--prefill-rows 16]

Two workloads of `--prompts` random prompts, greedy:
- long-tailed: request i may generate n_i tokens, drawn from a log-normal with median
  `--median` and capped at `--longest` (the longest about 8× the median);
- uniform: every request generates `--median` tokens.

The static decoder (`generation.decode.generate_tokens`) takes the prompts `--batch` at a
time and, with no stop id to end a row early, runs each batch to its longest request: a
row's tokens past its own n_i are not useful. The engine holds the same KV memory (`--batch`
sequences of prompt + longest tokens, in pages) and `--batch` decode slots, and admits the
next request whenever a sequence ends. Useful tokens/s = Σ n_i / wall time, best of
`--iters` after a warm-up run (compilation excluded).
"""

from __future__ import annotations

import argparse

import jax
import numpy as np

from benchmarks.generate import best_time
from llama_jax import LlamaConfig
from llama_jax.generation import decode
from llama_jax.generation.engine import Engine, EngineConfig, Request
from llama_jax.generation.sampling import SamplingConfig
from llama_jax.parallel import sharding

GREEDY = SamplingConfig(temperature=0.0)


def lengths(args, rng) -> np.ndarray:
  """Per-request new-token budgets of the long-tailed workload."""
  drawn = np.exp(rng.normal(np.log(args.median), 0.9, args.prompts))
  return np.clip(np.round(drawn), 1, args.longest).astype(int)


def static_run(config, params, prompts, budgets, batch):
  """Batches of `batch` prompts, each decoded to its longest budget."""
  for lo in range(0, len(prompts), batch):
    chunk = slice(lo, lo + batch)
    gen = decode.GenerationConfig(max_new_tokens=int(max(budgets[chunk])), sampling=GREEDY)
    jax.block_until_ready(decode.generate_tokens(config, params, prompts[chunk], 0, gen).tokens)


def engine_run(engine, prompts, budgets):
  pairs = zip(prompts, budgets, strict=True)
  engine.generate([Request(prompt=p, max_new_tokens=int(n), sampling=GREEDY) for p, n in pairs])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small_50m")
  parser.add_argument("--prompts", type=int, default=256)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--median", type=int, default=16)
  parser.add_argument("--longest", type=int, default=128)
  parser.add_argument("--page-size", type=int, default=16)
  parser.add_argument("--prefill-rows", type=int, default=16)
  parser.add_argument("--iters", type=int, default=2)
  args = parser.parse_args(argv)

  config = LlamaConfig.preset(args.preset, max_seq_len=args.prompt_len + args.longest)
  params = sharding.init_params(config, jax.random.key(0))
  rng = np.random.default_rng(0)
  prompts = [list(rng.integers(1, config.vocab_size, args.prompt_len)) for _ in range(args.prompts)]
  seq_len = args.prompt_len + args.longest
  pages = args.batch * -(-seq_len // args.page_size) + 1  # the static decoder's KV, + scratch
  engine = Engine(
    config,
    params,
    EngineConfig(page_size=args.page_size, num_pages=pages, max_seqs=args.batch,
                 max_seq_len=seq_len, prefill_chunk=args.prompt_len,
                 prefill_rows=args.prefill_rows),
  )  # fmt: skip
  print(f"{args.preset}, {args.prompts} prompts of {args.prompt_len} tokens, "
        f"batch / decode slots {args.batch}, KV for {args.batch} × {seq_len} tokens, "
        f"{jax.devices()[0]}")  # fmt: skip
  print("| workload | useful tokens | static decoder tok/s | engine tok/s | engine / static |")
  print("|---|---|---|---|---|")
  for name, budgets in (("long-tailed", lengths(args, rng)),
                        ("uniform", np.full(args.prompts, args.median))):  # fmt: skip
    useful = int(budgets.sum())
    static = best_time(lambda b=budgets: static_run(config, params, prompts, b, args.batch),
                       args.iters)  # fmt: skip
    ours = best_time(lambda b=budgets: engine_run(engine, prompts, b), args.iters)
    print(f"| {name} (median {int(np.median(budgets))}, longest {budgets.max()}) | {useful} | "
          f"{useful / static:,.0f} | {useful / ours:,.0f} | {static / ours:.2f}× |")  # fmt: skip


if __name__ == "__main__":
  main()
