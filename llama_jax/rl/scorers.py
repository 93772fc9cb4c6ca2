"""Scorers: the one signature every generate-then-score stage calls.

    scorer = build_scorer("check_answer")                          # or "reward_model", "llama2"
    scores = score(scorer, records, responses)                     # np.float64 [N], checked

A response's score is what a scorer says of it; online RL's reward adds penalties to it
(`llama_jax.rl.online`).

A `Scorer` is any function `(records, prompts, responses) -> scores [N]` over flat, aligned
lists: `records[i]` is the record (an `rl_prompt` row, or just `{"prompt": ...}`) whose prompt
`prompts[i]` (`records[i]["prompt"]`) was answered by `responses[i]`. Records carry what a
programmatic check needs (references, safety labels); prompts are what a reward model reads.
Best-of-K (`llama_jax.rl.best_of_k`), rejection sampling, PPO and GRPO
(`llama_jax.rl.online`) and `experiments.generate` all take one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from llama_jax.data import scoring

Record = dict[str, Any]
Scorer = Callable[[Sequence[Record], Sequence[Any], Sequence[str]], Sequence[float]]
SCORER_KINDS = ("reward_model", "llama2", "check_answer")
# The reward-model workdirs each kind loads, by `build_scorer` argument.
REWARD_MODEL_FIELDS = {"reward_model": ("reward_model",), "llama2": ("helpful", "safety")}


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


def scorer_from_section(section: Mapping[str, Any], tokenizer=None, *, mesh=None) -> Scorer:
  """`build_scorer` of a config section (a mapping with `kind` and any of `build_scorer`'s
  keyword arguments; other keys are ignored): every generate-then-score stage (generation,
  rejection sampling, GRPO, PPO) builds its scorer from its `reward` section here."""
  names = set(inspect.signature(build_scorer).parameters) - {"kind", "tokenizer", "mesh"}
  options = {k: section[k] for k in names if k in section}
  return build_scorer(section["kind"], tokenizer, mesh=mesh, **options)


def reward_model_params(kind: str, config, mesh) -> dict[str, Any]:
  """Abstract parameters (shapes and shardings on `mesh`) of the reward models a scorer of
  `kind` loads, by `build_scorer` argument (none for check_answer). Their architecture is
  assumed to be `config`, the policy's (Llama 2 and 3 initialize their RMs from the chat
  model or the pre-trained one)."""
  from llama_jax.model import reward_model  # noqa: PLC0415  (the model stack, as above)
  from llama_jax.parallel import aot, sharding  # noqa: PLC0415

  shapes = reward_model.abstract_params(config)
  rm_shardings = sharding.param_shardings(reward_model.RewardModel(config), mesh)
  return dict.fromkeys(REWARD_MODEL_FIELDS.get(kind, ()), aot.abstract(shapes, rm_shardings))


def reward_model_programs(kind: str, batch_size: int, config, mesh, seq_len: int, resident=()):
  """The reward models' scoring pass (`aot.Program`s, one per RM of `kind`; the other RMs
  count as resident) over `batch_size` rows of `seq_len` tokens, as `rewards.RewardScorer`
  pads them, for ahead-of-time compile-and-fit checks."""
  from llama_jax.model import reward_model  # noqa: PLC0415
  from llama_jax.parallel import aot, sharding  # noqa: PLC0415
  from llama_jax.rl import rewards  # noqa: PLC0415

  rms = reward_model_params(kind, config, mesh)
  if not rms:
    return []
  sharding.check_batch_fits_mesh(batch_size, mesh, "reward.batch_size")
  rows = sharding.named_sharding(mesh, ("act_batch", "act_seq"))
  batch = aot.rows(rows, batch_size, seq_len, ("tokens", "segment_ids"))
  score_fn = rewards.make_score_fn(config, mesh)
  flops = reward_model.flops_per_token(config, seq_len) / 3 * batch_size * seq_len
  out = []
  for name, params in rms.items():
    others = [p for n, p in rms.items() if n != name]
    out.append(aot.Program(f"score[{name}]", score_fn, (params, batch["tokens"],
               batch["segment_ids"]), flops, resident=(others, resident),
               note=f"{batch_size} × {seq_len}"))  # fmt: skip
  return out


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
