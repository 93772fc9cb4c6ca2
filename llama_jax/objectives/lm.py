"""Masked next-token cross entropy, kept as (sum, count) so token means stay exact.

Shapes: B batch, T sequence, D model width, V vocabulary. `targets` are already the next
tokens (the data pipeline shifts them), so position t's logits are scored against
`targets[:, t]` where `mask[:, t]` is 1.

A token mean over a batch that is padded, packed or split into micro-batches is only exact
if the sums and the token count are carried separately and divided once at the end; every
function here therefore returns sums, and `token_mean` does the division.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from llama_jax.objectives.logprobs import scan_chunks

# Sums returned per batch (or chunk); all float32 scalars except `tokens`.
SUM_KEYS = ("loss_sum", "nll_sum", "z_loss_sum", "correct", "tokens")


def cross_entropy_sums(
  logits: jax.Array,  # [B, T, V]
  targets: jax.Array,  # [B, T] int
  mask: jax.Array,  # [B, T] {0, 1}
  *,
  z_loss: float = 0.0,
) -> dict[str, jax.Array]:
  """Sums over the masked tokens of the NLL, the z-loss and the argmax hits, and their count.

  `loss_sum = nll_sum + z_loss · Σ log²Z`, the PaLM z-loss that keeps the softmax
  normalizer near 1. The softmax is computed in float32 whatever the logits' dtype.
  """
  logits = logits.astype(jnp.float32)
  mask = mask.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), -1)[..., 0]
  nll_sum = jnp.sum((log_z - target_logit) * mask)
  z_loss_sum = jnp.sum(jnp.square(log_z) * mask)
  correct = jnp.sum((jnp.argmax(logits, -1) == targets) * mask)
  return {
    "loss_sum": nll_sum + z_loss * z_loss_sum,
    "nll_sum": nll_sum,
    "z_loss_sum": z_loss_sum,
    "correct": correct,
    "tokens": jnp.sum(mask),
  }


def chunked_cross_entropy_sums(
  hidden: jax.Array,  # [B, T, D]
  logits_fn: Callable[[jax.Array], jax.Array],  # [B, C, D] -> [B, C, V]
  targets: jax.Array,  # [B, T]
  mask: jax.Array,  # [B, T]
  *,
  chunk_size: int,
  z_loss: float = 0.0,
) -> dict[str, jax.Array]:
  """`cross_entropy_sums` of `logits_fn(hidden)` without the whole float32 [B, T, V] at once.

  `scan_chunks` turns T / chunk_size pieces into logits one at a time and adds up their sums,
  so peak memory holds one [B, chunk_size, V] block instead of T / chunk_size of them (a 128k
  vocabulary at B·T = 32k tokens is 16 GiB of float32 logits otherwise).
  """

  def chunk_sums(h, y, m):
    return cross_entropy_sums(logits_fn(h), y, m, z_loss=z_loss)

  return scan_chunks(chunk_sums, (hidden, targets, mask), chunk_size=chunk_size, combine=jnp.add)


def token_mean(sums: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`(loss, metrics)` from accumulated sums: every sum divided once by the token count.

  A batch with no target tokens gives loss 0 rather than NaN (max(count, 1) in the
  denominator), so an all-padding batch cannot poison a run.
  """
  count = jnp.maximum(sums["tokens"], 1.0)
  loss = sums["loss_sum"] / count
  metrics = {
    "loss": loss,
    "nll": sums["nll_sum"] / count,
    "z_loss": sums["z_loss_sum"] / count,
    "accuracy": sums["correct"] / count,
    "tokens": sums["tokens"],
  }
  return loss, metrics


def lm_loss(
  logits: jax.Array,  # [B, T, V]
  targets: jax.Array,  # [B, T]
  mask: jax.Array,  # [B, T]
  *,
  z_loss: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Token-mean masked cross entropy `(loss, metrics)` of one batch (see `token_mean`)."""
  return token_mean(cross_entropy_sums(logits, targets, mask, z_loss=z_loss))
