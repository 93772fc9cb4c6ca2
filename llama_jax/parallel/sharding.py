"""Device meshes, the logical-axis table, and sharded parameter initialization.

Sharding is declared once, as data: parameters and activations carry logical axis names
(see `llama_jax.model.llama`), and `DEFAULT_RULES` maps each name to mesh axes of a
`('data', 'fsdp', 'tensor')` mesh. A parameter axis with no rule is an error, never a
silent replication.

The one planned exception is attention heads on a tensor axis wider than their count
(SmolLM2-135M's 3 kv heads on tensor = 2, Llama 3 70B's 8 on tensor = 16): `rules_for`
fits the table to a model and a mesh by leaving the head axes that the mesh does not divide
whole (`model.head_axis_sizes`), as MaxText replicates kv heads; the model fits the
activation rules the same way at trace time, so callers that install `DEFAULT_RULES` need
not know. Any other dimension that its mesh axes do not divide is still an error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.model.attention import fit_rules
from llama_jax.model.config import LlamaConfig
from llama_jax.model.llama import as_model, head_axis_sizes, init_boxed

# A model: a linen module (`Llama(config, lora=...)`, `RewardModel(config)`, ...) or a
# `LlamaConfig`, which stands for `Llama(config)` (see `llama_jax.model.llama.as_model`).
Model = nn.Module | LlamaConfig

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

DEFAULT_RULES: Rules = (
  # Parameters: FSDP shards the model width, tensor parallelism the heads / MLP / vocab.
  ("vocab", "tensor"),
  ("embed", "fsdp"),
  ("q_heads", "tensor"),
  ("kv_heads", "tensor"),
  ("head_dim", None),
  ("mlp", "tensor"),
  ("norm", None),
  ("layers", None),
  ("lora_rank", None),  # LoRA's r: small, replicated; A and B follow their weight's other axes
  # Activations: batch over data × fsdp, heads / MLP / vocab over tensor.
  ("act_batch", BATCH_AXES),
  ("act_seq", None),
  ("act_embed", None),
  ("act_heads", "tensor"),
  ("act_kv_heads", "tensor"),  # keys, values and the KV cache [L, B, S, K, H]
  ("act_mlp", "tensor"),
  ("act_vocab", "tensor"),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh shape; one axis may be -1 to take the remaining devices."""

  data: int = 1
  fsdp: int = -1
  tensor: int = 1

  def resolve(self, num_devices: int) -> tuple[int, int, int]:
    shape = [self.data, self.fsdp, self.tensor]
    if shape.count(-1) > 1:
      raise ValueError(f"MeshConfig {self}: at most one axis may be -1")
    known = math.prod(s for s in shape if s != -1)
    if -1 in shape:
      if num_devices % known:
        raise ValueError(f"MeshConfig {self}: {num_devices} devices are not divisible by {known}")
      shape[shape.index(-1)] = num_devices // known
    if math.prod(shape) != num_devices or min(shape) < 1:
      raise ValueError(
        f"MeshConfig data={shape[0]} × fsdp={shape[1]} × tensor={shape[2]} = "
        f"{math.prod(shape)} does not match the {num_devices} available devices"
      )
    return tuple(shape)


def make_mesh(
  config: MeshConfig | None = None, devices: Sequence[jax.Device] | None = None, **axes: int
) -> Mesh:
  """A ('data', 'fsdp', 'tensor') mesh, e.g. `make_mesh(fsdp=4, tensor=2)`.

  Devices are laid out by `mesh_utils` so that the innermost axis (tensor) gets the
  fastest interconnect. Works across hosts once `initialize_distributed` has run.
  """
  config = config or MeshConfig(**axes)
  devices = list(devices if devices is not None else jax.devices())
  shape = config.resolve(len(devices))
  try:
    grid = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  except (AssertionError, NotImplementedError, ValueError):  # e.g. CPU / uneven topologies
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def initialize_distributed(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  local_device_ids: Sequence[int] | None = None,
) -> None:
  """Joins a multi-process JAX job (no-op for a single process that passed nothing).

  On TPU VMs and SLURM / Open MPI GPU clusters all arguments can be left out: JAX finds
  the coordinator itself. On localhost pass them explicitly (see tests).
  """
  if jax.distributed.is_initialized():
    return
  explicit = coordinator_address is not None or num_processes is not None
  if not explicit and not _on_managed_cluster():
    return
  jax.distributed.initialize(
    coordinator_address=coordinator_address,
    num_processes=num_processes,
    process_id=process_id,
    local_device_ids=local_device_ids,
  )


def _on_managed_cluster() -> bool:
  import os

  return any(
    k in os.environ
    for k in (
      "TPU_WORKER_HOSTNAMES",
      "SLURM_JOB_ID",
      "OMPI_COMM_WORLD_SIZE",
      "JAX_COORDINATOR_ADDRESS",
    )
  )


# --------------------------------------------------------------------------- logical axes


def logical_to_mesh_spec(
  logical: Sequence[str | None], rules: Rules = DEFAULT_RULES, what: str = "array"
) -> PartitionSpec:
  """PartitionSpec for logical axis names; an axis name with no rule raises."""
  table = dict(rules)
  missing = [name for name in logical if name is not None and name not in table]
  if missing:
    raise ValueError(
      f"{what}: logical axis {missing[0]!r} (axes {tuple(logical)}) has no sharding rule; "
      f"add it to the rules (known: {sorted(table)})"
    )
  return PartitionSpec(*(None if name is None else table[name] for name in logical))


def _mesh_axis_size(mesh: Mesh, axes) -> int:
  if axes is None:
    return 1
  return math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes))


def _path_name(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


@functools.lru_cache(maxsize=32)
def _abstract_boxed(model: nn.Module):
  return jax.eval_shape(lambda: init_boxed(model, jax.random.key(0)))


def abstract_params(model: Model):
  """Boxed (`nn.Partitioned`) parameter shapes, nothing allocated (traced once per model)."""
  return _abstract_boxed(as_model(model))


def param_partition_specs(model: Model, rules: Rules = DEFAULT_RULES):
  """Tree of mesh PartitionSpecs for the parameters of `model`."""
  boxed = abstract_params(model)

  def spec(path, leaf):
    name = _path_name(path)
    if not isinstance(leaf, nn.Partitioned):
      raise ValueError(f"parameter {name} has no logical axis names; annotate it in the model")
    return logical_to_mesh_spec(leaf.names, rules, what=f"parameter {name}")

  return jax.tree_util.tree_map_with_path(
    spec, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )


_log = logging.getLogger(__name__)
_logged: set[str] = set()


def rules_for(model: Model, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Rules:
  """`rules` fitted to `model` on `mesh`: a query / kv head axis whose mesh axes do not
  divide its count is left unsharded (replicated over them), for parameters and activations
  alike. The kv heads go first (K < N); the query heads, and with them the attention
  activations, only where N does not divide either (SmolLM2's 9 on tensor = 2). MLP, vocab
  and the model width keep their rules. A mesh that divides every head axis gets `rules`
  back unchanged (same entries, same order)."""
  sizes = head_axis_sizes(as_model(model).config)
  fitted = fit_rules(rules, mesh.shape, sizes)
  dropped = [f"{name} ({sizes[name]}) over {axes}"
             for (name, axes), (_, kept) in zip(rules, fitted, strict=True) if kept != axes]
  note = f"mesh {dict(mesh.shape)}: replicating " + ", ".join(dropped)
  if dropped and note not in _logged:  # once per model shape and mesh, not per call
    _logged.add(note)
    _log.info("%s: the mesh axes do not divide them", note)
  return fitted


def check_fits_mesh(model: Model, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> None:
  """Raises if a parameter dimension is not divisible by the mesh axes it is sharded over
  (under `rules_for(model, mesh, rules)`: head axes that do not divide are replicated)."""
  rules = rules_for(model, mesh, rules)
  shapes = nn.meta.unbox(abstract_params(model))
  specs = param_partition_specs(model, rules)
  for (path, leaf), spec in zip(
    jax.tree_util.tree_leaves_with_path(shapes),
    jax.tree_util.tree_leaves(specs, is_leaf=_is_spec),
    strict=True,
  ):
    for dim, (size, axes) in enumerate(zip(leaf.shape, spec, strict=False)):
      n = _mesh_axis_size(mesh, axes)
      if size % n:
        raise ValueError(
          f"parameter {_path_name(path)} of shape {leaf.shape}: dimension {dim} (size {size}) "
          f"is not divisible by mesh axes {axes} of size {n} (mesh {dict(mesh.shape)})"
        )


def _is_spec(x) -> bool:
  return isinstance(x, PartitionSpec)


def param_shardings(model: Model, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Tree of `NamedSharding`s for the parameters, after checking they fit the mesh (under
  `rules_for(model, mesh, rules)`)."""
  check_fits_mesh(model, mesh, rules)
  specs = param_partition_specs(model, rules_for(model, mesh, rules))
  return jax.tree_util.tree_map(lambda spec: NamedSharding(mesh, spec), specs, is_leaf=_is_spec)


def abstract_sharded_params(model: Model, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """Parameter `ShapeDtypeStruct`s placed as `param_shardings` (ahead-of-time arguments, and
  the restore target of a checkpoint)."""
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    nn.meta.unbox(abstract_params(model)),
    param_shardings(model, mesh, rules),
  )


def named_sharding(
  mesh: Mesh, logical: Sequence[str | None], rules: Rules = DEFAULT_RULES
) -> NamedSharding:
  """NamedSharding of an activation / batch array from its logical axis names."""
  return NamedSharding(mesh, logical_to_mesh_spec(logical, rules))


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None, rules: Rules = DEFAULT_RULES):
  """Context under which the model's `with_logical_constraint`s take effect (the model
  fits the head entries of `rules` to its own head counts, see `rules_for`)."""
  if mesh is None:
    yield
    return
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
    yield


def batch_shards(mesh: Mesh) -> int:
  """How many pieces the batch axes (data × fsdp) split a batch into."""
  return _mesh_axis_size(mesh, BATCH_AXES)


def check_batch_fits_mesh(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  """Raises, naming the values, if a global batch does not divide over data × fsdp."""
  n = batch_shards(mesh)
  if batch_size % n:
    raise ValueError(
      f"{what}={batch_size} is not divisible by the mesh's batch axes data × fsdp = {n} "
      f"(mesh {dict(mesh.shape)})"
    )


@functools.partial(jax.jit, static_argnums=0)
def _init_unsharded(model: nn.Module, rng: jax.Array):
  return nn.meta.unbox(init_boxed(model, rng))


def init_params(
  model: Model, rng: jax.Array, mesh: Mesh | None = None, rules: Rules = DEFAULT_RULES
):
  """Fresh parameters of `model` (a module, e.g. `RewardModel(config)`, or a `LlamaConfig`).

  With a `mesh`, the initializer is jit-compiled with `out_shardings`, so every device
  computes only its own shards: a model larger than one device never exists on one device.
  Without one, on the default device (tests, notebooks, small models).
  """
  model = as_model(model)
  if mesh is None:
    return _init_unsharded(model, rng)
  shardings = param_shardings(model, mesh, rules)
  with activation_sharding(mesh, rules):
    return jax.jit(lambda key: nn.meta.unbox(init_boxed(model, key)), out_shardings=shardings)(rng)


def init_missing(model: Model, params: Any, rng: jax.Array, mesh: Mesh,
                 rules: Rules = DEFAULT_RULES) -> Any:
  """`params` completed to the full tree of `model`: its parameters that `params` lacks
  (e.g. fresh LoRA adapters beside loaded weights) initialized straight into their shardings,
  the given ones kept as they are (no copy). A given parameter the model does not have, or
  of another shape, raises."""
  model = as_model(model)
  shapes = nn.meta.unbox(abstract_params(model))
  given = dict(jax.tree_util.tree_leaves_with_path(params))
  expected = dict(jax.tree_util.tree_leaves_with_path(shapes))
  for path, leaf in given.items():
    if path not in expected or tuple(leaf.shape) != tuple(expected[path].shape):
      want = expected[path].shape if path in expected else "no such parameter"
      raise ValueError(
        f"init_missing: parameter {_path_name(path)} of shape {tuple(leaf.shape)} does not "
        f"fit the model ({want})"
      )
  missing = jax.tree_util.tree_map_with_path(lambda p, _: p not in given, shapes)
  if not any(jax.tree.leaves(missing)):
    return params
  keep = lambda tree: jax.tree.map(lambda x, m: x if m else None, tree, missing)
  shardings = keep(param_shardings(model, mesh, rules))
  with activation_sharding(mesh, rules):
    fresh = jax.jit(lambda key: keep(nn.meta.unbox(init_boxed(model, key))),
                    out_shardings=shardings)(rng)  # fmt: skip
  return jax.tree_util.tree_map_with_path(
    lambda p, f: given[p] if f is None else f, fresh, is_leaf=lambda x: x is None
  )


def make_forward(model: Model, mesh: Mesh, rules: Rules = DEFAULT_RULES):
  """`forward(params, tokens, positions=None, segment_ids=None) -> logits`, jitted with
  explicit in/out shardings: batch over data × fsdp, vocab logits over tensor.

  Host (numpy) inputs are the *global* batch, identical on every process; each device
  receives only its rows.
  """
  model = as_model(model)
  batch = named_sharding(mesh, ("act_batch", "act_seq"), rules)

  def forward(params, tokens, positions, segment_ids):
    with activation_sharding(mesh, rules):
      return model.apply({"params": params}, tokens, positions, segment_ids)

  jitted = jax.jit(
    forward,
    in_shardings=(param_shardings(model, mesh, rules), batch, batch, batch),
    out_shardings=named_sharding(mesh, ("act_batch", "act_seq", "act_vocab"), rules),
  )

  def call(params, tokens, positions=None, segment_ids=None):
    place = lambda x: None if x is None else to_global(x, batch)
    return jitted(params, place(tokens), place(positions), place(segment_ids))

  call.jitted = jitted
  return call


def to_global(x, sharding: NamedSharding) -> jax.Array:
  """A global host array (the same on every process) -> a sharded `jax.Array`."""
  if isinstance(x, jax.Array):
    return x
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


# --------------------------------------------------------------------------- process-local rows
# Multi-host code where each process holds its own rows (online RL's rollouts): a batch-sharded
# global array [N, ...] is, on each process, one contiguous block of rows.


def process_rows(batch: jax.sharding.Sharding, num_rows: int) -> slice:
  """The rows of a global [num_rows, ...] array under `batch` that this process's devices
  hold: one contiguous block (all rows on a single process)."""
  indices = batch.addressable_devices_indices_map((num_rows,)).values()
  blocks = sorted({idx[0].indices(num_rows)[:2] for idx in indices})
  start, stop = blocks[0]
  for lo, hi in blocks[1:]:
    if lo > stop:
      raise ValueError(
        f"this process holds rows {blocks} of {num_rows}, not one block: lay the mesh's batch "
        "axes out process by process (sharding.make_mesh does)"
      )
    stop = max(stop, hi)
  return slice(start, stop)


def from_process_rows(local, batch: NamedSharding, num_rows: int) -> jax.Array:
  """A global [num_rows, ...] array under `batch` from this process's rows
  (`process_rows(batch, num_rows)` of it); every process calls this with its own block."""
  local = np.asarray(local)
  return jax.make_array_from_process_local_data(batch, local, (num_rows, *local.shape[1:]))


def to_process_rows(x: jax.Array) -> np.ndarray:
  """This process's rows (`process_rows`) of a global array sharded over its first axis,
  copied to the host: what `from_process_rows` turns back into `x`."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  rows = process_block(x)
  out = np.empty((rows.stop - rows.start, *x.shape[1:]), x.dtype)
  for shard in x.addressable_shards:  # replicas (e.g. over tensor) write the same values
    lo, hi = shard.index[0].indices(x.shape[0])[:2]
    out[(slice(lo - rows.start, hi - rows.start), *shard.index[1:])] = np.asarray(shard.data)
  return out


def process_block(x: jax.Array) -> slice:
  """`process_rows` of a global array: the rows of its first axis this process holds."""
  return slice(0, x.shape[0]) if x.is_fully_addressable else process_rows(x.sharding, x.shape[0])


def process_allgather(x) -> np.ndarray:
  """Every process's `x` concatenated along axis 0 in process order (a no-op on one
  process): small host values such as per-response rewards, for global statistics."""
  x = np.asarray(x)
  if jax.process_count() == 1:
    return x
  from jax.experimental import multihost_utils

  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def bytes_per_device(tree) -> dict[jax.Device, int]:
  """Bytes of `tree`'s arrays held on each addressable device (counts real shards)."""
  out: dict[jax.Device, int] = {}
  for leaf in jax.tree_util.tree_leaves(tree):
    for shard in leaf.addressable_shards:
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out
