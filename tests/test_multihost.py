"""Real multi-process JAX on localhost: 2 processes × 4 CPU devices load a HF checkpoint
straight into a mesh that spans both, run the sharded forward, and save it back."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import transformers

from llama_jax.testing import hf_logits, save_hf_tiny

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_load_forward_and_save(tmp_path):
  model = save_hf_tiny("llama3_gqa", tmp_path / "hf")
  port = str(_free_port())
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("XLA_FLAGS", None)
  procs = [subprocess.Popen(
    [sys.executable, str(ROOT / "tests" / "multihost_worker.py"), str(i), port,
     str(tmp_path / "hf"), str(tmp_path)],
    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for i in range(2)]
  outputs = [p.communicate(timeout=300)[0] for p in procs]
  for p, out in zip(procs, outputs, strict=True):
    assert p.returncode == 0, out[-3000:]
  tokens = np.random.RandomState(0).randint(0, 256, (8, 16))
  ref = hf_logits(model, tokens)
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), ref, atol=1e-4)
  saved = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "saved").float().eval()
  np.testing.assert_array_equal(hf_logits(saved, tokens), ref)
