"""The mapping table between Hugging Face tensor names and llama_jax parameters, and the one
loader that places tensors, one at a time, straight into their target shardings.

Every checkpoint format is first expressed in HF names and HF layouts (`[out, in]` matrices,
half-split RoPE rows); `meta.py` converts Meta's names and its interleaved RoPE rows to that.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax import sharding as shd
from llama_jax.config import LlamaConfig


class CheckpointError(ValueError):
  """A checkpoint that does not match the model: names the tensor/field and the values."""


@dataclasses.dataclass(frozen=True)
class TensorSpec:
  """Where one HF tensor goes: parameter path, layer index, HF shape, whether transposed."""

  hf_name: str
  path: tuple[str, ...]  # path inside one block, or at the top level when layer is None
  layer: int | None
  hf_shape: tuple[int, ...]
  transposed: bool  # HF stores nn.Linear weights as [out, in]; ours are [in, …out]


def tensor_specs(cfg: LlamaConfig) -> dict[str, TensorSpec]:
  """The mapping table: every tensor a HF Llama checkpoint of `cfg` holds."""
  d, f, v = cfg.d_model, cfg.mlp_dim, cfg.vocab_size
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  per_layer = {  # HF suffix: (block path, HF shape, transposed)
    "input_layernorm.weight": (("attn_norm", "scale"), (d,), False),
    "self_attn.q_proj.weight": (("attn", "q"), (q, d), True),
    "self_attn.k_proj.weight": (("attn", "k"), (kv, d), True),
    "self_attn.v_proj.weight": (("attn", "v"), (kv, d), True),
    "self_attn.o_proj.weight": (("attn", "o"), (d, q), True),
    "post_attention_layernorm.weight": (("mlp_norm", "scale"), (d,), False),
    "mlp.gate_proj.weight": (("mlp", "gate"), (f, d), True),
    "mlp.up_proj.weight": (("mlp", "up"), (f, d), True),
    "mlp.down_proj.weight": (("mlp", "down"), (d, f), True),
  }
  specs = [TensorSpec("model.embed_tokens.weight", ("embed",), None, (v, d), False),
           TensorSpec("model.norm.weight", ("final_norm", "scale"), None, (d,), False)]
  if not cfg.tie_embeddings:
    specs.append(TensorSpec("lm_head.weight", ("lm_head",), None, (v, d), True))
  for i in range(cfg.num_layers):
    for suffix, (path, shape, transposed) in per_layer.items():
      specs.append(TensorSpec(f"model.layers.{i}.{suffix}", path, i, shape, transposed))
  return {s.hf_name: s for s in specs}


def param_path(cfg: LlamaConfig, spec: TensorSpec) -> tuple[str, ...]:
  """Full path in the params tree (scanned models stack layers under 'layers')."""
  if spec.layer is None:
    return spec.path
  return (("layers",) if cfg.scan_layers else (f"layers_{spec.layer}",)) + spec.path


def to_param(spec: TensorSpec, hf_array: np.ndarray, param_shape: tuple[int, ...]) -> np.ndarray:
  """HF layout -> llama_jax layout (e.g. q_proj [N·H, D] -> q [D, N, H])."""
  if tuple(hf_array.shape) != spec.hf_shape:
    raise CheckpointError(
      f"tensor {spec.hf_name}: shape {tuple(hf_array.shape)} does not match the model's "
      f"expected {spec.hf_shape}"
    )
  return (hf_array.T if spec.transposed else hf_array).reshape(param_shape)


def to_hf(spec: TensorSpec, param: np.ndarray) -> np.ndarray:
  """llama_jax layout -> HF layout (inverse of `to_param`)."""
  if spec.transposed:
    return np.ascontiguousarray(param.reshape(spec.hf_shape[::-1]).T)
  return param.reshape(spec.hf_shape)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def build_params(
  cfg: LlamaConfig,
  tensors: Mapping[str, Callable[[], np.ndarray]],
  *,
  source: str,
  mesh: Mesh | None = None,
  rules: shd.Rules = shd.DEFAULT_RULES,
  ignore: Iterable[str] = (),
):
  """Loads HF-named tensors into a params tree, one tensor at a time.

  Args:
    cfg: the model config; its `param_dtype` is the dtype the parameters get.
    tensors: HF name -> zero-argument function that reads that tensor (HF layout) to host.
    source: the file or directory, for error messages.
    mesh: place each parameter straight into its sharding on this mesh (else on the
      default device). Host memory stays at about one tensor.
    ignore: extra tensor names that may be present and are skipped (e.g. cached RoPE
      frequencies in old checkpoints).

  Raises:
    CheckpointError: a missing, unexpected or wrongly shaped tensor.
  """
  specs = tensor_specs(cfg)
  missing = sorted(set(specs) - set(tensors), key=_natural_key)
  extra = sorted(set(tensors) - set(specs) - set(ignore), key=_natural_key)
  if missing or extra:
    raise CheckpointError(
      f"{source}: checkpoint does not match the model config "
      f"(layers={cfg.num_layers}, tie_embeddings={cfg.tie_embeddings}): "
      f"missing tensors {missing[:8]}{' …' if len(missing) > 8 else ''}; "
      f"unexpected tensors {extra[:8]}{' …' if len(extra) > 8 else ''}"
    )
  shapes = nn.meta.unbox(shd.abstract_params(cfg))
  shardings = shd.param_shardings(cfg, mesh, rules) if mesh is not None else None
  dtype = jnp.dtype(cfg.param_dtype)
  params: dict = {}
  layer_slices: dict[tuple[str, ...], list] = {}  # scanned models: per-layer arrays to stack

  for name, spec in specs.items():
    path = param_path(cfg, spec)
    shape = _get(shapes, path).shape
    stacked = cfg.scan_layers and spec.layer is not None
    host = to_param(spec, tensors[name](), shape[1:] if stacked else shape).astype(dtype)
    sharding = None if shardings is None else _get(shardings, path)
    if stacked:
      layer_slices.setdefault(path, []).append(_place(host, _drop_leading_axis(sharding)))
    else:
      _set(params, path, _place(host, sharding))
    del host

  for path, slices in layer_slices.items():
    stack = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=_get(shardings, path)
                    if shardings is not None else None)
    _set(params, path, stack(*slices))
    del slices[:]
  return params


def _place(host: np.ndarray, sharding):
  """Host array -> device array; each device (or process) receives only its own shards."""
  if sharding is None:
    return jax.device_put(host)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _drop_leading_axis(sharding):
  if sharding is None:
    return None
  return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec[1:]))


def iter_hf_tensors(cfg: LlamaConfig, params) -> Iterable[tuple[str, np.ndarray]]:
  """(HF name, host array in HF layout) for every tensor, fetched one at a time.

  Parameters sharded across processes are all-gathered, so every process must iterate.
  """
  gathered: dict[tuple[str, ...], np.ndarray] = {}
  for name, spec in tensor_specs(cfg).items():
    path = param_path(cfg, spec)
    if cfg.scan_layers and spec.layer is not None:
      if path not in gathered:  # one stacked parameter kind at a time
        gathered = {path: _to_host(_get(params, path))}
      value = gathered[path][spec.layer]
    else:
      value = _to_host(_get(params, path))
    yield name, to_hf(spec, value)


def _to_host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _natural_key(name: str):
  return [int(p) if p.isdigit() else p for p in name.split(".")]


def nbytes(shape, dtype) -> int:
  return math.prod(shape) * jnp.dtype(dtype).itemsize
