"""Sampling from a checkpoint (an experiment workdir or a Hugging Face directory).

    python -m experiments.generate --config=experiments/configs/generate.py:tiny \
      --workdir=DIR [--config.init_from=WORKDIR_OR_HF_DIR] [--config.generation.top_p=0.9]

Writes DIR/samples.jsonl and DIR/generate_config.json; see experiments/configs/generate.py.
With `scorer.kind` set (check_answer, reward_model, llama2) every sample is scored by
`llama_jax.rl.scorers.scorer_from_section`, as rejection sampling, GRPO and PPO score theirs.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import jax
import ml_collections
import numpy as np

from experiments import data_sources, models, runs, sections
from llama_jax.generation.decode import decode_program, model_stop_ids
from llama_jax.generation.engine import engine_programs
from llama_jax.parallel import aot, sharding
from llama_jax.rl import scorers
from llama_jax.rl.best_of_k import select_best
from llama_jax.rl.rollouts import sample_batches

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"


def check_config(cfg: ml_collections.ConfigDict) -> None:
  """`sections.check_config` against the generate reference; a config of before the `scorer`
  section (`scorer` a string, the kind) is told what replaced it."""
  if isinstance(cfg.get("scorer"), str):
    raise sections.ConfigError(
      f"config.scorer={cfg.scorer!r} is now config.scorer.kind (with the scorer section's "
      "reward-model fields; '' = no scores)"
    )
  sections.check_config(cfg, sections.reference_config("generate"))


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """The sampler of one batch of `data.batch_size` prompts (`experiments.compile_check`)."""
  check_config(cfg)
  model_cfg = sections.model_config(cfg)
  sharding.check_fits_mesh(model_cfg, mesh)
  gen = sections.generation_config(cfg, model_stop_ids(model_cfg))
  return [
    decode_program(model_cfg, gen, cfg.data.batch_size, assumed.prompt_len, mesh),
    *engine_programs(model_cfg, sections.engine_config(cfg), mesh),
  ]


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Samples responses to the configured prompts into `workdir/samples.jsonl`.

  Returns summary metrics: prompts, responses, mean response tokens, generated tokens/s
  and, with `scorer.kind` set, the mean score and the mean best-of-K score.
  """
  check_config(cfg)
  sharding.initialize_distributed()
  kind = cfg.scorer.kind
  if kind and kind not in scorers.SCORER_KINDS:  # before the model loads
    raise ValueError(f"scorer.kind={kind!r}; expected '' or one of {scorers.SCORER_KINDS}")
  scorer_config = scorers.scorer_config(cfg.scorer) if kind else None  # checked before it too
  policy = models.load_policy(cfg)
  scorer = None
  if scorer_config is not None:
    scorer = scorers.build_scorer(scorer_config, policy.tokenizer, mesh=policy.mesh)
  g = cfg.generation
  gen = sections.generation_config(cfg, policy.tokenizer.stop_ids, policy.tokenizer.pad_id)
  batches = sample_batches(
    policy.config, policy.params, policy.tokenizer, data_sources.prompt_records(cfg.data), gen,
    batch_size=cfg.data.batch_size, seed=g.seed, chat=cfg.chat, mesh=policy.mesh,
  )  # fmt: skip
  rows, scores, num_tokens, seconds = [], [], 0, 0.0
  for batch, out, batch_seconds in batches:
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


if __name__ == "__main__":
  runs.launch(run)
