"""Critic-free policy gradient's jitted pieces on rollout rows (`llama_jax.rl.rollouts`, the K
responses of a prompt adjacent): GRPO and its variants Dr. GRPO, RLOO and REINFORCE++, which
differ only in their advantage estimator and loss aggregation (`GRPOConfig`).

    advantages = jit(make_advantage_fn(model, grpo))   # (policy, ref params, rows, rewards)
    out, metrics = advantages(params, ref_params, rows, rewards)  # old_logp, ref_logp, advantages
    step = make_train_step(model, optimizer, grpo)
    state, metrics = step(state, minibatch)             # rows + out

`llama_jax.rl.grpo.build` makes both, jitted and sharded, from a model, a mesh and a config.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from llama_jax.model import lora
from llama_jax.model.llama import as_model
from llama_jax.objectives import grpo as grpo_obj
from llama_jax.objectives import rl
from llama_jax.objectives.kl import kl_estimate
from llama_jax.parallel import sharding
from llama_jax.steps.common import ROW_FIELDS, Batch, make_logps_fn, row_logprobs, sums_train_step

FIELDS = (*ROW_FIELDS, "old_logp", "ref_logp", "advantages")


@dataclasses.dataclass(frozen=True)
class GRPOConfig:
  """Critic-free settings (DeepSeekMath's GRPO: K = 64, β 0.04, ε 0.2).

  Attributes:
    group_size: K responses per prompt.
    advantage: "group" (GRPO), "rloo" or "reinforce_pp" (`objectives.rl`).
    clip_eps: ε of the ratio's lower clip (and the upper one unless `clip_eps_high`).
    clip_eps_high: the upper clip (DAPO's "clip higher", e.g. 0.28); None = clip_eps.
    beta: coefficient of the k3 KL to the reference in the loss.
    kl_coef: coefficient of the k1 KL to the reference in the reward (RLOO, REINFORCE++).
    scale: "std" divides group-centered rewards by the group's std; "none" does not.
    aggregation: "sequence_mean", "token_mean" or "max_length" (`objectives.grpo`).
    max_length: the divisor of "max_length" (the launchers set generation.max_new_tokens).
    loss_chunk_size: compute log-probs over sequence chunks of this size (0 = at once).

  Dr. GRPO is advantage "group" with scale "none" and aggregation "max_length".
  """

  group_size: int = 8
  advantage: str = "group"
  clip_eps: float = 0.2
  clip_eps_high: float | None = None
  beta: float = 0.04
  kl_coef: float = 0.0
  scale: str = "std"
  aggregation: str = "sequence_mean"
  max_length: int = 0
  loss_chunk_size: int = 0

  def __post_init__(self):
    if self.advantage not in rl.ESTIMATORS:
      raise ValueError(f"grpo advantage={self.advantage!r}; expected one of {rl.ESTIMATORS}")
    if self.scale not in grpo_obj.SCALES:
      raise ValueError(f"grpo scale={self.scale!r}; expected one of {grpo_obj.SCALES}")
    if self.aggregation not in grpo_obj.AGGREGATIONS:
      raise ValueError(
        f"grpo aggregation={self.aggregation!r}; expected one of {grpo_obj.AGGREGATIONS}"
      )
    if self.aggregation == "max_length" and self.max_length < 1:
      raise ValueError(f"grpo aggregation 'max_length' needs max_length ≥ 1: {self.max_length}")
    if self.group_size < 2:
      raise ValueError(f"grpo group_size={self.group_size}: a group needs two responses")

  @property
  def uses_reference(self) -> bool:
    """Whether anything reads the reference's log-probs (else its pass is skipped)."""
    return self.beta > 0 or self.kl_coef > 0


def make_advantage_fn(
  model: sharding.Model,
  grpo: GRPOConfig,
  *,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  micro_batches: int = 1,
):
  """`advantages(policy_params, ref_params, rows, rewards [N]) -> (out, metrics)`: the
  rollout's old and reference log-probs and per-token advantages (`out`, each [N, T]) from
  the responses' rewards (their scores plus penalties), and the shared metrics of the pass
  (`objectives.rl.advantage_metrics`), the log-prob passes `micro_batches` row-blocks at a
  time. Not jitted."""
  logps, ref_logps = (
    make_logps_fn(m, grpo.loss_chunk_size, mesh=mesh, rules=rules, micro_batches=micro_batches)
    for m in (model, lora.without_adapters(as_model(model)))  # the reference's params are plain
  )

  def advantages(policy_params, ref_params, rows: Batch, rewards):
    mask = rows["response_mask"].astype(jnp.float32)
    logp, entropy = logps(policy_params, rows)
    ref_logp = ref_logps(ref_params, rows)[0] if grpo.uses_reference else logp
    kl = kl_estimate(logp, ref_logp, "k1") * mask
    per_token = rl.advantages(
      grpo.advantage, rewards, kl, mask,
      group_size=grpo.group_size, kl_coef=grpo.kl_coef, scale=grpo.scale,
    )  # fmt: skip
    out = {"old_logp": logp, "ref_logp": ref_logp, "advantages": per_token}
    return out, rl.advantage_metrics(rewards, kl, entropy, mask)

  return advantages


def make_train_step(
  model: sharding.Model,
  optimizer: optax.GradientTransformation,
  grpo: GRPOConfig,
  *,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  grad_accum_steps: int = 1,
):
  """`train_step(state, minibatch) -> (state, metrics)`: one clipped-ratio update (loss/policy,
  loss/kl, policy/clipfrac, policy/approxkl, grad_norm, ...)."""

  def sums_fn(params, batch):
    logp = row_logprobs(model, params, batch, grpo.loss_chunk_size)
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
      max_length=grpo.max_length,
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
