"""Tensor parallelism wider than the head counts: heads that tensor does not divide are
replicated over it (`sharding.rules_for`), everything else shards as before.

Models: "smol" has SmolLM2-135M's 9 query / 3 kv heads (neither divides tensor = 2 or 4);
"70b" has Llama 3 70B's ratio of 8 query / 2 kv heads, so tensor = 4 splits the query heads
and replicates the kv heads, as tensor = 16 does with 70B's 64 / 8; "groups" has 12 / 3
heads, whose GQA groups (4 query heads per kv head) straddle the devices on tensor = 2 or 4.
"""

import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from llama_jax import LlamaConfig
from llama_jax.generation import GenerationConfig, SamplingConfig, generate_tokens
from llama_jax.generation.decode import cache_shardings
from llama_jax.model.llama import positions_from_segments
from llama_jax.parallel import sharding
from llama_jax.parallel.sharding import init_params
from llama_jax.steps import common, lm
from llama_jax.testing import apply
from llama_jax.training import train_state as ts

TOL = 1e-5
_TINY = dict(head_dim=8, initializer_range=0.1)  # 0.1: logits far from zero (std ~1)
MODELS = {
  "smol": LlamaConfig.preset("tiny", num_heads=9, num_kv_heads=3, **_TINY),
  "70b": LlamaConfig.preset("tiny", num_heads=8, num_kv_heads=2, **_TINY),
  "groups": LlamaConfig.preset("tiny", num_heads=12, num_kv_heads=3, **_TINY),
  "70b_t8": LlamaConfig.preset("tiny", num_heads=16, num_kv_heads=4, **_TINY),
}


def _mesh(**axes):
  return sharding.make_mesh(devices=jax.devices()[: int(np.prod(list(axes.values())))], **axes)


def _name(axes):
  return "x".join(f"{k}{v}" for k, v in axes.items())


@pytest.fixture(scope="module")
def params():
  return {name: init_params(config, jax.random.key(0)) for name, config in MODELS.items()}


def _specs(config, mesh):
  layer = sharding.param_shardings(config, mesh)["layers_0"]
  return {name: layer[group][name].spec
          for group, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down")))
          for name in names}


# --------------------------------------------------------------------------- the rules


def test_heads_that_tensor_does_not_divide_are_replicated_and_the_rest_stays_sharded():
  smol = _specs(MODELS["smol"], _mesh(fsdp=4, tensor=2))  # 9 and 3 heads on tensor = 2
  assert smol["q"] == smol["k"] == smol["v"] == P("fsdp", None, None)
  assert smol["o"] == P(None, None, "fsdp")
  assert smol["gate"] == smol["up"] == P("fsdp", "tensor") and smol["down"] == P("tensor", "fsdp")
  mesh = _mesh(fsdp=2, tensor=4)
  b70 = _specs(MODELS["70b"], mesh)  # 8 query heads split 2 per device, 2 kv heads whole
  assert b70["q"] == P("fsdp", "tensor", None) and b70["o"] == P("tensor", None, "fsdp")
  assert b70["k"] == b70["v"] == P("fsdp", None, None)
  assert sharding.param_shardings(MODELS["70b"], mesh)["embed"].spec == P("tensor", "fsdp")
  # The KV cache follows the k / v weights: rows sharded, kv heads whole.
  assert cache_shardings(MODELS["70b"], mesh).k.spec == P(None, ("data", "fsdp"), None, None, None)
  # The real SmolLM2-135M: attention replicated over tensor, MLP (1536) and vocab (49152) split.
  real = LlamaConfig.preset("smollm2_135m", scan_layers=True)
  placed = sharding.param_shardings(real, _mesh(fsdp=4, tensor=2))
  assert placed["layers"]["attn"]["k"].spec == placed["layers"]["attn"]["q"].spec == P(
    None, "fsdp", None, None)
  assert placed["layers"]["mlp"]["up"].spec == P(None, "fsdp", "tensor")
  assert placed["embed"].spec == P("tensor", "fsdp")
  table = dict(sharding.rules_for(MODELS["70b"], mesh))
  assert table["kv_heads"] is table["act_kv_heads"] is None
  assert table["q_heads"] == table["act_heads"] == table["mlp"] == table["vocab"] == "tensor"


def test_replicated_heads_are_logged_once(caplog):
  config, mesh = LlamaConfig.preset("tiny", num_heads=10, num_kv_heads=5), _mesh(fsdp=4, tensor=2)
  with caplog.at_level(logging.INFO, logger="llama_jax.parallel.sharding"):
    for _ in range(2):
      sharding.param_shardings(config, mesh)
  assert [r.getMessage() for r in caplog.records] == [
    "mesh {'data': 1, 'fsdp': 4, 'tensor': 2}: replicating kv_heads (5) over tensor, "
    "act_kv_heads (5) over tensor: the mesh axes do not divide them"
  ]


@pytest.mark.parametrize("name", ["llama2_7b", "llama2_70b", "llama3_8b", "llama3_70b",
                                  "llama3p2_1b", "tiny"])
def test_divisible_presets_keep_their_rules(name):
  config = LlamaConfig.preset(name)
  for axes in (dict(fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2), dict(fsdp=8)):
    assert sharding.rules_for(config, _mesh(**axes)) == sharding.DEFAULT_RULES


def test_llama3_8b_keeps_todays_partition_specs():
  config, mesh = LlamaConfig.preset("llama3_8b"), _mesh(fsdp=4, tensor=2)
  assert _specs(config, mesh) == dict(
    q=P("fsdp", "tensor", None), k=P("fsdp", "tensor", None), v=P("fsdp", "tensor", None),
    o=P("tensor", None, "fsdp"), gate=P("fsdp", "tensor"), up=P("fsdp", "tensor"),
    down=P("tensor", "fsdp"),
  )
  shardings = sharding.param_shardings(config, mesh)
  assert shardings["embed"].spec == P("tensor", "fsdp")
  assert shardings["lm_head"].spec == P("fsdp", "tensor")
  assert cache_shardings(config, mesh).k.spec == P(None, ("data", "fsdp"), None, "tensor", None)


def test_only_heads_are_replicated_an_mlp_that_tensor_does_not_divide_is_an_error():
  config = LlamaConfig.preset("tiny", num_heads=9, num_kv_heads=3, mlp_dim=100)
  with pytest.raises(ValueError, match=r"layers_0/mlp/down .*\(size 100\) is not divisible by "
                                       r"mesh axes tensor of size 8"):
    sharding.check_fits_mesh(config, _mesh(data=1, fsdp=1, tensor=8))


# --------------------------------------------------------------------------- logits


def _head_constraints(text: str, heads: int) -> list[str]:
  """The mesh axes that the sharding constraints of [B, T, heads, H] activations put on the
  heads dimension (the lowered StableHLO's `sdy.sharding_constraint`s)."""
  pattern = rf'sharding_constraint .*<@mesh, \[(.*)\]> : tensor<\d+x\d+x{heads}x8xf32>'
  return [re.findall(r"\{[^}]*\}", dims)[2] for dims in re.findall(pattern, text)]


CASES = [
  ("smol", dict(fsdp=4, tensor=2)),
  ("smol", dict(fsdp=2, tensor=4)),
  ("smol", dict(data=2, fsdp=1, tensor=4)),
  ("70b", dict(fsdp=2, tensor=4)),
  ("70b_t8", dict(data=1, fsdp=1, tensor=8)),
  ("groups", dict(fsdp=4, tensor=2)),
  ("groups", dict(fsdp=2, tensor=4)),
]


@pytest.mark.parametrize("name,axes", CASES, ids=[f"{n}-{_name(a)}" for n, a in CASES])
def test_logits_equal_one_device(name, axes, params):
  config, mesh = MODELS[name], _mesh(**axes)
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (8, 24))
  segments = np.repeat([[1] * 14 + [2] * 7 + [0] * 3], 8, axis=0)  # packed, then padding
  ref = np.asarray(apply(config, params[name], tokens, segment_ids=segments))
  placed = jax.device_put(params[name], sharding.param_shardings(config, mesh))
  forward = sharding.make_forward(config, mesh)
  logits = np.asarray(forward(placed, tokens, None, segments))
  err = np.abs(logits - ref).max()
  print(f"\n{name} ({config.num_heads}/{config.num_kv_heads} heads) on {dict(mesh.shape)}: "
        f"max |Δlogit| = {err:.1e} (logit std {ref.std():.2f})")
  assert ref.std() > 0.3 and err <= TOL
  # Activations: the query heads split over tensor iff it divides N, the kv heads iff K.
  text = forward.jitted.lower(placed, tokens, None, segments).as_text()
  tensor = mesh.shape["tensor"]
  for heads in (config.num_heads, config.num_kv_heads):
    found = _head_constraints(text, heads)
    assert found and set(found) == {'{"tensor"}' if heads % tensor == 0 else "{}"}, heads


# --------------------------------------------------------------------------- generation


@pytest.mark.parametrize("name,axes", [("smol", dict(fsdp=4, tensor=2)),
                                       ("70b", dict(fsdp=2, tensor=4))],
                         ids=["smol-tensor2", "70b-tensor4"])
def test_greedy_generation_equals_one_device(name, axes, params):
  config, mesh = MODELS[name], _mesh(**axes)
  prompts = [np.random.RandomState(i).randint(3, config.vocab_size, n).tolist()
             for i, n in enumerate((5, 11, 3))]  # 3 prompts: padded to the batch shards
  gen = GenerationConfig(max_new_tokens=8, sampling=SamplingConfig(temperature=0.0))
  ref = generate_tokens(config, params[name], prompts, 0, gen)
  placed = jax.device_put(params[name], sharding.param_shardings(config, mesh))
  out = generate_tokens(config, placed, prompts, 0, gen, mesh=mesh)
  np.testing.assert_array_equal(out.tokens, ref.tokens)
  err = np.abs(np.asarray(out.model_logprobs) - np.asarray(ref.model_logprobs)).max()
  print(f"\n{name} on {dict(mesh.shape)}: tokens equal, max |Δlogprob| = {err:.1e}")
  assert err <= TOL


# --------------------------------------------------------------------------- training


def _batch(config, rows=8, t=16):
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.vocab_size, (rows, t)).astype(np.int32)
  segments = np.ones((rows, t), np.int32)
  segments[::2, t // 2 :] = 2
  return {
    "tokens": tokens,
    "segment_ids": segments,
    "positions": np.asarray(positions_from_segments(jnp.asarray(segments))),
    "targets": np.roll(tokens, -1, axis=1),
    "target_mask": (np.roll(segments, -1, 1) == segments).astype(np.int32),
  }


def _train(config, params, mesh, steps=3):
  settings = ts.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant")
  optimizer = ts.make_optimizer(settings)
  shardings = ts.state_shardings(config, optimizer, mesh)
  state = ts.new_train_state(params, shardings, optimizer, jax.random.key(1))
  step = common.jit_train_step(lm.make_train_step(config, optimizer, mesh=mesh), shardings, mesh)
  losses = []
  for _ in range(steps):
    state, metrics = step(state, _batch(config))
    losses.append(float(metrics["loss"]))
  return jax.device_get(state.params), losses


@pytest.mark.parametrize("name,axes", [("smol", dict(fsdp=4, tensor=2)),
                                       ("70b", dict(fsdp=2, tensor=4))],
                         ids=["smol-tensor2", "70b-tensor4"])
def test_train_steps_equal_one_device(name, axes, params):
  config = MODELS[name]
  ref, ref_losses = _train(config, params[name], _mesh(data=1, fsdp=1, tensor=1))
  out, losses = _train(config, params[name], _mesh(**axes))
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  errs = [np.abs(np.asarray(a) - np.asarray(b)).max()
          for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True)]
  print(f"\n{name}, 3 AdamW steps on {axes}: losses {np.round(losses, 4).tolist()}, "
        f"max |Δparam| = {max(errs):.1e}")
  assert max(errs) <= TOL
