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

import numpy as np
import transformers

from llama_jax import sharding
from llama_jax.testing import hf_logits, save_hf_tiny

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import multihost_worker  # noqa: E402


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run_two_processes(mode: str, out: Path, *args: str) -> None:
  port = str(_free_port())
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  procs = [
    subprocess.Popen(
      [
        sys.executable,
        str(ROOT / "tests" / "multihost_worker.py"),
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
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, output in zip(procs, outputs, strict=True):
    assert p.returncode == 0, output[-3000:]


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
