"""Per-token and per-sequence log-probabilities of given tokens: what DPO, PPO and GRPO score.

Shapes: B batch, T sequence, D model width, V vocabulary. `targets` are the next tokens (the
data pipeline shifts them), so `logits[:, t]` scores `targets[:, t]`. The softmax runs in
float32 whatever the logits' dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp


def token_logprobs(
  logits: jax.Array,  # [B, T, V]
  targets: jax.Array,  # [B, T] int
) -> jax.Array:
  """log p(targets[b, t]) [B, T] float32."""
  logits = logits.astype(jnp.float32)
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
  return target_logit - jax.nn.logsumexp(logits, axis=-1)


def token_entropy(logits: jax.Array) -> jax.Array:
  """H(softmax(logits)) [B, T] float32."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp) * logp, axis=-1)


def chunked_token_logprobs(
  hidden: jax.Array,  # [B, T, D]
  logits_fn: Callable[[jax.Array], jax.Array],  # [B, C, D] -> [B, C, V]
  targets: jax.Array,  # [B, T]
  *,
  chunk_size: int,
  with_entropy: bool = False,
):
  """`token_logprobs(logits_fn(hidden), targets)` [B, T], one [B, C, V] logit block at a time;
  with `with_entropy`, `(logprobs, entropy)` (entropy of the whole distribution per token).

  As `objectives.lm.chunked_cross_entropy_sums`: a `lax.scan` over T / chunk_size pieces,
  each rematerialized in the backward pass. `chunk_size` 0 (or ≥ T) computes all at once.
  """

  def stats(h, y):
    logits = logits_fn(h)
    logp = token_logprobs(logits, y)
    return (logp, token_entropy(logits)) if with_entropy else logp

  b, t, _ = hidden.shape
  if chunk_size <= 0 or chunk_size >= t:
    return stats(hidden, targets)
  if t % chunk_size:
    raise ValueError(f"loss chunk_size={chunk_size} must divide the sequence length T={t}")

  def split(x):  # [B, T, ...] -> [T / C, B, C, ...]
    return jnp.swapaxes(x.reshape(b, t // chunk_size, chunk_size, *x.shape[2:]), 0, 1)

  @jax.checkpoint
  def chunk(_, hy):
    return None, stats(*hy)

  _, pieces = jax.lax.scan(chunk, None, (split(hidden), split(targets)))  # [T / C, B, C]
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(b, t), pieces)


def sequence_logprobs(
  token_logps: jax.Array,  # [B, T]
  mask: jax.Array,  # [B, T] {0, 1}
) -> jax.Array:
  """Σ_t mask · log p [B]: the log-probability of each row's masked tokens."""
  return jnp.sum(token_logps * mask.astype(jnp.float32), axis=-1)


def shift_left(x: jax.Array) -> jax.Array:
  """x[:, t + 1] at t (0 at the end): a token-aligned mask [B, T] aligned with `targets`."""
  return jnp.pad(x[:, 1:], ((0, 0), (0, 1)))
