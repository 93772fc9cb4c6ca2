"""A workdir nobody can silently damage, tried as a careful user would: runs killed with
SIGKILL at random moments (one of them inside a checkpoint write) resume to the same state
and metrics as an uninterrupted run; a second writer is refused while the first runs; a
changed config is refused before anything is written; a run stopped after its last step
redoes its end (final evaluation, plot, record) and a finished run is left as it is.

The runs are real `python -m experiments.pretrain` processes on the tiny model (1 layer):
one random kill (beside the one inside a checkpoint write), then 5, under `-m full_size`
(`make test-full`); `make test` runs the others.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from experiments import lm, runs
from experiments.configs import pretrain
from llama_jax.checkpoint import orbax as ckpt_lib
from llama_jax.checkpoint import workdirs
from llama_jax.training.metrics import read_metrics
from llama_jax.training.trainer import read_final

ROOT = Path(__file__).resolve().parents[2]
STEPS = 24
OVERRIDES = (
  "--config.model.num_layers=1", "--config.model.d_model=64", "--config.model.head_dim=16",
  "--config.model.mlp_dim=128", "--config.data.seq_len=64", "--config.data.batch_size=8",
  "--config.optimizer.warmup_steps=1", "--config.train.log_every=1",
  "--config.train.checkpoint_every=1", f"--config.train.num_steps={STEPS}",
)  # fmt: skip


def small(steps=4, **train):
  cfg = pretrain.get_config("tiny")
  cfg.model.update(num_layers=1, d_model=64, head_dim=16, mlp_dim=128)
  cfg.data.update(seq_len=64, batch_size=8)
  cfg.optimizer.update(warmup_steps=1)
  cfg.train.update(num_steps=steps, log_every=1, checkpoint_every=2, **train)
  return cfg


def launch(workdir: Path, cache: Path) -> subprocess.Popen:
  """`python -m experiments.pretrain` on the tiny config, 8 emulated devices."""
  env = dict(
    os.environ,
    XLA_FLAGS=os.environ["XLA_FLAGS"],  # conftest's: 8 devices, unoptimized tiny programs
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(cache),  # the relaunches reuse the first one's programs
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",  # the small per-shard checks too
    PYTHONPATH=str(ROOT),
  )
  cmd = [sys.executable, "-m", "experiments.pretrain",
         "--config=experiments/configs/pretrain.py:tiny", f"--workdir={workdir}", *OVERRIDES]
  return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)  # fmt: skip


def logged_steps(workdir: Path) -> int:
  path = workdir / "metrics.jsonl"
  if not path.exists():
    return 0
  return sum(1 for line in path.read_text().splitlines() if '"loss"' in line)


def writing_checkpoint(workdir: Path) -> bool:
  """Whether Orbax is writing a step right now (its temporary directory exists)."""
  try:
    return any("tmp" in e.name for e in os.scandir(workdir / "checkpoints"))
  except FileNotFoundError:
    return False


def wait_for(proc: subprocess.Popen, ready, timeout: float = 240) -> bool:
  """Polls until `ready()` (True) or until `proc` exits (False; it must have succeeded)."""
  deadline = time.monotonic() + timeout
  while proc.poll() is None and time.monotonic() < deadline:
    if ready():
      return True
    time.sleep(0.0005)
  out = proc.communicate(timeout=300)[0] if proc.poll() is not None else ""
  assert proc.returncode == 0, out[-3000:]
  return False


def kill_when(proc: subprocess.Popen, ready) -> bool:
  """SIGKILLs `proc` as soon as `ready()`; False if it finished first."""
  if not wait_for(proc, ready):
    return False
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return True


def finish(proc: subprocess.Popen) -> str:
  out = proc.communicate(timeout=300)[0]
  assert proc.returncode == 0 and f"Finished at step {STEPS}" in out, out[-3000:]
  return out


def state_arrays(workdir: Path) -> dict[str, np.ndarray]:
  """Every array of the newest checkpoint's state (parameters, moments, step, RNG key)."""
  import jax
  import orbax.checkpoint as ocp

  directory = ckpt_lib.checkpoint_dir(workdir)
  step = max(int(p.name) for p in directory.iterdir() if p.name.isdigit())
  tree = ocp.PyTreeCheckpointer().restore(directory / str(step) / "state")
  leaves = jax.tree_util.tree_leaves_with_path(tree)
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def holds_lock(workdir: Path, pid: int) -> bool:
  try:
    return f'"pid": {pid},' in (workdir / workdirs.LOCK_FILE).read_text()
  except FileNotFoundError:
    return False


@pytest.mark.slow
@pytest.mark.full_size  # 30-37 s: four and seven runs as subprocesses
@pytest.mark.parametrize("kills", [1, 5])
def test_random_kills_resume_to_the_uninterrupted_run(tmp_path, kills):
  """`kills` kills at seeded random steps and one inside a checkpoint write; each relaunch
  resumes. While a run holds the workdir, a second writer is refused and changes nothing."""
  cache = tmp_path / "jit"
  finish(launch(tmp_path / "whole", cache))
  rng = np.random.default_rng(0)
  kill_steps = sorted(rng.choice(np.arange(2, STEPS - 2), size=kills, replace=False).tolist())
  killed = tmp_path / "killed"
  for n, at in enumerate(kill_steps):
    proc = launch(killed, cache)
    if n == kills // 2:  # a second writer while this one runs: refused, with the holder named
      # (once it has logged a step: on a fresh workdir the lock comes before any metrics)
      assert wait_for(proc, lambda p=proc.pid: holds_lock(killed, p) and logged_steps(killed))
      before = (killed / "metrics.jsonl").read_bytes()
      with pytest.raises(workdirs.WorkdirLocked, match=rf"in use by another run \(pid {proc.pid}"):
        lm.run(common_config(), str(killed))
      assert (killed / "metrics.jsonl").read_bytes()[: len(before)] == before
    assert kill_when(proc, lambda at=at: logged_steps(killed) >= at), f"finished before {at}"
  proc = launch(killed, cache)  # a kill while Orbax writes a step
  assert kill_when(proc, lambda: writing_checkpoint(killed)), "no checkpoint write was caught"
  out = finish(launch(killed, cache))
  assert "taking over the lock of a run that did not finish" in out
  whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(killed)
  train = lambda rows: [(r["step"], r["loss"], r["grad_norm"]) for r in rows if "loss" in r]
  assert [s for s, *_ in train(resumed)] == list(range(1, STEPS + 1))  # no duplicates, no gaps
  assert train(resumed) == train(whole)
  a, b = state_arrays(tmp_path / "whole"), state_arrays(killed)
  assert a.keys() == b.keys()
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert read_final(killed) == read_final(tmp_path / "whole")


def common_config():
  """The subprocesses' config, for an in-process run on their workdir."""
  cfg = pretrain.get_config("tiny")
  cfg.update_from_flattened_dict(
    {k.removeprefix("--config.").split("=")[0]: json.loads(k.split("=")[1]) for k in OVERRIDES}
  )
  return cfg


def test_a_changed_config_is_refused_with_a_diff_before_anything_is_written(tmp_path):
  lm.run(small(steps=2), str(tmp_path))
  files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  changed = small(steps=2)
  changed.data.batch_size = 16
  changed.optimizer.learning_rate = 1e-3
  with pytest.raises(runs.ConfigChanged) as refused:
    lm.run(changed, str(tmp_path))
  message = str(refused.value)
  assert "data.batch_size: 8 -> 16" in message and "optimizer.learning_rate" in message
  assert "train.num_steps" in message and "--config.resume=override" in message  # the way out
  assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files  # untouched
  # A longer run and another mesh are safe changes: it resumes.
  longer = small(steps=3)
  longer.mesh.update(data=2, fsdp=4)
  lm.run(longer, str(tmp_path))
  assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [1, 2, 3]
  # resume="override" continues with the change and keeps the old config beside the new.
  changed.train.num_steps = 4
  changed.resume = "override"
  lm.run(changed, str(tmp_path))
  kept = list(tmp_path.glob("experiment_config.*.json"))
  assert len(kept) == 1 and json.loads(kept[0].read_text())["data"]["batch_size"] == 8
  assert json.loads((tmp_path / "experiment_config.json").read_text())["data"]["batch_size"] == 16


def test_a_run_stopped_during_its_end_redoes_it_and_a_finished_run_is_left_alone(tmp_path):
  results = lm.run(small(steps=2), str(tmp_path))
  assert results and read_final(tmp_path) == {"step": 2, "eval": results}
  # As a kill during the final evaluation leaves it: the last checkpoint, no eval row at the
  # last step, no plot, no record of the end.
  rows = read_metrics(tmp_path)
  (tmp_path / "metrics.jsonl").write_text(
    "".join(json.dumps(r) + "\n" for r in rows if not any(k.startswith("eval/") for k in r))
  )
  for name in ("final.json", "metrics.png"):
    (tmp_path / name).unlink()
  redone = lm.run(small(steps=2), str(tmp_path))
  assert redone == results  # the same checkpoint, evaluated again
  assert read_metrics(tmp_path) == rows  # one eval row at the last step, as before
  assert (tmp_path / "metrics.png").exists() and read_final(tmp_path)["eval"] == results
  # A rerun of the finished run changes nothing and still returns its results.
  files = lambda: {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
  before = files()
  assert lm.run(small(steps=2), str(tmp_path)) == results
  assert files() == before


def test_the_lock_is_exclusive_reentrant_and_released(tmp_path):
  script = (
    "import sys, time\nfrom llama_jax.checkpoint import workdirs\n"
    "with workdirs.locked(sys.argv[1]):\n  print('held', flush=True)\n  time.sleep(60)\n"
  )
  holder = subprocess.Popen(
    [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True,
    env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT)),
  )  # fmt: skip
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(workdirs.WorkdirLocked, match=rf"pid {holder.pid} on .* since "):
    with workdirs.locked(tmp_path):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with workdirs.locked(tmp_path), workdirs.locked(tmp_path):  # the dead holder's lock is free
    assert json.loads((tmp_path / workdirs.LOCK_FILE).read_text())["pid"] == os.getpid()
  assert (tmp_path / workdirs.LOCK_FILE).read_text() == ""  # released cleanly
