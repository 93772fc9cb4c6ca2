"""The LM train step: optimizer settings, sharded == single device, accumulation, non-finite."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from llama_jax import LlamaConfig
from llama_jax.model.llama import positions_from_segments
from llama_jax.parallel import sharding
from llama_jax.steps import common, lm
from llama_jax.training import train_state as ts

CFG = LlamaConfig.preset("tiny")
OPT = ts.OptimizerConfig(learning_rate=1e-2, warmup_steps=2, total_steps=10)


def make_batch(rows, t=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, CFG.vocab_size, (rows, t)).astype(np.int32)
  segments = np.ones((rows, t), np.int32)
  segments[::2, t // 2 :] = 2  # packed rows: two documents
  segments[1::4, -3:] = 0  # and some padding
  return {
    "tokens": tokens,
    "segment_ids": segments,
    "positions": np.asarray(positions_from_segments(jnp.asarray(segments))),
    "targets": np.roll(tokens, -1, axis=1),
    "target_mask": (segments != 0).astype(np.int32) * (np.roll(segments, -1, 1) == segments),
    "valid": np.ones(rows, np.int32),
  }


def run_steps(mesh, batches, *, accum=1, chunk=0, state=None, optimizer=None):
  optimizer = optimizer or ts.make_optimizer(OPT)
  shardings = ts.state_shardings(CFG, optimizer, mesh)
  if state is None:
    state = ts.init_train_state(CFG, optimizer, mesh, jax.random.PRNGKey(0))
  step = common.jit_train_step(
    lm.make_train_step(
      CFG,
      optimizer,
      mesh=mesh,
      grad_accum_steps=accum,
      loss_chunk_size=chunk,
      learning_rate_fn=ts.learning_rate_schedule(OPT),
    ),
    shardings,
    mesh,
  )
  history = []
  for batch in batches:
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def single_device_mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def reference():
  batches = [make_batch(8, seed=i) for i in range(3)]
  return batches, run_steps(single_device_mesh(), batches)


def assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_learning_rate_schedule_by_hand():
  cfg = ts.OptimizerConfig(
    learning_rate=1.0, warmup_steps=10, total_steps=110, final_lr_fraction=0.1
  )
  lr = ts.learning_rate_schedule(cfg)
  assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(0.5)
  assert float(lr(10)) == pytest.approx(1.0)
  assert float(lr(60)) == pytest.approx(0.1 + 0.9 * 0.5)  # cosine half way
  assert float(lr(110)) == pytest.approx(0.1) and float(lr(500)) == pytest.approx(0.1)
  constant = ts.learning_rate_schedule(
    ts.OptimizerConfig(learning_rate=2.0, warmup_steps=4, schedule="constant")
  )
  assert float(constant(2)) == pytest.approx(1.0) and float(constant(1000)) == 2.0
  with pytest.raises(ValueError, match="schedule='exp'"):
    ts.OptimizerConfig(schedule="exp")


def test_adamw_settings_and_norm_mask():
  """One update equals a hand-written AdamW step; RMSNorm scales are not decayed."""
  cfg = ts.OptimizerConfig(
    learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.5, grad_clip=0.0
  )
  tx = ts.make_optimizer(cfg)
  params = {"attn_norm": {"scale": jnp.ones(3)}, "mlp": {"up": jnp.full((2,), 2.0)}}
  grads = {"attn_norm": {"scale": jnp.full(3, 0.3)}, "mlp": {"up": jnp.full((2,), -0.2)}}
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  # First Adam step: m̂ = g, v̂ = g², so the step is lr · g / (|g| + eps).
  adam = lambda g: 0.1 * g / (abs(g) + 1e-5)
  np.testing.assert_allclose(new["attn_norm"]["scale"], 1 - adam(0.3), rtol=1e-6)
  np.testing.assert_allclose(new["mlp"]["up"], 2 - adam(-0.2) - 0.1 * 0.5 * 2, rtol=1e-6)


def test_clipping_at_global_norm_one():
  """Gradients of norm 3 act as if divided by 3; gradients of norm 0.5 are left alone."""
  settings = dict(learning_rate=0.1, warmup_steps=0, schedule="constant", weight_decay=0.0)
  clipped = ts.make_optimizer(ts.OptimizerConfig(**settings))
  plain = ts.make_optimizer(ts.OptimizerConfig(**settings, grad_clip=0.0))
  params = {"w": jnp.zeros(4)}
  g1 = {"w": jnp.array([3.0, 0.0, 0.0, 0.0])}
  g2 = {"w": jnp.array([0.3, 0.2, 0.2, 0.0])}

  def two_steps(tx, grads):
    state, out = tx.init(params), []
    for g in grads:
      update, state = tx.update(g, state, params)
      out.append(update["w"])
    return out

  expected = two_steps(plain, [jax.tree.map(lambda x: x / 3, g1), g2])
  for got, want in zip(two_steps(clipped, [g1, g2]), expected, strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  unclipped = two_steps(plain, [g1, g2])
  assert not np.allclose(unclipped[1], expected[1])


def test_loss_falls_and_metrics(reference):
  _, (_, history) = reference
  assert [int(m["skipped"]) for m in history] == [0, 0, 0]
  assert all(bool(m["finite"]) for m in history)
  assert history[0]["learning_rate"] == 0 and history[1]["learning_rate"] == pytest.approx(5e-3)
  tokens = make_batch(8)["target_mask"].sum()
  assert history[0]["tokens"] == tokens
  # Repeating one batch must drive its loss down.
  state, again = run_steps(single_device_mesh(), [make_batch(8)] * 6)
  assert again[-1]["loss"] < again[0]["loss"] - 0.1


@pytest.mark.parametrize("axes", [dict(fsdp=8), dict(fsdp=4, tensor=2)])
def test_sharded_step_equals_single_device(reference, axes):
  batches, (ref_state, ref_history) = reference
  state, history = run_steps(sharding.make_mesh(**axes), batches)
  for h, r in zip(history, ref_history, strict=True):
    np.testing.assert_allclose(h["loss"], r["loss"], rtol=1e-5)
    np.testing.assert_allclose(h["grad_norm"], r["grad_norm"], rtol=1e-4)
  assert_trees_close(state.params, ref_state.params, atol=1e-5)
  assert_trees_close(state.opt_state, ref_state.opt_state, atol=1e-5)


def test_accumulated_microbatches_equal_one_big_step():
  """4 micro-batches of 8 rows == one step on 32 rows (with a chunked loss as well)."""
  mesh = sharding.make_mesh(fsdp=8)
  batches = [make_batch(32, seed=10 + i) for i in range(2)]
  big, big_history = run_steps(mesh, batches)
  accum, accum_history = run_steps(mesh, batches, accum=4, chunk=4)
  for a, b in zip(accum_history, big_history, strict=True):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    assert a["tokens"] == b["tokens"]
  assert_trees_close(accum.params, big.params, atol=1e-5)


def test_nonfinite_step_is_skipped_and_counted(reference):
  batches, _ = reference
  mesh = single_device_mesh()
  optimizer = ts.make_optimizer(OPT)
  state = ts.init_train_state(CFG, optimizer, mesh, jax.random.PRNGKey(0))
  norm = state.params["final_norm"]
  poisoned = state.replace(
    params={**state.params, "final_norm": {"scale": norm["scale"].at[0].set(jnp.nan)}}
  )
  before = jax.device_get(poisoned)
  after, history = run_steps(mesh, batches[:1], state=poisoned, optimizer=optimizer)
  assert not history[0]["finite"] and int(history[0]["skipped"]) == 1
  assert int(after.step) == 1 and int(after.skipped) == 1
  assert_trees_close(after.params, before.params, atol=0)  # NaN == NaN for assert_allclose
  assert_trees_close(after.opt_state, before.opt_state, atol=0)


def test_microbatches_must_fit_the_mesh():
  with pytest.raises(ValueError, match="does not split into 3 micro-batches"):
    common.split_microbatches({"tokens": jnp.zeros((8, 4))}, 3)


def test_bfloat16_compute_keeps_float32_master_weights(reference):
  batches, (ref_state, ref_history) = reference
  global CFG
  saved, CFG = CFG, CFG.replace(dtype="bfloat16")
  try:
    state, history = run_steps(single_device_mesh(), batches)
  finally:
    CFG = saved
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.params))
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(state.opt_state) if x.ndim)
  for h, r in zip(history, ref_history, strict=True):
    assert abs(h["loss"] - r["loss"]) < 0.05
  # Adam moves every parameter by about lr per step whatever its gradient's size, so bf16
  # noise can flip a few near-zero gradients: compare the mean change, bound the worst.
  diffs = [
    np.abs(a - b)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(ref_state.params), strict=True)
  ]
  assert np.mean(np.concatenate([d.ravel() for d in diffs])) < 1e-4
  assert max(d.max() for d in diffs) <= 3 * OPT.learning_rate
