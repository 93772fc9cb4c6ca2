"""GRPO's jitted pieces on rollout rows (`llama_jax.rollouts.rollout_rows`, the K responses of
a prompt adjacent): the old and reference log-probs of a rollout, and the update step.

    logps = jit(make_logps_fn(config))            # (params, rows) -> ([B, T], [B, T])
    step = make_train_step(config, optimizer, GRPOConfig(group_size=8))
    state, metrics = step(state, minibatch)       # rows + old_logp, ref_logp, advantages
"""

from __future__ import annotations

import dataclasses

import optax
from jax.sharding import Mesh

from llama_jax import sharding
from llama_jax.config import LlamaConfig
from llama_jax.objectives import grpo as grpo_obj
from llama_jax.rollouts import ROW_FIELDS
from llama_jax.steps.common import Batch, map_microbatches, sums_train_step, token_logprobs

FIELDS = (*ROW_FIELDS, "old_logp", "ref_logp", "advantages")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """GRPO settings (DeepSeekMath: K = 64, β 0.04, ε 0.2).

  Attributes:
    group_size: K responses per prompt.
    clip_eps: ε of the ratio's lower clip (and the upper one unless `clip_eps_high`).
    clip_eps_high: the upper clip (DAPO's "clip higher", e.g. 0.28); None = clip_eps.
    beta: coefficient of the k3 KL to the reference in the loss (0 = no reference pass).
    scale: "std" divides group-centered rewards by the group's std; "none" does not.
    aggregation: "sequence_mean" or "token_mean" (`objectives.grpo`).
    loss_chunk_size: compute log-probs over sequence chunks of this size (0 = at once).
  """

  group_size: int = 8
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  beta: float = 0.04
  scale: str = "std"
  aggregation: str = "sequence_mean"
  loss_chunk_size: int = 0

  def __post_init__(self):
    if self.scale not in grpo_obj.SCALES:
      raise ValueError(f"grpo scale={self.scale!r}; expected one of {grpo_obj.SCALES}")
    if self.aggregation not in grpo_obj.AGGREGATIONS:
      raise ValueError(
        f"grpo aggregation={self.aggregation!r}; expected one of {grpo_obj.AGGREGATIONS}"
      )
    if self.group_size < 2:
      raise ValueError(f"grpo group_size={self.group_size}: a group needs two responses")


def make_logps_fn(
  config: LlamaConfig,
  chunk_size: int = 0,
  *,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  micro_batches: int = 1,
):
  """`logps(params, rows) -> (logp, entropy)`, each [B, T]: log-probs of the rows' targets
  and the entropy of the model's distribution at each position (policy or reference),
  `micro_batches` row-blocks at a time."""

  def logps(params, rows: Batch):
    rows = {k: rows[k] for k in ("tokens", "positions", "segment_ids", "targets")}
    fn = lambda b: token_logprobs(config, params, b, chunk_size, with_entropy=True)
    with sharding.activation_sharding(mesh, rules):
      return map_microbatches(fn, rows, micro_batches)

  return logps


def make_train_step(
  config: LlamaConfig,
  optimizer: optax.GradientTransformation,
  grpo: GRPOConfig,
  *,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  grad_accum_steps: int = 1,
):
  """`train_step(state, minibatch) -> (state, metrics)`: one GRPO update (loss, kl,
  policy/clipfrac, grad_norm, ...)."""

  def sums_fn(params, batch):
    logp = token_logprobs(config, params, batch, grpo.loss_chunk_size)
    return grpo_obj.grpo_sums(
      logp,
      batch["old_logp"],
      batch["ref_logp"],
      batch["advantages"],
      batch["response_mask"],
      clip_eps=grpo.clip_eps,
      clip_eps_high=grpo.clip_eps_high,
      beta=grpo.beta,
      aggregation=grpo.aggregation,
    )

  return sums_train_step(
    sums_fn,
    grpo_obj.grpo_mean,
    optimizer,
    fields=FIELDS,
    count_key="count",
    mesh=mesh,
    rules=rules,
    grad_accum_steps=grad_accum_steps,
  )
