"""Meshes, logical-axis rules, directly sharded init, and sharded forward parity."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import LlamaConfig
from llama_jax.checkpoint import load_hf_checkpoint
from llama_jax.parallel import sharding
from llama_jax.parallel.sharding import init_params as init_unsharded
from llama_jax.testing import apply, save_hf_tiny

MESHES = [dict(data=1, fsdp=1, tensor=1), dict(data=8, fsdp=1), dict(fsdp=8),
          dict(fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)]


def _mesh(axes):
  devices = jax.devices()[: int(np.prod(list(axes.values())))]
  return sharding.make_mesh(devices=devices, **axes)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  path = tmp_path_factory.mktemp("gqa")
  save_hf_tiny("llama3_gqa", path)
  return path


@pytest.fixture(scope="module")
def reference(checkpoint):
  config, params = load_hf_checkpoint(checkpoint)
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (8, 32))
  segments = np.repeat([[1] * 20 + [2] * 12], 8, axis=0)
  return tokens, segments, np.asarray(apply(config, params, tokens, segment_ids=segments))


@pytest.mark.parametrize("axes", MESHES, ids=lambda a: "x".join(f"{k}{v}" for k, v in a.items()))
def test_sharded_logits_equal_single_device(axes, checkpoint, reference):
  tokens, segments, ref = reference
  mesh = _mesh(axes)
  config, params = load_hf_checkpoint(checkpoint, mesh=mesh)
  forward = sharding.make_forward(config, mesh)
  logits = forward(params, tokens, None, segments)
  assert logits.sharding.spec == P(("data", "fsdp"), None, "tensor")
  # Logit rounding scales with the largest logit: the tolerance does too.
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-5 * np.abs(ref).max(), rtol=0)


def test_fsdp8_holds_an_eighth_of_the_parameters(checkpoint):
  config, params = load_hf_checkpoint(checkpoint, mesh=_mesh(dict(fsdp=8)))
  total = sum(x.nbytes for x in jax.tree_util.tree_leaves(params))
  per_device = sharding.bytes_per_device(params)
  assert len(per_device) == 8
  norms = 4 * config.d_model * (2 * config.num_layers + 1)  # replicated RMSNorm scales
  print(f"\nfsdp=8: {total} parameter bytes, per device {sorted(set(per_device.values()))}"
        f" (replicated norms {norms} bytes)")
  for nbytes in per_device.values():
    assert nbytes == (total - norms) // 8 + norms


def test_init_is_directly_sharded_and_equals_unsharded():
  config = LlamaConfig.preset("tiny")
  mesh = _mesh(dict(fsdp=4, tensor=2))
  params = sharding.init_params(config, jax.random.key(3), mesh)
  assert params["layers_0"]["attn"]["q"].sharding.spec == P("fsdp", "tensor", None)
  assert params["layers_0"]["mlp"]["down"].sharding.spec == P("tensor", "fsdp")
  assert params["embed"].sharding.spec == P("tensor", "fsdp")
  # The compiled initializer outputs shards only; nothing is gathered onto one device.
  assert all(len(x.addressable_shards) == 8 for x in jax.tree_util.tree_leaves(params))
  ref = init_unsharded(config, jax.random.key(3))
  for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(ref), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_scanned_params_shard_with_a_layers_axis():
  config = LlamaConfig.preset("tiny", scan_layers=True)
  specs = sharding.param_partition_specs(config)
  assert specs["layers"]["attn"]["k"] == P(None, "fsdp", "tensor", None)


def test_every_parameter_needs_a_rule():
  rules = [r for r in sharding.DEFAULT_RULES if r[0] != "mlp"]
  with pytest.raises(ValueError, match=r"parameter layers_0/mlp/\w+: logical axis 'mlp'"):
    sharding.param_partition_specs(LlamaConfig.preset("tiny"), rules)


def test_config_that_does_not_fit_the_mesh():
  config = LlamaConfig.preset("tiny", d_model=36)  # fsdp = 8 does not divide the width
  with pytest.raises(ValueError, match=r"parameter embed of shape \(512, 36\): dimension 1 "
                                       r"\(size 36\) is not divisible by mesh axes fsdp of size 8"):
    sharding.param_shardings(config, _mesh(dict(fsdp=8)))
  # Heads that tensor does not divide are not an error: they are replicated over it (see
  # test_tensor_parallel.py); the tiny model's 2 kv heads on tensor = 4, say.
  placed = sharding.param_shardings(LlamaConfig.preset("tiny"), _mesh(dict(fsdp=2, tensor=4)))
  assert placed["layers_0"]["attn"]["k"].spec == P("fsdp", None, None)


def test_mesh_shapes_and_errors():
  assert dict(sharding.make_mesh(data=2).shape) == {"data": 2, "fsdp": 4, "tensor": 1}
  assert dict(sharding.make_mesh(fsdp=2, tensor=-1).shape) == {"data": 1, "fsdp": 2, "tensor": 4}
  with pytest.raises(ValueError, match="8 devices are not divisible by 3"):
    sharding.make_mesh(data=3, fsdp=-1)
  with pytest.raises(ValueError, match="= 16 does not match the 8 available devices"):
    sharding.make_mesh(data=4, fsdp=4)
  with pytest.raises(ValueError, match="batch_size=12 is not divisible .* = 8"):
    sharding.check_batch_fits_mesh(12, sharding.make_mesh(fsdp=8))
