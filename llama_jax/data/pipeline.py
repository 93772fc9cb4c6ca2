"""grain input pipelines shared by every training stage: shuffle, tokenize, pack or pad, batch.

One pipeline per stage, built from a random-access source (anything with `__len__` and
`__getitem__`: a `tfds.data_source(...)`, an ArrayRecord source, a list of dicts) and a
tokenize function `record -> dict[str, np.ndarray]` (see `llama_jax.data.packing` for what
it may return). Per host, in grain's dataset API:

  source ─ map_with_index(tokenize + check) ─ shuffle(seed; reshuffled every epoch)
    ─ [host_index::host_count] ─ repeat(num_epochs) ─ to_iter_dataset(threads)
    ─ [mp_prefetch(workers)] ─ account (count / skip / raise) ─ [FirstFitPack] ─ batch
    ─ finish (targets, valid, pad rows) ─ [thread prefetch]

and `PipelineIterator` on top turns local numpy batches into global `jax.Array`s.

Output batch (local rows Bl = global B / hosts; global arrays have B rows):

  tokens      [B, T] int32   model inputs; 0 on padding
  segment_ids [B, T] int32   1, 2, 3, ... per document in a row; 0 on padding
  positions   [B, T] int32   restart at 0 at every document; 0 on padding
  targets     [B, T] int32   next token of the same document (see `packing` docstring)
  target_mask [B, T] int32   1 where `targets` is trained on (same document, loss_mask)
  valid       [B]    int32   0 for all-padding rows (end of a finite pipeline)
  <field>     [B, T]         every per-token field of the tokenize output, token-aligned
  <scalar>    [B]            per-example scalars in pad mode; in pack mode [B, T], each
                             document's value on its tokens (0 on padding)

Data split across hosts: one global shuffle per epoch (same seed everywhere), host k takes
positions k, k + n, k + 2n, ... of it; so every record is read by exactly one host per epoch.
Packing is data dependent, so with a finite `num_epochs` hosts may run out after different
numbers of batches: train multi-host by step count on a repeating pipeline
(`num_epochs=None`), and evaluate with `make_eval_pipeline`, which yields the same number of
batches on every host.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import grain
import jax
import numpy as np
from absl import flags
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.data import packing, records

log = logging.getLogger(__name__)

TokenizeFn = Callable[[Any], Mapping[str, Any]]

_COUNTERS = (
  "records",  # records read (including ones held in the packer, not yet emitted)
  "examples",  # records kept
  "tokens",  # tokens kept
  "skipped_error",  # tokenize_fn raised or returned malformed output (on_error="skip")
  "skipped_too_long",  # longer than seq_len (on_too_long="skip")
  "truncated",  # records cut to seq_len (on_too_long="truncate")
  "truncated_tokens",  # tokens removed by truncation
)
# How many records the schema probe may try before giving up on the tokenize function.
_PROBE_RECORDS = 64
_LOG_FIRST = 10


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
  """Settings of one input pipeline.

  Attributes:
    seq_len: T, the length of every row.
    batch_size: global B, rows per step summed over all hosts.
    mode: "pack" puts several documents in a row (first-fit); "pad" one example per row.
    shuffle: reshuffle the records every epoch (and the packed rows) from `seed`.
    seed: in [0, 2**32); the same on every host.
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop (and count) a final partial batch; otherwise it is padded with
      all-zero rows whose `valid` is 0.
    on_too_long: for examples longer than T: "truncate" to T (counted), "skip" (counted) or
      "raise" naming the record and its length.
    on_error: when tokenize_fn raises or returns malformed output: "raise" naming the record
      (and its `_source`/`_line`-style fields), or "skip" and count it.
    num_packing_bins: rows packed at once (first-fit); more means less padding and more
      reordering. None: the local batch size.
    max_docs_per_row: optional cap on documents in one packed row.
    loss_mask_field: a token-aligned 0/1 field ANDed into `target_mask` (shifted with the
      targets) when the tokenize output has it; None ignores it.
    num_threads: grain read threads per process (tokenize runs there); 0 reads inline.
    prefetch_buffer_size: elements the read threads run ahead.
    worker_count: grain worker processes (`mp_prefetch`); output equals worker_count=0.
    worker_buffer_size: elements each worker process runs ahead.
    prefetch_batches: finished local batches prepared ahead in a background thread.
  """

  seq_len: int
  batch_size: int
  mode: Literal["pack", "pad"] = "pack"
  shuffle: bool = True
  seed: int = 0
  num_epochs: int | None = None
  drop_remainder: bool = True
  on_too_long: Literal["truncate", "skip", "raise"] = "truncate"
  on_error: Literal["raise", "skip"] = "raise"
  num_packing_bins: int | None = None
  max_docs_per_row: int | None = None
  loss_mask_field: str | None = "loss_mask"
  num_threads: int = 0
  prefetch_buffer_size: int = 64
  worker_count: int = 0
  worker_buffer_size: int = 2
  prefetch_batches: int = 0

  def __post_init__(self):
    _check_choice("mode", self.mode, ("pack", "pad"))
    _check_choice("on_too_long", self.on_too_long, ("truncate", "skip", "raise"))
    _check_choice("on_error", self.on_error, ("raise", "skip"))
    for name in ("seq_len", "batch_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"PipelineConfig.{name} must be positive, got {getattr(self, name)}")
    if self.num_epochs is not None and self.num_epochs < 1:
      raise ValueError(f"PipelineConfig.num_epochs must be None or >= 1, got {self.num_epochs}")
    if not 0 <= self.seed < 2**32:
      raise ValueError(f"PipelineConfig.seed must be in [0, 2**32), got {self.seed}")
    for name in ("num_threads", "worker_count", "prefetch_batches"):
      if getattr(self, name) < 0:
        raise ValueError(f"PipelineConfig.{name} must be >= 0, got {getattr(self, name)}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"PipelineConfig.{name} must be one of {choices}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Per-record stage (runs in read threads / worker processes, so it returns verdicts instead of
# raising: the decision to raise or skip is taken in one place, in order, in the main process).


@dataclasses.dataclass(frozen=True)
class _Accepted:
  example: packing.Example
  num_tokens: int  # kept, after truncation
  truncated_tokens: int
  note: str = ""  # which record was truncated, for the log


@dataclasses.dataclass(frozen=True)
class _Rejected:
  kind: Literal["error", "too_long"]
  message: str
  detail: str = ""


_SCALARS = (str, bytes, int, float, np.generic)


def describe_record(index: int, record: Any) -> str:
  """`record 12 (_source='a.jsonl', _line=3)`: the index plus any `_`-prefixed scalar fields.

  Builders can attach `_source`, `_line`, ... to records so errors point at the file.
  """
  where = []
  if isinstance(record, Mapping):
    for key, value in record.items():
      if isinstance(key, str) and key.startswith("_") and isinstance(value, _SCALARS):
        if isinstance(value, bytes):
          value = value.decode("utf-8", "replace")
        where.append(f"{key}={value!r}")
  return f"record {index}" + (f" ({', '.join(where)})" if where else "")


@dataclasses.dataclass(frozen=True)
class _Tokenize:
  """tokenize_fn + schema check + too-long policy + row layout, for `map_with_index`."""

  tokenize_fn: TokenizeFn
  schema: packing.Schema
  num_records: int
  seq_len: int
  packed: bool
  on_too_long: str

  def __call__(self, index: int, record: Any) -> _Accepted | _Rejected:
    # Indices of later epochs run past the source; the record number is what users can find.
    index %= self.num_records
    try:
      example = packing.conform(self.tokenize_fn(record), self.schema)
    except Exception as e:  # noqa: BLE001 -- any failure of user code is reported per record
      return _Rejected(
        "error",
        f"tokenize_fn failed on {describe_record(index, record)}: {type(e).__name__}: {e}",
        traceback.format_exc(),
      )
    length = packing.example_length(example)
    cut = max(0, length - self.seq_len)
    if cut and self.on_too_long != "truncate":
      return _Rejected(
        "too_long",
        f"{describe_record(index, record)} has {length} tokens, more than seq_len="
        f"{self.seq_len} (on_too_long={self.on_too_long!r})",
      )
    note = ""
    if cut:
      example = packing.truncate(example, self.schema, self.seq_len)
      note = f"{describe_record(index, record)} from {length} to {self.seq_len} tokens"
    if self.packed:
      example = packing.broadcast_scalars(example, self.schema)
    else:
      example = packing.pad_example(example, self.schema, self.seq_len)
    return _Accepted(example, min(length, self.seq_len), cut, note)


# ---------------------------------------------------------------------------------------------
# Accounting stage: counts live in the iterator state, so a restored pipeline reports the same
# numbers as one that never stopped (the packer replays from a saved parent state).


class _AccountIterDataset(grain.IterDataset):
  """Unwraps verdicts: yields accepted examples, counts and logs skips, raises on policy."""

  def __init__(self, parent: grain.IterDataset, *, on_error: str, on_too_long: str):
    super().__init__(parent)
    self._policies = {"error": on_error, "too_long": on_too_long}
    self.iterator: _AccountIterator | None = None

  def __iter__(self) -> _AccountIterator:
    self.iterator = _AccountIterator(self._parent.__iter__(), self._policies)
    return self.iterator

  def __str__(self) -> str:
    return "AccountIterDataset"


class _AccountIterator(grain.DatasetIterator):
  def __init__(self, parent: grain.DatasetIterator, policies: dict[str, str]):
    super().__init__(parent)
    self._policies = policies
    self.counts = dict.fromkeys(_COUNTERS, 0)

  def __next__(self) -> packing.Example:
    while True:
      verdict = next(self._parent)
      self.counts["records"] += 1
      if isinstance(verdict, _Accepted):
        return self._accept(verdict)
      self._reject(verdict)

  def _accept(self, verdict: _Accepted) -> packing.Example:
    self.counts["examples"] += 1
    self.counts["tokens"] += verdict.num_tokens
    if verdict.truncated_tokens:
      self.counts["truncated"] += 1
      self.counts["truncated_tokens"] += verdict.truncated_tokens
      if self.counts["truncated"] <= _LOG_FIRST:
        log.warning("Truncated %s (%d truncated so far)", verdict.note, self.counts["truncated"])
    return verdict.example

  def _reject(self, verdict: _Rejected) -> None:
    if self._policies[verdict.kind] == "raise":
      error = ValueError(verdict.message)
      if verdict.detail and hasattr(error, "add_note"):
        error.add_note(verdict.detail)
      raise error
    key = f"skipped_{verdict.kind}"
    self.counts[key] += 1
    if self.counts[key] <= _LOG_FIRST or self.counts[key] % 1000 == 0:
      log.warning("Skipped: %s (%d %s so far)", verdict.message, self.counts[key], key)

  def get_state(self) -> dict[str, Any]:
    return {"parent": self._parent.get_state(), "counts": dict(self.counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self.counts = {**dict.fromkeys(_COUNTERS, 0), **state["counts"]}


# ---------------------------------------------------------------------------------------------
# Assembly.


def describe_source(source: Any) -> str:
  """`dataset 'my_sft' split 'train'`: a source's `name` (and `split`) if it has them
  (`builders.RecordSource`, `bundled.load`), else its type."""
  name, split = getattr(source, "name", None), getattr(source, "split", None)
  if not name:
    return f"the {type(source).__name__} source"
  return f"dataset {name!r}" + (f" split {split!r}" if split else "")


def probe_schema(source: Sequence[Any], tokenize_fn: TokenizeFn) -> packing.Schema:
  """The fields every example must have, from the first records the tokenize function accepts.

  Records of another kind than the tokenize function reads (`records.KindMismatchError`)
  stop the probe at once: the whole dataset is of that kind.
  """
  if len(source) == 0:
    raise ValueError(f"{describe_source(source)} is empty")
  errors = []
  for index in range(min(len(source), _PROBE_RECORDS)):
    record = source[index]
    try:
      return packing.infer_schema(tokenize_fn(record))
    except records.KindMismatchError as e:
      raise e.at(f"{describe_source(source)} {describe_record(index, record)}") from None
    except Exception as e:  # noqa: BLE001 -- keep looking; all failures are reported together
      errors.append(f"{describe_record(index, record)}: {type(e).__name__}: {e}")
  raise ValueError(
    f"tokenize_fn produced no usable example from the first {len(errors)} records:\n  "
    + "\n  ".join(errors[:5])
  )


def build_dataset(
  source: Sequence[Any],
  tokenize_fn: TokenizeFn,
  config: PipelineConfig,
  *,
  local_batch_size: int,
  shard_index: int = 0,
  shard_count: int = 1,
  schema: packing.Schema | None = None,
) -> tuple[grain.IterDataset, _AccountIterDataset, packing.Schema]:
  """The grain dataset of local numpy batches for one host (see the module docstring).

  Returns the dataset, its accounting stage (whose iterator holds the skip counters) and the
  schema. Most callers want `make_pipeline`; this is for composing further grain stages.
  """
  schema = schema or probe_schema(source, tokenize_fn)
  packed = config.mode == "pack"
  tokenize = _Tokenize(
    tokenize_fn, schema, len(source), config.seq_len, packed, config.on_too_long
  )
  ds = grain.MapDataset.source(source).map_with_index(tokenize)
  if config.shuffle:
    ds = ds.shuffle(seed=config.seed)  # a new permutation for every epoch (seed + epoch)
  if shard_count > 1:
    ds = ds[shard_index::shard_count]
  if config.num_epochs != 1:
    ds = ds.repeat(config.num_epochs)
  read = grain.ReadOptions(
    num_threads=config.num_threads, prefetch_buffer_size=config.prefetch_buffer_size
  )
  it = ds.to_iter_dataset(read)
  if config.worker_count:
    _default_grain_profiling_flag()
    # Before any many-to-one stage: worker i reads elements i::n and grain interleaves them
    # round-robin, so the element order (and every batch) is the same as without workers.
    it = it.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=config.worker_count, per_worker_buffer_size=config.worker_buffer_size
      )
    )
  accounted = _AccountIterDataset(it, on_error=config.on_error, on_too_long=config.on_too_long)
  it = accounted
  if packed:
    it = grain.experimental.FirstFitPackIterDataset(
      it,
      length_struct=dict.fromkeys(schema, config.seq_len),
      num_packing_bins=config.num_packing_bins or local_batch_size,
      seed=config.seed,
      shuffle_bins=config.shuffle,
      max_sequences_per_bin=config.max_docs_per_row,
    )
  it = it.batch(local_batch_size, drop_remainder=False)
  it = it.map(
    functools.partial(
      packing.finish_batch,
      schema=schema,
      batch_size=local_batch_size,
      seq_len=config.seq_len,
      packed=packed,
      loss_mask_field=config.loss_mask_field,
    )
  )
  if config.prefetch_batches:
    it = grain.experimental.ThreadPrefetchIterDataset(
      it, prefetch_buffer_size=config.prefetch_batches
    )
  return it, accounted, schema


def _default_grain_profiling_flag() -> None:
  # grain's `mp_prefetch` reads one absl flag, --grain_enable_multiprocess_worker_profiling,
  # with `.value` (its other flags fall back to their defaults when unparsed), which raises
  # UnparsedFlagAccessError outside an absl app (pytest, notebooks). Give that one flag its
  # default, rather than marking every flag of the process parsed behind its owner's back.
  name = "grain_enable_multiprocess_worker_profiling"
  if name in flags.FLAGS and not flags.FLAGS.is_parsed() and not flags.FLAGS[name].present:
    flags.FLAGS[name].parse(flags.FLAGS[name].default)


def _resolve_shards(
  shard_index: int | None, shard_count: int | None, mesh: Mesh | None
) -> tuple[int, int]:
  index = jax.process_index() if shard_index is None else shard_index
  count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= index < count:
    raise ValueError(f"shard_index={index} must be in [0, shard_count={count})")
  if mesh is not None and (count, index) != (jax.process_count(), jax.process_index()):
    raise ValueError(
      f"with a mesh, data shards must be the JAX processes: got shard {index} of {count}, "
      f"but this is process {jax.process_index()} of {jax.process_count()}"
    )
  return index, count


def local_batch_size(
  batch_size: int,
  shard_count: int,
  mesh: Mesh | None = None,
  batch_axes: Sequence[str] = ("data", "fsdp"),
) -> int:
  """Rows each host builds; checks the global batch against hosts and the mesh's batch axes."""
  if batch_size % shard_count:
    raise ValueError(
      f"global batch_size={batch_size} is not divisible by the number of data shards "
      f"(processes) {shard_count}"
    )
  if mesh is not None:
    missing = [a for a in batch_axes if a not in mesh.axis_names]
    if missing:
      raise ValueError(f"batch axes {missing} are not in the mesh axes {mesh.axis_names}")
    size = math.prod(mesh.shape[a] for a in batch_axes)
    if batch_size % size:
      raise ValueError(
        f"global batch_size={batch_size} is not divisible by the size {size} of the mesh's "
        f"batch axes {tuple(batch_axes)} (mesh shape {dict(mesh.shape)})"
      )
  return batch_size // shard_count


class PipelineIterator:
  """Iterator of global batches with exact, JSON-serializable resume state and counters.

  `next(it)` returns a dict of `jax.Array`s sharded `P(batch_axes)` over the mesh (numpy arrays
  of the local rows when there is no mesh). `get_state()` / `set_state()` save and restore the
  position: the batches after a restore equal those of an uninterrupted iterator.
  `stats()` returns the counters (records read, examples kept, skips, truncations, batches).
  """

  def __init__(
    self,
    dataset: grain.IterDataset,
    accounted: _AccountIterDataset,
    *,
    schema: packing.Schema,
    config: PipelineConfig,
    local_batch_size: int,
    mesh: Mesh | None = None,
    batch_axes: Sequence[str] = ("data", "fsdp"),
    num_batches: int | None = None,
  ):
    self.config = config
    self.schema = schema
    self.local_batch_size = local_batch_size
    self.global_batch_size = config.batch_size
    self.num_batches = num_batches
    self._sharding = None if mesh is None else NamedSharding(mesh, PartitionSpec(tuple(batch_axes)))
    self._iterator = dataset.__iter__()
    self._accounted = accounted
    self._emitted = 0
    self._dropped_rows = 0

  def __iter__(self) -> PipelineIterator:
    return self

  def __len__(self) -> int:
    if self.num_batches is None:
      raise TypeError("only finite evaluation pipelines have a length")
    return self.num_batches

  def __next__(self) -> dict[str, Any]:
    if self.num_batches is not None and self._emitted >= self.num_batches:
      raise StopIteration
    try:
      batch = next(self._iterator)
    except StopIteration:
      if self.num_batches is None:
        log.info("Input pipeline exhausted: %s", self.stats())
        raise
      # Every host yields num_batches batches, whatever its share of real examples.
      batch = packing.blank_rows(
        self.schema, self.local_batch_size, self.config.seq_len, self.config.mode == "pack"
      )
    if self.config.drop_remainder and not batch["valid"].all():
      self._dropped_rows += int(batch["valid"].sum())
      log.info("Dropped a final partial batch of %d rows", int(batch["valid"].sum()))
      raise StopIteration
    self._emitted += 1
    return self._to_global(batch)

  def _to_global(self, batch: packing.Batch) -> dict[str, Any]:
    if self._sharding is None:
      return batch
    return {
      k: jax.make_array_from_process_local_data(
        self._sharding, v, (self.global_batch_size, *v.shape[1:])
      )
      for k, v in batch.items()
    }

  def get_state(self) -> dict[str, Any]:
    """The position, as plain JSON-serializable data (store it next to the checkpoint)."""
    return {
      "grain": self._iterator.get_state(),
      "batches": self._emitted,
      "dropped_rows": self._dropped_rows,
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a `get_state()` taken on a pipeline built with the same arguments."""
    self._iterator.set_state(state["grain"])
    self._emitted = state["batches"]
    self._dropped_rows = state["dropped_rows"]

  def stats(self) -> dict[str, int]:
    """Counters; record-level ones include records buffered ahead of the emitted batches."""
    account = self._accounted.iterator
    counts = dict(account.counts) if account is not None else dict.fromkeys(_COUNTERS, 0)
    return {**counts, "batches": self._emitted, "dropped_rows": self._dropped_rows}

  def close(self) -> None:
    """Stops worker processes and threads, if any."""
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()

  def __enter__(self) -> PipelineIterator:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


def make_pipeline(
  source: Sequence[Any],
  tokenize_fn: TokenizeFn,
  config: PipelineConfig,
  *,
  mesh: Mesh | None = None,
  batch_axes: Sequence[str] = ("data", "fsdp"),
  shard_index: int | None = None,
  shard_count: int | None = None,
  evaluation: bool = False,
) -> PipelineIterator:
  """A training pipeline over `source`: batches of `config.batch_size` rows of T tokens.

  Args:
    source: random-access records (`len` and `[i]`): a grain/TFDS data source or a list.
    tokenize_fn: record -> dict of `tokens` and extra per-token or scalar fields.
    config: see `PipelineConfig`.
    mesh: if given, batches are global `jax.Array`s sharded over `batch_axes` (sequence axis
      replicated); otherwise numpy arrays of this host's rows.
    batch_axes: mesh axes the batch dimension is split over.
    shard_index, shard_count: this host's share of the data; default
      `jax.process_index()` / `jax.process_count()` (override to simulate hosts in tests).
    evaluation: one finite pass with a fixed batch count, see `make_eval_pipeline`.

  Returns:
    A `PipelineIterator`; see the module docstring for the batch fields.
  """
  index, count = _resolve_shards(shard_index, shard_count, mesh)
  local = local_batch_size(config.batch_size, count, mesh, batch_axes)
  if len(source) < count:
    raise ValueError(f"the source has {len(source)} records, fewer than the {count} data shards")
  dataset, accounted, schema = build_dataset(
    source, tokenize_fn, config, local_batch_size=local, shard_index=index, shard_count=count
  )
  # Every host yields the same number of evaluation batches, whatever its share of examples.
  num_batches = math.ceil(math.ceil(len(source) / count) / local) if evaluation else None
  return PipelineIterator(
    dataset,
    accounted,
    schema=schema,
    config=config,
    local_batch_size=local,
    mesh=mesh,
    batch_axes=batch_axes,
    num_batches=num_batches,
  )


def make_eval_pipeline(
  source: Sequence[Any], tokenize_fn: TokenizeFn, config: PipelineConfig, **kwargs: Any
) -> PipelineIterator:
  """One unshuffled pass in pad mode: every example exactly once, then padding rows.

  Uses `config`'s seq_len, batch_size, too-long/error policies and reading options; forces
  `mode="pad"`, no shuffle, one epoch, no dropped remainder. Every host yields the same number
  of batches (`len(it)`), the last ones padded with all-zero rows whose `valid` is 0, so
  metrics weighted by `valid` (or `target_mask`) count each example once. Keyword arguments
  are those of `make_pipeline`.
  """
  config = dataclasses.replace(
    config, mode="pad", shuffle=False, num_epochs=1, drop_remainder=False
  )
  return make_pipeline(source, tokenize_fn, config, evaluation=True, **kwargs)
