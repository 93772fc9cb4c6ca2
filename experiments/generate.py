"""Sampling from a checkpoint (an experiment workdir or a Hugging Face directory).

    python -m experiments.generate --config=experiments/configs/generate.py:tiny \
      --workdir=DIR [--config.init_from=WORKDIR_OR_HF_DIR] [--config.generation.top_p=0.9]

Writes DIR/samples.jsonl and DIR/generate_config.json; see experiments/configs/generate.py.
With `reward.kind` set (check_answer, reward_model, llama2) every sample is scored by
`llama_jax.rl.scorers.build_scorer`, as rejection sampling, GRPO and PPO score theirs.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags

from experiments import data_sources, models, runs, sections
from llama_jax.generation import (
  Generation,
  GenerationConfig,
  SamplingConfig,
  generate,
)
from llama_jax.generation.decode import abstract_decode_args, make_decode_fn
from llama_jax.parallel import aot, sharding
from llama_jax.rl import scorers
from llama_jax.rl.best_of_k import select_best

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
REWARD_FIELDS = ("reward_model", "helpful", "safety", "threshold", "whitening", "batch_size")


def build_scorer(cfg: ml_collections.ConfigDict, tokenizer, mesh) -> scorers.Scorer:
  """The `reward` section (`configs.base.reward_section`) as a `llama_jax.rl.scorers.Scorer`
  (`scorers.build_scorer`; the section's fields are its keyword arguments). Every
  generate-then-score stage (rejection sampling, GRPO, PPO) builds its scorer here."""
  options = {k: cfg[k] for k in REWARD_FIELDS if k in cfg}
  return scorers.build_scorer(cfg.kind, tokenizer, mesh=mesh, **options)


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """`sections.check_config` against the generate reference; a config of before the `reward`
  section (a top-level `scorer`) is told what replaced it."""
  if "scorer" in cfg:
    raise sections.ConfigError(
      f"config.scorer={cfg.scorer!r} is now config.reward.kind (with the reward section's "
      "reward-model fields; '' = no scores)"
    )
  sections.check_config(cfg, sections.reference_config("generate"))


def prompt_records(cfg: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The configured prompts: those of `split` whose task is in `tasks` (comma-separated;
  "" = all), from index `start`, `num_prompts` of them (0 = all)."""
  records = list(data_sources.load_records(cfg, cfg.split))
  if tasks := [t.strip() for t in cfg.get("tasks", "").split(",") if t.strip()]:
    records = [r for r in records if r.get("task") in tasks]
    if not records:
      raise ValueError(f"data.tasks={cfg.tasks!r}: no {cfg.split} prompt has one of these tasks")
  records = records[cfg.get("start", 0) :]
  return records[: cfg.num_prompts] if cfg.num_prompts else records


def sample_batches(
  cfg: ml_collections.ConfigDict, model_cfg, params, tokenizer, records, mesh
) -> Iterator[tuple[list[dict[str, Any]], Generation, float]]:
  """`(records, generation, seconds)` per batch of `cfg.data.batch_size` prompts, sampled
  with `cfg.generation`; batch keys fold the start index into the seed, so a batch's samples
  do not depend on the batches before it."""
  g = cfg.generation
  key = jax.random.key(g.seed)
  for start in range(0, len(records), cfg.data.batch_size):
    batch = records[start : start + cfg.data.batch_size]
    t0 = time.perf_counter()
    out = generate(
      model_cfg, params, tokenizer, [r["prompt"] for r in batch],
      max_new_tokens=g.max_new_tokens, num_samples=g.num_samples, temperature=g.temperature,
      top_k=g.top_k, top_p=g.top_p, prompt_bucket=g.prompt_bucket, chat=cfg.chat,
      key=jax.random.fold_in(key, start), mesh=mesh,
    )  # fmt: skip
    yield batch, out, time.perf_counter() - t0


def generation_config(cfg: ml_collections.ConfigDict, stop_ids, pad_id: int, num_samples=None):
  """The `generation` section as a `GenerationConfig` (`num_samples` overrides its own)."""
  g = cfg.generation
  return GenerationConfig(
    max_new_tokens=g.max_new_tokens,
    num_samples=num_samples or g.num_samples,
    sampling=SamplingConfig(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p),
    stop_ids=stop_ids,
    pad_id=pad_id,
    prompt_bucket=g.prompt_bucket,
  )


def generation_program(
  model_cfg, gen: GenerationConfig, num_prompts: int, prompt_len: int, mesh, resident=()
) -> aot.Program:
  """The compiled decoder of `generate_tokens` for one batch of prompts (prefill + decode
  loop; both KV caches are its arguments), for `experiments.compile_check`."""
  args = abstract_decode_args(model_cfg, gen, num_prompts, prompt_len, mesh)
  b, p = args[1].shape
  r, n = gen.num_samples, gen.max_new_tokens
  flops = model_cfg.flops_per_token(p + n) / 3 * (b * p + b * r * n)
  return aot.Program("generate", make_decode_fn(model_cfg, gen, mesh), args, flops, resident,
                     note=f"{b} prompts × {p} + {r} × {n} new")  # fmt: skip


def check_generation_config(cfg: ml_collections.ConfigDict, model_cfg, num_samples=None):
  """`generation_config` without a tokenizer: the model's EOS ids stop (shapes and memory do
  not depend on which ids stop)."""
  eos = model_cfg.eos_token_id
  stop_ids = () if eos is None else (eos,) if isinstance(eos, int) else eos
  return generation_config(cfg, stop_ids, 0, num_samples)


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """The sampler of one batch of `data.batch_size` prompts (`experiments.compile_check`)."""
  check_config(cfg)
  model_cfg = sections.model_config(cfg)
  sharding.check_fits_mesh(model_cfg, mesh)
  gen = check_generation_config(cfg, model_cfg)
  return [generation_program(model_cfg, gen, cfg.data.batch_size, assumed.prompt_len, mesh)]


def load_policy(cfg: ml_collections.ConfigDict):
  """`(tokenizer, mesh, model_config, params)` of the model to sample from (`init_from`)."""
  tokenizer = models.build_tokenizer(cfg.tokenizer, cfg.init_from)
  mesh = sections.build_mesh(cfg.mesh)
  model_cfg, params = models.load_model(cfg, mesh)
  models.check_tokenizer(model_cfg, tokenizer, cfg)
  if params is None:
    log.warning("init_from is empty: sampling from randomly initialized weights")
    params = sharding.init_params(model_cfg, jax.random.key(cfg.generation.seed), mesh)
  return tokenizer, mesh, model_cfg, params


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Samples responses to the configured prompts into `workdir/samples.jsonl`.

  Returns summary metrics: prompts, responses, mean response tokens, generated tokens/s
  and, with `reward.kind` set, the mean score and the mean best-of-K score.
  """
  check_config(cfg)
  sharding.initialize_distributed()
  kind = cfg.reward.kind
  if kind and kind not in scorers.SCORER_KINDS:  # before the model loads
    raise ValueError(f"reward.kind={kind!r}; expected '' or one of {scorers.SCORER_KINDS}")
  tokenizer, mesh, model_cfg, params = load_policy(cfg)
  scorer = build_scorer(cfg.reward, tokenizer, mesh) if kind else None
  g = cfg.generation
  records = prompt_records(cfg.data)
  rows, scores, num_tokens, seconds = [], [], 0, 0.0
  for batch, out, batch_seconds in sample_batches(cfg, model_cfg, params, tokenizer, records, mesh):
    start = len(rows)
    seconds += batch_seconds
    num_tokens += int(out.mask.sum())
    selection = select_best(scorer, batch, out.texts) if scorer is not None else None
    for i, record in enumerate(batch):
      row = {
        "id": record.get("id", start + i),
        "prompt": record["prompt"],
        "responses": out.texts[i],
        "num_tokens": out.mask[i].sum(-1).tolist(),
        "logprob": (out.model_logprobs[i] * out.mask[i]).sum(-1).tolist(),
      }
      if selection is not None:
        row |= {"scores": selection.scores[i].tolist(), "best": int(selection.best_index[i])}
        scores.append(selection.scores[i])
      rows.append(row)

  summary = {
    "prompts": float(len(rows)),
    "responses": float(len(rows) * g.num_samples),
    "mean_response_tokens": num_tokens / max(1, len(rows) * g.num_samples),
    "tokens_per_second": num_tokens / max(seconds, 1e-9),
  }
  if scores:
    summary |= {
      "mean_score": float(np.mean(scores)),
      "best_of_k_score": float(np.mean([s.max() for s in scores])),
    }
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    Path(workdir, "generate_config.json").write_text(cfg.to_json_best_effort(indent=2))
    with open(Path(workdir, SAMPLES_FILE), "w") as f:
      for row in rows:
        f.write(json.dumps(row) + "\n")
  log.info("Wrote %d prompts × %d samples to %s: %s", len(rows), g.num_samples,
           Path(workdir, SAMPLES_FILE), summary)  # fmt: skip
  return summary


def main(argv):
  del argv
  runs.setup_logging()
  with runs.one_line_errors():
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  runs.define_flags()  # here, not at import: tests import `run` next to other launchers
  app.run(main)
