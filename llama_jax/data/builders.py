"""TFDS builders for local JSONL records, built to array_record and read without TensorFlow.

:func:`build_dataset` validates JSONL files of one record kind (see
:mod:`llama_jax.data.records`), then builds a TFDS dataset with TFDS' own machinery
(``GeneratorBasedBuilder.download_and_prepare``) as ``array_record`` files under
``data_dir/name/1.0.0/``. :func:`load_source` opens a split as a random-access source of
normalized Python dicts for grain, whether the dataset was built here or is an existing
TFDS dataset with the same features.

No TensorFlow is involved: TFDS 4.9 imports TensorFlow lazily and only where a
``tf.data`` pipeline or TF-specific feature is used. Generating examples (features encode
to NumPy and serialize with TFDS' own protobuf example writer), writing array_record
shards, writing ``dataset_info.json``/``features.json``/``metadata.json`` and reading
through ``tfds.data_source`` all run on NumPy. Two details matter: ``_info`` builds a
``tfds.core.DatasetInfo`` directly (``dataset_info_from_configs`` looks for metadata files
next to the builder's source), and the builder classes, made per dataset name, skip TFDS'
registry (``skip_registration=True``); TFDS finds them again from files, so
``tfds.data_source(name, data_dir=..., split=...)`` works in a fresh process.

Storage (exact round trip): strings are ``Text`` features (UTF-8 bytes, NULs kept),
``is_unsafe`` is a bool, and a message list is a ``Sequence({"role": Text, "content":
Text})`` (read back as lists of roles and contents, zipped back into dicts). An optional
string that is absent is stored as ``""``, which cannot be confused with a value because
validation rejects empty strings. Examples keep file and line order
(``disable_shuffling=True``).

Caching: the dataset's ``metadata.json`` holds a SHA-256 of the kind, the error policy
and the bytes of every input file per split. Building again with the same inputs reuses
the data; with changed inputs the old version directory is deleted and rebuilt, with a
warning. ``force=True`` always rebuilds.

Validation reports (kept/skipped counts per reason and the first error messages, per
split) are stored in ``metadata.json`` under ``"validation"`` and summarized in the
dataset description, so a user can see later what was dropped.
"""

from __future__ import annotations

import collections.abc
import difflib
import hashlib
import logging
import os
import re
import shutil
import types
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from llama_jax.data import records
from llama_jax.data.records import Record

logger = logging.getLogger(__name__)

VERSION = "1.0.0"
# Bump when the stored layout or normalization changes, so old builds are not reused.
_SCHEMA_VERSION = 1
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_SPLIT_RE = re.compile(r"^\w+$")

# Feature layout per kind: "text" (string), "bool", or "messages" (list of messages).
_LAYOUT: dict[str, dict[str, str]] = {
  "text": {"text": "text"},
  "sft": {"messages": "messages", "id": "text"},
  "preference": {
    "prompt": "messages",
    "chosen": "text",
    "rejected": "text",
    "rating": "text",
    "edited": "text",
    "concern": "text",
    "id": "text",
  },
  "rl_prompt": {
    "prompt": "messages",
    "concern": "text",
    "is_unsafe": "bool",
    "reference": "text",
    "task": "text",
    "id": "text",
  },
}


def features(kind: str) -> tfds.features.FeaturesDict:
  """The TFDS features of a ``kind`` dataset (see the module docstring for the layout)."""

  def feature(layout: str):
    if layout == "messages":
      return tfds.features.Sequence({"role": tfds.features.Text(), "content": tfds.features.Text()})
    return tfds.features.Text() if layout == "text" else np.bool_

  return tfds.features.FeaturesDict(
    {key: feature(layout) for key, layout in _LAYOUT[records.check_kind(kind)].items()}
  )


def encode(kind: str, record: Record) -> dict[str, Any]:
  """Turns a normalized record into a TFDS example (``None`` becomes ``""``)."""
  return {
    key: "" if record[key] is None else record[key] for key in _LAYOUT[records.check_kind(kind)]
  }


def _str(value: Any) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def decode(kind: str, example: Mapping[str, Any]) -> Record:
  """Turns an example read from a data source back into the normalized record."""
  record: Record = {}
  for key, layout in _LAYOUT[records.check_kind(kind)].items():
    value = example[key]
    if layout == "messages":
      roles, contents = value["role"], value["content"]
      record[key] = [
        {"role": _str(r), "content": _str(c)} for r, c in zip(roles, contents, strict=True)
      ]
    elif layout == "bool":
      record[key] = bool(value)
    else:
      text = _str(value)
      record[key] = None if text == "" and key in records.optional_fields(kind) else text
  return record


def content_hash(
  kind: str, splits: Mapping[str, Sequence[str | os.PathLike]], on_error: str
) -> str:
  """SHA-256 over the kind, the error policy, and each split's file bytes in order."""
  digest = hashlib.sha256(f"llama_jax-jsonl/{_SCHEMA_VERSION}/{kind}/{on_error}".encode())
  for split in sorted(splits):
    digest.update(f"\0split\0{split}".encode())
    for path in splits[split]:
      file_digest = hashlib.sha256()
      with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
          file_digest.update(chunk)
      digest.update(b"\0file\0" + file_digest.digest())
  return digest.hexdigest()


class _JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the per-dataset builders made by :func:`_builder_class`."""

  RELEASE_NOTES = {VERSION: "Records validated from local JSONL by llama_jax."}
  VERSION = tfds.core.Version(VERSION)
  # Set per dataset by _builder_class.
  kind: str
  split_paths: dict[str, tuple[str, ...]]
  on_error: str
  extra_metadata: dict[str, Any]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    # These builders are made at run time and have no source directory (no checksums or
    # metadata files beside them). Saying so also sidesteps TFDS 4.9.10 looking up
    # `importlib_resources`, a backport that recent etils releases no longer install.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    # A DatasetInfo made directly: dataset_info_from_configs() would look for metadata
    # files beside this module.
    validation = self.extra_metadata["validation"]
    lines = [f"llama_jax {self.kind} records from local JSONL."]
    lines += [f"{split}: {', '.join(paths)}" for split, paths in self.split_paths.items()]
    lines += [f"content sha256: {self.extra_metadata['content_sha256']}"]
    lines += [
      f"{split}: {records.ValidationReport(**report).summary()}"
      for split, report in validation.items()
    ]
    return tfds.core.DatasetInfo(
      builder=self,
      description="\n".join(lines),
      features=features(self.kind),
      disable_shuffling=True,  # keep file and line order
      metadata=tfds.core.MetadataDict(self.extra_metadata),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # everything is local
    return {split: self._generate_examples(paths) for split, paths in self.split_paths.items()}

  def _generate_examples(self, paths: Sequence[str]):
    # Validation already ran in build_dataset (and raised there in "raise" mode, before
    # anything was written); the same policy skips the same lines here.
    rows = records.iter_jsonl(paths, self.kind, on_error=self.on_error)
    for index, record in enumerate(rows):
      yield index, encode(self.kind, record)


def _builder_class(name: str, kind: str, split_paths, on_error: str, metadata) -> type:
  attrs = {
    "name": name,
    "kind": kind,
    "split_paths": split_paths,
    "on_error": on_error,
    "extra_metadata": metadata,
    "__module__": __name__,
  }
  # Kept out of TFDS' registry: a registered class would shadow the built files when the
  # dataset is later opened by name, and a second build under the same name would clash.
  return types.new_class(
    f"JsonlBuilder_{name}",
    (_JsonlBuilder,),
    {"skip_registration": True},
    lambda namespace: namespace.update(attrs),
  )


def _stored_hash(version_dir: str) -> str | None:
  """The content hash of an earlier build in ``version_dir``, or None."""
  if not os.path.exists(os.path.join(version_dir, "dataset_info.json")):
    return None
  try:
    return tfds.builder_from_directory(version_dir).info.metadata.get("content_sha256")
  except Exception as e:  # an unreadable old build is simply rebuilt
    logger.warning("cannot read the earlier build in %s (%s)", version_dir, e)
    return None


def _check_splits(splits: Mapping[str, Sequence[str | os.PathLike]]) -> dict[str, tuple[str, ...]]:
  if not splits:
    raise ValueError("no splits given")
  checked = {}
  for split, paths in splits.items():
    if not _SPLIT_RE.match(split):
      raise ValueError(f"split name {split!r} must be letters, digits and underscores")
    paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
    if not paths:
      raise ValueError(f"split {split!r} has no files")
    for path in paths:
      if not os.path.isfile(path):
        raise FileNotFoundError(f"split {split!r}: no such file {os.fspath(path)!r}")
    checked[split] = tuple(os.path.abspath(p) for p in paths)
  return checked


def _validate_splits(kind: str, split_paths, on_error: str) -> dict[str, dict[str, Any]]:
  reports = {}
  for split, paths in split_paths.items():
    report = records.ValidationReport(kind)
    for _ in records.iter_jsonl(paths, kind, on_error=on_error, report=report):
      pass
    logger.log(
      logging.WARNING if report.skipped else logging.INFO, "split %s: %s", split, report.summary()
    )
    if report.kept == 0:
      # An empty split would fail inside TFDS with a less useful message, or worse, be
      # mistaken for data.
      raise records.RecordError(
        reason="no_records",
        problem=f"no valid {kind} records in split {split!r}: {report.summary()}",
        path=", ".join(paths),
      )
    reports[split] = report.to_dict()
  return reports


def build_dataset(
  kind: str,
  name: str,
  splits: Mapping[str, Sequence[str | os.PathLike] | str | os.PathLike],
  data_dir: str | os.PathLike,
  *,
  on_error: records.OnError = "raise",
  force: bool = False,
) -> tfds.core.DatasetBuilder:
  """Validates JSONL files and builds them into an array_record TFDS dataset.

  Args:
    kind: record kind of every file: "text", "sft", "preference" or "rl_prompt".
    name: dataset name (lowercase snake_case); data goes to ``data_dir/name/1.0.0``.
    splits: split name -> JSONL path(s), e.g. ``{"train": [a, b], "test": [c]}``; files
      of a split are concatenated in the order given.
    data_dir: TFDS data directory.
    on_error: "raise" stops at the first bad line (nothing is written); "skip" drops bad
      lines, logs the counts and stores them in the dataset's ``metadata.json``.
    force: rebuild even if the stored content hash matches.

  Returns:
    A builder of the prepared dataset (``builder.as_data_source(split)`` reads it).

  Raises:
    RecordError: for a bad line (``on_error="raise"``) or a split left with no records.
    FileNotFoundError: for a missing input file.
  """
  records.check_kind(kind)
  records.check_on_error(on_error)
  if not _NAME_RE.match(name):
    raise ValueError(f"dataset name {name!r} must be lowercase snake_case")
  split_paths = _check_splits(splits)
  digest = content_hash(kind, split_paths, on_error)
  version_dir = os.path.join(os.fspath(data_dir), name, VERSION)
  stored = _stored_hash(version_dir)
  if stored == digest and not force:
    logger.info("reusing %s (content sha256 %s)", version_dir, digest[:12])
    return tfds.builder_from_directory(version_dir)
  metadata = {
    "llama_jax_kind": kind,
    "schema_version": _SCHEMA_VERSION,
    "content_sha256": digest,
    "on_error": on_error,
    "sources": {split: list(paths) for split, paths in split_paths.items()},
    "validation": _validate_splits(kind, split_paths, on_error),
  }
  if os.path.exists(version_dir):
    # Only now, after the new inputs validated, is the old build given up.
    why = "force=True" if stored == digest else f"inputs changed (stored hash {str(stored)[:12]})"
    logger.warning("rebuilding %s: %s", version_dir, why)
    shutil.rmtree(version_dir)
  builder_cls = _builder_class(name, kind, split_paths, on_error, metadata)
  builder = builder_cls(data_dir=os.fspath(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder


class UnknownDatasetError(tfds.core.registered.DatasetNotFoundError):
  """A dataset name found neither as built files in the data directories nor in TFDS'
  registry; names the directories searched and the closest names there are."""


def built_datasets(data_dir: str | os.PathLike | None = None) -> list[str]:
  """Names of the datasets built in ``data_dir`` (TFDS' default data directories when
  ``None``): directories holding ``version/dataset_info.json`` (or ``config/version/...``)."""
  names = set()
  for root in tfds.core.utils.file_utils.list_data_dirs(data_dir and os.fspath(data_dir)):
    root = epath.Path(root)
    if not root.is_dir():
      continue
    for folder in root.iterdir():
      if any(folder.glob("*/dataset_info.json")) or any(folder.glob("*/*/dataset_info.json")):
        names.add(folder.name)
  return sorted(names)


def _not_found(name: str, data_dir: str | os.PathLike | None) -> UnknownDatasetError:
  """The error for a dataset that is nowhere: the name asked for, the directories searched
  and the close matches among the datasets built there and registered with TFDS (not the
  whole registry, which buried the name under ~250 others)."""
  base = name.split("/")[0].split(":")[0]
  dirs = [os.fspath(d) for d in tfds.core.utils.file_utils.list_data_dirs(
    data_dir and os.fspath(data_dir))]  # fmt: skip
  built = built_datasets(data_dir)
  registered = tfds.list_builders(with_community_datasets=False)
  close = difflib.get_close_matches(base, sorted(set(built) | set(registered)), n=5, cutoff=0.6)
  hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
  there = ", ".join(built[:10]) + (f" … ({len(built)} in all)" if len(built) > 10 else "")
  return UnknownDatasetError(
    f"no dataset {name!r}: not built in data_dir {dirs} (datasets there: {there or 'none'}) "
    f"and not registered with TFDS{hint}"
  )


def dataset_builder(
  name: str, data_dir: str | os.PathLike | None = None
) -> tfds.core.DatasetBuilder:
  """Finds a prepared dataset: built files in ``data_dir`` first, then TFDS' registry.

  Files come first so that a dataset built here under a name that TFDS also registers
  is read as built, not regenerated by the registered code.

  Raises:
    UnknownDatasetError: neither has ``name``; naming the directories searched and the
      close matches among the datasets there and in TFDS' registry.
  """
  kwargs = {} if data_dir is None else {"data_dir": os.fspath(data_dir)}
  try:
    return tfds.core.read_only_builder.builder_from_files(name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    pass
  try:
    return tfds.builder(name, **kwargs)
  except tfds.core.registered.DatasetNotFoundError:
    raise _not_found(name, data_dir) from None


def infer_kind(info: tfds.core.DatasetInfo) -> str:
  """The record kind of a dataset: from its llama_jax metadata, else from its features."""
  kind = (info.metadata or {}).get("llama_jax_kind")
  if kind:
    return records.check_kind(kind)
  keys = set(info.features.keys())
  for kind, layout in _LAYOUT.items():
    if keys == set(layout):
      return kind
  raise ValueError(
    f"dataset {info.full_name} has features {sorted(keys)}, which match no record kind: "
    + "; ".join(f"{k}: {sorted(v)}" for k, v in _LAYOUT.items())
  )


class RecordSource(collections.abc.Sequence):
  """A random-access source of normalized records (plain Python dicts) for grain.

  Wraps a TFDS data source and decodes each example with :func:`decode`. Picklable, so
  grain worker processes can use it.
  """

  def __init__(self, source: Sequence[Any], kind: str, *, name: str = "", split: str = ""):
    self._source = source
    self.kind = records.check_kind(kind)
    self.name, self.split = name, split  # for error messages (`pipeline.describe_source`)

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index):
    if isinstance(index, slice):
      return [self[i] for i in range(*index.indices(len(self)))]
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"record index {index} out of range for {len(self)} records")
    return decode(self.kind, self._source[index])

  def __getitems__(self, indices: Sequence[int]) -> list[Record]:
    """Batch read (one array_record lookup for many indices where the source can)."""
    getitems = getattr(self._source, "__getitems__", None)
    examples = getitems(list(indices)) if getitems else [self._source[i] for i in indices]
    return [decode(self.kind, example) for example in examples]

  def __iter__(self):
    for index in range(len(self)):
      yield self[index]

  def __repr__(self) -> str:
    return f"RecordSource(kind={self.kind!r}, len={len(self)}, source={self._source!r})"


def load_source(
  name: str,
  split: str,
  data_dir: str | os.PathLike | None = None,
  *,
  kind: str | None = None,
) -> RecordSource:
  """Opens one split of a prepared TFDS dataset as a :class:`RecordSource`.

  Args:
    name: dataset name as built by :func:`build_dataset`, or any TFDS dataset (also
      ``"name/config:version"``) whose features follow one record kind's layout.
    split: split name or TFDS split expression (``"train[:90%]"``).
    data_dir: TFDS data directory (TFDS' default when ``None``).
    kind: record kind; inferred from the dataset's metadata or features when ``None``.
  """
  builder = dataset_builder(name, data_dir)
  inferred = infer_kind(builder.info)
  if kind is not None and records.check_kind(kind) != inferred:
    raise ValueError(f"dataset {name!r} holds {inferred} records, not {kind}")
  return RecordSource(builder.as_data_source(split=split), inferred, name=name, split=split)
