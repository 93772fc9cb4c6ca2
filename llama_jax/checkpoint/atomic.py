"""Side files of a workdir written whole or not at all, and read back checked.

A plain `np.savez(path)` or `path.write_text(...)` cut off by a kill, a preemption or a full
disk leaves a partial file at the final name, and the next run trips over it (a bare
`BadZipFile`, a `JSONDecodeError`). Here every write goes to a temporary file in the same
directory (`.<name>.<random>.tmp`), is flushed and fsynced, then `os.replace`d over the
target: POSIX rename is atomic, so readers see the old file or the new one, never a part.
A temporary file left by a killed writer is never read (readers open the final name only).

Readers (`load_npz`, `read_json`) read the whole file and raise `DamagedFileError` naming it
when it is not what a complete write leaves (zip CRCs are checked on every npz member), so
the caller can recompute the file instead of failing.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np


class DamagedFileError(ValueError):
  """A side file that is not what a complete write leaves (truncated, bit-flipped, empty)."""


def _umask() -> int:
  # `mkstemp` makes 0600 files; give the final file the mode a plain `open` would.
  mask = os.umask(0)
  os.umask(mask)
  return mask


_FILE_MODE = 0o666 & ~_umask()


def _fsync_directory(directory: Path) -> None:
  """Makes the rename itself durable (best effort: some file systems refuse)."""
  with contextlib.suppress(OSError):
    fd = os.open(directory, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", **kwargs: Any) -> Iterator[IO]:
  """`open(path, mode)` whose content appears at `path` only when the block ends without an
  exception; otherwise `path` keeps its old content (or stays absent).

  Args:
    path: the final file; its directory is created if needed.
    mode: "w" (text) or "wb" (binary).
    **kwargs: passed to `open` (e.g. `encoding`).
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', got {mode!r}")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    with os.fdopen(fd, mode, **kwargs) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, _FILE_MODE)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise
  _fsync_directory(path.parent)


def write_text(path: str | os.PathLike, text: str) -> None:
  """Writes `text` (UTF-8) to `path` atomically."""
  with atomic_open(path, "w", encoding="utf-8") as f:
    f.write(text)


def write_json(path: str | os.PathLike, value: Any, **dumps_kwargs: Any) -> None:
  """Writes `json.dumps(value, **dumps_kwargs)` to `path` atomically."""
  write_text(path, json.dumps(value, **dumps_kwargs))


def write_jsonl(path: str | os.PathLike, rows: Any) -> None:
  """Writes one JSON object per line to `path` atomically."""
  with atomic_open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def savez(path: str | os.PathLike, **arrays: Any) -> None:
  """`np.savez(path, **arrays)`, atomically (the file name is used as given)."""
  with atomic_open(path, "wb") as f:
    np.savez(f, **arrays)


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """Every array of an `.npz` file, read in full; `DamagedFileError` naming the file and the
  fault when it is truncated or corrupted (each member's zip CRC-32 is checked)."""
  try:
    with np.load(path, allow_pickle=False) as stored:
      return {name: stored[name] for name in stored.files}
  except FileNotFoundError:
    raise
  except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError) as e:
    raise DamagedFileError(f"{path}: damaged .npz file ({type(e).__name__}: {e})") from None


def read_json(path: str | os.PathLike) -> Any:
  """The JSON value in `path`; `DamagedFileError` naming the file when it does not parse."""
  try:
    return json.loads(Path(path).read_text(encoding="utf-8"))
  except FileNotFoundError:
    raise
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise DamagedFileError(f"{path}: damaged JSON file ({e})") from None
