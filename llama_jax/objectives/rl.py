"""Pieces every online RL algorithm shares: masked statistics, the advantage pass's metrics, and
the critic-free advantage estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++).

Shapes: N responses (the K of one prompt adjacent: prompt b owns rows b·K … b·K + K − 1), T
tokens, `mask` [N, T] 1 on response tokens. Every estimator returns per-token advantages
[N, T] (0 off the mask), so one policy loss (`objectives.grpo.grpo_sums`) serves them all:

    group         (r − mean_group r) / (std_group r + ε)    GRPO; scale "none": Dr. GRPO
    rloo          r_i − mean_{j ≠ i} r_j                     RLOO (Ahmadian et al. 2024)
    reinforce_pp  whiten_batch(Σ_{s ≥ t} r_s)                REINFORCE++ (Hu 2025)

For "group" and "rloo", r is the sequence score minus β · Σ_t KL_t (KL in the reward, as
RLOO's paper; β = `kl_coef`, 0 leaves the KL to the loss as GRPO does). For "reinforce_pp",
r_t is the per-token reward −β · KL_t with the score added at the last token (as PPO, but
no critic): its returns-to-go are normalized over every response token of the batch, with
no per-group std, so easy and hard prompts keep their relative weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

ESTIMATORS = ("group", "rloo", "reinforce_pp")
SCALES = ("std", "none")


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of `x` over the entries where `mask` is 1 (0 for an empty mask)."""
  mask = _f32(mask)
  return jnp.sum(_f32(x) * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def masked_whiten(x: jax.Array, mask: jax.Array, *, shift_mean: bool = True, eps: float = 1e-8):
  """(x − mean) / std over the masked entries (the mean added back if not `shift_mean`);
  0 where `mask` is 0."""
  mean = masked_mean(x, mask)
  var = masked_mean(jnp.square(_f32(x) - mean), mask)
  out = (_f32(x) - mean) * jax.lax.rsqrt(var + eps)
  if not shift_mean:
    out = out + mean
  return out * _f32(mask)


def _groups(rewards: jax.Array, group_size: int) -> jax.Array:
  r = _f32(rewards)
  if r.shape[0] % group_size:
    raise ValueError(f"{r.shape[0]} rewards do not split into groups of {group_size}")
  return r.reshape(-1, group_size)


def group_advantages(
  rewards: jax.Array,  # [N]
  group_size: int,
  *,
  scale: str = "std",
  eps: float = 1e-4,
) -> jax.Array:
  """Per-response advantages [N]: the reward minus its group's mean, divided by the group's
  standard deviation (population) plus `eps` if `scale` is "std" (GRPO; "none": Dr. GRPO,
  which drops the division because it up-weights prompts that are nearly always solved)."""
  if scale not in SCALES:
    raise ValueError(f"group advantage scale={scale!r}; expected one of {SCALES}")
  groups = _groups(rewards, group_size)
  centered = groups - groups.mean(axis=1, keepdims=True)
  if scale == "std":
    centered = centered / (groups.std(axis=1, keepdims=True) + eps)
  return centered.reshape(-1)


def rloo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:  # [N] -> [N]
  """r_i minus the mean of the other K − 1 rewards of its group: an unbiased baseline, since
  it does not depend on response i (equal to K / (K − 1) · (r_i − group mean))."""
  if group_size < 2:
    raise ValueError(f"rloo needs group_size ≥ 2, got {group_size}")
  groups = _groups(rewards, group_size)
  others = (groups.sum(axis=1, keepdims=True) - groups) / (group_size - 1)
  return (groups - others).reshape(-1)


def last_index(mask: jax.Array) -> jax.Array:
  """[N] index of each row's last masked token (−1 for an empty row)."""
  t = mask.shape[-1]
  positions = jnp.where(mask != 0, jnp.arange(t), -1)
  return jnp.max(positions, axis=-1)


def token_rewards(
  scores: jax.Array,  # [N] the reward model's score of each response
  kl: jax.Array,  # [N, T] per-token KL estimate against the reference
  mask: jax.Array,  # [N, T]
  *,
  beta: float | jax.Array,
) -> jax.Array:
  """r_t = −β · kl_t on response tokens, plus the score at the last one [N, T]."""
  mask = _f32(mask)
  rewards = -beta * _f32(kl) * mask
  last = last_index(mask)
  at_last = (jnp.arange(mask.shape[-1]) == last[:, None]) & (last[:, None] >= 0)
  return rewards + jnp.where(at_last, _f32(scores)[:, None], 0.0)


def returns_to_go(rewards: jax.Array, mask: jax.Array) -> jax.Array:  # [N, T] -> [N, T]
  """G_t = Σ_{s ≥ t} r_s over the masked tokens (γ = 1), 0 off the mask."""
  r = _f32(rewards) * _f32(mask)
  return jnp.flip(jnp.cumsum(jnp.flip(r, axis=1), axis=1), axis=1) * _f32(mask)


def reinforce_pp_advantages(
  scores: jax.Array,  # [N]
  kl: jax.Array,  # [N, T] per-token KL estimate to the reference
  mask: jax.Array,  # [N, T]
  *,
  kl_coef: float,
) -> jax.Array:
  """REINFORCE++: returns-to-go of r_t = −β KL_t (+ the score at the last token), whitened
  over all response tokens of the batch [N, T]."""
  rewards = token_rewards(scores, kl, mask, beta=kl_coef)
  return masked_whiten(returns_to_go(rewards, mask), mask)


def advantages(
  estimator: str,
  scores: jax.Array,  # [N]
  kl: jax.Array,  # [N, T]
  mask: jax.Array,  # [N, T]
  *,
  group_size: int,
  kl_coef: float = 0.0,
  scale: str = "std",
) -> jax.Array:
  """Per-token advantages [N, T] by `estimator` (see the module docstring)."""
  if estimator not in ESTIMATORS:
    raise ValueError(f"advantage estimator={estimator!r}; expected one of {ESTIMATORS}")
  mask = _f32(mask)
  if estimator == "reinforce_pp":
    return reinforce_pp_advantages(scores, kl, mask, kl_coef=kl_coef)
  rewards = _f32(scores) - kl_coef * jnp.sum(_f32(kl) * mask, axis=1)
  if estimator == "rloo":
    per_response = rloo_advantages(rewards, group_size)
  else:
    per_response = group_advantages(rewards, group_size, scale=scale)
  return per_response[:, None] * mask


def advantage_metrics(
  rewards: jax.Array,  # [N] the responses' rewards the advantages use (scores + penalties)
  kl: jax.Array,  # [N, T] per-token KL estimate at sampling time, 0 off the mask
  entropy: jax.Array,  # [N, T] the policy's entropy at each position
  mask: jax.Array,  # [N, T]
) -> dict[str, jax.Array]:
  """The metrics every algorithm logs from its advantage pass, under shared names:
  objective/kl (nats per response), objective/kl_per_token, objective/rewards (the mean
  reward), policy/entropy."""
  return {
    "objective/kl": jnp.mean(jnp.sum(_f32(kl) * _f32(mask), axis=1)),
    "objective/kl_per_token": masked_mean(kl, mask),
    "objective/rewards": jnp.mean(_f32(rewards)),
    "policy/entropy": masked_mean(entropy, mask),
  }
