"""Rejection sampling: K samples per prompt from the current policy, the best one kept as SFT
data, pooled with the best answers of every earlier round (Llama 2 section 3.2.3; Llama 3
section 4.2.2).

    python -m experiments.rejection_sampling \
      --config=experiments/configs/rejection_sampling.py:tiny --workdir=DIR \
      --config.init_from=SFT_WORKDIR --config.reward.reward_model=RM_WORKDIR \
      [--config.pool_from=ROUND1_DIR,ROUND2_DIR]

One invocation is one round. Its answers are pooled with the `pool.jsonl` of each workdir in
`pool_from` (which already holds the rounds before it): per prompt, the highest-scoring of
this round's best sample and the earlier rounds' kept answers, the latter re-scored with this
round's scorer so that every answer is judged by the same reward model (Llama 2 retrained its
RMs between rounds). Llama 2 found that keeping only the latest round's samples let the model
regress on capabilities it had before; pooling all rounds fixed it.

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
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.experimental import multihost_utils

from experiments import common
from experiments import generate as generate_experiment
from llama_jax import aot, reward_model, rewards, rollouts, sharding
from llama_jax.data import builders, scoring
from llama_jax.data.records import prompt_messages
from llama_jax.generation import score_candidates

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
POOL_FILE = "pool.jsonl"
SFT_FILE = "sft.jsonl"
STATS_FILE = "rejection_sampling.json"
PLOT_FILE = "rejection_sampling.png"
TFDS_DIR = "tfds"
SCORER_KINDS = ("reward_model", "llama2", "check_answer")

# The project's scorer signature, `(records, prompts, responses) -> scores`: flat aligned lists,
# one rl_prompt record per response (prompts[i] is records[i]["prompt"]).
RecordScorer = Callable[[Sequence[dict[str, Any]], Sequence[Any], Sequence[str]], Sequence[float]]


# --------------------------------------------------------------------------- scoring


def build_scorer(cfg: ml_collections.ConfigDict, tokenizer, mesh) -> RecordScorer:
  """The `reward` section as a scorer `(records, prompts, responses) -> scores`.

  kind "reward_model": the raw score of the RM in `reward_model`; "llama2": logit(R_c) of
  the helpfulness and safety RMs in `helpful` and `safety` (`rewards.combine_llama2_rewards`
  with `threshold`; the safety branch is taken for prompts whose concern is "safety"),
  whitened as `whitening` says (selection only compares, so rejection sampling leaves it
  "none"; Llama 2's PPO whitens with running statistics); "check_answer": 1 for a
  right answer, 0 otherwise (`llama_jax.data.scoring`; records need a reference or a safety
  label).
  """
  if cfg.kind not in SCORER_KINDS:
    raise ValueError(f"reward.kind={cfg.kind!r}; expected one of {SCORER_KINDS}")
  if cfg.kind == "check_answer":
    return rollouts.check_answer_reward

  def rm(field: str) -> rewards.RewardScorer:
    if not cfg[field]:
      raise ValueError(f"reward.kind={cfg.kind!r} needs reward.{field}: a reward-model workdir")
    return rewards.RewardScorer.from_workdir(
      cfg[field], tokenizer, mesh=mesh, batch_size=cfg.batch_size
    )

  if cfg.kind == "reward_model":
    scorer = rm("reward_model")
    return lambda records, prompts, responses: scorer(prompts, responses)
  combined = rewards.Llama2Scorer(
    rm("helpful"), rm("safety"), threshold=cfg.threshold, whitening=cfg.get("whitening", "none")
  )
  return lambda records, prompts, responses: combined(
    prompts,
    responses,
    is_safety=[r["concern"] == "safety" for r in records],
  )


def score_records(
  scorer: RecordScorer, records: Sequence[dict[str, Any]], candidates: Sequence[Sequence[str]]
) -> np.ndarray:
  """Scores [B, K] of candidates [B][K] to `records` (`score_candidates`' checks, one call)."""
  by_record = lambda recs, ys: scorer(recs, [r["prompt"] for r in recs], ys)
  return score_candidates(by_record, records, candidates)


def reward_model_params(cfg: ml_collections.ConfigDict, model_cfg, mesh) -> dict[str, Any]:
  """Abstract parameters of the reward models the `reward` section loads, by field name
  (none for check_answer). Their architecture is assumed to be the policy's (Llama 2 and 3
  initialize their RMs from the chat model or the pre-trained one)."""
  fields = {"reward_model": ("reward_model",), "llama2": ("helpful", "safety")}.get(cfg.kind, ())
  shapes = reward_model.abstract_params(model_cfg)
  placed = aot.abstract(shapes, reward_model.param_shardings(model_cfg, mesh))
  return dict.fromkeys(fields, placed)


def scorer_programs(
  cfg: ml_collections.ConfigDict, model_cfg, mesh, seq_len: int, resident=()
) -> list[aot.Program]:
  """The reward models' scoring pass over `reward.batch_size` rows of `seq_len` tokens (as
  `rewards.RewardScorer` pads them), once per RM; the other RMs count as resident."""
  rms = reward_model_params(cfg, model_cfg, mesh)
  if not rms:
    return []
  sharding.check_batch_fits_mesh(cfg.batch_size, mesh, "reward.batch_size")
  rows = sharding.named_sharding(mesh, ("act_batch", "act_seq"))
  batch = aot.rows(rows, cfg.batch_size, seq_len, ("tokens", "segment_ids"))
  score = rewards.make_score_fn(model_cfg, mesh)
  flops = reward_model.flops_per_token(model_cfg, seq_len) / 3 * cfg.batch_size * seq_len
  out = []
  for name, params in rms.items():
    others = [p for n, p in rms.items() if n != name]
    out.append(aot.Program(f"score[{name}]", score, (params, batch["tokens"],
               batch["segment_ids"]), flops, resident=(others, resident),
               note=f"{cfg.batch_size} × {seq_len}"))  # fmt: skip
  return out


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """Sampling K answers per prompt and scoring them (`experiments.compile_check`): the
  policy and every reward model are on the devices together."""
  common.check_config(cfg, common.reference_config("rejection_sampling"))
  model_cfg = common.model_config(cfg)
  sharding.check_fits_mesh(model_cfg, mesh)
  gen = generate_experiment.check_generation_config(cfg, model_cfg)
  policy = sharding.abstract_sharded_params(model_cfg, mesh)
  generate = generate_experiment.generation_program(
    model_cfg, gen, cfg.data.batch_size, assumed.prompt_len, mesh,
    resident=reward_model_params(cfg.reward, model_cfg, mesh),
  )  # fmt: skip
  seq_len = rollouts.row_length([[0] * assumed.prompt_len], gen.max_new_tokens, 64)
  return [generate, *scorer_programs(cfg.reward, model_cfg, mesh, seq_len, resident=policy)]


# --------------------------------------------------------------------------- selection


def prompt_key(record: dict[str, Any]) -> str:
  """What identifies a prompt across rounds: its id, else its messages."""
  return record["id"] if record.get("id") else json.dumps(prompt_messages(record["prompt"]))


def expected_best_of_n(scores: np.ndarray) -> np.ndarray:
  """[K] the expected maximum score of n samples, n = 1..K, averaged over prompts.

  For each prompt the unbiased estimate from its K samples: of the C(K, n) subsets of size n,
  C(i − 1, n − 1) have the i-th smallest score as their maximum (Llama 2, Figure 7's curve).
  """
  b, k = scores.shape
  ordered = np.sort(scores, axis=1)  # ascending: rank i = 1..K
  curve = np.empty(k)
  for n in range(1, k + 1):
    weights = np.array([math.comb(i - 1, n - 1) for i in range(1, k + 1)]) / math.comb(k, n)
    curve[n - 1] = float((ordered @ weights).mean())
  return curve


def round_stats(scores: np.ndarray, round_index: int) -> dict[str, Any]:
  """Reward statistics of one round's samples [prompts, K]: best (max over K), median and
  mean, each averaged over prompts, and the expected best-of-n curve."""
  best, median = scores.max(axis=1), np.median(scores, axis=1)
  return {
    "round": round_index,
    "prompts": int(scores.shape[0]),
    "samples_per_prompt": int(scores.shape[1]),
    "reward/best": float(best.mean()),
    "reward/median": float(median.mean()),
    "reward/mean": float(scores.mean()),
    "reward/best_minus_median": float((best - median).mean()),
    "best_of_n": expected_best_of_n(scores).tolist(),
  }


def pool_answers(
  current: dict[str, dict[str, Any]], earlier: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
  """Per prompt key, the higher-scoring of this round's entry and the earlier rounds' one
  (this round's on ties); prompts seen in only one of them are kept as they are. Entries are
  `{"record", "response", "score", "round"}`, all scored by the same scorer."""
  pooled = dict(earlier)
  for key, entry in current.items():
    if key not in pooled or entry["score"] >= pooled[key]["score"]:
      pooled[key] = entry
  return pooled


def read_pool(workdirs: Sequence[str]) -> tuple[dict[str, dict[str, Any]], list[dict]]:
  """`(entries by prompt key, round statistics)` of earlier rounds' workdirs.

  Each workdir's pool already holds the rounds before it, so listing only the latest round
  is enough; listing several takes the best entry per prompt among them (by their own
  scores, which are re-scored anyway).
  """
  entries: dict[str, dict[str, Any]] = {}
  stats: dict[int, dict] = {}
  for workdir in workdirs:
    pool_file, stats_file = Path(workdir, POOL_FILE), Path(workdir, STATS_FILE)
    for path in (pool_file, stats_file):
      if not path.exists():
        raise FileNotFoundError(
          f"pool_from={workdir!r}: no {path.name}; not a rejection-sampling workdir"
        )
    with open(pool_file) as f:
      for line_number, line in enumerate(f, 1):
        try:
          entry = json.loads(line)
          key = entry.pop("key")
          entry["record"]["prompt"], entry["response"], entry["score"], entry["round"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
          raise ValueError(f"{pool_file}:{line_number}: not a pool entry ({e!r})") from None
        if key not in entries or entry["score"] > entries[key]["score"]:
          entries[key] = entry
    for row in json.loads(stats_file.read_text())["rounds"]:
      stats[row["round"]] = row
  return entries, [stats[r] for r in sorted(stats)]


def rescore(scorer: RecordScorer, entries: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """The entries with scores from `scorer` (one call over all of them)."""
  if not entries:
    return {}
  keys = list(entries)
  scores = score_records(
    scorer, [entries[k]["record"] for k in keys], [[entries[k]["response"]] for k in keys]
  )[:, 0]
  return {k: entries[k] | {"score": float(s)} for k, s in zip(keys, scores, strict=True)}


def sft_record(entry: dict[str, Any]) -> dict[str, Any]:
  """The `sft` record of a pooled answer: the prompt's messages, then the answer."""
  messages = prompt_messages(entry["record"]["prompt"])
  record = {"messages": [*messages, {"role": "assistant", "content": entry["response"]}]}
  if entry["record"].get("id"):
    record["id"] = entry["record"]["id"]
  return record


# --------------------------------------------------------------------------- reporting


def plot_rounds(path: str | Path, stats: Sequence[dict[str, Any]]) -> Path:
  """PNG: best / median / mean reward per round, and the latest round's best-of-n curve."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(10, 3.5), layout="constrained")
  FigureCanvasAgg(fig)
  left, right = fig.subplots(1, 2)
  rounds = [s["round"] for s in stats]
  for name, style in (("best", "o-"), ("median", "s--"), ("mean", "^:")):
    left.plot(rounds, [s[f"reward/{name}"] for s in stats], style, label=f"{name} of K")
  left.set(title="reward per round", xlabel="round", ylabel="reward", xticks=rounds)
  left.legend()
  curve = stats[-1]["best_of_n"]
  right.plot(range(1, len(curve) + 1), curve, "o-")
  right.set(title=f"round {rounds[-1]}: expected best of n", xlabel="n samples", ylabel="reward")
  fig.savefig(path, dpi=100)
  return Path(path)


def stats_table(stats: Sequence[dict[str, Any]]) -> str:
  """Markdown table of the per-round statistics."""
  lines = [
    "| round | prompts | K | best | median | mean | best − median | pooled |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for s in stats:
    lines.append(
      f"| {s['round']} | {s['prompts']} | {s['samples_per_prompt']} | {s['reward/best']:.3f} | "
      f"{s['reward/median']:.3f} | {s['reward/mean']:.3f} | "
      f"{s['reward/best_minus_median']:.3f} | {s.get('pool/size', '')} |"
    )
  return "\n".join(lines)


def _write_jsonl(path: Path, rows: Sequence[dict[str, Any]]) -> None:
  with open(path, "w") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


# --------------------------------------------------------------------------- the round


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """One rejection-sampling round into `workdir`; returns this round's statistics (see
  `round_stats`, plus pool/* counts, check/* accuracies and tokens/s)."""
  common.check_config(cfg, common.reference_config("rejection_sampling"))
  sharding.initialize_distributed()
  tokenizer, mesh, model_cfg, params = generate_experiment.load_policy(cfg)
  scorer = build_scorer(cfg.reward, tokenizer, mesh)
  earlier, earlier_stats = read_pool([p.strip() for p in cfg.pool_from.split(",") if p.strip()])
  round_index = cfg.round or 1 + max((s["round"] for s in earlier_stats), default=0)

  records = generate_experiment.prompt_records(cfg.data)
  samples, current, all_scores, num_tokens, seconds = [], {}, [], 0, 0.0
  for batch, out, batch_seconds in generate_experiment.sample_batches(
    cfg, model_cfg, params, tokenizer, records, mesh
  ):
    seconds += batch_seconds
    num_tokens += int(out.mask.sum())
    scores = score_records(scorer, batch, out.texts)
    for record, texts, row in zip(batch, out.texts, scores, strict=True):
      best = int(np.argmax(row))  # the first of tied maxima
      key = prompt_key(record)
      samples.append({"key": key, "record": record, "responses": texts,
                      "scores": row.tolist(), "best": best})  # fmt: skip
      current[key] = {"record": record, "response": texts[best], "score": float(row[best]),
                      "round": round_index}  # fmt: skip
    all_scores.append(scores)
    log.info(
      "round %d: %d / %d prompts sampled and scored", round_index, len(samples), len(records)
    )

  earlier = rescore(scorer, earlier) if cfg.rescore_pool else earlier
  pool = pool_answers(current, earlier)
  kept = [e for e in pool.values() if e["response"].strip()]
  stats = round_stats(np.concatenate(all_scores), round_index) | {
    "pool/size": len(kept),
    "pool/from_this_round": sum(e["round"] == round_index for e in kept),
    "pool/earlier_answer_kept": sum(k in current and pool[k]["round"] != round_index for k in pool),
    "pool/dropped_empty": len(pool) - len(kept),
    "tokens_per_second": num_tokens / max(seconds, 1e-9),
  }
  checkable = [i for i, s in enumerate(samples) if _checkable(s["record"])]
  if checkable:  # a check that does not use the reward model: is the kept answer right?
    picked = [samples[i] for i in checkable]
    stats["check/best"] = float(
      np.mean([scoring.check_answer(s["record"], s["responses"][s["best"]]) for s in picked])
    )
    stats["check/all_samples"] = float(np.mean(
      [scoring.check_answer(s["record"], y) for s in picked for y in s["responses"]]))  # fmt: skip
  history = [s for s in earlier_stats if s["round"] != round_index] + [stats]

  if jax.process_index() == 0:
    out_dir = Path(workdir)
    os.makedirs(out_dir, exist_ok=True)
    (out_dir / "experiment_config.json").write_text(cfg.to_json_best_effort(indent=2))
    _write_jsonl(out_dir / SAMPLES_FILE, samples)
    _write_jsonl(out_dir / POOL_FILE, [{"key": k} | e for k, e in pool.items()])
    _write_jsonl(out_dir / SFT_FILE, [sft_record(e) for e in kept])
    builders.build_dataset(
      "sft", cfg.output.name, {"train": [out_dir / SFT_FILE]}, out_dir / TFDS_DIR, force=True
    )
    (out_dir / STATS_FILE).write_text(
      json.dumps({"round": round_index, "rounds": history}, indent=2)
    )
    plot_rounds(out_dir / PLOT_FILE, history)
  multihost_utils.sync_global_devices("rejection_sampling: written")
  log.info("Rejection sampling, round %d:\n%s", round_index, stats_table(history))
  return stats


def _checkable(record: dict[str, Any]) -> bool:
  return (
    bool(record.get("is_unsafe"))
    or record.get("concern") == "safety"
    or scoring.has_reference(record)
  )


def main(argv):
  del argv
  common.setup_logging()
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  common.define_flags()
  app.run(main)
