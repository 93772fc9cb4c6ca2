"""Model averaging: weighted means by hand, dtypes kept, mismatches named, and checkpoints
averaged from workdirs and Hugging Face directories through the command-line entry."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import average
from experiments.configs.base import TINY_MODEL
from llama_jax import LlamaConfig
from llama_jax.checkpoint import save_hf_checkpoint, workdirs
from llama_jax.model import reward_model
from llama_jax.parallel import sharding
from llama_jax.parallel.sharding import init_params
from llama_jax.testing import save_workdir
from llama_jax.training import averaging
from llama_jax.training import train_state as ts

SMALL = dict(num_layers=2, d_model=64, head_dim=16, mlp_dim=128)


def test_weighted_mean_by_hand_in_float32_with_dtypes_kept():
  a = {"w": jnp.array([1.0, 2.0], jnp.bfloat16), "b": jnp.array([4.0])}
  b = {"w": jnp.array([3.0, 6.0], jnp.bfloat16), "b": jnp.array([0.0])}
  out = averaging.average_params([a, b], weights=[3, 1])
  np.testing.assert_allclose(np.asarray(out["w"], np.float32), [1.5, 3.0])
  np.testing.assert_allclose(out["b"], [3.0])
  assert out["w"].dtype == jnp.bfloat16 and out["b"].dtype == jnp.float32
  np.testing.assert_allclose(averaging.average_params([a, b])["b"], [2.0])


def test_bad_inputs_are_named():
  a = {"layer": {"w": jnp.zeros((2, 3))}}
  with pytest.raises(ValueError, match=r"\['layer'\]\['w'\] has shape \(3, 2\)"):
    averaging.average_params([a, {"layer": {"w": jnp.zeros((3, 2))}}])
  with pytest.raises(ValueError, match="in one model but not the other"):
    averaging.average_params([a, {"layer": {"v": jnp.zeros((2, 3))}}])
  with pytest.raises(ValueError, match="2 weights for 3 models"):
    averaging.normalized_weights([1, 2], 3)
  with pytest.raises(ValueError, match="non-negative"):
    averaging.normalized_weights([1, -1], 2)


def model_config():
  return LlamaConfig.preset(
    "tiny", **{k: v for k, v in TINY_MODEL.items() if k != "preset"} | SMALL
  )


OPTIMIZER = ts.make_optimizer(ts.OptimizerConfig(warmup_steps=1, total_steps=2))


def lm_workdir(path, params):
  config = model_config()
  state = ts.init_train_state(
    config, OPTIMIZER, sharding.make_mesh(), jax.random.PRNGKey(0), params=params
  )
  return save_workdir(path, config, state, step=3)


def test_average_command_over_workdirs_and_hf_directories(tmp_path):
  config = model_config()
  trees = [init_params(config, jax.random.PRNGKey(i)) for i in range(3)]
  a = lm_workdir(tmp_path / "a", trees[0])
  b = lm_workdir(tmp_path / "b", trees[1])
  save_hf_checkpoint(tmp_path / "c", config, trees[2])
  record = average.run(
    [a, b, str(tmp_path / "c")], str(tmp_path / "avg"), [2, 1, 1], hf_out=str(tmp_path / "avg_hf")
  )
  assert record["weights"] == [0.5, 0.25, 0.25] and record["kind"] == "lm"
  expected = jax.tree.map(lambda x, y, z: 0.5 * x + 0.25 * y + 0.25 * z, *trees)
  for path in (tmp_path / "avg", tmp_path / "avg_hf"):  # both outputs load as ordinary models
    loaded_cfg, loaded = workdirs.load_model(path, sharding.make_mesh())
    assert loaded_cfg == config
    for x, y in zip(
      jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(loaded)), strict=True
    ):
      np.testing.assert_allclose(y, x, atol=1e-6)


def test_reward_models_average_and_kinds_do_not_mix(tmp_path):
  config = model_config()
  mesh = sharding.make_mesh()
  paths = [
    save_workdir(
      tmp_path / f"rm{i}",
      config,
      ts.init_train_state(reward_model.RewardModel(config), OPTIMIZER, mesh, jax.random.PRNGKey(i)),
    )
    for i in range(2)
  ]
  assert workdirs.model_kind(paths[0]) == "reward_model"
  _, averaged = averaging.average_checkpoints(paths, mesh=mesh)
  parts = [workdirs.load_reward_model(p, mesh)[1] for p in paths]
  for x, y, z in zip(*(jax.tree.leaves(t) for t in (averaged, *parts)), strict=True):
    np.testing.assert_allclose(x, (np.asarray(y) + np.asarray(z)) / 2, atol=1e-6)
  lm = lm_workdir(tmp_path / "lm", init_params(config, jax.random.PRNGKey(5)))
  with pytest.raises(ValueError, match="cannot average different kinds"):
    averaging.average_checkpoints([paths[0], lm], mesh=mesh)
  with pytest.raises(ValueError, match="Hugging Face output is for LMs"):
    average.run(paths, str(tmp_path / "out"), hf_out=str(tmp_path / "hf"))


def test_model_kind_says_what_a_directory_lacks(tmp_path):
  with pytest.raises(FileNotFoundError, match="neither a Hugging Face checkpoint"):
    workdirs.model_kind(tmp_path)
  config = json.dumps(LlamaConfig.preset("tiny").to_dict())
  (tmp_path / workdirs.MODEL_CONFIG_FILE).write_text(config)
  with pytest.raises(Exception, match="no (such|complete) checkpoint"):
    workdirs.model_kind(tmp_path)
