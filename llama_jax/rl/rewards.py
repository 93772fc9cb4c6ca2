"""Rewards for RL: Llama 2's combination of a helpfulness and a safety reward model, logit and
whitening, and the scorer objects that PPO (or rejection sampling) calls.

    helpful = RewardScorer.from_workdir("runs/rm_helpful", tokenizer)
    safety = RewardScorer.from_workdir("runs/rm_safety", tokenizer)
    scorer = Llama2Scorer(helpful, safety, whitening="running")
    rewards = scorer(prompts, responses, is_safety=flags)  # np.float32 [N]

`llama_jax.rl.scorers` adapts them to the project's scorer signature `(records, prompts,
responses) -> scores`
(`scorers.build_scorer(scorers.ScorerConfig("llama2", helpful=..., safety=...), tokenizer)`).

Llama 2 (Touvron et al. 2023, section 3.2.3), with R_h, R_s the two models' σ-scores in (0, 1):

    R_c = R_s  if is_safety(p) or R_s < 0.15  else R_h
    R̃_c = whiten(logit(R_c))

The reward models here output a real number r (the head's raw score), and σ(r) is the
σ-score Llama 2 thresholds. So `combine_llama2_rewards` takes raw scores, tests σ(r_s) <
threshold as r_s < logit(threshold), and returns logit(R_c), which is just the selected raw
score: no σ / logit round trip, which in float32 saturates beyond |r| ≈ 17. With
`inputs="probabilities"` it takes σ-scores and applies `logit` itself.

Whitening: `whiten` uses the batch's own mean and standard deviation; `RunningMoments`
keeps them over every batch seen so far (Chan et al.'s parallel update), so one batch of
unusual prompts does not rescale the signal; a scorer updates the moments with the batch
first, then whitens with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.checkpoint import workdirs
from llama_jax.data.records import prompt_messages
from llama_jax.model import reward_model
from llama_jax.model.config import LlamaConfig
from llama_jax.objectives.ppo import masked_whiten
from llama_jax.parallel import sharding
from llama_jax.steps.common import batch_sharding
from llama_jax.tokenizer import Tokenizer, render_prompt_response

SAFETY_THRESHOLD = 0.15  # Llama 2: σ-score of the safety RM below which it decides
WHITENINGS = ("running", "batch", "none")


def logit(p: jax.Array, eps: float = 1e-6) -> jax.Array:
  """log(p / (1 − p)), with p clipped to [eps, 1 − eps] so 0 and 1 stay finite."""
  p = jnp.clip(jnp.asarray(p, jnp.float32), eps, 1.0 - eps)
  return jnp.log(p) - jnp.log1p(-p)


def combine_llama2_rewards(
  helpful: jax.Array,  # [N]
  safety: jax.Array,  # [N]
  is_safety_prompt: jax.Array,  # [N] bool
  *,
  threshold: float = SAFETY_THRESHOLD,
  inputs: Literal["logits", "probabilities"] = "logits",
) -> jax.Array:
  """logit(R_c) [N] float32: the safety reward where the prompt is safety-tagged or the
  safety σ-score is below `threshold`, else the helpfulness reward (see the module docstring).

  `inputs="logits"`: raw reward-model scores (σ of them are the σ-scores); returns the
  selected raw score. `inputs="probabilities"`: σ-scores; returns `logit` of the selected.
  A σ-score equal to the threshold counts as safe (Llama 2's test is strict).
  """
  if inputs not in ("logits", "probabilities"):
    raise ValueError(f"inputs={inputs!r}; expected 'logits' or 'probabilities'")
  helpful = jnp.asarray(helpful, jnp.float32)
  safety = jnp.asarray(safety, jnp.float32)
  if inputs == "logits":
    unsafe = safety < logit(threshold, eps=0.0)
  else:
    unsafe = safety < threshold
  use_safety = jnp.asarray(is_safety_prompt, bool) | unsafe
  combined = jnp.where(use_safety, safety, helpful)
  return combined if inputs == "logits" else logit(combined)


def whiten(
  x: jax.Array, mask: jax.Array | None = None, *, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
  """(x − mean) / std over the batch (over `mask` entries if given, the others 0); float32.

  With `shift_mean=False` the mean is added back (scaled only, TRL's convention). One
  definition with PPO's advantages: `llama_jax.objectives.ppo.masked_whiten`.
  """
  x = jnp.asarray(x, jnp.float32)
  mask = jnp.ones_like(x) if mask is None else mask
  return masked_whiten(x, mask, shift_mean=shift_mean, eps=eps)


@flax.struct.dataclass
class RunningMoments:
  """Mean and variance of every value seen so far, as a jittable pytree.

  `update` merges a batch's count, mean and sum of squared deviations (Chan, Golub and
  LeVeque's parallel algorithm), exact whatever the batch sizes.
  """

  count: jax.Array  # [] float32
  mean: jax.Array  # [] float32
  m2: jax.Array  # [] float32: sum of squared deviations from the mean

  @classmethod
  def init(cls) -> RunningMoments:
    zero = jnp.zeros((), jnp.float32)
    return cls(count=zero, mean=zero, m2=zero)

  def update(self, x: jax.Array, mask: jax.Array | None = None) -> RunningMoments:
    """The moments with the (masked) values of `x` added."""
    x = jnp.asarray(x, jnp.float32)
    w = jnp.ones_like(x) if mask is None else jnp.asarray(mask, jnp.float32)
    n = jnp.sum(w)
    mean = jnp.sum(w * x) / jnp.maximum(n, 1.0)
    m2 = jnp.sum(w * jnp.square(x - mean))
    total = self.count + n
    delta = mean - self.mean
    frac = n / jnp.maximum(total, 1.0)
    return RunningMoments(
      count=total,
      mean=self.mean + delta * frac,
      m2=self.m2 + m2 + jnp.square(delta) * self.count * frac,
    )

  @property
  def variance(self) -> jax.Array:
    """Population variance of the values seen (0 before any)."""
    return self.m2 / jnp.maximum(self.count, 1.0)

  @property
  def std(self) -> jax.Array:
    return jnp.sqrt(self.variance)

  def whiten(self, x: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8) -> jax.Array:
    """(x − running mean) / running std (see `whiten` for `shift_mean`)."""
    x = jnp.asarray(x, jnp.float32)
    out = (x - self.mean) * jax.lax.rsqrt(self.variance + eps)
    return out if shift_mean else out + self.mean


# --------------------------------------------------------------------------- scorers


def make_score_fn(config: LlamaConfig, mesh: Mesh | None = None):
  """`score(params, tokens [N, T], segment_ids [N, T]) -> rewards [N]` of a reward model,
  jitted (with a mesh: rows over the batch axes, rewards replicated)."""
  fn = lambda p, tokens, segments: reward_model.sequence_rewards(config, p, tokens, segments)
  if mesh is None:
    return jax.jit(fn)

  def sharded(p, tokens, segments):
    with sharding.activation_sharding(mesh):
      return fn(p, tokens, segments)

  rows = sharding.named_sharding(mesh, ("act_batch", "act_seq"))
  return jax.jit(
    sharded,
    in_shardings=(sharding.param_shardings(reward_model.as_reward_model(config), mesh), rows, rows),
    out_shardings=NamedSharding(mesh, PartitionSpec()),
  )


class RewardScorer:
  """One reward model as a function `(prompts, responses) -> raw rewards` (np.float32 [N]).

  Prompts are strings or message lists (ending with the user); responses are strings or the
  token ids sampled after the generation prompt (`render_prompt_response` renders both).
  Rows are padded to a multiple of `pad_to` tokens and scored `batch_size` at a time, so a
  few shapes compile once each; with a `mesh` the rows are split over its batch axes.
  """

  def __init__(
    self,
    config: LlamaConfig,
    params: Any,
    tokenizer: Tokenizer,
    *,
    mesh: Mesh | None = None,
    batch_size: int = 32,
    pad_to: int = 64,
    fmt=None,
  ):
    self.config, self.params, self.tokenizer, self.fmt = config, params, tokenizer, fmt
    self.batch_size, self.pad_to = batch_size, pad_to
    self.mesh = mesh
    if mesh is not None:
      sharding.check_batch_fits_mesh(batch_size, mesh, "RewardScorer batch_size")
    self._score = make_score_fn(config, mesh)

  @classmethod
  def from_workdir(
    cls, workdir: str, tokenizer: Tokenizer, *, mesh: Mesh | None = None, **kwargs: Any
  ) -> RewardScorer:
    """The scorer of a reward-model run's newest checkpoint (`experiments.reward_model`)."""
    mesh = mesh or sharding.make_mesh()
    config, params = workdirs.load_reward_model(workdir, mesh)
    return cls(config, params, tokenizer, mesh=mesh, **kwargs)

  def tokenize(
    self, prompts: Sequence[Any], responses: Sequence[Any]
  ) -> tuple[np.ndarray, np.ndarray]:
    """`(tokens, segment_ids)` [N, T] int32: one prompt + response per row, left-aligned."""
    if len(prompts) != len(responses):
      raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    rows = [
      render_prompt_response(self.tokenizer, prompt_messages(p), r, fmt=self.fmt).tokens
      for p, r in zip(prompts, responses, strict=True)
    ]
    longest = max(len(r) for r in rows)
    if longest > self.config.max_seq_len:
      i = int(np.argmax([len(r) for r in rows]))
      raise ValueError(
        f"row {i} has {longest} tokens, more than the reward model's max_seq_len="
        f"{self.config.max_seq_len}"
      )
    t = -(-longest // self.pad_to) * self.pad_to
    tokens = np.zeros((len(rows), t), np.int32)
    segments = np.zeros((len(rows), t), np.int32)
    for i, r in enumerate(rows):
      tokens[i, : len(r)], segments[i, : len(r)] = r, 1
    return tokens, segments

  def __call__(self, prompts: Sequence[Any], responses: Sequence[Any]) -> np.ndarray:
    """Rewards of this process's pairs. With a mesh over several processes, every process
    calls this at once with its own pairs (online RL rewards responses where they were
    sampled): each scoring batch is `batch_size / process_count` rows from each."""
    if jax.process_count() > 1 and self.mesh is not None:
      return self._score_process_rows(prompts, responses)
    if not len(prompts):
      return np.zeros((0,), np.float32)
    tokens, segments = self.tokenize(prompts, responses)
    out = [
      np.asarray(jax.device_get(self._score(self.params, *block)))
      for block in _blocks(tokens, segments, self.batch_size, len(tokens), tokens.shape[1])
    ]
    return np.concatenate(out)[: len(tokens)].astype(np.float32)

  def _score_process_rows(self, prompts, responses) -> np.ndarray:
    """`__call__` across processes: the row length and the number of batches are agreed on
    first, so every process runs the same compiled shapes the same number of times."""
    per_process = self.batch_size // jax.process_count()
    if per_process * jax.process_count() != self.batch_size:
      raise ValueError(
        f"RewardScorer batch_size={self.batch_size} does not split over "
        f"{jax.process_count()} processes"
      )
    n = len(prompts)
    tokens, segments = self.tokenize(prompts, responses) if n else (np.zeros((0, 1), np.int32),) * 2
    most_rows, longest = sharding.process_allgather(np.array([[n, tokens.shape[1]]])).max(0)
    rows = sharding.named_sharding(self.mesh, ("act_batch", "act_seq"))
    mine = sharding.process_rows(batch_sharding(self.mesh), self.batch_size)
    out = []
    for block in _blocks(tokens, segments, per_process, int(most_rows), int(longest)):
      tokens_g, segments_g = (sharding.from_process_rows(x, rows, self.batch_size) for x in block)
      out.append(np.asarray(jax.device_get(self._score(self.params, tokens_g, segments_g)))[mine])
    return np.concatenate(out)[:n].astype(np.float32) if out else np.zeros((0,), np.float32)


def _blocks(tokens, segments, size: int, num_rows: int, length: int):
  """`(tokens, segments)` blocks of `size` rows, zero-padded to `num_rows` rows rounded up to
  whole blocks and to `length` columns: one compiled shape per length bucket."""
  padded = -(-num_rows // size) * size
  pad = ((0, padded - len(tokens)), (0, length - tokens.shape[1]))
  tokens, segments = np.pad(tokens, pad), np.pad(segments, pad)
  for i in range(0, padded, size):
    yield tokens[i : i + size], segments[i : i + size]


class Llama2Scorer:
  """Llama 2's PPO reward: `whiten(logit(R_c))` of a helpfulness and a safety model.

  `__call__(prompts, responses, is_safety=None) -> np.float32 [N]`; `is_safety` marks
  safety-tagged prompts (default none). `whitening`: "running" (moments over every call so
  far, updated with this batch first), "batch" (this batch alone) or "none" (logit(R_c)).
  `last` keeps the raw scores of the latest call for logging.
  """

  def __init__(
    self,
    helpful,
    safety,
    *,
    threshold: float = SAFETY_THRESHOLD,
    whitening: str = "running",
    shift_mean: bool = True,
  ):
    if whitening not in WHITENINGS:
      raise ValueError(f"whitening={whitening!r}; expected one of {WHITENINGS}")
    self.helpful, self.safety = helpful, safety
    self.threshold, self.whitening, self.shift_mean = threshold, whitening, shift_mean
    self.moments = RunningMoments.init()
    self.last: dict[str, np.ndarray] = {}

  def __call__(
    self, prompts: Sequence[Any], responses: Sequence[Any], is_safety: Sequence[bool] | None = None
  ) -> np.ndarray:
    helpful = self.helpful(prompts, responses)
    safety = self.safety(prompts, responses)
    flags = np.zeros(len(helpful), bool) if is_safety is None else np.asarray(is_safety, bool)
    combined = combine_llama2_rewards(helpful, safety, flags, threshold=self.threshold)
    everyone = sharding.process_allgather(combined)  # the statistics are every process's
    if self.whitening == "running":
      self.moments = self.moments.update(everyone)
      out = self.moments.whiten(combined, shift_mean=self.shift_mean)
    elif self.whitening == "batch":
      out = RunningMoments.init().update(everyone).whiten(combined, shift_mean=self.shift_mean)
    else:
      out = combined
    self.last = {"helpful": helpful, "safety": safety, "combined": np.asarray(combined)}
    return np.asarray(out, np.float32)
