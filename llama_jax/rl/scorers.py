"""Scorers: the one signature every generate-then-score stage calls.

    scorer = build_scorer("check_answer")                          # or "reward_model", "llama2"
    scores = score(scorer, records, responses)                     # np.float64 [N], checked

A `Scorer` is any function `(records, prompts, responses) -> scores [N]` over flat, aligned
lists: `records[i]` is the record (an `rl_prompt` row, or just `{"prompt": ...}`) whose prompt
`prompts[i]` (`records[i]["prompt"]`) was answered by `responses[i]`. Records carry what a
programmatic check needs (references, safety labels); prompts are what a reward model reads.
Best-of-K (`llama_jax.rl.best_of_k`), rejection sampling, PPO and GRPO
(`llama_jax.rl.online`) and `experiments.generate` all take one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from llama_jax.data import scoring

Record = dict[str, Any]
Scorer = Callable[[Sequence[Record], Sequence[Any], Sequence[str]], Sequence[float]]
SCORER_KINDS = ("reward_model", "llama2", "check_answer")


def check_answer(
  records: Sequence[Record], prompts: Sequence[Any], responses: Sequence[str]
) -> list[float]:
  """1 for a right answer, 0 otherwise (`llama_jax.data.scoring.check_answer`; records need a
  reference or a safety label)."""
  del prompts  # the records hold the references
  return [scoring.check_answer(r, y) for r, y in zip(records, responses, strict=True)]


def from_prompt_scorer(fn: Callable[[Sequence[Any], Sequence[Any]], Sequence[float]]) -> Scorer:
  """A `Scorer` from a function of `(prompts, responses)` alone (a `rewards.RewardScorer`)."""
  return lambda records, prompts, responses: fn(prompts, responses)


def llama2(combined) -> Scorer:
  """A `Scorer` from a `rewards.Llama2Scorer`: the safety branch is taken for records whose
  concern is "safety"."""
  return lambda records, prompts, responses: combined(
    prompts, responses, is_safety=[r.get("concern") == "safety" for r in records]
  )


def build_scorer(
  kind: str,
  tokenizer=None,
  *,
  mesh=None,
  reward_model: str = "",
  helpful: str = "",
  safety: str = "",
  threshold: float = 0.15,
  whitening: str = "none",
  batch_size: int = 32,
) -> Scorer:
  """The scorer of `kind`.

  "check_answer": `check_answer` (no model). "reward_model": the raw score of the RM in the
  workdir `reward_model`. "llama2": logit(R_c) of the helpfulness and safety RM workdirs
  `helpful` and `safety` (`rewards.Llama2Scorer` with `threshold`), whitened as `whitening`
  says (selection only compares, so rejection sampling leaves it "none"; Llama 2's PPO
  whitens with running statistics). `batch_size`: rows per RM forward pass.
  """
  if kind not in SCORER_KINDS:
    raise ValueError(f"reward.kind={kind!r}; expected one of {SCORER_KINDS}")
  if kind == "check_answer":
    return check_answer
  from llama_jax.rl import rewards  # loads the model stack; check_answer does not need it

  def rm(field: str, workdir: str) -> rewards.RewardScorer:
    if not workdir:
      raise ValueError(f"reward.kind={kind!r} needs reward.{field}: a reward-model workdir")
    return rewards.RewardScorer.from_workdir(workdir, tokenizer, mesh=mesh, batch_size=batch_size)

  if kind == "reward_model":
    return from_prompt_scorer(rm("reward_model", reward_model))
  return llama2(
    rewards.Llama2Scorer(
      rm("helpful", helpful), rm("safety", safety), threshold=threshold, whitening=whitening
    )
  )


def score(scorer: Scorer, records: Sequence[Record], responses: Sequence[str]) -> np.ndarray:
  """np.float64 [N]: `scorer` on the aligned records and responses (prompts read from the
  records), checked to give one finite score per response."""
  if len(records) != len(responses):
    raise ValueError(f"{len(records)} records but {len(responses)} responses")
  scores = np.asarray(scorer(records, [r["prompt"] for r in records], responses), np.float64)
  if scores.shape != (len(responses),):
    raise ValueError(
      f"the scorer returned shape {scores.shape} for {len(responses)} (prompt, response) "
      "pairs; expected one score per pair"
    )
  if not np.isfinite(scores).all():
    bad = int(np.flatnonzero(~np.isfinite(scores))[0])
    raise ValueError(f"the scorer returned {scores[bad]} for pair {bad}")
  return scores
