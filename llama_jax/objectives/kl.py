"""Per-token estimators of KL(π ‖ π_ref) from log-probabilities of tokens sampled from π
(Schulman, "Approximating KL divergence", 2020). With r = log π_ref(x) − log π(x):

    k1 = −r                 unbiased, can be negative per token, high variance
    k2 = r² / 2             biased, low variance, non-negative
    k3 = (eˡ − 1) − r       unbiased, non-negative (GRPO's estimator), with l = r

PPO's reward penalty uses k1 by default (Llama 2, InstructGPT); GRPO's loss uses k3.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("k1", "k2", "k3")


def kl_estimate(
  logp: jax.Array,  # [..., T] log π of the sampled tokens
  ref_logp: jax.Array,  # [..., T] log π_ref of the same tokens
  kind: str = "k1",
) -> jax.Array:
  """The per-token estimate [..., T] (float32) of `kind` in `KINDS`."""
  if kind not in KINDS:
    raise ValueError(f"kl estimator {kind!r}; expected one of {KINDS}")
  r = jnp.asarray(ref_logp, jnp.float32) - jnp.asarray(logp, jnp.float32)
  if kind == "k1":
    return -r
  if kind == "k2":
    return 0.5 * jnp.square(r)
  return jnp.expm1(r) - r
