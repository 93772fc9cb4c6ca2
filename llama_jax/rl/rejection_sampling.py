"""Rejection sampling's bookkeeping: the best of K per prompt, pooled across rounds, re-scored,
and the statistics of each round (Llama 2 section 3.2.3; Llama 3 section 4.2.2).

    selection = select_best(scorer, records, candidates)          # llama_jax.generation
    samples, current = round_entries(records, selection, round_index)
    pool = pool_answers(current, rescore(scorer, earlier))
    stats = round_stats(scores, round_index) | pool_stats(pool, current, round_index)

A pool entry is `{"record", "response", "score", "round"}`: the kept answer to one prompt (by
`prompt_key`), its score and the round that sampled it. Every answer in a pool is judged by the
same scorer: earlier rounds' answers are re-scored with this round's (Llama 2 retrained its
RMs between rounds), and pooling every round keeps the model from regressing on what it could
do before. `experiments.rejection_sampling` reads and writes the files around these.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from llama_jax.data import scoring
from llama_jax.data.records import prompt_messages
from llama_jax.rl.best_of_k import BestOfK, score_candidates
from llama_jax.rl.scorers import Scorer

Entry = dict[str, Any]
Pool = dict[str, Entry]
ENTRY_FIELDS = ("record", "response", "score", "round")


def prompt_key(record: Mapping[str, Any]) -> str:
  """What identifies a prompt across rounds: its id, else its messages."""
  return record["id"] if record.get("id") else json.dumps(prompt_messages(record["prompt"]))


def round_entries(
  records: Sequence[dict[str, Any]], selection: BestOfK, round_index: int
) -> tuple[list[dict[str, Any]], Pool]:
  """`(samples, entries)` of one batch: per record a sample row `{"key", "record",
  "responses", "scores", "best"}` and its pool entry (the best response)."""
  samples, entries = [], {}
  for record, texts, row, best in zip(
    records, selection.candidates, selection.scores, selection.best_index, strict=True
  ):
    key, best = prompt_key(record), int(best)
    samples.append({"key": key, "record": record, "responses": list(texts),
                    "scores": row.tolist(), "best": best})  # fmt: skip
    entries[key] = {"record": record, "response": texts[best], "score": float(row[best]),
                    "round": round_index}  # fmt: skip
  return samples, entries


def expected_best_of_n(scores: np.ndarray) -> np.ndarray:
  """[K] the expected maximum score of n samples, n = 1..K, averaged over prompts.

  For each prompt the unbiased estimate from its K samples: of the C(K, n) subsets of size n,
  C(i − 1, n − 1) have the i-th smallest score as their maximum (Llama 2, Figure 7's curve).
  """
  _, k = scores.shape
  ordered = np.sort(scores, axis=1)
  return np.array([float((ordered @ order_weights(k, n, n - 1)).mean()) for n in range(1, k + 1)])


def order_weights(k: int, n: int, j: int) -> np.ndarray:
  """[K] the probability that the i-th smallest of K samples (i = 0..K−1) is the j-th
  smallest (j = 0..n−1) of a uniformly random subset of n of them: C(i, j)·C(K−1−i, n−1−j)
  / C(K, n). Weighting sorted per-prompt values with it gives unbiased best-of-n curves."""
  if not 0 <= j < n <= k:
    raise ValueError(f"need 0 <= j < n <= K, got j={j}, n={n}, K={k}")
  return np.array([math.comb(i, j) * math.comb(k - 1 - i, n - 1 - j) for i in range(k)]) / (
    math.comb(k, n)
  )


def best_of_n_curves(scores: np.ndarray, gold: np.ndarray, ns: Sequence[int]) -> dict[str, list]:
  """Expected curves over n (random n of each prompt's K samples, averaged over prompts):
  `max` (the best score, Llama 2 Figure 7), `median` (of the n scores) and `gold_at_max`
  (a program's check of the sample the scorer picks, ties broken by sample order).
  scores, gold: [prompts, K]."""
  order = np.argsort(scores, axis=1, kind="stable")
  ranked = np.take_along_axis(scores, order, 1)
  ranked_gold = np.take_along_axis(np.asarray(gold, np.float64), order, 1)
  k = scores.shape[1]
  curves: dict[str, list] = {"n": list(ns), "max": [], "median": [], "gold_at_max": []}
  for n in ns:
    top = order_weights(k, n, n - 1)
    median = (order_weights(k, n, (n - 1) // 2) + order_weights(k, n, n // 2)) / 2
    curves["max"].append(float((ranked @ top).mean()))
    curves["median"].append(float((ranked @ median).mean()))
    curves["gold_at_max"].append(float((ranked_gold @ top).mean()))
  return curves


def round_stats(scores: np.ndarray, round_index: int) -> dict[str, Any]:
  """Reward statistics of one round's samples [prompts, K]: best (max over K), median and
  mean, each averaged over prompts, and the expected best-of-n curve."""
  best, median = scores.max(axis=1), np.median(scores, axis=1)
  return {
    "round": round_index,
    "prompts": int(scores.shape[0]),
    "samples_per_prompt": int(scores.shape[1]),
    "score/best": float(best.mean()),
    "score/median": float(median.mean()),
    "score/mean": float(scores.mean()),
    "score/best_minus_median": float((best - median).mean()),
    "best_of_n": expected_best_of_n(scores).tolist(),
  }


def pool_answers(current: Pool, earlier: Pool) -> Pool:
  """Per prompt key, the higher-scoring of this round's entry and the earlier rounds' one
  (this round's on ties); prompts seen in only one of them are kept as they are. All entries
  must have been scored by the same scorer."""
  pooled = dict(earlier)
  for key, entry in current.items():
    if key not in pooled or entry["score"] >= pooled[key]["score"]:
      pooled[key] = entry
  return pooled


def pool_entry(row: Mapping[str, Any]) -> tuple[str, Entry]:
  """`(key, entry)` of a stored pool row `{"key", "record", "response", "score", "round"}`;
  a ValueError names what is missing."""
  try:
    entry = {k: row[k] for k in ENTRY_FIELDS}
    entry["record"]["prompt"]
    return row["key"], entry
  except (KeyError, TypeError) as e:
    raise ValueError(f"not a pool entry ({e!r})") from None


def merge_pools(pools: Iterable[Iterable[tuple[str, Entry]]]) -> Pool:
  """The best entry per key among earlier rounds' pools (by their own scores; the first on
  ties). Each round's pool already holds the rounds before it, so one pool is enough."""
  merged: Pool = {}
  for pool in pools:
    for key, entry in pool:
      if key not in merged or entry["score"] > merged[key]["score"]:
        merged[key] = entry
  return merged


def rescore(scorer: Scorer, entries: Pool) -> Pool:
  """The entries with scores from `scorer` (one call over all of them)."""
  if not entries:
    return {}
  keys = list(entries)
  scores = score_candidates(
    scorer, [entries[k]["record"] for k in keys], [[entries[k]["response"]] for k in keys]
  )[:, 0]
  return {k: entries[k] | {"score": float(s)} for k, s in zip(keys, scores, strict=True)}


def kept_answers(pool: Pool) -> list[Entry]:
  """The pool's entries with a non-empty answer (what the next SFT round trains on)."""
  return [e for e in pool.values() if e["response"].strip()]


def pool_stats(pool: Pool, current: Pool, round_index: int) -> dict[str, int]:
  """pool/* counts: kept answers, how many from this round, prompts of this round whose
  earlier answer won, and empty answers dropped."""
  kept = kept_answers(pool)
  return {
    "pool/size": len(kept),
    "pool/from_this_round": sum(e["round"] == round_index for e in kept),
    "pool/earlier_answer_kept": sum(k in current and pool[k]["round"] != round_index for k in pool),
    "pool/dropped_empty": len(pool) - len(kept),
  }


def checkable(record: Mapping[str, Any]) -> bool:
  """Whether `scoring.check_answer` can judge answers to the record."""
  return (
    bool(record.get("is_unsafe"))
    or record.get("concern") == "safety"
    or scoring.has_reference(record)
  )


def check_stats(samples: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """check/* accuracies, a check that does not use the scorer: of the kept answers
  (`check/best`) and of every sample (`check/all_samples`), over the checkable records
  (none if there are none)."""
  picked = [s for s in samples if checkable(s["record"])]
  if not picked:
    return {}
  check = scoring.check_answer
  return {
    "check/best": float(np.mean([check(s["record"], s["responses"][s["best"]]) for s in picked])),
    "check/all_samples": float(
      np.mean([check(s["record"], y) for s in picked for y in s["responses"]])
    ),
  }


def sft_record(entry: Entry) -> dict[str, Any]:
  """The `sft` record of a pooled answer: the prompt's messages, then the answer."""
  messages = prompt_messages(entry["record"]["prompt"])
  record = {"messages": [*messages, {"role": "assistant", "content": entry["response"]}]}
  if entry["record"].get("id"):
    record["id"] = entry["record"]["id"]
  return record


def stats_table(stats: Sequence[Mapping[str, Any]]) -> str:
  """Markdown table of the per-round statistics."""
  lines = [
    "| round | prompts | K | best | median | mean | best − median | pooled |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for s in stats:
    lines.append(
      f"| {s['round']} | {s['prompts']} | {s['samples_per_prompt']} | {s['score/best']:.3f} | "
      f"{s['score/median']:.3f} | {s['score/mean']:.3f} | "
      f"{s['score/best_minus_median']:.3f} | {s.get('pool/size', '')} |"
    )
  return "\n".join(lines)
