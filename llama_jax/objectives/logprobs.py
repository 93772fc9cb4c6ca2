"""Per-token and per-sequence log-probabilities of given tokens: what DPO, PPO and GRPO score.

Shapes: B batch, T sequence, D model width, V vocabulary. `targets` are the next tokens (the
data pipeline shifts them), so `logits[:, t]` scores `targets[:, t]`. The softmax runs in
float32 whatever the logits' dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp


def scan_chunks(
  fn: Callable[..., Any],
  arrays: tuple[jax.Array, ...],  # each [B, T, ...]
  *,
  chunk_size: int,
  combine: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> Any:
  """`fn(*arrays)` computed over T / chunk_size pieces [B, C, ...] in a `lax.scan`, each
  piece rematerialized in the backward pass: peak memory holds what `fn` makes of one piece
  (a [B, C, V] logit block) instead of all of them. The pieces' results are folded with
  `combine` (e.g. `jnp.add` for sums), or else joined back along T (per-token [B, C, ...]
  results). `chunk_size` 0 (or ≥ T) calls `fn` on everything at once.
  """
  b, t = arrays[0].shape[:2]
  if chunk_size <= 0 or chunk_size >= t:
    return fn(*arrays)
  if t % chunk_size:
    raise ValueError(f"loss chunk_size={chunk_size} must divide the sequence length T={t}")

  def split(x):  # [B, T, ...] -> [T / C, B, C, ...]
    return jnp.swapaxes(x.reshape(b, t // chunk_size, chunk_size, *x.shape[2:]), 0, 1)

  pieces = tuple(split(x) for x in arrays)
  piece_fn = jax.checkpoint(fn)
  if combine is not None:
    shapes = jax.eval_shape(fn, *(p[0] for p in pieces))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    body = lambda total, xs: (jax.tree.map(combine, total, piece_fn(*xs)), None)
    return jax.lax.scan(body, zeros, pieces)[0]
  _, out = jax.lax.scan(lambda _, xs: (None, piece_fn(*xs)), None, pieces)  # [T / C, B, C, ...]
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(b, t, *x.shape[3:]), out)


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

  One [B, C, V] block at a time: `scan_chunks`. `chunk_size` 0 (or ≥ T) computes all at once.
  """

  def stats(h, y):
    logits = logits_fn(h)
    logp = token_logprobs(logits, y)
    return (logp, token_entropy(logits)) if with_entropy else logp

  return scan_chunks(stats, (hidden, targets), chunk_size=chunk_size)


def sequence_logprobs(
  token_logps: jax.Array,  # [B, T]
  mask: jax.Array,  # [B, T] {0, 1}
) -> jax.Array:
  """Σ_t mask · log p [B]: the log-probability of each row's masked tokens."""
  return jnp.sum(token_logps * mask.astype(jnp.float32), axis=-1)


def shift_left(x: jax.Array) -> jax.Array:
  """x[:, t + 1] at t (0 at the end): a token-aligned mask [B, T] aligned with `targets`."""
  return jnp.pad(x[:, 1:], ((0, 0), (0, 1)))
