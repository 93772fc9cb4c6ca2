"""GRPO (Shao et al. 2024): K responses per prompt, advantages from the group's rewards, a
clipped ratio and a k3 KL penalty to the reference inside the loss.

Shapes: N = B · K responses, rows of one prompt adjacent (prompt b owns rows b·K … b·K + K − 1),
T response tokens, `mask` [N, T].

    A_i = (r_i − mean_group(r)) / (std_group(r) + ε)      (scale "none": no division)
    per token: −min(ρ A, clip(ρ, 1 − ε_low, 1 + ε_high) A) + β · k3(π_θ, π_ref)

Aggregation: "sequence_mean" averages each response's tokens, then the responses (the paper);
"token_mean" averages all tokens of the batch (DAPO), so long responses weigh more;
"max_length" sums each response's tokens and divides by a constant, the generation budget
(Dr. GRPO: a per-response length divisor biases toward long wrong and short right answers).
All are kept as sums and a count for exact accumulation (`grpo_mean`).

The advantages may be per response [N] or per token [N, T] (`objectives.rl.advantages`), so
the same loss serves GRPO, Dr. GRPO, RLOO and REINFORCE++.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llama_jax.objectives.kl import kl_estimate
from llama_jax.objectives.rl import SCALES, group_advantages

__all__ = ["AGGREGATIONS", "SCALES", "group_advantages", "grpo_loss", "grpo_mean", "grpo_sums"]

AGGREGATIONS = ("sequence_mean", "token_mean", "max_length")


def grpo_sums(
  logp: jax.Array,  # [N, T] log π_θ of the sampled tokens
  old_logp: jax.Array,  # [N, T] log π at sampling time
  ref_logp: jax.Array,  # [N, T] log π_ref
  advantages: jax.Array,  # [N] or [N, T]
  mask: jax.Array,  # [N, T]
  *,
  clip_eps: float = 0.2,
  clip_eps_high: float | None = None,
  beta: float = 0.04,
  aggregation: str = "sequence_mean",
  max_length: int = 0,
) -> dict[str, jax.Array]:
  """Sums of the loss and its metric terms, and the count `aggregation` divides by
  (`max_length`: the constant of "max_length", e.g. the generation's max_new_tokens)."""
  if aggregation not in AGGREGATIONS:
    raise ValueError(f"grpo aggregation={aggregation!r}; expected one of {AGGREGATIONS}")
  mask = jnp.asarray(mask, jnp.float32)
  logp = jnp.asarray(logp, jnp.float32)
  ratio = jnp.exp(logp - jnp.asarray(old_logp, jnp.float32))
  adv = jnp.asarray(advantages, jnp.float32)
  adv = adv[:, None] if adv.ndim == 1 else adv
  high = clip_eps if clip_eps_high is None else clip_eps_high
  clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + high)
  surrogate = jnp.minimum(ratio * adv, clipped_ratio * adv)
  kl = kl_estimate(logp, ref_logp, "k3")
  per_token = {
    "loss": -surrogate + beta * kl,
    "kl": kl,
    "clipped": (clipped_ratio * adv < ratio * adv).astype(jnp.float32),
    "approx_kl": 0.5 * jnp.square(logp - jnp.asarray(old_logp, jnp.float32)),
  }
  lengths = mask.sum(axis=1)
  if aggregation == "sequence_mean":
    weights = mask / jnp.maximum(lengths, 1.0)[:, None]
    count = jnp.sum(lengths > 0).astype(jnp.float32)
  elif aggregation == "max_length":
    if max_length < 1:
      raise ValueError(f"grpo aggregation 'max_length' needs max_length ≥ 1, got {max_length}")
    # Every row counts, even an empty one: the divisor must not depend on the samples.
    weights, count = mask / max_length, jnp.float32(mask.shape[0])
  else:
    weights, count = mask, jnp.sum(mask)
  sums = {f"{k}_sum": jnp.sum(v * weights) for k, v in per_token.items()}
  return sums | {"count": count}


def grpo_mean(sums: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`(loss, metrics)` from accumulated `grpo_sums`: loss/policy (the loss, KL term
  included), loss/kl (the k3 term before β), policy/clipfrac, policy/approxkl."""
  count = jnp.maximum(sums["count"], 1.0)
  loss = sums["loss_sum"] / count
  return loss, {
    "loss/policy": loss,
    "loss/kl": sums["kl_sum"] / count,
    "policy/clipfrac": sums["clipped_sum"] / count,
    "policy/approxkl": sums["approx_kl_sum"] / count,
  }


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, **kwargs):
  """`(loss, metrics)` of one batch (see `grpo_sums` for the keyword arguments)."""
  return grpo_mean(grpo_sums(logp, old_logp, ref_logp, advantages, mask, **kwargs))
