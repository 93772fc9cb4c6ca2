"""The pretrain and SFT experiment modules end to end at tiny size (a few steps each)."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import lm
from experiments.configs import pretrain, sft
from llama_jax import LlamaConfig
from llama_jax.checkpoint import orbax as ckpt_lib
from llama_jax.checkpoint import save_hf_checkpoint
from llama_jax.parallel import sharding
from llama_jax.training.metrics import read_metrics
from llama_jax.training.trainer import NonFiniteError

ROOT = Path(__file__).resolve().parents[2]


def small(cfg, steps=4, **train):
  """The tiny variant shrunk further for the test suite."""
  cfg.model.update(num_layers=2, d_model=64, head_dim=16, mlp_dim=128)
  cfg.data.update(seq_len=64, batch_size=8)
  cfg.optimizer.update(warmup_steps=1)
  cfg.train.update(num_steps=steps, log_every=1, checkpoint_every=2, **train)
  return cfg


def final_params(workdir):
  model_cfg = LlamaConfig.from_dict(json.loads(Path(workdir, "model_config.json").read_text()))
  mesh = sharding.make_mesh()
  abstract = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    jax.eval_shape(lambda: sharding.init_params(model_cfg, jax.random.PRNGKey(0), mesh)),
    sharding.param_shardings(model_cfg, mesh),
  )
  return jax.device_get(ckpt_lib.load_params(ckpt_lib.checkpoint_dir(workdir), abstract))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("pretrain")
  results = lm.run(small(pretrain.get_config("tiny"), steps=20), str(workdir))
  return workdir, results


def test_pretrain_writes_metrics_checkpoints_and_plot(pretrained):
  workdir, results = pretrained
  rows = read_metrics(workdir)
  train = [r for r in rows if "loss" in r]
  assert [r["step"] for r in train] == list(range(1, 21))
  assert train[-1]["loss"] < train[0]["loss"] - 1.0
  assert {"learning_rate", "grad_norm", "tokens_per_second"} <= set(train[-1])
  assert "eval/loss" in rows[-1] and results["loss"] == rows[-1]["eval/loss"]
  assert ckpt_lib.CheckpointManager(ckpt_lib.checkpoint_dir(workdir)).all_steps()[-1] == 20
  assert (workdir / "metrics.png").read_bytes()[:4] == b"\x89PNG"
  assert list((workdir / "tensorboard").iterdir())


def test_stop_and_resume_is_bit_identical(tmp_path):
  whole = small(pretrain.get_config("tiny"), steps=4)
  lm.run(whole, str(tmp_path / "whole"))
  first = small(pretrain.get_config("tiny"), steps=2)
  lm.run(first, str(tmp_path / "parts"))  # "stopped" after step 2
  lm.run(whole, str(tmp_path / "parts"))  # the rerun resumes at step 2
  a, b = final_params(tmp_path / "whole"), final_params(tmp_path / "parts")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)
  losses = lambda w: [r["loss"] for r in read_metrics(w) if "loss" in r]
  assert losses(tmp_path / "parts") == losses(tmp_path / "whole")


def test_sft_from_pretrain_workdir_and_from_hf(pretrained, tmp_path):
  workdir, _ = pretrained
  cfg = small(sft.get_config("tiny"), steps=2)
  cfg.init_from = str(workdir)
  results = lm.run(cfg, str(tmp_path / "sft"))
  assert np.isfinite(results["loss"])
  # SFT starts from the pretrained weights: the loss of its first step, the same with the
  # workdir and with the HF export of it, is far below a fresh init's.
  params = final_params(workdir)
  model_cfg = LlamaConfig.from_dict(json.loads((workdir / "model_config.json").read_text()))
  save_hf_checkpoint(tmp_path / "hf", model_cfg, params)
  cfg_hf = small(sft.get_config("tiny"), steps=2)
  cfg_hf.init_from = str(tmp_path / "hf")
  lm.run(cfg_hf, str(tmp_path / "sft_hf"))
  first = lambda w: read_metrics(w)[0]["loss"]
  assert first(tmp_path / "sft_hf") == pytest.approx(first(tmp_path / "sft"), rel=1e-5)
  scratch = small(sft.get_config("tiny"), steps=2)
  lm.run(scratch, str(tmp_path / "scratch"))
  assert first(tmp_path / "scratch") > first(tmp_path / "sft") + 0.5


def test_batch_that_does_not_fit_the_mesh_fails_before_compiling(tmp_path):
  cfg = small(pretrain.get_config("tiny"))
  cfg.data.batch_size = 12
  with pytest.raises(ValueError, match=r"data.batch_size=12 is not divisible .* = 8"):
    lm.run(cfg, str(tmp_path))
  cfg.data.batch_size = 16
  cfg.train.grad_accum_steps = 4
  with pytest.raises(ValueError, match=r"micro-batch data.batch_size / 4=4 is not divisible"):
    lm.run(cfg, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


def test_nonfinite_raise_names_the_step(tmp_path):
  cfg = small(pretrain.get_config("tiny"), steps=3, on_nonfinite="raise")
  cfg.optimizer.update(learning_rate=1e30, warmup_steps=0, schedule="constant")
  with pytest.raises(NonFiniteError, match=r"step 2: non-finite"):
    lm.run(cfg, str(tmp_path))
  cfg.train.on_nonfinite = "skip"
  lm.run(cfg, str(tmp_path / "skip"))
  assert read_metrics(tmp_path / "skip")[-2]["skipped"] == 2


@pytest.mark.full_size  # 9 s; make test runs the compile check's and generate's command lines
def test_command_line_with_overrides(tmp_path):
  cmd = [
    sys.executable,
    "-m",
    "experiments.pretrain",
    "--config=experiments/configs/pretrain.py:tiny",
    f"--workdir={tmp_path}",
    "--config.train.num_steps=2",
    "--config.optimizer.warmup_steps=1",
    "--config.model.num_layers=1",
    "--config.data.batch_size=8",
    "--config.data.seq_len=32",
  ]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert [r["step"] for r in read_metrics(tmp_path) if "loss" in r] == [2]
  assert json.loads((tmp_path / "model_config.json").read_text())["num_layers"] == 1
