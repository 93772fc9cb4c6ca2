"""The LM loss against numbers computed by hand, chunking, and exactness under splitting."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.objectives import lm
from llama_jax.objectives.logprobs import scan_chunks


def test_cross_entropy_by_hand():
  # One row, two positions, V = 3; the second position is masked out.
  logits = jnp.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 9.0]]])
  targets = jnp.array([[0, 1]])
  mask = jnp.array([[1, 0]])
  sums = lm.cross_entropy_sums(logits, targets, mask, z_loss=1e-2)
  log_z = math.log(math.exp(1) + math.exp(2) + math.exp(3))
  assert sums["nll_sum"] == pytest.approx(log_z - 1.0, rel=1e-6)
  assert sums["z_loss_sum"] == pytest.approx(log_z**2, rel=1e-6)
  assert sums["loss_sum"] == pytest.approx(log_z - 1.0 + 1e-2 * log_z**2, rel=1e-6)
  assert sums["tokens"] == 1 and sums["correct"] == 0  # argmax is 2, target 0
  loss, metrics = lm.lm_loss(logits, targets, mask)
  assert loss == pytest.approx(log_z - 1.0, rel=1e-6)
  assert metrics["accuracy"] == 0 and metrics["tokens"] == 1


def test_bfloat16_logits_are_upcast():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 11)) * 4
  targets = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 11)
  mask = jnp.ones((2, 5))
  low = lm.cross_entropy_sums(logits.astype(jnp.bfloat16), targets, mask)
  high = lm.cross_entropy_sums(logits.astype(jnp.bfloat16).astype(jnp.float32), targets, mask)
  assert low["nll_sum"].dtype == jnp.float32
  np.testing.assert_allclose(low["nll_sum"], high["nll_sum"], rtol=1e-6)


def test_token_mean_is_exact_under_uneven_splits():
  """Per-part means averaged are wrong when parts hold different token counts; sums are not."""
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 6, 7)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 7, (4, 6)))
  mask = jnp.asarray(np.array([[1] * 6, [1, 0, 0, 0, 0, 0], [1] * 3 + [0] * 3, [0] * 6]))
  whole, _ = lm.lm_loss(logits, targets, mask)
  parts = [
    lm.cross_entropy_sums(logits[i : i + 1], targets[i : i + 1], mask[i : i + 1]) for i in range(4)
  ]
  total = jax.tree.map(lambda *xs: sum(xs), *parts)
  np.testing.assert_allclose(lm.token_mean(total)[0], whole, rtol=1e-6)
  mean_of_means = np.mean(
    [lm.lm_loss(logits[i : i + 1], targets[i : i + 1], mask[i : i + 1])[0] for i in range(3)]
  )
  assert abs(mean_of_means - whole) > 1e-2  # what a naive average would get wrong


def test_empty_mask_gives_zero_not_nan():
  loss, metrics = lm.lm_loss(jnp.zeros((1, 3, 5)), jnp.zeros((1, 3), int), jnp.zeros((1, 3)))
  assert loss == 0 and metrics["tokens"] == 0


@pytest.mark.parametrize("chunk", [0, 2, 4, 8])
def test_chunked_equals_full_with_gradients(chunk):
  rng = np.random.default_rng(1)
  b, t, d, v = 2, 8, 5, 13
  hidden = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
  head = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, t)))
  mask = jnp.asarray(rng.integers(0, 2, (b, t)))

  def full(h, w):
    return lm.cross_entropy_sums(h @ w, targets, mask, z_loss=1e-3)["loss_sum"]

  def chunked(h, w):
    return lm.chunked_cross_entropy_sums(
      h, lambda x: x @ w, targets, mask, chunk_size=chunk, z_loss=1e-3
    )["loss_sum"]

  np.testing.assert_allclose(chunked(hidden, head), full(hidden, head), rtol=1e-6)
  g_full = jax.grad(full, argnums=(0, 1))(hidden, head)
  g_chunk = jax.grad(chunked, argnums=(0, 1))(hidden, head)
  for a, b_ in zip(g_chunk, g_full, strict=True):
    np.testing.assert_allclose(a, b_, rtol=1e-5, atol=1e-6)


def test_chunk_must_divide():
  with pytest.raises(ValueError, match="chunk_size=3 must divide the sequence length T=8"):
    lm.chunked_cross_entropy_sums(
      jnp.zeros((1, 8, 2)), lambda x: x, jnp.zeros((1, 8), int), jnp.ones((1, 8)), chunk_size=3
    )


def test_chunked_peak_memory_is_one_chunk():
  """The compiled chunked loss holds one [B, C, V] block of logits, not [B, T, V]."""
  b, t, d, v, c = 2, 512, 16, 4096, 64
  hidden = jnp.zeros((b, t, d))
  head = jnp.zeros((d, v))
  targets = jnp.zeros((b, t), jnp.int32)
  mask = jnp.ones((b, t))

  def temp_bytes(chunk):
    def loss(h, w):
      return lm.chunked_cross_entropy_sums(h, lambda x: x @ w, targets, mask, chunk_size=chunk)[
        "loss_sum"
      ]

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, head).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full_logits = b * t * v * 4
  assert temp_bytes(0) >= full_logits
  assert temp_bytes(c) < full_logits / 2


def test_scan_chunks_joins_or_folds_the_pieces():
  x = jnp.arange(2 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 3)
  double = lambda a: 2 * a  # per-token results come back joined along T
  np.testing.assert_array_equal(scan_chunks(double, (x,), chunk_size=2), 2 * x)
  total = scan_chunks(lambda a: {"s": a.sum()}, (x,), chunk_size=4, combine=jnp.add)
  assert float(total["s"]) == float(x.sum())
  with pytest.raises(ValueError, match="must divide the sequence length T=8"):
    scan_chunks(double, (x,), chunk_size=3)
