"""The mapping table between Hugging Face tensor names and llama_jax parameters, and the one
loader that places tensors, one at a time, straight into their target shardings.

Every checkpoint format is first expressed in HF names and HF layouts (`[out, in]` matrices,
half-split RoPE rows); `meta.py` converts Meta's names and its interleaved RoPE rows to that.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax.model.config import LlamaConfig
from llama_jax.parallel import sharding as shd


class CheckpointError(ValueError):
  """A checkpoint that does not match the model: names the tensor/field and the values."""


def read_json(file: str | Path) -> Any:
  """The JSON in `file`; a `CheckpointError` naming the file, line and column if it does not
  parse (`json`'s own error names neither the file nor, once re-raised, survives a wrapper)."""
  try:
    return json.loads(Path(file).read_text())
  except json.JSONDecodeError as e:
    raise CheckpointError(
      f"{file}: not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}"
    ) from None
  except UnicodeDecodeError as e:
    raise CheckpointError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None


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
  origins: Mapping[str, str] | None = None,
):
  """Loads HF-named tensors into a params tree, one tensor at a time.

  Every tensor must hold floating-point values (an integer tensor would be cast silently)
  that are all finite once in `param_dtype` (a NaN weight makes every loss NaN, and the
  trainer then skips every step without failing); both are checked as it is loaded, the
  second on its devices (one reduction, fetched once for the whole checkpoint).

  Args:
    cfg: the model config; its `param_dtype` is the dtype the parameters get.
    tensors: HF name -> zero-argument function that reads that tensor (HF layout) to host.
    source: the file or directory, for error messages.
    mesh: place each parameter straight into its sharding on this mesh (else on the
      default device). Host memory stays at about one tensor.
    ignore: extra tensor names that may be present and are skipped (e.g. cached RoPE
      frequencies in old checkpoints).
    origins: HF name -> where that tensor is read from (its file, and its name there if
      it differs), for error messages; default `source`.

  Raises:
    CheckpointError: a missing, unexpected or wrongly shaped tensor, a tensor that is not
      floating point, or one with NaN or infinite values; naming the tensor and its file.
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
  finite: list[tuple[str, Any]] = []  # (HF name, device bool), fetched together at the end
  origins = origins or {}

  for name, spec in specs.items():
    path = param_path(cfg, spec)
    shape = _get(shapes, path).shape
    stacked = cfg.scan_layers and spec.layer is not None
    raw = tensors[name]()
    if not jnp.issubdtype(raw.dtype, jnp.floating):
      raise CheckpointError(
        f"{origins.get(name, source)}: tensor {name} has dtype {raw.dtype}; model weights "
        f"must be floating point (it would be cast to {dtype} silently)"
      )
    with np.errstate(over="ignore", invalid="ignore"):  # what overflows is reported below
      host = to_param(spec, raw, shape[1:] if stacked else shape).astype(dtype)
    del raw
    sharding = None if shardings is None else _get(shardings, path)
    placed = _place(host, _drop_leading_axis(sharding) if stacked else sharding)
    finite.append((name, _shard_flags(placed)))
    if stacked:
      layer_slices.setdefault(path, []).append(placed)
    else:
      _set(params, path, placed)
    del host, placed

  oks = _all_true([flags for _, flags in finite])
  bad = [name for (name, _), ok in zip(finite, oks, strict=True) if not ok]
  if bad:
    _raise_non_finite(cfg, specs, bad, params, layer_slices, source, origins)

  for path, slices in layer_slices.items():
    stack = jax.jit(lambda *xs: jnp.stack(xs), out_shardings=_get(shardings, path)
                    if shardings is not None else None)
    _set(params, path, stack(*slices))
    del slices[:]
  return params


@jax.jit
def _all_finite(x: jax.Array) -> jax.Array:
  # One fused reduction where the shard is (no copy, no host transfer but the bool).
  return jnp.isfinite(x).all()


def _shard_flags(x: jax.Array) -> list[jax.Array | bool]:
  """Whether each shard this process holds (one replica of each) is finite, one
  single-device reduction per shard: no collectives, which XLA:CPU can deadlock on when
  many small programs with all-reduces are in flight at once (as in a loader's loop).
  Shards in host memory (CPU devices) are checked by numpy where they are: a jitted check
  would compile once per shard shape and device, seconds per model load for nothing."""
  if not isinstance(x, jax.Array):
    x = jnp.asarray(x)
  shards = [s.data for s in x.addressable_shards if s.replica_id == 0]
  return [
    bool(np.isfinite(np.asarray(s)).all()) if s.device.platform == "cpu" else _all_finite(s)
    for s in shards
  ]


def _all_true(flags: list[list[jax.Array]]) -> list[bool]:
  """Per leaf: all its shards finite, on every process (each checked its own shards)."""
  local = np.array([all(bool(f) for f in fs) for fs in jax.device_get(flags)], bool)
  everyone = shd.process_allgather(local[None])  # [processes, leaves]
  return everyone.all(axis=0).tolist()


@jax.jit
def _non_finite_rows(x: jax.Array) -> jax.Array:
  """Non-finite values per index of the leading axis (per layer of a stacked parameter);
  int32 counts cannot overflow per row, where one count of a 10^11-value leaf could."""
  return jnp.sum(~jnp.isfinite(x), axis=tuple(range(1, x.ndim)), dtype=jnp.int32)


def _count_non_finite(x: jax.Array) -> tuple[int, list[int]]:
  """(non-finite values, the leading-axis indices that hold them) of a float array."""
  rows = _to_host(_non_finite_rows(x)).reshape(-1)  # gathered across processes if need be
  return int(rows.astype(np.int64).sum()), np.flatnonzero(rows).tolist()


def _raise_non_finite(cfg, specs, bad, params, layer_slices, source, origins):
  """The error for the tensors in `bad` (HF names, in load order) that hold NaN or Inf."""
  name = bad[0]
  spec = specs[name]
  path = param_path(cfg, spec)
  param = "/".join(path)
  if cfg.scan_layers and spec.layer is not None:
    value, param = layer_slices[path][spec.layer], f"{param}[{spec.layer}]"
  else:
    value = _get(params, path)
  count, _ = _count_non_finite(value)
  more = f"; also {', '.join(bad[1:9])}{' …' if len(bad) > 9 else ''}" if len(bad) > 1 else ""
  raise CheckpointError(
    f"{origins.get(name, source)}: tensor {name} (parameter {param}) has {count} "
    f"non-finite (NaN or Inf) value(s) of {value.size} as {value.dtype}; "
    f"{len(bad)} tensor(s) are not finite{more}"
  )


def check_finite(params, source: str) -> None:
  """Raises `CheckpointError` if a floating-point leaf of `params` holds NaN or Inf, naming
  the parameter path (and, for a leaf of stacked layers, which layers), how many values,
  and `source` (the checkpoint read). For params restored without `build_params` (Orbax):
  one on-device reduction per leaf, fetched once.
  """
  leaves = [(p, x) for p, x in jax.tree_util.tree_leaves_with_path(params)
            if jnp.issubdtype(x.dtype, jnp.floating)]  # fmt: skip
  oks = _all_true([_shard_flags(x) for _, x in leaves])
  bad = [(jax.tree_util.keystr(p, simple=True, separator="/"), x)
         for (p, x), ok in zip(leaves, oks, strict=True) if not ok]  # fmt: skip
  if not bad:
    return
  name, value = bad[0]
  count, rows = _count_non_finite(value)
  where = f" in layers {rows[:8]}{' …' if len(rows) > 8 else ''}" if "layers/" in name else ""
  others = [n for n, _ in bad[1:9]]
  more = f"; also {', '.join(others)}{' …' if len(bad) > 9 else ''}" if others else ""
  raise CheckpointError(
    f"{source}: parameter {name} has {count} non-finite (NaN or Inf) value(s) of "
    f"{value.size}{where}; {len(bad)} parameter(s) are not finite{more}"
  )


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
