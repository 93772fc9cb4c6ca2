"""The attention-kernel table: splash (Pallas interpret mode on CPU) against `attend_xla`.

Outputs and gradients on packed, padded, GQA and MHA rows; the whole model with
attention_impl="splash"; the shard_map path on an 8-device mesh; and the loud errors for
what a kernel cannot express.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import KVCache, LlamaConfig
from llama_jax.model.attention import KERNELS, attend, attend_splash, check_kernel
from llama_jax.model.config import AttentionImpl
from llama_jax.model.llama import Llama, attend_xla, segment_mask
from llama_jax.parallel import sharding
from llama_jax.parallel.sharding import init_params
from llama_jax.testing import apply

# Tolerances relative to the largest magnitude compared (max |Δ| / max |reference|), so they
# hold on any CPU: float32 rounding differs between machines (AVX2 vs AVX-512 reduction
# orders) but scales with the values. Measured worst cases: float32 1.1e-6 on AVX-512 and
# 1.4e-6 on AVX2 (dv of padded_mqa: 1024 terms per sum), bfloat16 4.8e-3; a wrong mask or
# softmax is off by 1e-2 or more.
F32_TOL = 1e-5  # ~84 float32 ulps of the largest value
BF16_TOL = 1e-2  # bfloat16 attention and its gradients vs float32 (8 bits of mantissa)


def _segments(kind: str, b: int, t: int) -> np.ndarray:
  """[B, T] segment ids: several documents per row, or real tokens then padding (0)."""
  rows = []
  for i in range(b):
    cuts = {"packed": [t // 5 + 7 * i, t // 2, t - 9 - i], "padded": [t - 23 - 11 * i]}[kind]
    ids = np.searchsorted(np.asarray(cuts), np.arange(t), side="right") + 1
    rows.append(np.where(ids > len(cuts), 0, ids) if kind == "padded" else ids)
  return np.stack(rows).astype(np.int32)


def _inputs(b, t, n, k, h, dtype=jnp.float32, seed=0):
  rng = np.random.RandomState(seed)
  q, kk, v, dout = (rng.randn(b, t, heads, h) for heads in (n, k, k, n))
  return [jnp.asarray(a, dtype) for a in (q, kk, v, dout)]


def _xla(q, k, v, segment_ids):
  return attend_xla(q, [(k, v, segment_mask(segment_ids, segment_ids, causal=True))])


def _value_and_grads(fn, q, k, v, dout, segment_ids):
  """fn's output and the gradients w.r.t. q, k, v of <output, dout>."""
  loss = lambda q, k, v: jnp.sum(fn(q, k, v, segment_ids).astype(jnp.float32) * dout)
  out = jax.jit(fn)(q, k, v, segment_ids)
  return [out, *jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)]


def _max_errors(got, want) -> list[float]:
  """Per pair, max |got − want| over max |want|: a float32 sum's rounding error grows with
  the magnitudes it adds, so an error is judged against them."""
  errors = []
  for a, b in zip(got, want, strict=True):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    errors.append(float(np.abs(a - b).max() / np.abs(b).max()))
  return errors


def assert_close(got, want):
  """`got` equals `want` to F32_TOL of the largest |want|."""
  want = np.asarray(want)
  np.testing.assert_allclose(got, want, atol=F32_TOL * np.abs(want).max(), rtol=0)


CASES = {  # name: (segments, B, T, N, K, H)
  "packed_gqa": ("packed", 2, 128, 4, 2, 32),
  "padded_gqa": ("padded", 2, 128, 4, 2, 32),
  "packed_mha": ("packed", 2, 128, 4, 4, 32),
  "padded_mqa": ("padded", 2, 256, 4, 1, 64),
  "packed_gqa_unaligned_t": ("packed", 2, 100, 4, 2, 32),  # T padded up to 128 inside
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_splash_matches_xla_outputs_and_gradients(case):
  kind, b, t, n, k, h = CASES[case]
  q, kk, v, dout = _inputs(b, t, n, k, h)
  segment_ids = jnp.asarray(_segments(kind, b, t))
  got = _value_and_grads(attend_splash, q, kk, v, dout, segment_ids)
  want = _value_and_grads(_xla, q, kk, v, dout, segment_ids)
  errors = _max_errors(got, want)
  print(f"\n{case}: max |Δ| / max |ref| out, dq, dk, dv = "
        f"{', '.join(f'{e:.1e}' for e in errors)}")
  assert max(errors) <= F32_TOL
  assert all(g.shape == w.shape for g, w in zip(got, want, strict=True))


def test_splash_bfloat16_is_as_accurate_as_xla():
  q, k, v, dout = _inputs(2, 128, 4, 2, 32, jnp.bfloat16, seed=1)
  segment_ids = jnp.asarray(_segments("packed", 2, 128))
  exact = _value_and_grads(_xla, *(a.astype(jnp.float32) for a in (q, k, v, dout)), segment_ids)
  splash = _value_and_grads(attend_splash, q, k, v, dout, segment_ids)
  assert splash[0].dtype == jnp.bfloat16
  splash_errors = _max_errors(splash, exact)
  xla_errors = _max_errors(_value_and_grads(_xla, q, k, v, dout, segment_ids), exact)
  print(f"\nbfloat16 vs float32: max |Δ| / max |ref| out, dq, dk, dv: splash "
        f"{', '.join(f'{e:.1e}' for e in splash_errors)}; xla "
        f"{', '.join(f'{e:.1e}' for e in xla_errors)}")
  assert max(splash_errors) <= BF16_TOL
  for ours, theirs in zip(splash_errors, xla_errors, strict=True):
    assert ours <= 1.5 * theirs  # no worse than XLA's own bfloat16 attention


@pytest.fixture(scope="module")
def tiny():
  config = LlamaConfig.preset("tiny")  # N=4, K=2: GQA
  return config, init_params(config, jax.random.key(0))


def test_llama_with_splash_gives_the_logits_of_xla(tiny):
  config, params = tiny
  tokens = np.random.RandomState(0).randint(1, config.vocab_size, (2, 128))
  segments = _segments("packed", 2, 128)
  segments[1, -20:] = 0  # and padding
  ref = np.asarray(apply(config, params, tokens, segment_ids=segments))
  splash = config.replace(attention_impl="splash")
  out = np.asarray(apply(splash, params, tokens, segment_ids=segments))
  print(f"\nLlama tiny: max |Δlogit| = {np.abs(out - ref).max():.1e}")
  assert_close(out, ref)
  # A prefill (the tokens fill the cache) takes the same cache-free kernel.
  (ref_prefill, ref_cache), (prefill, cache) = (
    apply(c, params, tokens, segment_ids=segments, cache=KVCache.init(config, 2, 128))
    for c in (config, splash)
  )
  assert_close(prefill, ref_prefill)
  assert_close(cache.k, ref_cache.k)


def _mesh():
  return sharding.make_mesh(data=2, fsdp=2, tensor=2)  # 8 CPU devices


def test_splash_on_a_mesh_runs_per_device_through_shard_map(tiny):
  config, params = tiny
  mesh = _mesh()
  tokens = np.random.RandomState(1).randint(1, config.vocab_size, (4, 128))
  segments = _segments("packed", 4, 128)
  ref = np.asarray(apply(config, params, tokens, segment_ids=segments))
  splash = config.replace(attention_impl="splash")
  forward = sharding.make_forward(splash, mesh)
  # Initialized under the mesh too: `init`'s single row is padded to the 4 batch shards.
  sharded_params = sharding.init_params(splash, jax.random.key(0), mesh)
  out = np.asarray(forward(sharded_params, tokens, segment_ids=segments))
  print(f"\nLlama tiny on {dict(mesh.shape)}: max |Δlogit| = {np.abs(out - ref).max():.1e}")
  assert_close(out, ref)
  assert "shard_map" in str(forward.jitted.trace(sharded_params, tokens, None, segments).jaxpr)


def test_splash_gradients_on_a_mesh():
  mesh = _mesh()
  q, k, v, dout = _inputs(4, 128, 4, 2, 32, seed=2)
  segment_ids = jnp.asarray(_segments("packed", 4, 128))
  heads = sharding.named_sharding(mesh, ("act_batch", "act_seq", "act_heads", None))
  rows = sharding.named_sharding(mesh, ("act_batch", "act_seq"))

  def sharded(q, k, v, segment_ids):
    with sharding.activation_sharding(mesh):
      return attend("splash", q, k, v, segment_ids)

  placed = [jax.device_put(a, heads) for a in (q, k, v)]
  got = _value_and_grads(sharded, *placed, jax.device_put(dout, heads),
                         jax.device_put(segment_ids, rows))
  want = _value_and_grads(_xla, q, k, v, dout, segment_ids)
  errors = _max_errors(got, want)
  print(f"\nmesh {dict(mesh.shape)}: max |Δ| / max |ref| out, dq, dk, dv = "
        f"{', '.join(f'{e:.1e}' for e in errors)}")
  assert max(errors) <= F32_TOL


def test_splash_on_a_mesh_pads_a_batch():
  q, k, v, dout = _inputs(2, 128, 4, 2, 32, seed=3)  # 2 rows over data × fsdp = 4
  segment_ids = jnp.asarray(_segments("padded", 2, 128))
  mesh = _mesh()

  def sharded(q, k, v, segment_ids):
    with sharding.activation_sharding(mesh):
      return attend_splash(q, k, v, segment_ids)

  # Placed on the mesh (replicated), so that jit compiles for its 8 devices.
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  got = _value_and_grads(sharded, *jax.device_put((q, k, v, dout, segment_ids), replicated))
  want = _value_and_grads(_xla, q, k, v, dout, segment_ids)
  errors = _max_errors(got, want)
  print(f"\n2 rows padded to 4 on the mesh: max |Δ| / max |ref| out, dq, dk, dv = "
        f"{', '.join(f'{e:.1e}' for e in errors)}")
  assert max(errors) <= F32_TOL


@pytest.mark.parametrize("n,kv", [(12, 3), (9, 3)], ids=["q_split_kv_whole", "all_whole"])
def test_splash_on_a_tensor_axis_wider_than_the_kv_heads(n, kv):
  """tensor = 4: 12 query heads split 3 per device, whose GQA groups (4 per kv head)
  straddle the devices, against 3 kv heads that stay whole; 9 / 3 heads all stay whole."""
  q, k, v, dout = _inputs(2, 128, n, kv, 16, seed=4)
  segment_ids = jnp.asarray(_segments("packed", 2, 128))
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=4)

  def sharded(q, k, v, segment_ids):
    with sharding.activation_sharding(mesh):
      return attend_splash(q, k, v, segment_ids)

  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  placed = jax.device_put((q, k, v, dout, segment_ids), replicated)
  if n % 4:  # forward only: the backward adds nothing the split case does not cover
    got, want = [jax.jit(sharded)(*placed[:3], placed[4])], [_xla(q, k, v, segment_ids)]
  else:
    got = _value_and_grads(sharded, *placed)
    want = _value_and_grads(_xla, q, k, v, dout, segment_ids)
  errors = _max_errors(got, want)
  print(f"\n{n} / {kv} heads on {dict(mesh.shape)}: max |Δ| / max |ref| "
        f"{', '.join(f'{e:.1e}' for e in errors)}")
  assert max(errors) <= F32_TOL


def test_splash_compiles_for_a_tpu_with_its_mosaic_kernel():
  """Ahead of time, for TPU devices this host does not have: the real kernel, not the
  interpreter, forward and backward, per device through shard_map, T padded (200 -> 256),
  bfloat16 under the "highest" matmul precision that conftest sets (which Mosaic refuses
  for 16-bit matmuls unless `attend_splash` traces them at the default)."""
  pytest.importorskip("libtpu", reason="TPU descriptions need libtpu: pip install 'jax[tpu]'")
  topologies = pytest.importorskip("llama_jax.parallel.topologies")
  mesh = sharding.make_mesh(devices=topologies.get_topology("v5p-8").devices(), fsdp=2, tensor=2)
  config = LlamaConfig.preset("tiny", attention_impl="splash", dtype="bfloat16")
  model = Llama(config)
  params = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    nn.meta.unbox(sharding.abstract_params(config)), sharding.param_shardings(config, mesh),
  )
  tokens = jax.ShapeDtypeStruct((4, 200), jnp.int32,
                                sharding=sharding.named_sharding(mesh, ("act_batch", "act_seq")))

  def loss(params, tokens):
    with sharding.activation_sharding(mesh):
      return jnp.mean(model.apply({"params": params}, tokens, segment_ids=tokens % 3))

  lowered = jax.jit(jax.value_and_grad(loss)).lower(params, tokens)
  assert lowered.as_text().count("tpu_custom_call") >= 3  # Mosaic kernels: forward, dq, dkv
  lowered.compile()


# --------------------------------------------------------------------------- capabilities


def test_the_table_has_every_configurable_kernel():
  assert set(KERNELS) | {"auto"} == set(AttentionImpl.__args__)
  assert all(name == kernel.name for name, kernel in KERNELS.items())
  assert [n for n, kernel in KERNELS.items() if kernel.extra_mask] == ["xla"]


@pytest.mark.parametrize("impl", ["splash", "cudnn", "dot_product"])
def test_an_extra_mask_needs_a_kernel_that_takes_one(impl):
  cfg = LlamaConfig.preset("tiny", attention_impl=impl)
  tokens = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match=rf"attention_mask needs attention_impl='xla'.*{impl!r}"):
    Llama(cfg).init(jax.random.key(0), tokens, method=Llama.hidden_states,
                    attention_mask=jnp.ones((1, 4, 4), bool))
  q, k, v, _ = _inputs(1, 128, 4, 2, 32)
  with pytest.raises(ValueError, match=r"cannot take an extra \[B, T, T\] mask"):
    attend(impl, q, k, v, jnp.ones((1, 128), jnp.int32), jnp.ones((1, 128, 128), bool))
  if impl == "splash":  # called directly, too
    with pytest.raises(ValueError, match="attention_mask needs attention_impl='xla'"):
      attend_splash(q, k, v, jnp.ones((1, 128), jnp.int32), jnp.ones((1, 128, 128), bool))


def test_a_kernel_off_its_platform_or_unknown_fails_loudly():
  with pytest.raises(ValueError, match=r"'cudnn' .*runs on \('gpu',\), not on 'cpu'"):
    check_kernel("cudnn", platform="cpu")
  q, k, v, _ = _inputs(4, 128, 4, 2, 32)
  cudnn = functools.partial(attend, "cudnn")
  with (sharding.activation_sharding(_mesh()),  # a mesh of CPU devices
        pytest.raises(ValueError, match=r"'cudnn' .*runs on \('gpu',\), not on 'cpu'")):
    jax.eval_shape(cudnn, q, k, v, jnp.ones((4, 128), jnp.int32))
  with pytest.raises(ValueError, match="unknown attention_impl 'ring'"):
    check_kernel("ring")
  assert check_kernel("splash", platform="cpu").name == "splash"  # interpret mode
