"""A workdir nobody can silently damage: checkpoint manifests, restore that falls back past
damaged steps (loudly), retention that counts verified steps only, a full disk reported in one
line, and side files written atomically and recomputed when damaged."""

import contextlib
import errno
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import types
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from orbax.checkpoint._src.path import atomicity

from llama_jax.checkpoint import CheckpointError, atomic, manifest
from llama_jax.checkpoint import orbax as ckpt_lib
from llama_jax.checkpoint.orbax import CheckpointManager, DiskFullError
from llama_jax.parallel import sharding
from llama_jax.training import trainer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(fsdp=8)


def state_at(mesh, step: int):
  """A small sharded state (64 × 64 float32 weights: one 16 KiB array file) for `step`."""
  w = np.random.default_rng(step).standard_normal((64, 64)).astype(np.float32)
  return {"params": {"w": jax.device_put(w, NamedSharding(mesh, P("fsdp")))}}


def target(mesh):
  return {
    "params": {"w": jax.ShapeDtypeStruct((64, 64), jnp.float32, sharding=NamedSharding(mesh, P()))}
  }


def save_steps(directory, mesh, steps, *, async_save=False, **kwargs):
  with CheckpointManager(directory, async_save=async_save, **kwargs) as ckpt:
    for step in steps:
      assert ckpt.save(step, state_at(mesh, step), data_state={"next": step}, force=True)


def array_file(step_dir: Path) -> Path:
  """The largest file of the state item: the one holding the weights."""
  return max(
    (p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
  )


def flip_64_bytes(path: Path) -> None:
  data = bytearray(path.read_bytes())
  middle = len(data) // 2
  data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
  path.write_bytes(bytes(data))


def damage(step_dir: Path, kind: str) -> str:
  """Damages a step directory; returns what the warning must name."""
  if kind == "data_item":
    for p in sorted((step_dir / "data").iterdir()):
      p.unlink()
    (step_dir / "data").rmdir()
    return "data/ missing (the whole item: 2 files)"
  if kind == "metadata":
    size = (step_dir / "state" / "_METADATA").stat().st_size
    (step_dir / "state" / "_METADATA").unlink()
    return f"state/_METADATA missing (expected {size} bytes)"
  if kind == "bitflip":
    path = array_file(step_dir)
    flip_64_bytes(path)
    return f"{path.relative_to(step_dir)} content changed: crc32"
  if kind == "truncate":
    path = array_file(step_dir)
    size = path.stat().st_size
    os.truncate(path, size // 2)
    return f"{path.relative_to(step_dir)} truncated: {size // 2} bytes, expected {size}"
  assert kind == "manifest"
  (step_dir / manifest.MANIFEST).unlink()
  return "no MANIFEST.json"


KINDS = ["data_item", "metadata", "bitflip", "truncate", "manifest"]


# --------------------------------------------------------------------------- manifests


@pytest.mark.parametrize("async_save", [False, True])
def test_manifest_lists_every_file_of_each_saved_step(tmp_path, mesh, async_save):
  with CheckpointManager(tmp_path, async_save=async_save) as ckpt:
    ckpt.save(1, state_at(mesh, 1), data_state={"next": 1}, meta={"run": "x"}, force=True)
    ckpt.save(2, state_at(mesh, 2), data_state={"next": 2}, force=True)
    # Starting step 2's save finalized step 1 (its manifest, written after Orbax's commit).
    assert (tmp_path / "1" / manifest.MANIFEST).exists()
  for step in (1, 2):
    step_dir = tmp_path / str(step)
    saved = json.loads((step_dir / manifest.MANIFEST).read_text())
    on_disk = {
      str(p.relative_to(step_dir)): p
      for p in step_dir.rglob("*")
      if p.is_file() and p.name != manifest.MANIFEST
    }
    assert saved["format"] == manifest.FORMAT and saved["step"] == step
    assert sorted(saved["files"]) == sorted(on_disk)
    assert {"state/_METADATA", "data/process_0-of-1.json", "_CHECKPOINT_METADATA"} <= set(on_disk)
    assert ("meta/meta.json" in on_disk) == (step == 1)
    for rel, path in on_disk.items():
      data = path.read_bytes()
      assert saved["files"][rel] == {"size": len(data), "crc32": f"{zlib.crc32(data):08x}"}
    assert manifest.verify(step_dir) == []


@pytest.mark.parametrize("kind", KINDS)
def test_restore_falls_back_past_a_damaged_step(tmp_path, mesh, caplog, kind):
  save_steps(tmp_path, mesh, [1, 2])
  named = damage(tmp_path / "2", kind)
  with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path, read_only=True) as ckpt:
    assert ckpt.latest_step() == 2 and ckpt.latest_verified_step() == 1
    state, data_state, _ = ckpt.restore(abstract_state=target(mesh))
    with pytest.raises(
      CheckpointError, match="step 2 is damaged: .*" + re.escape(named.split(":")[0])
    ):
      ckpt.restore(2, abstract_state=target(mesh))
  np.testing.assert_array_equal(state["params"]["w"], state_at(mesh, 1)["params"]["w"])
  assert data_state == {"next": 1}
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert any("checkpoint step 2 is damaged and skipped" in w and named in w for w in warnings)
  assert any("using checkpoint step 1, the newest intact one" in w for w in warnings)


@pytest.mark.parametrize("kind", [k for k in KINDS if k != "manifest"])
def test_no_intact_step_is_one_clear_error(tmp_path, mesh, kind):
  save_steps(tmp_path, mesh, [1])
  named = damage(tmp_path / "1", kind)
  with CheckpointManager(tmp_path, read_only=True) as ckpt:
    with pytest.raises(CheckpointError) as err:
      ckpt.restore(abstract_state=target(mesh))
  message = str(err.value)
  assert message.startswith(f"{tmp_path}: no intact checkpoint to restore. Step 1: ")
  assert named in message and "\n" not in message and len(message) < 1000
  assert "tensorstore" not in message.lower()
  with pytest.raises(CheckpointError, match="no intact checkpoint"):
    ckpt_lib.load_params(tmp_path, target(mesh)["params"])
  with pytest.raises(CheckpointError, match="no intact checkpoint"):
    ckpt_lib.saved_shapes(tmp_path)


def test_checkpoints_from_before_manifests_restore_unverified_with_a_warning(
  tmp_path, mesh, caplog
):
  """A directory where no step has a manifest (saved by an earlier llama_jax) still resumes;
  once any step has one, a step without it is damaged (see above)."""
  save_steps(tmp_path, mesh, [1, 2])
  for step in (1, 2):
    damage(tmp_path / str(step), "manifest")
  with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path, read_only=True) as ckpt:
    state, _, _ = ckpt.restore(abstract_state=target(mesh))
  np.testing.assert_array_equal(state["params"]["w"], state_at(mesh, 2)["params"]["w"])
  assert any("using it unverified" in r.getMessage() for r in caplog.records)


def test_load_params_and_saved_shapes_skip_a_damaged_step(tmp_path, mesh, caplog):
  save_steps(tmp_path, mesh, [1, 2])
  damage(tmp_path / "2", "truncate")
  with caplog.at_level(logging.WARNING):
    params = ckpt_lib.load_params(tmp_path, target(mesh)["params"])
    assert ckpt_lib.saved_shapes(tmp_path) == {"params/w": (64, 64)}
  np.testing.assert_array_equal(params["w"], state_at(mesh, 1)["params"]["w"])
  assert sum("checkpoint step 2 is damaged" in r.getMessage() for r in caplog.records) == 2
  with pytest.raises(CheckpointError, match=r"step 2 is damaged: state/.* truncated"):
    ckpt_lib.load_params(tmp_path, target(mesh)["params"], step=2)


class _Iterator:
  def __init__(self):
    self.positions = []

  def get_state(self):
    return {}

  def set_state(self, position):
    self.positions.append(position)


def test_resume_sets_damaged_steps_aside_and_saves_them_again(tmp_path, mesh, caplog):
  save_steps(tmp_path, mesh, [1, 2, 3])
  damage(tmp_path / "3", "data_item")
  damage(tmp_path / "2", "bitflip")
  train_iter = _Iterator()
  with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path) as ckpt:
    state = trainer.restore_or_init(
      ckpt, lambda: pytest.fail("not a fresh start"), target(mesh), train_iter
    )
    assert ckpt.all_steps() == [1]
    assert ckpt.save(2, state_at(mesh, 2), data_state={"next": 2})  # due again: not blocked
  np.testing.assert_array_equal(state["params"]["w"], state_at(mesh, 1)["params"]["w"])
  assert train_iter.positions == [{"next": 1}]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2", "2.damaged", "3.damaged"]
  assert manifest.verify(tmp_path / "2") == []
  warnings = " | ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  assert "step 3 is damaged and skipped: data/ missing" in warnings
  assert "step 2 is damaged and skipped: state/" in warnings and "content changed" in warnings
  assert "moved aside to 3.damaged" in warnings
  assert "Resumed from the checkpoint of step 1" in warnings and "[2, 3]" in warnings


def test_resume_with_no_intact_step_raises_instead_of_starting_afresh(tmp_path, mesh):
  save_steps(tmp_path, mesh, [1])
  damage(tmp_path / "1", "metadata")
  with CheckpointManager(tmp_path) as ckpt:
    with pytest.raises(
      CheckpointError, match="no intact checkpoint to restore. Step 1: state/_METADATA"
    ):
      trainer.restore_or_init(
        ckpt, lambda: pytest.fail("not a fresh start"), target(mesh), _Iterator()
      )
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1"]  # nothing moved nor deleted


# --------------------------------------------------------------------------- retention


def test_retention_counts_verified_steps_only(tmp_path, mesh, monkeypatch):
  save_steps(tmp_path, mesh, [1, 2, 3], max_to_keep=2)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]
  damage(tmp_path / "3", "bitflip")
  save_steps(tmp_path, mesh, [4], max_to_keep=2)
  # Orbax's LatestN(2) would have left 3 (damaged) and 4; the verified 2 and 4 are kept.
  assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3", "4"]

  # Saves whose manifest never gets written (say, the process dies first) do not count:
  # the only verified step survives however many of them follow.
  monkeypatch.setattr(manifest, "write", lambda step_dir, step=None: None)
  save_steps(tmp_path, mesh, [5, 6, 7], max_to_keep=1)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5", "6", "7"]
  monkeypatch.undo()
  with CheckpointManager(tmp_path, read_only=True) as ckpt:
    assert ckpt.latest_verified_step() == 4
  save_steps(tmp_path, mesh, [8], max_to_keep=1)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["8"]


# --------------------------------------------------------------------------- disk full


def _disk_full_at_commit(monkeypatch, directory):
  """The step's commit (writing `commit_success.txt`, after every item) finds no space."""
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def no_space(self):
    if Path(self.get_final()).parent == directory:
      raise OSError(errno.ENOSPC, "No space left on device", str(self.get()))
    await finalize(self)

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", no_space)


@pytest.mark.parametrize("async_save", [False, True])
def test_disk_full_is_one_line_and_keeps_the_verified_step(tmp_path, mesh, monkeypatch, async_save):
  save_steps(tmp_path, mesh, [1])
  _disk_full_at_commit(monkeypatch, tmp_path)
  with pytest.raises(DiskFullError) as err:
    with CheckpointManager(tmp_path, async_save=async_save) as ckpt:
      ckpt.save(2, state_at(mesh, 2), data_state={"next": 2}, force=True)
      ckpt.wait_until_finished()
  message = str(err.value)
  assert "\n" not in message and err.value.__cause__ is None
  assert message.startswith(
    f"{tmp_path}: no space left on device while saving the checkpoint of step 2 ("
  )
  assert " free); the last verified checkpoint, step 1, is kept" in message
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2.orbax-checkpoint-tmp"]
  monkeypatch.undo()
  with CheckpointManager(tmp_path, read_only=True) as ckpt:
    assert ckpt.latest_verified_step() == 1 and ckpt.all_steps() == [1]
  with CheckpointManager(tmp_path) as ckpt:  # the next run removes the partial save
    assert ckpt.latest_verified_step() == 1
    assert ckpt.save(2, state_at(mesh, 2), data_state={"next": 2})
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", "2"]


_FULL_DISK_RUN = textwrap.dedent(
  """
  import errno, sys
  import jax.numpy as jnp
  from llama_jax.checkpoint import orbax as ckpt_lib

  async def no_space(self, directory, args):
    async def write():
      raise OSError(errno.ENOSPC, "No space left on device", str(directory))
    return [ckpt_lib.ocp.future.CommitFutureAwaitingContractedSignals(write(), name="data")]

  with ckpt_lib.CheckpointManager(sys.argv[1], async_save=True) as ckpt:
    ckpt.save(1, {"w": jnp.ones(8)}, data_state={"next": 1}, force=True)
    ckpt.wait_until_finished()
    ckpt_lib._ProcessJsonHandler.async_save = no_space
    for step in (2, 3):  # a training loop: the failure surfaces when the next save starts
      ckpt.save(step, {"w": jnp.ones(8) * step}, data_state={"next": step}, force=True)
  """
)


def test_disk_full_in_a_run_exits_non_zero_without_a_flood(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  run = subprocess.run(
    [sys.executable, "-c", _FULL_DISK_RUN, str(tmp_path / "ckpt")],
    env=env, cwd=REPO, capture_output=True, text=True, timeout=120,
  )  # fmt: skip
  noise = ("cudart_stub", "absl::InitializeLog")  # JAX's plugin discovery, at import
  lines = [s for s in run.stderr.splitlines() if s.strip() and not any(n in s for n in noise)]
  assert run.returncode == 1, run.stderr[-3000:]
  assert lines[-1].startswith("llama_jax.checkpoint.orbax.DiskFullError: ")
  assert "step 2 (" in lines[-1] and "the last verified checkpoint, step 1, is kept" in lines[-1]
  assert "No space left on device" not in run.stderr.replace(lines[-1], "")
  assert run.stderr.count("Traceback") == 1 and len(lines) < 25, run.stderr
  assert sorted(p.name for p in (tmp_path / "ckpt").iterdir())[0] == "1"


def test_disk_full_detection():
  assert ckpt_lib._is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
  tensorstore_like = ValueError(
    'INTERNAL: Error writing local file "/x/d/ab": [OS error: No space left on device]'
  )
  try:
    try:
      raise tensorstore_like
    except ValueError as e:
      raise RuntimeError("commit failed") from e
  except RuntimeError as e:
    assert ckpt_lib._is_disk_full(e)
  assert not ckpt_lib._is_disk_full(OSError(errno.EACCES, "Permission denied"))


# --------------------------------------------------------------------------- side files


def test_atomic_write_leaves_the_old_file_or_the_new(tmp_path):
  path = tmp_path / "stage.json"
  atomic.write_json(path, {"result": 1})
  with pytest.raises(RuntimeError), atomic.atomic_open(path, "w") as f:
    f.write('{"result": ')
    raise RuntimeError("killed mid-write")
  assert atomic.read_json(path) == {"result": 1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["stage.json"]  # temp file removed
  assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_damaged_npz_and_json_are_named(tmp_path):
  path = tmp_path / "table.npz"
  atomic.savez(path, train=np.arange(400, dtype=np.float32).reshape(200, 2))
  # A partial temp file left by a writer killed mid-write is never read.
  (tmp_path / ".table.npz.kill.tmp").write_bytes(path.read_bytes()[:100])
  np.testing.assert_array_equal(atomic.load_npz(path)["train"], np.arange(400).reshape(200, 2))
  data = bytearray(path.read_bytes())
  data[200:264] = bytes(b ^ 0xFF for b in data[200:264])  # inside the array's bytes
  path.write_bytes(bytes(data))
  with pytest.raises(atomic.DamagedFileError, match=f"{path}: damaged .npz file .*CRC"):
    atomic.load_npz(path)
  os.truncate(path, 300)
  with pytest.raises(atomic.DamagedFileError, match=f"{path}: damaged .npz file"):
    atomic.load_npz(path)
  (tmp_path / "x.json").write_text('{"rounds": [')
  with pytest.raises(atomic.DamagedFileError, match="x.json: damaged JSON file"):
    atomic.read_json(tmp_path / "x.json")


def test_damaged_reference_logps_are_recomputed(tmp_path, monkeypatch, caplog):
  from experiments import dpo as dpo_experiment

  computed = []

  def table(step, params, batches, n):
    computed.append(n)
    return np.full((n, 2), -float(len(computed)), np.float32)

  monkeypatch.setattr(dpo_experiment.dpo_steps, "reference_logps_table", table)
  cfg = ml_collections.ConfigDict({"dpo": {"reference_from": ""}, "init_from": "sft"})
  algorithm = types.SimpleNamespace(config=types.SimpleNamespace(mask_formatting=True),
                                    reference_step=None)  # fmt: skip
  records = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(3)]
  splits = {"train": records, "eval": records[:2]}

  def tables():
    pipeline = lambda records, evaluation: contextlib.nullcontext()  # noqa: E731
    return dpo_experiment.reference_tables(cfg, algorithm, None, splits, pipeline, str(tmp_path))

  first = tables()
  assert computed == [3, 2] and first["train"].shape == (3, 2)
  path = tmp_path / dpo_experiment.REFERENCE_FILE
  assert [p.name for p in tmp_path.iterdir()] == [path.name]
  np.testing.assert_array_equal(tables()["train"], first["train"])  # reused on resume
  assert computed == [3, 2]

  os.truncate(path, path.stat().st_size - 40)  # e.g. a write cut off by a full disk
  with caplog.at_level(logging.WARNING):
    again = tables()
  assert computed == [3, 2, 3, 2]
  np.testing.assert_array_equal(again["train"], np.full((3, 2), -3.0))
  assert any(
    f"{path}: damaged .npz file" in r.getMessage() and "recomputing" in r.getMessage()
    for r in caplog.records
    if r.levelno == logging.WARNING
  )
  np.testing.assert_array_equal(atomic.load_npz(path)["train"], again["train"])


def test_a_damaged_stage_record_reruns_the_stage(tmp_path, caplog):
  from experiments import recipes

  done = tmp_path / "sft" / recipes.STAGE_FILE
  assert recipes._read_stage(done) is None
  atomic.write_json(done, {"result": {"loss": 1.0}, "seconds": 3.0})
  assert recipes._read_stage(done) == {"result": {"loss": 1.0}, "seconds": 3.0}
  done.write_text('{"result": {"loss"')
  with caplog.at_level(logging.WARNING):
    assert recipes._read_stage(done) is None
  assert any(f"{done}: damaged JSON file" in r.getMessage() for r in caplog.records)
