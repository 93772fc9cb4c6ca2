"""Orbax save / resume of training runs: the TrainState, the input pipeline's position and
small JSON metadata, restored straight into the target shardings (of any mesh shape).

Convention: an experiment workdir keeps its checkpoints under `<workdir>/checkpoints/`
(`checkpoint_dir(workdir)`), one directory per step:

  <workdir>/checkpoints/
    1000/
      state/                     the TrainState pytree (OCDBT + zarr, one chunk per shard)
      data/process_0-of-1.json   each process's data-iterator position
      meta/meta.json             optional run metadata, e.g. the experiment config
    2000.orbax-checkpoint-tmp/   a save in flight, or one cut off: never listed nor restored

Why an interrupted save is never taken for a checkpoint (orbax 0.12,
`orbax/checkpoint/_src/path/atomicity.py` and `step.py`):
- On local / POSIX file systems (`AtomicRenameTemporaryPath`) every save writes into
  `<step>.orbax-checkpoint-tmp/` (items into `<item>.orbax-checkpoint-tmp/` inside it). Only when
  every array and JSON file is written, and all processes met at a barrier, does the primary
  process rename the items, write `commit_success.txt`, then rename the step directory to
  `<step>`: one atomic rename(2) is the commit. Step listing accepts only names without the
  tmp suffix, so a crash at any moment before that rename leaves an invisible tmp directory.
- On GCS (`CommitFileTemporaryPath`; object stores have no atomic directory rename) the save
  writes into `<step>/` directly and its last write is `<step>/commit_success.txt`; a step
  directory without that file is treated as temporary.
Leftover tmp directories are removed when a writing `CheckpointManager` opens the directory,
and a save of the same step replaces its stale tmp directory.

Multi-host: every process calls every method (orbax synchronizes them with barriers and
writes each array shard from the process that owns it); nothing here is per-process except
the data-iterator position, which each process keeps for itself (see `_ProcessJsonHandler`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from llama_jax.checkpoint.params import CheckpointError

STATE, DATA, META = "state", "data", "meta"
CHECKPOINTS_SUBDIR = "checkpoints"
_MAX_LISTED = 8  # mismatches named in one error message


def absolute(path: epath.PathLike) -> epath.Path:
  """`path` made absolute (Orbax refuses relative paths); URLs such as gs://… as they are."""
  return epath.Path(path if "://" in str(path) else os.path.abspath(path))


def checkpoint_dir(workdir: epath.PathLike) -> epath.Path:
  """Where an experiment workdir keeps its Orbax checkpoints: `<workdir>/checkpoints/`.

  Returns an `etils.epath.Path` (a `pathlib`-like path that also understands `gs://…`).
  """
  return absolute(workdir) / CHECKPOINTS_SUBDIR


# ---------------------------------------------------------------------------------------------
# The data item: one JSON file per process.


def _process_file() -> str:
  return f"process_{jax.process_index()}-of-{jax.process_count()}.json"


class _ProcessJsonHandler(ocp.AsyncCheckpointHandler):
  """Each process's own JSON value, stored as `process_<i>-of-<n>.json`.

  Orbax's `JsonCheckpointHandler` writes on the primary process only; on a multi-host resume
  every host would then read host 0's input position. grain's own Orbax handler keeps one file
  per process the same way.
  """

  async def async_save(self, directory: epath.Path, args: _DataSave):
    async def write():
      (directory / _process_file()).write_text(args.item)

    # Waits for orbax's (asynchronous) creation of `directory` before writing.
    return [ocp.future.CommitFutureAwaitingContractedSignals(write(), name="data_state_save")]

  def save(self, directory: epath.Path, args: _DataSave):
    async def save_and_wait():
      for f in await self.async_save(directory, args):
        f.result()

    asyncio.run(save_and_wait())

  def restore(self, directory: epath.Path, args: _DataRestore | None = None) -> Any:
    del args
    path = directory / _process_file()
    if not path.exists():
      saved = sorted(p.name for p in directory.iterdir())
      raise CheckpointError(
        f"{directory}: no data-iterator state for this process ({path.name}); the checkpoint "
        f"holds {saved}: it was written by another number of processes"
      )
    return json.loads(path.read_text())


@ocp.args.register_with_handler(_ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class _DataSave(ocp.args.CheckpointArgs):
  item: str  # already JSON-encoded, so a later change to the caller's dict cannot leak in


@ocp.args.register_with_handler(_ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class _DataRestore(ocp.args.CheckpointArgs):
  pass


def _json_encode(value: Any, what: str) -> str:
  """JSON text of `value`, failing here rather than in orbax's background thread."""
  try:
    return json.dumps(value)
  except (TypeError, ValueError) as e:
    raise ValueError(f"{what} must be JSON-serializable: {e}") from e


# ---------------------------------------------------------------------------------------------
# Matching a saved tree against an abstract target.


def _key_name(key) -> str:
  for attr in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _flat_shapes(tree) -> dict[str, tuple[int, ...] | None]:
  """`{"params/layers_0/attn/q": shape}` for every leaf.

  Orbax stores dataclasses and NamedTuples as dicts and tuples as lists, so attribute, dict
  and sequence keys all map to plain names; empty nodes (optax's `EmptyState`) have no leaves.
  """
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {
    "/".join(_key_name(k) for k in path): (
      tuple(leaf.shape) if getattr(leaf, "shape", None) is not None else None
    )
    for path, leaf in leaves
  }


def _listed(paths: list[str]) -> str:
  more = f" … and {len(paths) - _MAX_LISTED} more" if len(paths) > _MAX_LISTED else ""
  return ", ".join(paths[:_MAX_LISTED]) + more


def _tree_mismatches(saved, target, *, prefix: str = "") -> list[str]:
  """Human-readable differences between a saved tree's metadata and a target tree.

  Only paths under `prefix` of the saved tree count (for partial restores); shapes are
  compared, dtypes are not (orbax casts on restore, e.g. float32 weights into bfloat16).
  """
  saved_shapes = {p: s for p, s in _flat_shapes(saved).items() if p.startswith(prefix)}
  target_shapes = _flat_shapes(target)
  problems = []
  if missing := sorted(target_shapes.keys() - saved_shapes.keys()):
    problems.append(f"not in the checkpoint: {_listed(missing)}")
  if extra := sorted(saved_shapes.keys() - target_shapes.keys()):
    problems.append(f"in the checkpoint but not in the target: {_listed(extra)}")
  shapes = [
    f"{p} saved {saved_shapes[p]} vs target {s}"
    for p, s in sorted(target_shapes.items())
    if p in saved_shapes and saved_shapes[p] is not None and s is not None and saved_shapes[p] != s
  ]
  if shapes:
    problems.append(f"shape mismatch: {_listed(shapes)}")
  return problems


def _restore_args(abstract) -> Any:
  """Per-leaf `ArrayRestoreArgs` that read each array straight into its target sharding."""
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract)
  unsharded = [jax.tree_util.keystr(p) for p, x in flat if getattr(x, "sharding", None) is None]
  if unsharded:
    raise ValueError(
      "every leaf of the restore target needs a sharding (jax.ShapeDtypeStruct(..., "
      f"sharding=...) or a jax.Array); these have none: {_listed(unsharded)}"
    )
  return ocp.checkpoint_utils.construct_restore_args(abstract)


# ---------------------------------------------------------------------------------------------
# The manager.


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  return {
    STATE: ocp.PyTreeCheckpointHandler(),
    DATA: _ProcessJsonHandler(),
    META: ocp.JsonCheckpointHandler(filename="meta.json"),
  }


class CheckpointManager:
  """Periodic, asynchronous, retention-limited checkpoints of a training run.

  Each checkpoint holds the TrainState pytree ("state"), each process's data-iterator position
  ("data", JSON) and optional run metadata ("meta", JSON). Use as a context manager, or call
  `close()`, so that an asynchronous save in flight is committed before the process exits.

  Args:
    directory: where the step directories live (for experiments, `checkpoint_dir(workdir)`).
    save_interval_steps: `save()` writes at steps that are multiples of this (and when JAX's
      preemption notice has arrived); `force=True` writes at any step.
    max_to_keep: how many of the latest checkpoints to keep (None: all).
    async_save: `save()` returns once the arrays are copied to host memory and writes them in
      a background thread; the caller may then donate or delete the state's buffers.
    read_only: never write nor delete anything, including the tmp directories left by a
      crashed save (use this to read the checkpoints of a run that may still be writing).
  """

  def __init__(
    self,
    directory: epath.PathLike,
    *,
    save_interval_steps: int = 1,
    max_to_keep: int | None = None,
    async_save: bool = True,
    read_only: bool = False,
  ):
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    if max_to_keep is not None and max_to_keep < 1:
      raise ValueError(f"max_to_keep must be None or >= 1, got {max_to_keep}")
    self.directory = absolute(directory)
    options = ocp.CheckpointManagerOptions(
      # Orbax's default policy also saves the first step a run reaches; a resumed run would
      # then write a checkpoint off the interval, so the interval (and preemption) only.
      save_decision_policy=ocm.AnySavePolicy(
        [ocm.FixedIntervalPolicy(save_interval_steps), ocm.PreemptionCheckpointingPolicy()]
      ),
      preservation_policy=ocm.LatestN(max_to_keep),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
      create=not read_only,
      save_interval_steps=0 if read_only else save_interval_steps,  # read_only warns otherwise
    )
    self._manager = ocp.CheckpointManager(
      self.directory, item_handlers=_item_handlers(), options=options
    )

  def save(
    self,
    step: int,
    state: Any,
    *,
    data_state: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    force: bool = False,
  ) -> bool:
    """Saves `state` (a pytree of jax.Arrays) if `step` is due, or always with `force`.

    Returns whether a save was started. A step that already has a checkpoint is never
    overwritten (returns False), so a final `force=True` save may repeat a periodic one.
    """
    step = int(step)
    if not force and not self._manager.should_save(step):
      return False
    if step in self._manager.all_steps():
      return False
    items = {STATE: ocp.args.PyTreeSave(state)}
    if data_state is not None:
      items[DATA] = _DataSave(_json_encode(data_state, "data_state"))
    if meta is not None:
      items[META] = ocp.args.JsonSave(json.loads(_json_encode(meta, "meta")))
    return self._manager.save(step, args=ocp.args.Composite(**items), force=True)

  def latest_step(self) -> int | None:
    """The newest checkpoint's step (including a save this process has in flight), or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints kept, ascending."""
    return sorted(self._manager.all_steps())

  def restore(
    self, step: int | None = None, *, abstract_state: Any
  ) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None]:
    """Restores `(state, data_state, meta)` of `step` (default: the latest checkpoint).

    `abstract_state` has the structure of the saved state with `jax.ShapeDtypeStruct` leaves
    carrying the target `sharding`; each process reads only the slices its devices hold, so
    the mesh may differ from the one that saved. `data_state` / `meta` are None when that
    save had none. Raises `CheckpointError` naming the paths when the trees do not match.
    """
    self._manager.wait_until_finished()  # a step still being written cannot be read yet
    step = _resolve_step(self._manager, self.directory, step)
    _check_matches(self._manager, self.directory, step, abstract_state)
    step_dir = self.directory / str(step)
    restore_args = _restore_args(abstract_state)
    items = {STATE: ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args)}
    if (step_dir / DATA).exists():
      items[DATA] = _DataRestore()
    if (step_dir / META).exists():
      items[META] = ocp.args.JsonRestore()
    restored = _restore(self._manager, self.directory, step, items)
    return (
      restored[STATE],
      restored[DATA] if DATA in items else None,
      restored[META] if META in items else None,
    )

  def wait_until_finished(self) -> None:
    """Blocks until the save in flight (if any) is committed and old checkpoints pruned."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight, then releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _resolve_step(manager: ocp.CheckpointManager, directory: epath.Path, step: int | None) -> int:
  steps = sorted(manager.all_steps())
  if not steps:
    raise CheckpointError(f"{directory}: no complete checkpoint")
  if step is None:
    return steps[-1]
  if step not in steps:
    raise CheckpointError(f"{directory}: no complete checkpoint for step {step}; steps: {steps}")
  return step


def _check_matches(manager, directory, step: int, target, *, prefix: str = "") -> None:
  try:
    saved = manager.metadata(step).item_metadata[STATE]
  except Exception as e:  # a step directory without readable state metadata
    raise CheckpointError(f"{directory} step {step}: cannot read the state's metadata: {e}") from e
  saved_tree = saved.tree if hasattr(saved, "tree") else saved
  if problems := _tree_mismatches(saved_tree, target, prefix=prefix):
    raise CheckpointError(
      f"{directory} step {step}: the saved state does not match the target: " + "; ".join(problems)
    )


def _restore(manager, directory, step: int, items: dict[str, Any]):
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except CheckpointError:
    raise
  except Exception as e:  # orbax / tensorstore raise many types; keep the cause attached
    raise CheckpointError(f"{directory} step {step}: restore failed: {e}") from e


def _read_only_manager(directory: epath.Path) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
    directory,
    item_handlers=_item_handlers(),
    options=ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0),
  )


def _resolve_directory(directory: epath.PathLike) -> epath.Path:
  """A checkpoint directory, or the `checkpoints/` directory of a run workdir."""
  directory = absolute(directory)
  nested = checkpoint_dir(directory)
  return nested if nested.is_dir() else directory


def saved_shapes(directory: epath.PathLike, step: int | None = None) -> dict[str, Any]:
  """`{"params/layers_0/...": shape}` of the state saved at `step` (default: the newest) in a
  checkpoint directory or run workdir, read from the metadata alone."""
  directory = _resolve_directory(directory)
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: no such checkpoint directory")
  manager = _read_only_manager(directory)
  try:
    step = _resolve_step(manager, directory, step)
    saved = manager.metadata(step).item_metadata[STATE]
    return _flat_shapes(saved.tree if hasattr(saved, "tree") else saved)
  finally:
    manager.close()


def load_params(
  directory: epath.PathLike, abstract_params: Any, step: int | None = None, *, within: str = ""
) -> Any:
  """Restores only the `params` subtree of a saved TrainState (default: latest step).

  `within` names the saved state's field that holds the TrainState, for states of several
  models ("policy" of a PPO or GRPO run); "" for a plain TrainState.

  `directory` is a checkpoint directory or a run workdir (its `checkpoints/` is used).
  `abstract_params` is a params pytree of `jax.ShapeDtypeStruct`s with target shardings (and
  dtypes: float32 weights load into bfloat16 targets). Orbax's partial restore reads the
  params' arrays only: optimizer moments are never read, and their structure is not needed.
  """
  directory = _resolve_directory(directory)
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: no such checkpoint directory")
  manager = _read_only_manager(directory)
  try:
    step = _resolve_step(manager, directory, step)
    target = {"params": abstract_params}
    if within:
      target = {within: target}
    _check_matches(manager, directory, step, target, prefix=f"{within}/params/".lstrip("/"))
    args = ocp.args.PyTreeRestore(
      item=target, restore_args=_restore_args(target), partial_restore=True
    )
    restored = _restore(manager, directory, step, {STATE: args})[STATE]
    return (restored[within] if within else restored)["params"]
  finally:
    manager.close()
