"""Orbax save / resume: round trips, async saves, retention, cross-mesh restore, params-only
loads, mismatch errors and a save killed (SIGKILL) before its commit."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llama_jax import LlamaConfig
from llama_jax.checkpoint import CheckpointError
from llama_jax.checkpoint.orbax import CheckpointManager, checkpoint_dir, load_params
from llama_jax.parallel import sharding

REPO = Path(__file__).resolve().parents[2]
CFG = LlamaConfig.preset("tiny")
OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
DATA_STATE = {"grain": {"next_index": 12}, "batches": 3, "dropped_rows": 0}
META = {"config": {"model": "tiny", "lr": 1e-3}, "note": "unit test"}


@flax.struct.dataclass
class TrainState:
  """Same shape as the training loop's state."""

  step: jax.Array
  params: dict
  opt_state: optax.OptState
  rng: jax.Array
  skipped: jax.Array


def abstract_state(mesh):
  """ShapeDtypeStructs with the target shardings on `mesh`; nothing allocated."""
  params = jax.eval_shape(lambda: sharding.init_params(CFG, jax.random.PRNGKey(0), mesh))
  params = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    params,
    sharding.param_shardings(CFG, mesh),
  )
  replicated = NamedSharding(mesh, P())
  # jit(optimizer.init) alone leaves the moments on one device: zeros do not depend on the
  # params, so sharding propagation gives them nothing. Map the param shardings instead.
  opt_state = optax.tree_map_params(
    OPTIMIZER,
    lambda _, p: p,
    jax.eval_shape(OPTIMIZER.init, params),
    params,
    transform_non_params=lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
  )
  scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  rng = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
  return TrainState(step=scalar, params=params, opt_state=opt_state, rng=rng, skipped=scalar)


def shardings_of(tree):
  return jax.tree.map(lambda x: x.sharding, tree)


def make_state(mesh, seed: int, step: int = 7) -> TrainState:
  """A state whose optimizer moments are non-zero (one update taken), all leaves sharded."""
  target = abstract_state(mesh)
  params = sharding.init_params(CFG, jax.random.PRNGKey(seed), mesh)

  def init_and_update(params):
    opt_state = OPTIMIZER.init(params)
    grads = jax.tree.map(jnp.sin, params)
    return OPTIMIZER.update(grads, opt_state, params)[1]

  opt_state = jax.jit(init_and_update, out_shardings=shardings_of(target.opt_state))(params)
  replicated = NamedSharding(mesh, P())
  return TrainState(
    step=jax.device_put(jnp.int32(step), replicated),
    params=params,
    opt_state=opt_state,
    rng=jax.device_put(jax.random.PRNGKey(seed + 100), replicated),
    skipped=jax.device_put(jnp.int32(2), replicated),
  )


def assert_trees_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
  ):
    assert np.asarray(g).dtype == np.asarray(w).dtype, jax.tree_util.keystr(path)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=jax.tree_util.keystr(path))


def assert_shardings(got, target):
  for (path, g), t in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(target), strict=True
  ):
    assert g.sharding.is_equivalent_to(t.sharding, g.ndim), jax.tree_util.keystr(path)


@pytest.fixture(scope="module")
def mesh8():
  return sharding.make_mesh(fsdp=8)


@pytest.fixture(scope="module")
def mesh42():
  return sharding.make_mesh(fsdp=4, tensor=2)


@pytest.fixture(scope="module")
def state8(mesh8):
  return make_state(mesh8, seed=1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, state8):
  """A workdir with a checkpoint of `state8` at step 7 (with data state and meta)."""
  workdir = tmp_path_factory.mktemp("run")
  with CheckpointManager(checkpoint_dir(workdir)) as ckpt:
    assert ckpt.save(7, state8, data_state=DATA_STATE, meta=META, force=True)
  return workdir


def small_state(mesh, value: float):
  """A cheap sharded pytree for the tests that only count steps."""
  x = jnp.full((16, 4), value, jnp.float32)
  return {"w": jax.device_put(x, NamedSharding(mesh, P("fsdp")))}


def test_round_trip_is_bit_identical(saved, state8, mesh8):
  target = abstract_state(mesh8)
  with CheckpointManager(checkpoint_dir(saved)) as ckpt:
    assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]
    state, data_state, meta = ckpt.restore(abstract_state=target)
  assert isinstance(state, TrainState)
  assert_trees_equal(state, state8)
  assert_shardings(state, target)
  assert int(state.step) == 7 and int(state.skipped) == 2
  assert state.rng.dtype == jnp.uint32
  assert data_state == DATA_STATE and meta == META


def test_async_save_copies_before_returning(tmp_path, state8, mesh8):
  """The training step donates the state right after `save` returns: the save must not care."""
  state = jax.device_put(state8, shardings_of(state8), may_alias=False)  # a copy to delete
  with CheckpointManager(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(4, state, data_state={"batches": 4}, force=True)
    for x in jax.tree.leaves(state):
      x.delete()  # what donation does to the buffers
    ckpt.wait_until_finished()
    assert (tmp_path / "4").is_dir() and ckpt.all_steps() == [4]
    restored, data_state, meta = ckpt.restore(4, abstract_state=abstract_state(mesh8))
  assert_trees_equal(restored, state8)
  assert data_state == {"batches": 4} and meta is None


def test_relative_directory(tmp_path, monkeypatch, state8, mesh8):
  """Workdirs given on the command line are often relative; Orbax needs absolute paths."""
  monkeypatch.chdir(tmp_path)
  with CheckpointManager(checkpoint_dir("run"), async_save=False) as ckpt:
    assert ckpt.save(1, state8, force=True)
  with CheckpointManager(checkpoint_dir("run")) as ckpt:
    restored, _, _ = ckpt.restore(1, abstract_state=abstract_state(mesh8))
  assert_trees_equal(restored, state8)
  assert (tmp_path / "run" / "checkpoints" / "1").is_dir()


def test_retention_keeps_the_last_two(tmp_path, mesh8):
  with CheckpointManager(tmp_path, max_to_keep=2) as ckpt:
    for step in range(1, 5):
      assert ckpt.save(step, small_state(mesh8, step), force=True)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 4]
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.isdigit()) == ["3", "4"]
  with CheckpointManager(tmp_path, read_only=True) as ckpt:
    target = jax.tree.map(ocp.tree.to_shape_dtype_struct, small_state(mesh8, 0))
    state, _, _ = ckpt.restore(abstract_state=target)
  np.testing.assert_array_equal(state["w"], np.full((16, 4), 4.0))


def test_save_interval_steps(tmp_path, mesh8):
  with CheckpointManager(tmp_path, save_interval_steps=3) as ckpt:
    saved = [s for s in range(1, 8) if ckpt.save(s, small_state(mesh8, s))]
    assert saved == [3, 6]
    assert ckpt.save(7, small_state(mesh8, 7), force=True)  # e.g. the run's last step
    assert not ckpt.save(7, small_state(mesh8, 7), force=True)  # never overwritten
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 6, 7] and ckpt.latest_step() == 7


def test_restore_onto_another_mesh(saved, state8, mesh42):
  target = abstract_state(mesh42)
  with CheckpointManager(checkpoint_dir(saved), read_only=True) as ckpt:
    state, _, _ = ckpt.restore(7, abstract_state=target)
  assert_trees_equal(state, state8)
  assert_shardings(state, target)
  q = state.params["layers_0"]["attn"]["q"]
  assert q.sharding.mesh.shape == {"data": 1, "fsdp": 4, "tensor": 2}
  assert q.addressable_shards[0].data.shape == (16, 2, 16)  # was (8, 4, 16) on fsdp=8
  assert state8.params["layers_0"]["attn"]["q"].addressable_shards[0].data.shape == (8, 4, 16)
  mu = state.opt_state[1][0].mu["embed"]
  assert mu.sharding == target.opt_state[1][0].mu["embed"].sharding
  assert len(mu.addressable_shards) == 8 and mu.addressable_shards[0].data.shape != mu.shape


def test_load_params_from_a_workdir_reads_params_only(saved, state8, mesh42, monkeypatch):
  read = []
  deserialize = ocp.type_handlers.ArrayHandler.deserialize

  async def spy(self, infos, args=None):
    read.extend(info.name for info in infos)
    return await deserialize(self, infos, args)

  monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "deserialize", spy)
  target = abstract_state(mesh42).params
  params = load_params(saved, target)  # the workdir, not its checkpoints/ subdirectory
  assert_trees_equal(params, state8.params)
  assert_shardings(params, target)
  assert read and all(name.startswith("params.") for name in read), read
  assert_trees_equal(load_params(checkpoint_dir(saved), target, step=7), state8.params)


def test_load_params_casts_to_the_target_dtype(saved, state8, mesh8):
  target = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16, sharding=x.sharding),
    abstract_state(mesh8).params,
  )
  params = load_params(saved, target)
  assert_trees_equal(params, jax.tree.map(lambda x: x.astype(jnp.bfloat16), state8.params))


def test_mismatch_errors_name_the_parameter(saved, mesh8):
  target = abstract_state(mesh8)
  embed = target.params["embed"]
  wider = dict(
    target.params, embed=jax.ShapeDtypeStruct((256, 64), embed.dtype, sharding=embed.sharding)
  )
  with CheckpointManager(checkpoint_dir(saved), read_only=True) as ckpt:
    with pytest.raises(CheckpointError) as err:
      ckpt.restore(abstract_state=target.replace(params=wider))
  message = str(err.value)
  assert str(checkpoint_dir(saved)) in message and "step 7" in message
  assert "params/embed saved (512, 64) vs target (256, 64)" in message

  fewer = {k: v for k, v in target.params.items() if k != "lm_head"}
  with pytest.raises(
    CheckpointError, match="in the checkpoint but not in the target: params/lm_head"
  ):
    load_params(saved, fewer)
  replicated = NamedSharding(mesh8, P())
  extra = dict(target.params, bias=jax.ShapeDtypeStruct((64,), jnp.float32, sharding=replicated))
  with pytest.raises(CheckpointError, match="not in the checkpoint: params/bias"):
    load_params(saved, extra)


def test_missing_checkpoints_and_bad_metadata(tmp_path, mesh8):
  with CheckpointManager(tmp_path) as ckpt:
    assert ckpt.latest_step() is None and ckpt.all_steps() == []
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
      ckpt.restore(abstract_state=small_state(mesh8, 0))
    with pytest.raises(ValueError, match="data_state must be JSON-serializable"):
      ckpt.save(1, small_state(mesh8, 1), data_state={"x": object()}, force=True)
    assert ckpt.save(1, small_state(mesh8, 1), force=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint for step 2; steps: \\[1\\]"):
      ckpt.restore(2, abstract_state=small_state(mesh8, 0))


# A writer whose second save is held just before its commit (the step directory's rename),
# with every array and JSON file already written: the sharpest moment to be killed.
_INTERRUPTED_WRITER = textwrap.dedent(
  """
  import asyncio, sys
  import jax, jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from orbax.checkpoint._src.path import atomicity
  from llama_jax.parallel import sharding
  from llama_jax.checkpoint.orbax import CheckpointManager

  directory, marker = sys.argv[1], sys.argv[2]
  mesh = sharding.make_mesh(fsdp=8)
  def state(step):
    w = jnp.arange(4096 * 64, dtype=jnp.float32).reshape(4096, 64) * step
    return {"w": jax.device_put(w, NamedSharding(mesh, P("fsdp")))}

  finalize = atomicity.AtomicRenameTemporaryPath.finalize
  async def hold_step_commit(self):
    if str(self.get_final().parent) == directory:  # the step directory, not an item inside it
      open(marker, "w").write(str(self.get()))
      await asyncio.sleep(600)
    await finalize(self)

  ckpt = CheckpointManager(directory, async_save=True)
  ckpt.save(1, state(1), data_state={"batches": 1}, force=True)
  ckpt.wait_until_finished()
  atomicity.AtomicRenameTemporaryPath.finalize = hold_step_commit
  ckpt.save(2, state(2), data_state={"batches": 2}, force=True)
  ckpt.wait_until_finished()  # never returns: killed by the test
  """
)


def test_save_killed_before_commit_is_ignored(tmp_path, mesh8):
  directory, marker = tmp_path / "checkpoints", tmp_path / "held"
  env = dict(os.environ, PYTHONPATH=str(REPO))
  writer = subprocess.Popen(
    [sys.executable, "-c", _INTERRUPTED_WRITER, str(directory), str(marker)],
    cwd=REPO,
    env=env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
  )
  try:
    deadline = time.monotonic() + 120
    while not marker.exists():
      if writer.poll() is not None:
        pytest.fail(f"writer exited early:\n{writer.stderr.read().decode()[-3000:]}")
      assert time.monotonic() < deadline, "writer never reached the commit"
      time.sleep(0.05)
    os.kill(writer.pid, signal.SIGKILL)
  finally:
    writer.kill()
    writer.wait()
    writer.stderr.close()
  assert writer.returncode == -signal.SIGKILL

  # What is left: the complete step 1 and step 2's fully written but uncommitted tmp directory.
  held = Path(marker.read_text())
  assert held.name == "2.orbax-checkpoint-tmp" and held.is_dir()
  assert (held / "state").is_dir() and (held / "data" / "process_0-of-1.json").exists()
  assert sorted(p.name for p in directory.iterdir()) == [
    "1",
    "2.orbax-checkpoint-tmp",
  ]

  target = {
    "w": jax.ShapeDtypeStruct((4096, 64), jnp.float32, sharding=NamedSharding(mesh8, P("fsdp")))
  }
  expected = np.arange(4096 * 64, dtype=np.float32).reshape(4096, 64)
  with CheckpointManager(directory, read_only=True) as ckpt:  # leaves the tmp directory alone
    assert ckpt.latest_step() == 1 and ckpt.all_steps() == [1]
    state, data_state, _ = ckpt.restore(abstract_state=target)
  np.testing.assert_array_equal(state["w"], expected)
  assert data_state == {"batches": 1}
  assert held.is_dir()

  # A resumed run: opening a writer removes the stale tmp directory; step 2 is then saved anew.
  with CheckpointManager(directory) as ckpt:
    assert ckpt.latest_step() == 1
    w = jax.device_put(jnp.asarray(expected * 2), target["w"].sharding)
    assert ckpt.save(2, {"w": w}, data_state={"batches": 2}, force=True)
    ckpt.wait_until_finished()
    state, data_state, _ = ckpt.restore(abstract_state=target)
  assert not held.exists() and ckpt.all_steps() == [1, 2]
  np.testing.assert_array_equal(state["w"], expected * 2)
  assert data_state == {"batches": 2}
  assert json.loads((directory / "2" / "data" / "process_0-of-1.json").read_text()) == data_state
