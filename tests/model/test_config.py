"""LlamaConfig presets: parameter counts against the published sizes, nothing allocated."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import LlamaConfig
from llama_jax.model.config import PRESETS, RopeScaling
from llama_jax.parallel.sharding import abstract_params

# Published sizes (billions, as rounded in the papers / model cards).
PUBLISHED = {
  "llama2_7b": "6.74", "llama2_13b": "13.0", "llama2_70b": "69.0", "llama3_8b": "8.03",
  "llama3_70b": "70.6", "llama3p1_8b": "8.03", "llama3p1_70b": "70.6",
  "llama3p1_405b": "405.9", "llama3p2_1b": "1.24", "llama3p2_3b": "3.21",
}


def _tree_size(config) -> int:
  import flax.linen as nn

  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(
    nn.meta.unbox(abstract_params(config))))


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_param_count_matches_tree_and_paper(name):
  config = LlamaConfig.preset(name, scan_layers=True)  # scanned: fast to trace, same count
  n = config.num_params()
  assert _tree_size(config) == n
  decimals = len(PUBLISHED[name].split(".")[1])
  assert f"{n / 1e9:.{decimals}f}" == PUBLISHED[name], (name, n)


def test_unscanned_tree_has_same_count():
  config = LlamaConfig.preset("llama3p2_1b")
  assert _tree_size(config) == config.num_params() == 1_235_814_400


def test_presets_follow_recipes_table():
  assert LlamaConfig.preset("llama3p1_8b").rope_scaling == RopeScaling(factor=8.0)
  assert LlamaConfig.preset("llama3p2_1b").rope_scaling.factor == 32.0
  assert LlamaConfig.preset("llama3p2_3b").tie_embeddings
  assert not LlamaConfig.preset("llama3p1_405b").tie_embeddings
  c = LlamaConfig.preset("llama2_70b")
  assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.mlp_dim) == (80, 8192, 64, 8,
                                                                              28672)
  assert {"tiny", "tiny_mha"} <= set(PRESETS)


def test_overrides_and_errors():
  c = LlamaConfig.preset("tiny", dtype="bfloat16", scan_layers=True)
  assert c.dtype == "bfloat16" and c.scan_layers
  with pytest.raises(TypeError, match="num_layer"):
    LlamaConfig.preset("tiny", num_layer=3)
  with pytest.raises(KeyError, match="llama4"):
    LlamaConfig.preset("llama4")
  with pytest.raises(ValueError, match="num_kv_heads=3"):
    LlamaConfig.preset("tiny", num_kv_heads=3)
  with pytest.raises(ValueError, match="dtype='fp8'"):
    LlamaConfig.preset("tiny", dtype="fp8")
  with pytest.raises(ValueError, match="attention_impl"):
    LlamaConfig.preset("tiny", attention_impl="flash")


@pytest.mark.parametrize("dtype", [jnp.bfloat16, np.dtype("bfloat16"), "bfloat16"])
def test_dtype_fields_take_what_jnp_dtype_takes(dtype):
  c = LlamaConfig.preset("tiny", dtype=dtype, param_dtype=jnp.float32)
  # Normalized to the name: the config stays hashable, comparable and JSON-able.
  assert (c.dtype, c.param_dtype) == ("bfloat16", "float32")
  assert c == LlamaConfig.preset("tiny", dtype="bfloat16") and hash(c)
  assert LlamaConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
  with pytest.raises(ValueError, match="param_dtype=<class 'jax.numpy.int32'>"):
    LlamaConfig.preset("tiny", param_dtype=jnp.int32)
