"""Inputs checked at the door (issue 19): bad weights, configs and data stop a run before
any step with an error that names the file, tensor or field and the value. The format-level
cases live beside their loaders (tests/checkpoint, tests/data); these cross the seams:
Orbax workdirs and the experiments' `init_from`."""

import json
import re

import jax
import jax.numpy as jnp
import pytest

from experiments import models
from experiments.configs import sft
from llama_jax import LlamaConfig
from llama_jax.checkpoint import CheckpointError, checkpoint_dir, workdirs
from llama_jax.checkpoint.params import check_finite
from llama_jax.model.llama import Llama
from llama_jax.parallel import sharding
from llama_jax.testing import save_hf_tiny, save_workdir
from llama_jax.training import train_state as ts


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(fsdp=4, tensor=2)


@pytest.mark.parametrize("scan", [False, True])
def test_nan_weights_in_a_workdir_name_the_parameter_and_layer(tmp_path, mesh, scan):
  config = LlamaConfig.preset("tiny", scan_layers=scan)
  model = Llama(config)
  params = sharding.init_params(model, jax.random.PRNGKey(0), mesh)
  if scan:  # layer 1 of the stacked MLP input projection
    params["layers"]["mlp"]["up"] = params["layers"]["mlp"]["up"].at[1, 0, :3].set(jnp.nan)
  else:
    params["layers_1"]["mlp"]["up"] = params["layers_1"]["mlp"]["up"].at[0, :3].set(jnp.inf)
  opt = ts.make_optimizer(ts.OptimizerConfig(warmup_steps=1, total_steps=2))
  state = ts.init_train_state(model, opt, mesh, jax.random.PRNGKey(0), params=params)
  run = save_workdir(tmp_path / "run", config, state)

  source = str(checkpoint_dir(run))
  name = r"layers/mlp/up .* in layers \[1\]" if scan else r"layers_1/mlp/up .* of 8192"
  with pytest.raises(CheckpointError, match=(
      rf"run/checkpoints\S*: parameter {name}; 1 parameter\(s\) are not finite$")):
    _, loaded = workdirs.load_model(run, mesh)  # raises here once load_model checks itself
    check_finite(loaded, source)
  with pytest.raises(CheckpointError, match=r"has 3 non-finite \(NaN or Inf\) value\(s\)"):
    check_finite(params, source)
  check_finite(sharding.init_params(model, jax.random.PRNGKey(1), mesh), source)  # all finite


def _cfg(init_from):
  cfg = sft.get_config("tiny")
  cfg.update(init_from=str(init_from), tokenizer="tiny:llama3")
  return cfg


def test_init_from_with_malformed_config_json_names_file_line_and_column(tmp_path, mesh):
  save_hf_tiny("llama3_gqa", tmp_path / "hf")
  text = (tmp_path / "hf" / "config.json").read_text()
  broken = text.replace('"hidden_size": 64,', '"hidden_size": 64')  # a comma left out
  (tmp_path / "hf" / "config.json").write_text(broken)
  line = next(i for i, t in enumerate(text.splitlines(), 1) if '"hidden_size"' in t) + 1
  with pytest.raises(CheckpointError, match=(
      rf"^init_from='{re.escape(str(tmp_path))}/hf': {re.escape(str(tmp_path))}/hf/config.json: "
      rf"not valid JSON: Expecting ',' delimiter at line {line}, column 3$")):
    models.load_model(_cfg(tmp_path / "hf"), mesh)


def test_init_from_keeps_an_exception_type_whatever_its_constructor(tmp_path, mesh):
  """The wrapper that prefixes `init_from=` rebuilt the exception with one argument, which
  json.JSONDecodeError's constructor refuses (a TypeError hid the real error)."""
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "model_config.json").write_text('{"vocab_size": 256,}')
  with pytest.raises(json.JSONDecodeError, match=(  # the note carries init_from
      rf"(?s)Expecting property name .*line 1 column 20.*init_from='{re.escape(str(tmp_path))}")):
    models.load_model(_cfg(tmp_path / "run"), mesh)
  with pytest.raises(FileNotFoundError, match=r"^init_from='.*nowhere': .*nowhere is neither"):
    models.load_model(_cfg(tmp_path / "nowhere"), mesh)



def test_sft_data_given_to_pretraining_names_dataset_record_and_kinds(tmp_path):
  """Through the launcher: was `KeyError: 'text'`."""
  from experiments import lm  # noqa: PLC0415
  from experiments.configs import pretrain  # noqa: PLC0415
  from llama_jax.data.records import KindMismatchError  # noqa: PLC0415

  cfg = pretrain.get_config("tiny")
  cfg.model.update(num_layers=1, d_model=32, head_dim=8, mlp_dim=64)
  cfg.data.update(name="sft", seq_len=32, batch_size=8, eval_split="")
  with pytest.raises(KindMismatchError, match=re.escape(
      "dataset 'bundled sft' split 'train' record 0 has fields ['id', 'messages'], but this "
      "stage reads 'text' records (pretraining), which need ['text']; it looks like a 'sft' "
      "record, for supervised fine-tuning. Is the data kind (data.kind) or the dataset wrong?")):
    lm.run(cfg, str(tmp_path / "pt"))
  assert [p.name for p in (tmp_path / "pt").iterdir()] == [".lock"]  # refused before any write
