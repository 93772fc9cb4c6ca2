"""PPO's jitted pieces on rollout rows (`llama_jax.rl.rollouts.rollout_rows`): the advantage
pass, the policy update and the value update, each its own function so it can be tested,
profiled and sharded on its own (`llama_jax.rl.ppo.build` jits them into a `PPO`).

    advantages = jit(make_advantage_fn(policy_cfg, value_cfg, ppo))
    out, metrics = advantages(policy_params, ref_params, value_params, rows, rewards, kl_coef)
    policy_step = make_policy_step(policy_cfg, optimizer, ppo)   # (state, minibatch)
    value_step = make_value_step(value_cfg, optimizer, ppo)      # (state, minibatch)

The value model is a reward model (`llama_jax.model.reward_model`: trunk + scalar head) read at
every token instead of the last; Llama 2 initializes it from the reward model.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from llama_jax.model import lora, reward_model
from llama_jax.model.config import LlamaConfig
from llama_jax.model.llama import as_model
from llama_jax.objectives import ppo as ppo_obj
from llama_jax.objectives import rl
from llama_jax.objectives.kl import KINDS, kl_estimate
from llama_jax.parallel import sharding
from llama_jax.steps.common import ROW_FIELDS, Batch, row_logprobs, sums_train_step


@dataclasses.dataclass(frozen=True)
class PPOConfig:
  """PPO settings (Llama 2: kl_coef 0.01 for 7B/13B, 0.005 for 34B/70B; clip 0.2).

  Attributes:
    kl_coef: β of the per-token KL penalty (the start value if `kl_target` is set).
    kl_estimator: "k1" (default), "k2" or "k3" (`objectives.kl`).
    kl_target: > 0 turns on the adaptive controller with this target KL per response.
    kl_horizon: the controller's horizon in responses.
    gamma, lam: GAE's discount and λ.
    clip_eps: the policy ratio's clip range; value_clip_eps: the value clip range.
    whiten_advantages: normalize advantages over the rollout's response tokens.
    no_eos_penalty: added to the reward of a response that ends without a stop token.
    loss_chunk_size: compute log-probs over sequence chunks of this size (0 = at once).
  """

  kl_coef: float = 0.01
  kl_estimator: str = "k1"
  kl_target: float = 0.0
  kl_horizon: int = 10000
  gamma: float = 1.0
  lam: float = 0.95
  clip_eps: float = 0.2
  value_clip_eps: float = 0.2
  whiten_advantages: bool = True
  no_eos_penalty: float = 0.0
  loss_chunk_size: int = 0

  def __post_init__(self):
    if self.kl_estimator not in KINDS:
      raise ValueError(f"ppo kl_estimator={self.kl_estimator!r}; expected one of {KINDS}")


def token_values(model: reward_model.RewardModel | LlamaConfig, params: Any, rows: Batch):
  """V(s_t) [B, T]: the value model's head (a `RewardModel`) at every position."""
  return reward_model.as_reward_model(model).apply(
    {"params": params}, rows["tokens"], rows["positions"], rows["segment_ids"]
  )


def make_advantage_fn(
  policy_model: sharding.Model,
  value_model: reward_model.RewardModel | LlamaConfig,
  ppo: PPOConfig,
  *,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
):
  """`advantages(policy_params, ref_params, value_params, rows, rewards [B], kl_coef) -> (out,
  metrics)`: from the responses' rewards (their scores plus penalties) and the per-token KL
  penalty, the rollout's old log-probs, values, advantages and returns (`out`, each [B, T]),
  plus the shared metrics of the pass (`objectives.rl.advantage_metrics`) and value/*. Not
  jitted."""

  ref_model = lora.without_adapters(as_model(policy_model))  # the reference's params are plain

  def advantages(policy_params, ref_params, value_params, rows: Batch, rewards, kl_coef):
    mask = rows["response_mask"].astype(jnp.float32)
    with sharding.activation_sharding(mesh, rules):
      logp, entropy = row_logprobs(
        policy_model, policy_params, rows, ppo.loss_chunk_size, with_entropy=True
      )
      ref_logp = row_logprobs(ref_model, ref_params, rows, ppo.loss_chunk_size)
      values = token_values(value_model, value_params, rows) * mask
    kl = kl_estimate(logp, ref_logp, ppo.kl_estimator) * mask
    token_rewards = ppo_obj.token_rewards(rewards, kl, mask, beta=kl_coef)
    per_token, returns = ppo_obj.gae(token_rewards, values, mask, gamma=ppo.gamma, lam=ppo.lam)
    if ppo.whiten_advantages:
      per_token = ppo_obj.masked_whiten(per_token, mask)
    out = {"old_logp": logp, "old_values": values, "advantages": per_token, "returns": returns}
    metrics = rl.advantage_metrics(rewards, kl, entropy, mask)
    metrics |= {
      "objective/non_score_reward": -kl_coef * metrics["objective/kl"],
      "value/explained_variance": ppo_obj.explained_variance(values, returns, mask),
      "value/mean": ppo_obj.masked_mean(values, mask),
    }
    return out, metrics

  return advantages


POLICY_FIELDS = (*ROW_FIELDS, "old_logp", "advantages")
VALUE_FIELDS = (*ROW_FIELDS, "old_values", "returns")


def make_policy_step(
  model: sharding.Model,
  optimizer: optax.GradientTransformation,
  ppo: PPOConfig,
  *,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  grad_accum_steps: int = 1,
):
  """`policy_step(state, minibatch) -> (state, metrics)`: one clipped-surrogate update
  (loss/policy, policy/clipfrac, policy/approxkl, policy/ratio, grad_norm, ...)."""

  def sums_fn(params, batch):
    logp = row_logprobs(model, params, batch, ppo.loss_chunk_size)
    return ppo_obj.policy_sums(
      logp, batch["old_logp"], batch["advantages"], batch["response_mask"], clip_eps=ppo.clip_eps
    )

  return sums_train_step(
    sums_fn,
    lambda sums: ppo_obj.token_mean(sums, "policy"),
    optimizer,
    fields=POLICY_FIELDS,
    count_key="tokens",
    mesh=mesh,
    rules=rules,
    grad_accum_steps=grad_accum_steps,
  )


def make_value_step(
  model: reward_model.RewardModel | LlamaConfig,
  optimizer: optax.GradientTransformation,
  ppo: PPOConfig,
  *,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  grad_accum_steps: int = 1,
):
  """`value_step(state, minibatch) -> (state, metrics)`: one clipped value-loss update."""

  def sums_fn(params, batch):
    values = token_values(model, params, batch)
    return ppo_obj.value_sums(
      values,
      batch["old_values"],
      batch["returns"],
      batch["response_mask"],
      clip_eps=ppo.value_clip_eps,
    )

  return sums_train_step(
    sums_fn,
    lambda sums: ppo_obj.token_mean(sums, "value"),
    optimizer,
    fields=VALUE_FIELDS,
    count_key="tokens",
    mesh=mesh,
    rules=rules,
    grad_accum_steps=grad_accum_steps,
  )
