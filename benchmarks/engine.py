"""Useful tokens/s of the rollout engine vs the static decoder and batched
`transformers.generate`, same weights, same KV memory.

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
`--iters` after a warm-up run (compilation excluded). `transformers.generate` (greedy, KV
cache, PyTorch CPU, the same weights) takes the same batches as the static decoder and runs
each to its longest budget too; `--no-baseline` skips it. The engine's greedy tokens are
checked against both before timing.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import numpy as np

from benchmarks.generate import best_time, same_weights
from llama_jax.generation import decode
from llama_jax.generation.engine import Engine, EngineConfig, Request
from llama_jax.generation.sampling import SamplingConfig

GREEDY = SamplingConfig(temperature=0.0)


def lengths(args, rng) -> np.ndarray:
  """Per-request new-token budgets of the long-tailed workload."""
  drawn = np.exp(rng.normal(np.log(args.median), 0.9, args.prompts))
  return np.clip(np.round(drawn), 1, args.longest).astype(int)


def static_run(config, params, prompts, budgets, batch):
  """Batches of `batch` prompts, each decoded to its longest budget; the tokens [B, N]."""
  out = []
  for lo in range(0, len(prompts), batch):
    chunk = slice(lo, lo + batch)
    gen = decode.GenerationConfig(max_new_tokens=int(max(budgets[chunk])), sampling=GREEDY)
    tokens = decode.generate_tokens(config, params, prompts[chunk], 0, gen).tokens[:, 0]
    out.extend(np.asarray(tokens).tolist())
  return out


def transformers_run(hf_model, prompts, budgets, batch):
  """The same batches through `transformers.generate`; the tokens [B, N]."""
  import torch

  out = []
  with torch.no_grad():
    for lo in range(0, len(prompts), batch):
      ids = torch.as_tensor(np.asarray(prompts[lo : lo + batch]))
      n = int(max(budgets[lo : lo + batch]))
      kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, use_cache=True)
      tokens = hf_model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
      out.extend(tokens[:, ids.shape[1] :].numpy().tolist())
  return out


def engine_run(engine, prompts, budgets):
  pairs = zip(prompts, budgets, strict=True)
  done = engine.generate(
    [Request(prompt=p, max_new_tokens=int(n), sampling=GREEDY) for p, n in pairs]
  )
  return [samples[0].tokens for samples in done]


def same_tokens(ours, theirs, budgets) -> bool:
  """Every request's tokens, up to its own budget, agree."""
  return all(a[:n] == b[:n] for a, b, n in zip(ours, theirs, budgets, strict=True))


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
  parser.add_argument("--no-baseline", action="store_true", help="no transformers (no torch)")
  args = parser.parse_args(argv)

  # The weights transformers holds too (`benchmarks.generate`), or random ones without it.
  models = argparse.Namespace(preset=args.preset, dtype="float32", torch_threads=0,
                              no_baseline=args.no_baseline)  # fmt: skip
  config, params, hf_model = same_weights(models)
  config = dataclasses.replace(config, max_seq_len=args.prompt_len + args.longest)
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
  print("| workload | useful tokens | static decoder tok/s | transformers tok/s | engine tok/s "
        "| engine / static | engine / transformers |")  # fmt: skip
  print("|---|---|---|---|---|---|---|")
  for name, budgets in (("long-tailed", lengths(args, rng)),
                        ("uniform", np.full(args.prompts, args.median))):  # fmt: skip
    useful = int(budgets.sum())
    ours_fn = lambda b=budgets: engine_run(engine, prompts, b)
    static_fn = lambda b=budgets: static_run(config, params, prompts, b, args.batch)
    hf_fn = lambda b=budgets: transformers_run(hf_model, prompts, b, args.batch)
    tokens = ours_fn()
    assert same_tokens(tokens, static_fn(), budgets), f"{name}: the static decoder differs"
    if hf_model is not None:
      assert same_tokens(tokens, hf_fn(), budgets), f"{name}: transformers differs"
    ours, static = best_time(ours_fn, args.iters), best_time(static_fn, args.iters)
    hf = best_time(hf_fn, args.iters) if hf_model is not None else float("nan")
    print(f"| {name} (median {int(np.median(budgets))}, longest {budgets.max()}) | {useful} | "
          f"{useful / static:,.0f} | {useful / hf:,.0f} | {useful / ours:,.0f} | "
          f"{static / ours:.2f}× | {hf / ours:.2f}× |")  # fmt: skip
  print("greedy tokens identical: engine, static decoder" + ("" if hf_model is None else
        ", transformers"))  # fmt: skip


if __name__ == "__main__":
  main()
