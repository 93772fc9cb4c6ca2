"""Orbax save / resume of training runs: the TrainState, the input pipeline's position and
small JSON metadata, restored straight into the target shardings (of any mesh shape).

Convention: an experiment workdir keeps its checkpoints under `<workdir>/checkpoints/`
(`checkpoint_dir(workdir)`), one directory per step:

  <workdir>/checkpoints/
    1000/
      state/                     the TrainState pytree (OCDBT + zarr, one chunk per shard)
      data/process_0-of-1.json   each process's data-iterator position
      meta/meta.json             optional run metadata, e.g. the experiment config
      MANIFEST.json              size and CRC-32 of every file above (`manifest.py`)
    2000.orbax-checkpoint-tmp/   a save in flight, or one cut off: never listed nor restored
    3000.damaged/                a step that failed verification, set aside on resume

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
Leftover tmp directories are removed by a writing `CheckpointManager` (started when it opens
the directory, finished before its first save), and a save of the same step replaces its
stale tmp directory.

Verified steps (`manifest.py`): once Orbax has committed a step, process 0 records the size
and CRC-32 of every file under it in `<step>/MANIFEST.json`. Resuming takes the newest step
whose files all match (`latest_verified_step`); a newer damaged or unverifiable step (an
item or file missing, a file truncated or changed, no manifest) is named with what is wrong
in a WARNING and skipped; resuming (`trainer.restore_or_init`) then moves it aside to
`<step>.damaged` (`set_aside`), so that the run can save that step again. Retention counts
verified steps only, so it never deletes the last intact checkpoint in favour of damaged
ones. A save that runs out of disk space raises `DiskFullError`: one line with the
directory, the free space and the step still kept.

Multi-host: every process calls every method (orbax synchronizes them with barriers and
writes each array shard from the process that owns it); nothing here is per-process except
the data-iterator position, which each process keeps for itself (see `_ProcessJsonHandler`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import errno
import itertools
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocm

from llama_jax.checkpoint import manifest as manifest_lib
from llama_jax.checkpoint.params import CheckpointError

log = logging.getLogger(__name__)

STATE, DATA, META = "state", "data", "meta"
CHECKPOINTS_SUBDIR = "checkpoints"
DAMAGED_SUFFIX = ".damaged"  # a damaged step set aside: `<step>.damaged` (Orbax ignores it)
_MAX_LISTED = 8  # mismatches named in one error message
_barrier_ids = itertools.count()  # every process creates managers and saves in the same order


class DiskFullError(CheckpointError):
  """A checkpoint save ran out of disk space; the message says where, how much is free and
  which verified step is kept."""


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
# Verified steps and a full disk.


def _barrier(what: str) -> None:
  """All processes meet (the manifest is written, a damaged step moved) before any reads."""
  if jax.process_count() > 1:
    ocp.multihost.sync_global_processes(f"llama_jax_checkpoint:{what}:{next(_barrier_ids)}")


def _step_numbers(directory: epath.Path) -> list[int]:
  """Committed step directories, ascending, listed afresh (Orbax's cache is per thread of
  events; retention runs in the manifest thread)."""
  if not directory.is_dir():
    return []
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit() and p.is_dir())


def _newest_intact(directory: epath.Path, steps: Iterable[int]) -> int | None:
  """The newest step of `steps` whose files match its manifest; None when `steps` is empty.

  Each newer step that does not match is named in a WARNING with what is wrong; when none
  matches, a `CheckpointError` lists them all.
  """
  damaged: dict[int, list[str]] = {}
  for step in sorted(steps, reverse=True):
    problems = manifest_lib.verify(directory / str(step))
    if not problems:
      if damaged:
        log.warning(
          "%s: using checkpoint step %d, the newest intact one (skipped damaged steps %s)",
          directory,
          step,
          sorted(damaged),
        )
      return step
    log.warning(
      "%s: checkpoint step %d is damaged and skipped: %s", directory, step, "; ".join(problems)
    )
    damaged[step] = problems
  if not damaged:
    return None
  found = " ".join(f"Step {s}: {'; '.join(p)}." for s, p in sorted(damaged.items()))
  raise CheckpointError(
    f"{directory}: no intact checkpoint to restore. {found} Nothing was restored. Move the "
    "damaged steps away to start afresh; a step saved before checkpoints had manifests can be "
    "vouched for with llama_jax.checkpoint.manifest.write('<step directory>')."
  )


def _verified_step(manager: ocp.CheckpointManager, directory: epath.Path, step: int | None) -> int:
  """`step` if intact, or by default the newest intact step; `CheckpointError` otherwise."""
  steps = sorted(manager.all_steps())
  if step is None:
    found = _newest_intact(directory, steps)
    if found is None:
      raise CheckpointError(f"{directory}: no complete checkpoint")
    return found
  if step not in steps:
    raise CheckpointError(f"{directory}: no complete checkpoint for step {step}; steps: {steps}")
  if problems := manifest_lib.verify(directory / str(step)):
    raise CheckpointError(f"{directory} step {step} is damaged: " + "; ".join(problems))
  return step


def _is_disk_full(error: BaseException | None) -> bool:
  """Whether `error`, or an exception it came from, is ENOSPC (a Python `OSError`, or the
  status text of TensorStore's C++ writers)."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
      return True
    if "No space left on device" in str(error):
      return True
    error = error.__cause__ or error.__context__
  return False


class _QuietDiskFull(logging.Filter):
  """Drops Orbax's own records of a disk-full failure: each of its threads logs the full
  traceback (hundreds of lines in all) of what `CheckpointManager` reports in one line.
  Once that is reported, the failed save's remaining threads fail as they unwind ("cannot
  schedule new futures after shutdown"); those records are dropped too."""

  reported = False  # a DiskFullError was raised in this process

  def filter(self, record: logging.LogRecord) -> bool:
    if f"{os.sep}orbax{os.sep}" not in record.pathname:
      return True
    error = record.exc_info[1] if record.exc_info else None
    if _is_disk_full(error) or "No space left on device" in record.getMessage():
      return False
    unwinding = isinstance(error, RuntimeError) and "cannot schedule new futures" in str(error)
    return not (self.reported and unwinding)


_quiet_disk_full = _QuietDiskFull()
logging.getLogger("absl").addFilter(_quiet_disk_full)


def _free_space(directory: epath.Path) -> str:
  path = str(directory)
  while path and not os.path.isdir(path):  # the step directory may be gone with the tmp one
    path = os.path.dirname(path)
  try:
    free = float(shutil.disk_usage(path).free)
  except (OSError, ValueError):
    return "free space unknown"
  for unit in ("bytes", "KiB", "MiB", "GiB"):
    if free < 1024:
      return f"{free:.0f} {unit} free" if unit == "bytes" else f"{free:.1f} {unit} free"
    free /= 1024
  return f"{free:.1f} TiB free"


def _completed(fn, *args) -> concurrent.futures.Future:
  """`fn(*args)` run now, as a finished future (the synchronous twin of an executor's)."""
  future: concurrent.futures.Future = concurrent.futures.Future()
  try:
    future.set_result(fn(*args))
  except Exception as e:
    future.set_exception(e)
  return future


# ---------------------------------------------------------------------------------------------
# The manager.


def _item_handlers() -> dict[str, ocp.CheckpointHandler]:
  return {
    STATE: ocp.PyTreeCheckpointHandler(),
    DATA: _ProcessJsonHandler(),
    META: ocp.JsonCheckpointHandler(filename="meta.json"),
  }


class CheckpointManager:
  """Periodic, asynchronous, retention-limited, checksummed checkpoints of a training run.

  Each checkpoint holds the TrainState pytree ("state"), each process's data-iterator position
  ("data", JSON) and optional run metadata ("meta", JSON), plus `MANIFEST.json`: the size and
  CRC-32 of every file, written by process 0 once the step is committed. Use as a context
  manager, or call `close()`, so that an asynchronous save in flight is committed and its
  manifest written before the process exits.

  Args:
    directory: where the step directories live (for experiments, `checkpoint_dir(workdir)`).
    save_interval_steps: `save()` writes at steps that are multiples of this (and when JAX's
      preemption notice has arrived); `force=True` writes at any step.
    max_to_keep: how many of the latest verified checkpoints to keep (None: all). Steps that
      fail verification do not count, so the newest intact step is never deleted.
    async_save: `save()` returns once the arrays are copied to host memory and writes them in
      a background thread (the manifest is written in another one once they are committed);
      the caller may then donate or delete the state's buffers.
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
    self._max_to_keep, self._read_only = max_to_keep, read_only
    options = ocp.CheckpointManagerOptions(
      # Orbax's default policy also saves the first step a run reaches; a resumed run would
      # then write a checkpoint off the interval, so the interval (and preemption) only.
      save_decision_policy=ocm.AnySavePolicy(
        [ocm.FixedIntervalPolicy(save_interval_steps), ocm.PreemptionCheckpointingPolicy()]
      ),
      # Retention is `_prune`'s: Orbax's LatestN counts damaged and unverified steps too.
      preservation_policy=ocm.LatestN(None),
      enable_async_checkpointing=async_save,
      cleanup_tmp_directories=not read_only,
      read_only=read_only,
      create=not read_only,
      save_interval_steps=0 if read_only else save_interval_steps,  # read_only warns otherwise
    )
    self._manager = ocp.CheckpointManager(
      self.directory, item_handlers=_item_handlers(), options=options
    )
    # One thread waits for Orbax's commit, then checksums and prunes, while training goes on.
    self._executor = (
      concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint_manifest")
      if async_save and not read_only
      else None
    )
    self._pending: tuple[int, concurrent.futures.Future] | None = None
    self._failed = False

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
    Raises `DiskFullError` (one line: directory, free space, the verified step kept) when
    this save, or the asynchronous one before it, ran out of disk space.
    """
    step = int(step)
    if not force and not self._manager.should_save(step):
      return False
    self._finish_pending()
    if step in self._manager.all_steps():
      return False
    items = {STATE: ocp.args.PyTreeSave(state)}
    if data_state is not None:
      items[DATA] = _DataSave(_json_encode(data_state, "data_state"))
    if meta is not None:
      items[META] = ocp.args.JsonSave(json.loads(_json_encode(meta, "meta")))
    try:
      started = self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    except Exception as e:
      self._save_failed(step, e)
      raise
    if started:
      if self._executor is not None:
        self._pending = (step, self._executor.submit(self._commit, step))
      else:
        self._pending = (step, _completed(self._commit, step))
        self._finish_pending()
    return started

  def _commit(self, step: int) -> None:
    """After Orbax's commit of `step`: its manifest, then retention (process 0 only)."""
    self._manager.wait_until_finished()
    if jax.process_index() == 0:
      manifest_lib.write(self.directory / str(step), step)
      self._prune()

  def _prune(self) -> None:
    """Deletes the steps older than the `max_to_keep` newest verified ones. Unverified steps
    are not counted, and nothing is deleted until that many verified steps exist."""
    if self._max_to_keep is None:
      return
    steps, kept = _step_numbers(self.directory), 0
    for step in reversed(steps):
      if not manifest_lib.verify(self.directory / str(step)):  # cached for steps just written
        kept += 1
        if kept == self._max_to_keep:
          for old in (s for s in steps if s < step):
            (self.directory / str(old)).rmtree(missing_ok=True)
            log.info("%s: removed checkpoint step %d (keeping %d)", self.directory, old, kept)
          return

  def _finish_pending(self) -> None:
    """Waits for the save in flight, its manifest and retention; all processes then agree."""
    if self._pending is None:
      return
    step, future = self._pending
    self._pending = None
    try:
      future.result()
    except Exception as e:
      self._save_failed(step, e)
      raise
    _barrier(f"manifest:{step}")
    self._manager.reload()  # process 0 may have removed steps

  def _save_failed(self, step: int, error: Exception) -> None:
    """Turns a disk-full failure into a one-line `DiskFullError`; other errors pass."""
    self._failed = True
    if not _is_disk_full(error):
      return
    # The partial save stays until the next writer opens the directory (Orbax removes tmp
    # directories then): Orbax's other writer threads may still be using it now.
    kept = _newest_intact_quietly(self.directory)
    kept = (
      f"the last verified checkpoint, step {kept}, is kept"
      if kept is not None
      else "there is no verified checkpoint to keep"
    )
    _quiet_disk_full.reported = True
    raise DiskFullError(
      f"{self.directory}: no space left on device while saving the checkpoint of step {step} "
      f"({_free_space(self.directory)}); {kept}"
    ) from None

  def latest_step(self) -> int | None:
    """The newest checkpoint's step (including a save this process has in flight), verified
    or not, or None; resuming uses `latest_verified_step`."""
    return self._manager.latest_step()

  def latest_verified_step(self) -> int | None:
    """The newest step whose files match its manifest, or None when there is no checkpoint.

    Each newer step that fails verification is named in a WARNING with what is wrong (which
    file, expected versus found). Raises `CheckpointError` when steps exist but none is
    intact. Reads every file of each step it checks (except those verified before).
    """
    self._finish_pending()
    return _newest_intact(self.directory, self._manager.all_steps())

  def verify(self, step: int) -> list[str]:
    """What is wrong with the checkpoint of `step` (empty when its files match the manifest)."""
    self._finish_pending()
    return manifest_lib.verify(self.directory / str(int(step)))

  def set_aside(self, steps: Iterable[int]) -> None:
    """Renames the (damaged) checkpoints of `steps` to `<step>.damaged` (`-2`, `-3`, … when
    taken), with a WARNING each: Orbax then neither lists nor restores them, a resumed run
    can save those steps again, and the files stay for a post-mortem. Every process calls
    this; process 0 renames."""
    if self._read_only:
      raise ValueError(f"{self.directory}: read-only CheckpointManager; cannot set aside steps")
    self._finish_pending()
    if jax.process_index() == 0:
      for step in sorted(steps):
        source = self.directory / str(step)
        target, n = self.directory / f"{step}{DAMAGED_SUFFIX}", 1
        while target.exists():
          n += 1
          target = self.directory / f"{step}{DAMAGED_SUFFIX}-{n}"
        source.rename(target)
        log.warning(
          "%s: damaged checkpoint step %d moved aside to %s (delete it once looked at)",
          self.directory,
          step,
          target.name,
        )
    _barrier("set_aside")
    self._manager.reload()

  def all_steps(self) -> list[int]:
    """Steps of the checkpoints kept, ascending (verified or not)."""
    return sorted(self._manager.all_steps())

  def restore(
    self, step: int | None = None, *, abstract_state: Any
  ) -> tuple[Any, dict[str, Any] | None, dict[str, Any] | None]:
    """Restores `(state, data_state, meta)` of `step` (default: the newest verified step).

    `abstract_state` has the structure of the saved state with `jax.ShapeDtypeStruct` leaves
    carrying the target `sharding`; each process reads only the slices its devices hold, so
    the mesh may differ from the one that saved. `data_state` / `meta` are None when that
    save had none. The step's files are checked against its manifest first; raises
    `CheckpointError` naming what is damaged, or the paths when the trees do not match.
    """
    self._finish_pending()  # a step still being written cannot be read yet
    step = _verified_step(self._manager, self.directory, step)
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
    """Blocks until the save in flight (if any) is committed, its manifest written and old
    checkpoints pruned."""
    self._finish_pending()
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for the save in flight and its manifest, then releases orbax's threads."""
    try:
      self._finish_pending()
    finally:
      if self._failed:
        # Orbax raises a failed background save again at every wait; it was reported already.
        _close_after_failure(self._manager)
      else:
        self._manager.close()
      if self._executor is not None:
        self._executor.shutdown(wait=True)

  def __enter__(self) -> CheckpointManager:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _close_after_failure(manager: ocp.CheckpointManager) -> None:
  try:
    manager.close()
  except Exception:  # the failed save again, already reported
    log.debug("closing orbax's manager after a failed save", exc_info=True)


def _newest_intact_quietly(directory: epath.Path) -> int | None:
  """The newest intact step for an error message: no warnings, no exception."""
  for step in reversed(_step_numbers(directory)):
    if not manifest_lib.verify(directory / str(step)):
      return step
  return None


def _check_matches(manager, directory, step: int, target, *, prefix: str = "") -> None:
  try:
    saved = manager.metadata(step).item_metadata[STATE]
  except Exception as e:  # a step directory without readable state metadata
    raise CheckpointError(
      f"{directory} step {step}: cannot read the state's metadata: {_first_line(e)}"
    ) from e
  saved_tree = saved.tree if hasattr(saved, "tree") else saved
  if problems := _tree_mismatches(saved_tree, target, prefix=prefix):
    raise CheckpointError(
      f"{directory} step {step}: the saved state does not match the target: " + "; ".join(problems)
    )


def _first_line(error: BaseException, limit: int = 300) -> str:
  """The gist of an orbax / TensorStore error, whose text can run to hundreds of lines."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return text if len(text) <= limit else text[:limit] + " …"


def _restore(manager, directory, step: int, items: dict[str, Any]):
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except CheckpointError:
    raise
  except Exception as e:  # orbax / tensorstore raise many types; keep the cause attached
    raise CheckpointError(f"{directory} step {step}: restore failed: {_first_line(e)}") from e


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
  """`{"params/layers_0/...": shape}` of the state saved at `step` (default: the newest
  verified step) in a checkpoint directory or run workdir, read from the metadata once the
  step's files are checked against its manifest (`CheckpointError` naming the damage)."""
  directory = _resolve_directory(directory)
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: no such checkpoint directory")
  manager = _read_only_manager(directory)
  try:
    step = _verified_step(manager, directory, step)
    try:
      saved = manager.metadata(step).item_metadata[STATE]
    except Exception as e:
      raise CheckpointError(
        f"{directory} step {step}: cannot read the state's metadata: {_first_line(e)}"
      ) from e
    return _flat_shapes(saved.tree if hasattr(saved, "tree") else saved)
  finally:
    manager.close()


def load_params(
  directory: epath.PathLike, abstract_params: Any, step: int | None = None, *, within: str = ""
) -> Any:
  """Restores only the `params` subtree of a saved TrainState (default: the newest verified
  step; newer damaged ones are named in a WARNING and skipped).

  `within` names the saved state's field that holds the TrainState, for states of several
  models ("policy" of a PPO or GRPO run); "" for a plain TrainState.

  `directory` is a checkpoint directory or a run workdir (its `checkpoints/` is used).
  `abstract_params` is a params pytree of `jax.ShapeDtypeStruct`s with target shardings (and
  dtypes: float32 weights load into bfloat16 targets). Orbax's partial restore reads the
  params' arrays only: optimizer moments are never read, and their structure is not needed.
  The step's files are checked against its manifest first (`CheckpointError` naming them).
  """
  directory = _resolve_directory(directory)
  if not directory.is_dir():
    raise CheckpointError(f"{directory}: no such checkpoint directory")
  manager = _read_only_manager(directory)
  try:
    step = _verified_step(manager, directory, step)
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
