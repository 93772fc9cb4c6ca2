"""PPO for language models (Schulman et al. 2017; Ouyang et al. 2022; Llama 2, section 3.2.3).

Shapes: B responses, T response tokens; `mask` [B, T] is 1 on generated tokens (the stop
token included) and 0 after. Token t's value is V(s_t), the state before token t is emitted.

- `token_rewards` (from `objectives.rl`, shared with REINFORCE++): the per-token reward
  −β · KL_t with the sequence's score added at its last token (Llama 2: R = R̃_c − β KL).
- `gae`: δ_t = r_t + γ V_{t+1} − V_t, A_t = δ_t + γλ A_{t+1}, returns A + V.
- `policy_sums` / `value_sums`: the clipped surrogate and the clipped value loss as masked
  sums and a token count, so token means stay exact under accumulation (`token_mean`).
- `adaptive_kl_beta`: β ← β (1 + clip(KL / target − 1, ±0.2) · n / horizon) (Ziegler et al.).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Shared with the critic-free algorithms; re-exported here where PPO's users look for them.
from llama_jax.objectives.rl import last_index, masked_mean, masked_whiten, token_rewards

__all__ = [
  "adaptive_kl_beta", "explained_variance", "gae", "last_index", "masked_mean", "masked_whiten",
  "policy_loss", "policy_sums", "token_mean", "token_rewards", "value_loss", "value_sums",
]  # fmt: skip


def _f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def gae(
  rewards: jax.Array,  # [B, T]
  values: jax.Array,  # [B, T]
  mask: jax.Array,  # [B, T]
  *,
  gamma: float,
  lam: float,
) -> tuple[jax.Array, jax.Array]:
  """(advantages, returns) [B, T] by generalized advantage estimation, 0 where `mask` is 0.

  Masked tokens end the episode: the value after a row's last token is 0, and a gap in the
  mask does not carry advantages across it.
  """
  mask = _f32(mask)
  rewards, values = _f32(rewards) * mask, _f32(values) * mask
  next_values = jnp.pad(values[:, 1:], ((0, 0), (0, 1)))
  next_mask = jnp.pad(mask[:, 1:], ((0, 0), (0, 1)))
  deltas = rewards + gamma * next_values * next_mask - values

  def step(carry, x):  # backwards over time
    delta, nm = x
    adv = delta + gamma * lam * nm * carry
    return adv, adv

  _, advantages = jax.lax.scan(
    step, jnp.zeros(mask.shape[0]), (deltas.T, next_mask.T), reverse=True
  )
  advantages = advantages.T * mask
  return advantages, (advantages + values) * mask


def policy_sums(
  logp: jax.Array,  # [B, T] log π_θ of the sampled tokens
  old_logp: jax.Array,  # [B, T] log π at sampling time
  advantages: jax.Array,  # [B, T]
  mask: jax.Array,  # [B, T]
  *,
  clip_eps: float = 0.2,
  clip_eps_high: float | None = None,
) -> dict[str, jax.Array]:
  """Masked sums of the clipped surrogate loss max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε_high)),
  ρ = π_θ / π_old; of the clipped tokens; of the approximate KL ½ (log ρ)²; and the count."""
  mask = _f32(mask)
  log_ratio = _f32(logp) - _f32(old_logp)
  ratio = jnp.exp(log_ratio)
  high = clip_eps if clip_eps_high is None else clip_eps_high
  adv = _f32(advantages)
  unclipped = -adv * ratio
  clipped = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
  return {
    "loss_sum": jnp.sum(jnp.maximum(unclipped, clipped) * mask),
    "clipped": jnp.sum((clipped > unclipped) * mask),
    "approx_kl_sum": jnp.sum(0.5 * jnp.square(log_ratio) * mask),
    "ratio_sum": jnp.sum(ratio * mask),
    "tokens": jnp.sum(mask),
  }


def value_sums(
  values: jax.Array,  # [B, T] V_θ
  old_values: jax.Array,  # [B, T] V at rollout time
  returns: jax.Array,  # [B, T]
  mask: jax.Array,  # [B, T]
  *,
  clip_eps: float = 0.2,
) -> dict[str, jax.Array]:
  """Masked sums of ½ max((V − R)², (clip(V, V_old ± ε) − R)²), of clipped tokens, the count."""
  mask = _f32(mask)
  values, old_values, returns = _f32(values), _f32(old_values), _f32(returns)
  clipped_values = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
  loss_unclipped = jnp.square(values - returns)
  loss_clipped = jnp.square(clipped_values - returns)
  return {
    "loss_sum": 0.5 * jnp.sum(jnp.maximum(loss_unclipped, loss_clipped) * mask),
    "clipped": jnp.sum((loss_clipped > loss_unclipped) * mask),
    "tokens": jnp.sum(mask),
  }


def token_mean(sums: dict[str, jax.Array], prefix: str) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`(loss, metrics)` of `policy_sums` (prefix "policy") or `value_sums` ("value")."""
  count = jnp.maximum(sums["tokens"], 1.0)
  loss = sums["loss_sum"] / count
  metrics = {f"loss/{prefix}": loss, f"{prefix}/clipfrac": sums["clipped"] / count}
  if "approx_kl_sum" in sums:
    metrics["policy/approxkl"] = sums["approx_kl_sum"] / count
    metrics["policy/ratio"] = sums["ratio_sum"] / count
  return loss, metrics


def policy_loss(logp, old_logp, advantages, mask, *, clip_eps=0.2, clip_eps_high=None):
  """Token-mean clipped surrogate `(loss, metrics)` (see `policy_sums`)."""
  sums = policy_sums(
    logp, old_logp, advantages, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high
  )
  return token_mean(sums, "policy")


def value_loss(values, old_values, returns, mask, *, clip_eps=0.2):
  """Token-mean clipped value loss `(loss, metrics)` (see `value_sums`)."""
  return token_mean(value_sums(values, old_values, returns, mask, clip_eps=clip_eps), "value")


def adaptive_kl_beta(
  beta: float, kl: float, num_steps: int, *, target: float, horizon: int
) -> float:
  """The adaptive controller's next β after `num_steps` samples with mean KL `kl`."""
  error = min(max(kl / target - 1.0, -0.2), 0.2)
  return beta * (1.0 + error * num_steps / horizon)


def explained_variance(values: jax.Array, returns: jax.Array, mask: jax.Array) -> jax.Array:
  """1 − Var[R − V] / Var[R] over the masked tokens."""
  mean_r = masked_mean(returns, mask)
  var_r = masked_mean(jnp.square(_f32(returns) - mean_r), mask)
  diff = _f32(returns) - _f32(values)
  var_d = masked_mean(jnp.square(diff - masked_mean(diff, mask)), mask)
  return 1.0 - var_d / jnp.maximum(var_r, 1e-8)
