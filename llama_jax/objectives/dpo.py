"""Direct preference optimization (Rafailov et al. 2023) with the Llama 3 changes.

Inputs are per-pair log-probabilities [B], already summed over each response's mask, under
the policy (π) and the frozen reference (π_ref), for the chosen (w) and rejected (l) responses.
With the implicit reward r(y) = β (log π(y) − log π_ref(y)) and

    δ = (log π(y_w) − log π_ref(y_w)) − (log π(y_l) − log π_ref(y_l))

the per-pair losses are (β multiplies δ exactly once):

    sigmoid  −(1 − ε) log σ(β δ) − ε log σ(−β δ)   (ε = label_smoothing: conservative DPO)
    ipo      (δ − 1 / (2β))²                        (Azar et al. 2023)
    hinge    max(0, 1 − β δ)                        (SLiC, Zhao et al. 2023)

Llama 3 adds an NLL term on the chosen responses, coefficient 0.2:

    L = mean_pairs loss + nll_coef · (token-mean −log π over the chosen responses' tokens)

As elsewhere, `dpo_sums` / `nll_sums` return sums and counts so that means stay exact under
padding and gradient accumulation; `dpo_mean` divides once. Metric names follow the
ecosystem's (`rewards/chosen`, `rewards/rejected`, `rewards/margins`, `rewards/accuracies`,
`logps/chosen`, `logps/rejected`), all means over pairs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LOSS_TYPES = ("sigmoid", "ipo", "hinge")
_PAIR_SUMS = (
  "dpo_loss_sum",
  "rewards_chosen_sum",
  "rewards_rejected_sum",
  "correct",
  "logps_chosen_sum",
  "logps_rejected_sum",
  "pairs",
)


def check_loss_type(loss_type: str, label_smoothing: float = 0.0) -> None:
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"dpo loss_type={loss_type!r}; expected one of {LOSS_TYPES}")
  if not 0.0 <= label_smoothing < 0.5:
    raise ValueError(f"dpo label_smoothing={label_smoothing} must be in [0, 0.5)")
  if label_smoothing and loss_type != "sigmoid":
    raise ValueError(f"label_smoothing applies to loss_type 'sigmoid' only, not {loss_type!r}")


def pair_losses(
  delta: jax.Array,  # [B] policy log-ratio of chosen minus that of rejected
  *,
  beta: float,
  loss_type: str = "sigmoid",
  label_smoothing: float = 0.0,
) -> jax.Array:
  """The per-pair DPO loss [B] of δ (see the module docstring)."""
  check_loss_type(loss_type, label_smoothing)
  if loss_type == "sigmoid":
    return -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * delta) - (
      label_smoothing * jax.nn.log_sigmoid(-beta * delta)
    )
  if loss_type == "ipo":
    return jnp.square(delta - 1.0 / (2.0 * beta))
  return jax.nn.relu(1.0 - beta * delta)


def dpo_sums(
  policy_chosen_logps: jax.Array,  # [B]
  policy_rejected_logps: jax.Array,  # [B]
  ref_chosen_logps: jax.Array,  # [B]
  ref_rejected_logps: jax.Array,  # [B]
  valid: jax.Array | None = None,  # [B] {0, 1}; 0 for padding rows
  *,
  beta: float,
  loss_type: str = "sigmoid",
  label_smoothing: float = 0.0,
) -> dict[str, jax.Array]:
  """Sums over the valid pairs of the loss and the metric terms, and the pair count."""
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  pc, pr = f32(policy_chosen_logps), f32(policy_rejected_logps)
  chosen_ratio = pc - f32(ref_chosen_logps)
  rejected_ratio = pr - f32(ref_rejected_logps)
  losses = pair_losses(
    chosen_ratio - rejected_ratio, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing
  )
  w = jnp.ones_like(pc) if valid is None else f32(valid)
  chosen_rewards, rejected_rewards = beta * chosen_ratio, beta * rejected_ratio
  return {
    "dpo_loss_sum": jnp.sum(losses * w),
    "rewards_chosen_sum": jnp.sum(chosen_rewards * w),
    "rewards_rejected_sum": jnp.sum(rejected_rewards * w),
    "correct": jnp.sum((chosen_rewards > rejected_rewards) * w),
    "logps_chosen_sum": jnp.sum(pc * w),
    "logps_rejected_sum": jnp.sum(pr * w),
    "pairs": jnp.sum(w),
  }


def nll_sums(
  chosen_token_logps: jax.Array,  # [B, T]
  chosen_mask: jax.Array,  # [B, T] {0, 1}: the chosen responses' target tokens
) -> dict[str, jax.Array]:
  """`nll_sum` (−Σ log π over the masked tokens) and `nll_tokens` (their count)."""
  mask = chosen_mask.astype(jnp.float32)
  return {"nll_sum": -jnp.sum(chosen_token_logps * mask), "nll_tokens": jnp.sum(mask)}


def dpo_mean(
  sums: dict[str, jax.Array], *, nll_coef: float = 0.0
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`(loss, metrics)` from accumulated sums: pair terms divided by the pair count, the NLL
  by the chosen token count (`nll_sums`; needed when `nll_coef` is nonzero)."""
  pairs = jnp.maximum(sums["pairs"], 1.0)
  mean = {k: sums[k] / pairs for k in _PAIR_SUMS if k != "pairs"}
  metrics = {
    "dpo_loss": mean["dpo_loss_sum"],
    "rewards/chosen": mean["rewards_chosen_sum"],
    "rewards/rejected": mean["rewards_rejected_sum"],
    "rewards/margins": mean["rewards_chosen_sum"] - mean["rewards_rejected_sum"],
    "rewards/accuracies": mean["correct"],
    "logps/chosen": mean["logps_chosen_sum"],
    "logps/rejected": mean["logps_rejected_sum"],
    "pairs": sums["pairs"],
  }
  loss = metrics["dpo_loss"]
  if "nll_sum" in sums:
    metrics["nll"] = sums["nll_sum"] / jnp.maximum(sums["nll_tokens"], 1.0)
    loss = loss + nll_coef * metrics["nll"]
  elif nll_coef:
    raise ValueError("nll_coef is set but the sums have no nll_sum (see nll_sums)")
  metrics["loss"] = loss
  return loss, metrics


def dpo_loss(
  policy_chosen_logps: jax.Array,  # [B]
  policy_rejected_logps: jax.Array,  # [B]
  ref_chosen_logps: jax.Array,  # [B]
  ref_rejected_logps: jax.Array,  # [B]
  *,
  beta: float,
  loss_type: str = "sigmoid",
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean DPO loss over the pairs and its metrics (see the module docstring)."""
  sums = dpo_sums(
    policy_chosen_logps,
    policy_rejected_logps,
    ref_chosen_logps,
    ref_rejected_logps,
    beta=beta,
    loss_type=loss_type,
    label_smoothing=label_smoothing,
  )
  return dpo_mean(sums)
