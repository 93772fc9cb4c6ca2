"""Scorers: the one signature every generate-then-score stage calls.

    scorer = build_scorer(ScorerConfig("check_answer"))            # or "reward_model", "llama2"
    scores = score(scorer, records, responses)                     # np.float64 [N], checked

A response's score is what a scorer says of it; online RL's reward adds penalties to it
(`llama_jax.rl.online`).

A `Scorer` is any function `(records, prompts, responses) -> scores [N]` over flat, aligned
lists: `records[i]` is the record (an `rl_prompt` row, or just `{"prompt": ...}`) whose prompt
`prompts[i]` (`records[i]["prompt"]`) was answered by `responses[i]`. Records carry what a
programmatic check needs (references, safety labels); prompts are what a reward model reads.
Best-of-K (`llama_jax.rl.best_of_k`), rejection sampling, PPO and GRPO
(`llama_jax.rl.online`) and `experiments.generate` all take one; the experiments build theirs
from their `scorer` config section, a `ScorerConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from llama_jax.data import scoring

Record = dict[str, Any]
Scorer = Callable[[Sequence[Record], Sequence[Any], Sequence[str]], Sequence[float]]
SCORER_KINDS = ("reward_model", "llama2", "check_answer")
# The reward-model workdirs each kind loads, by `ScorerConfig` field.
REWARD_MODEL_FIELDS = {"reward_model": ("reward_model",), "llama2": ("helpful", "safety")}


@dataclasses.dataclass(frozen=True)
class ScorerConfig:
  """Which scorer `build_scorer` makes: the `scorer` section of every generate-then-score
  experiment (generation, rejection sampling, GRPO, PPO).

  kind          "check_answer" (a right answer to an rl_prompt record scores 1; no model),
                "reward_model" (the raw score of the RM in the workdir `reward_model`) or
                "llama2" (Llama 2's combined score of the helpfulness and safety RM workdirs
                `helpful` and `safety`, safety threshold `threshold`).
  batch_size    rows per reward-model forward pass (a multiple of the mesh's batch axes).
  whitening     "none", "batch" or "running" (llama2 only; selection only compares, so
                rejection sampling leaves it "none"; Llama 2's PPO whitens with running
                statistics).
  """

  kind: str = "check_answer"
  reward_model: str = ""
  helpful: str = ""
  safety: str = ""
  threshold: float = 0.15
  batch_size: int = 32
  whitening: str = "none"

  def __post_init__(self):
    if self.kind not in SCORER_KINDS:
      raise ValueError(f"scorer.kind={self.kind!r}; expected one of {SCORER_KINDS}")
    size = self.batch_size
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
      raise ValueError(f"scorer.batch_size={self.batch_size!r}; expected a positive int")


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


def build_scorer(config: ScorerConfig, tokenizer=None, *, mesh=None) -> Scorer:
  """The scorer `config` describes (`ScorerConfig`): `check_answer` (no model), or a
  `rewards.RewardScorer` / `rewards.Llama2Scorer` over the reward-model workdirs it names,
  read with `tokenizer` onto `mesh`."""
  if config.kind == "check_answer":
    return check_answer
  from llama_jax.rl import rewards  # loads the model stack; check_answer does not need it

  def rm(field: str) -> rewards.RewardScorer:
    workdir = getattr(config, field)
    if not workdir:
      raise ValueError(f"scorer.kind={config.kind!r} needs scorer.{field}: a reward-model workdir")
    return rewards.RewardScorer.from_workdir(
      workdir, tokenizer, mesh=mesh, batch_size=config.batch_size
    )

  if config.kind == "reward_model":
    return from_prompt_scorer(rm("reward_model"))
  return llama2(
    rewards.Llama2Scorer(
      rm("helpful"), rm("safety"), threshold=config.threshold, whitening=config.whitening
    )
  )


def scorer_config(section: Mapping[str, Any]) -> ScorerConfig:
  """The `ScorerConfig` of a config's `scorer` section (a mapping of its fields); a key that
  is not a field is an error naming it."""
  names = [field.name for field in dataclasses.fields(ScorerConfig)]
  unknown = [key for key in section.keys() if key not in names]
  if unknown:
    raise ValueError(f"scorer has no field {unknown[0]!r}; its fields: {names}")
  return ScorerConfig(**{key: section[key] for key in section.keys()})


def scorer_from_section(section: Mapping[str, Any], tokenizer=None, *, mesh=None) -> Scorer:
  """`build_scorer` of a config's `scorer` section (`scorer_config`): every generate-then-score
  stage (generation, rejection sampling, GRPO, PPO) builds its scorer here."""
  return build_scorer(scorer_config(section), tokenizer, mesh=mesh)


def reward_model_params(kind: str, config, mesh) -> dict[str, Any]:
  """Abstract parameters (shapes and shardings on `mesh`) of the reward models a scorer of
  `kind` loads, by `ScorerConfig` field (none for check_answer). Their architecture is
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
  sharding.check_batch_fits_mesh(batch_size, mesh, "scorer.batch_size")
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
