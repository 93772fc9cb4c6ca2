"""Real multi-process JAX on localhost: 2 processes × 4 CPU devices form one mesh.

They load a HF checkpoint straight into a mesh that spans both, run the sharded forward and
save it back; and they run the LM train step (with gradient accumulation) and an Orbax
save/restore, which must equal one process driving all 8 devices.
"""

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import transformers

from experiments.configs.base import TINY_MODEL
from llama_jax import LlamaConfig
from llama_jax.model import reward_model
from llama_jax.parallel import sharding
from llama_jax.testing import hf_logits, save_hf_tiny, save_workdir
from llama_jax.training import train_state as ts
from llama_jax.training.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "rl"))

import multihost_worker  # noqa: E402


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(mode: str, out: Path, *args: str) -> None:
  port = str(_free_port())
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        str(ROOT / "tests" / "rl" / "multihost_worker.py"),
        mode,
        str(i),
        port,
        str(out),
        *args,
      ],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  for p, output in zip(procs, outputs, strict=True):
    assert p.returncode == 0, output[-3000:]


def make_rm_workdir(path) -> str:
  """A random reward model on the RL runs' tiny architecture, as a workdir."""
  model = {k: v for k, v in TINY_MODEL.items() if k != "preset"} | multihost_worker.RL_MODEL
  config = LlamaConfig.preset("tiny", **model)
  opt = ts.make_optimizer(ts.OptimizerConfig(warmup_steps=1, total_steps=2))
  mesh = sharding.make_mesh()
  state = ts.init_train_state(reward_model.RewardModel(config), opt, mesh, jax.random.key(7))
  return save_workdir(path, config, state)


def test_two_processes_load_forward_and_save(tmp_path):
  model = save_hf_tiny("llama3_gqa", tmp_path / "hf")
  run_two_processes("forward", tmp_path, str(tmp_path / "hf"))
  tokens = np.random.RandomState(0).randint(0, 256, (8, 16))
  ref = hf_logits(model, tokens)
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), ref, atol=1e-4)
  saved = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "saved").float().eval()
  np.testing.assert_array_equal(hf_logits(saved, tokens), ref)


def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
  run_two_processes("train", tmp_path)
  state, losses, _ = multihost_worker.train_run(sharding.make_mesh(fsdp=4, tensor=2))
  np.testing.assert_allclose(np.load(tmp_path / "losses.npy"), losses, rtol=1e-5)
  reference = multihost_worker.gathered_params(state)
  for name in ("params.npz", "resumed.npz"):
    with np.load(tmp_path / name) as two_process:
      assert sorted(two_process.files) == sorted(reference)
      for key, value in reference.items():
        np.testing.assert_allclose(two_process[key], value, atol=1e-6, err_msg=f"{name} {key}")
  # Resuming from the step-2 checkpoint redoes step 3 bit for bit.
  two_process_losses = np.load(tmp_path / "losses.npy")
  np.testing.assert_array_equal(np.load(tmp_path / "resumed_losses.npy"), two_process_losses[-1:])
  with np.load(tmp_path / "params.npz") as a, np.load(tmp_path / "resumed.npz") as b:
    for key in a.files:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


RL_KEYS = ("loss/policy", "objective/kl", "policy/entropy", "score/mean", "score/std")


@pytest.mark.parametrize(
  "algorithm, extra",
  [pytest.param("grpo", (), marks=pytest.mark.full_size),  # 34 s
   pytest.param("ppo", ("loss/value", "kl_coef"), marks=pytest.mark.full_size)],  # 35 s
)  # fmt: skip
def test_two_processes_run_rl_like_one_process_with_eight_devices(tmp_path, algorithm, extra):
  """Each process rewards (with a reward model sharded over both) and turns into rows the
  responses its devices sampled; the iterations, their resume from a checkpoint included,
  equal one process driving all 8 devices."""
  rm_dir = make_rm_workdir(tmp_path / "rm")
  run_two_processes("rl", tmp_path, rm_dir, algorithm)
  multihost_worker.rl_run(algorithm, str(tmp_path / f"one_{algorithm}"), rm_dir, steps=2)
  one, two = (read_metrics(tmp_path / d) for d in (f"one_{algorithm}", algorithm))
  assert [r["step"] for r in two] == [1, 2] == [r["step"] for r in one], algorithm
  assert all(r["score/std"] > 0 for r in one)  # the RM's rewards carry signal
  for key in RL_KEYS + extra:
    np.testing.assert_allclose(
      [r[key] for r in two], [r[key] for r in one], rtol=1e-5, atol=1e-6, err_msg=key
    )
