"""Rejection sampling: K samples per prompt from the current policy, the best one kept as SFT
data, pooled with the best answers of every earlier round (Llama 2 section 3.2.3; Llama 3
section 4.2.2).

    python -m experiments.rejection_sampling \
      --config=experiments/configs/rejection_sampling.py:tiny --workdir=DIR \
      --config.init_from=SFT_WORKDIR --config.scorer.reward_model=RM_WORKDIR \
      [--config.pool_from=ROUND1_DIR,ROUND2_DIR]

One invocation is one round. Its answers are pooled with the `pool.jsonl` of each workdir in
`pool_from` (which already holds the rounds before it): per prompt, the highest-scoring of
this round's best sample and the earlier rounds' kept answers, the latter re-scored with this
round's scorer so that every answer is judged by the same reward model (Llama 2 retrained its
RMs between rounds). Llama 2 found that keeping only the latest round's samples let the model
regress on capabilities it had before; pooling all rounds fixed it. The selection, pooling,
re-scoring and statistics are `llama_jax.rl.rejection_sampling`'s and the scorers
`llama_jax.rl.scorers`'; this module wires the config to them and reads and writes the files.

Writes to DIR:
  samples.jsonl              every prompt's K responses, their scores and the best index
  pool.jsonl                 the pooled best answer per prompt, with its score and round
  sft.jsonl                  the pool as `sft` records (what the next SFT round trains on)
  tfds/<output.name>/1.0.0   the same built into an array_record TFDS dataset: point an SFT
                             config at it with data.source=tfds, data.name=<output.name>,
                             data.data_dir=DIR/tfds
  rejection_sampling.json    per-round statistics of this and every earlier round
  rejection_sampling.png     best vs median vs mean reward per round, and best-of-n vs n
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from experiments import data_sources, models, runs, sections
from llama_jax.checkpoint import atomic
from llama_jax.data import builders
from llama_jax.generation.decode import decode_program, model_stop_ids
from llama_jax.generation.engine import engine_programs
from llama_jax.parallel import aot, sharding
from llama_jax.rl import rejection_sampling as rs_lib
from llama_jax.rl import rollouts, scorers
from llama_jax.rl.best_of_k import select_best

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
POOL_FILE = "pool.jsonl"
SFT_FILE = "sft.jsonl"
STATS_FILE = "rejection_sampling.json"
PLOT_FILE = "rejection_sampling.png"
TFDS_DIR = "tfds"


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """Sampling K answers per prompt and scoring them (`experiments.compile_check`): the
  policy and every reward model are on the devices together."""
  sections.check_config(cfg, sections.reference_config("rejection_sampling"))
  model_cfg = sections.model_config(cfg)
  sharding.check_fits_mesh(model_cfg, mesh)
  gen = sections.generation_config(cfg, model_stop_ids(model_cfg))
  policy = sharding.abstract_sharded_params(model_cfg, mesh)
  scorer = scorers.scorer_config(cfg.scorer)
  reward_models = scorers.reward_model_params(scorer.kind, model_cfg, mesh)
  generate = decode_program(
    model_cfg, gen, cfg.data.batch_size, assumed.prompt_len, mesh, resident=reward_models
  )
  engine = engine_programs(model_cfg, sections.engine_config(cfg), mesh, resident=reward_models)
  seq_len = rollouts.row_length([[0] * assumed.prompt_len], gen.max_new_tokens, 64)
  scoring = scorers.reward_model_programs(
    scorer.kind, scorer.batch_size, model_cfg, mesh, seq_len, resident=policy
  )
  return [generate, *engine, *scoring]


# --------------------------------------------------------------------------- files


def read_pool_file(path: Path) -> list[tuple[str, dict[str, Any]]]:
  """`(key, entry)` per line of a `pool.jsonl` (`rejection_sampling.pool_entry`); a bad line
  is a ValueError naming the file and line."""
  rows = []
  with open(path) as f:
    for line_number, line in enumerate(f, 1):
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line_number}: not a pool entry ({e!r})") from None
      try:
        rows.append(rs_lib.pool_entry(row))
      except ValueError as e:
        raise ValueError(f"{path}:{line_number}: {e}") from None
  return rows


def read_pool(workdirs: Sequence[str]) -> tuple[dict[str, dict[str, Any]], list[dict]]:
  """`(entries by prompt key, round statistics)` of earlier rounds' workdirs.

  Each workdir's pool already holds the rounds before it, so listing only the latest round
  is enough; listing several takes the best entry per prompt among them
  (`rejection_sampling.merge_pools`; the scores are re-scored anyway).
  """
  pools, stats = [], {}
  for workdir in workdirs:
    pool_file, stats_file = Path(workdir, POOL_FILE), Path(workdir, STATS_FILE)
    for path in (pool_file, stats_file):
      if not path.exists():
        raise FileNotFoundError(
          f"pool_from={workdir!r}: no {path.name}; not a rejection-sampling workdir"
        )
    pools.append(read_pool_file(pool_file))
    for row in atomic.read_json(stats_file)["rounds"]:  # DamagedFileError names the file
      stats[row["round"]] = row
  return rs_lib.merge_pools(pools), [stats[r] for r in sorted(stats)]


# --------------------------------------------------------------------------- reporting


def plot_rounds(path: str | Path, stats: Sequence[dict[str, Any]]) -> Path:
  """PNG: best / median / mean score per round, and the latest round's best-of-n curve."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(10, 3.5), layout="constrained")
  FigureCanvasAgg(fig)
  left, right = fig.subplots(1, 2)
  rounds = [s["round"] for s in stats]
  for name, style in (("best", "o-"), ("median", "s--"), ("mean", "^:")):
    left.plot(rounds, [s[f"score/{name}"] for s in stats], style, label=f"{name} of K")
  left.set(title="score per round", xlabel="round", ylabel="score", xticks=rounds)
  left.legend()
  curve = stats[-1]["best_of_n"]
  right.plot(range(1, len(curve) + 1), curve, "o-")
  right.set(title=f"round {rounds[-1]}: expected best of n", xlabel="n samples", ylabel="score")
  with atomic.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=100)
  return Path(path)


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
  atomic.write_jsonl(path, rows)  # a later round's `pool_from` never reads half a pool


# --------------------------------------------------------------------------- the round


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """One rejection-sampling round into `workdir`; returns this round's statistics (see
  `llama_jax.rl.rejection_sampling.round_stats`, plus pool/* counts, check/* accuracies and
  tokens/s)."""
  sections.check_config(cfg, sections.reference_config("rejection_sampling"))
  sharding.initialize_distributed()
  policy = models.load_policy(cfg)
  scorer = scorers.scorer_from_section(cfg.scorer, policy.tokenizer, mesh=policy.mesh)
  earlier, earlier_stats = read_pool([p.strip() for p in cfg.pool_from.split(",") if p.strip()])
  round_index = cfg.round or 1 + max((s["round"] for s in earlier_stats), default=0)

  records = data_sources.prompt_records(cfg.data)
  gen = sections.generation_config(cfg, policy.tokenizer.stop_ids, policy.tokenizer.pad_id)
  samples, current, all_scores, num_tokens, seconds = [], {}, [], 0, 0.0
  for batch, out, batch_seconds in rollouts.sample_batches(
    policy.config, policy.params, policy.tokenizer, records, gen,
    batch_size=cfg.data.batch_size, seed=cfg.generation.seed, chat=cfg.chat, mesh=policy.mesh,
  ):  # fmt: skip
    seconds += batch_seconds
    num_tokens += int(out.mask.sum())
    selection = select_best(scorer, batch, out.texts, out)
    batch_samples, entries = rs_lib.round_entries(batch, selection, round_index)
    samples += batch_samples
    current |= entries
    all_scores.append(selection.scores)
    log.info(
      "round %d: %d / %d prompts sampled and scored", round_index, len(samples), len(records)
    )

  earlier = rs_lib.rescore(scorer, earlier) if cfg.rescore_pool else earlier
  pool = rs_lib.pool_answers(current, earlier)
  stats = (
    rs_lib.round_stats(np.concatenate(all_scores), round_index)
    | rs_lib.pool_stats(pool, current, round_index)
    | {"tokens_per_second": num_tokens / max(seconds, 1e-9)}
    | rs_lib.check_stats(samples)
  )
  history = [s for s in earlier_stats if s["round"] != round_index] + [stats]

  if jax.process_index() == 0:
    out_dir = Path(workdir)
    os.makedirs(out_dir, exist_ok=True)
    atomic.write_text(out_dir / "experiment_config.json", cfg.to_json_best_effort(indent=2))
    _write_jsonl(out_dir / SAMPLES_FILE, samples)
    _write_jsonl(out_dir / POOL_FILE, [{"key": k} | e for k, e in pool.items()])
    _write_jsonl(out_dir / SFT_FILE, [rs_lib.sft_record(e) for e in rs_lib.kept_answers(pool)])
    builders.build_dataset(
      "sft", cfg.output.name, {"train": [out_dir / SFT_FILE]}, out_dir / TFDS_DIR, force=True
    )
    atomic.write_json(out_dir / STATS_FILE, {"round": round_index, "rounds": history}, indent=2)
    plot_rounds(out_dir / PLOT_FILE, history)
  multihost_utils.sync_global_devices("rejection_sampling: written")
  log.info("Rejection sampling, round %d:\n%s", round_index, rs_lib.stats_table(history))
  return stats


if __name__ == "__main__":
  runs.launch(run)
