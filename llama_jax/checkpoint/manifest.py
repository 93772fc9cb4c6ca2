"""Checksums of a committed checkpoint step: `<step>/MANIFEST.json`.

Orbax makes a save atomic (a step directory appears only once every file is written) but
never checks a step again: a deleted item, a truncated array file or flipped bytes restore
without complaint, or fail deep inside TensorStore. Orbax 0.12 keeps no checksums of the
array data (zarr3's crc32c covers only the shard index; OCDBT has none), so after a step
commits the writing process (process 0) records the size and CRC-32 of every file under the
step directory:

  {"format": "llama_jax.checkpoint.manifest/1", "step": 20,
   "files": {"state/_METADATA": {"size": 438, "crc32": "1a2b3c4d"}, ...}}

A step is intact when every listed file exists with that size and CRC-32 (`verify`); files
added later (none are, by Orbax) are not checked. CRC-32 finds every truncation, every burst
of up to 32 flipped bits and all but 2^-32 of other damage; it is no defence against anyone
who wants to forge a checkpoint, which is not its purpose. zlib's CRC-32 runs at ~6 GB/s on
one core, so reading the files costs more than the checksum.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import zlib
from typing import Any

from etils import epath

from llama_jax.checkpoint import atomic

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
FORMAT = "llama_jax.checkpoint.manifest/1"
_CHUNK = 16 << 20
_MAX_LISTED = 6  # problems named in one message

# step directory -> (signature of its files' stats, problems found): a step verified once is
# not read again while no file's size or mtime changed (`saved_shapes` then `load_params`,
# or the writer's retention, would otherwise hash the same files again).
_verified: dict[str, tuple[Any, list[str]]] = {}
_lock = threading.Lock()


def _is_local(path: epath.Path) -> bool:
  return "://" not in str(path)


def _files(step_dir: epath.Path) -> dict[str, epath.Path]:
  """Every file under `step_dir` by its relative POSIX path, the manifest excepted."""
  found, stack = {}, [(step_dir, "")]
  while stack:
    directory, prefix = stack.pop()
    for child in directory.iterdir():
      rel = prefix + child.name
      if child.is_dir():
        stack.append((child, rel + "/"))
      elif rel != MANIFEST:
        found[rel] = child
  return found


def _digest(path: epath.Path) -> tuple[int, str]:
  size, crc = 0, 0
  with path.open("rb") as f:
    while chunk := f.read(_CHUNK):
      size += len(chunk)
      crc = zlib.crc32(chunk, crc)
  return size, f"{crc:08x}"


def _signature(step_dir: epath.Path) -> Any:
  """Sizes and mtimes of every file (local directories only; None elsewhere: no caching)."""
  if not _is_local(step_dir):
    return None
  stats = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      st = os.stat(os.path.join(root, name))
      stats.append((os.path.join(root, name), st.st_size, st.st_mtime_ns))
  return tuple(sorted(stats))


def compute(step_dir: epath.PathLike, step: int | None = None) -> dict[str, Any]:
  """The manifest of `step_dir` as it is now (reads every file)."""
  step_dir = epath.Path(step_dir)
  files = {}
  for rel, path in sorted(_files(step_dir).items()):
    size, crc = _digest(path)
    files[rel] = {"size": size, "crc32": crc}
  return {"format": FORMAT, "step": step, "files": files}


def write(step_dir: epath.PathLike, step: int | None = None) -> dict[str, Any]:
  """Checksums every file under a committed step directory into `<step_dir>/MANIFEST.json`.

  Called by the writing process once Orbax has committed the step. Also the way to vouch for
  a checkpoint saved before manifests existed (after checking it restores and trains):
  `llama_jax.checkpoint.manifest.write("<workdir>/checkpoints/<step>")`.
  """
  step_dir = epath.Path(step_dir)
  manifest = compute(step_dir, step)
  text = json.dumps(manifest, indent=1, sort_keys=True)
  if _is_local(step_dir):
    atomic.write_text(os.fspath(step_dir / MANIFEST), text)
  else:  # an object store writes an object whole or not at all
    (step_dir / MANIFEST).write_text(text)
  with _lock:
    _verified[str(step_dir)] = (_signature(step_dir), [])
  return manifest


def _any_manifest(checkpoints: epath.Path) -> bool:
  """Whether any step directory under `checkpoints` has a manifest."""
  return any((p / MANIFEST).exists() for p in checkpoints.iterdir() if p.name.isdigit())


def _listed(problems: list[str]) -> list[str]:
  if len(problems) <= _MAX_LISTED:
    return problems
  return problems[:_MAX_LISTED] + [f"… and {len(problems) - _MAX_LISTED} more"]


def _check(step_dir: epath.Path) -> list[str]:
  path = step_dir / MANIFEST
  if not path.exists() and not _any_manifest(step_dir.parent):
    # Every step predates checksums (or the first save's manifest was never written): what
    # Orbax committed is used as it is, as before manifests existed, with a warning.
    log.warning("%s: no %s in any checkpoint step (written before llama_jax checksummed "
                "checkpoints); using it unverified", step_dir, MANIFEST)  # fmt: skip
    return []
  if not path.exists():
    return [
      f"no {MANIFEST} (written after a save commits: the save did not finish, or the step "
      "predates checksummed checkpoints)"
    ]
  try:
    manifest = json.loads(path.read_text())
    expected = manifest["files"]
    if manifest.get("format") != FORMAT or not isinstance(expected, dict):
      raise ValueError(f"format {manifest.get('format')!r}, expected {FORMAT!r}")
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    return [f"{MANIFEST} unreadable ({e})"]
  present = _files(step_dir)
  problems, missing_items = [], set()
  for item in sorted({rel.split("/")[0] for rel in expected if "/" in rel}):
    if not (step_dir / item).exists():
      n = sum(rel.startswith(item + "/") for rel in expected)
      problems.append(f"{item}/ missing (the whole item: {n} files)")
      missing_items.add(item)
  for rel, want in sorted(expected.items()):
    if rel.split("/")[0] in missing_items and "/" in rel:
      continue
    if rel not in present:
      problems.append(f"{rel} missing (expected {want['size']} bytes)")
      continue
    size, crc = _digest(present[rel])
    if size != want["size"]:
      how = "truncated" if size < want["size"] else "grown"
      problems.append(f"{rel} {how}: {size} bytes, expected {want['size']}")
    elif crc != want["crc32"]:
      problems.append(
        f"{rel} content changed: crc32 {crc}, expected {want['crc32']} (flipped or overwritten "
        "bytes)"
      )
  return _listed(problems)


def verify(step_dir: epath.PathLike) -> list[str]:
  """What is wrong with a committed step directory (empty: intact), each naming the file
  and what was expected versus found. Reads every file unless nothing changed since the
  last verification in this process."""
  step_dir = epath.Path(step_dir)
  signature = _signature(step_dir)
  key = str(step_dir)
  with _lock:
    cached = _verified.get(key)
  if signature is not None and cached is not None and cached[0] == signature:
    return list(cached[1])
  problems = _check(step_dir)
  with _lock:
    _verified[key] = (signature, problems)
  return list(problems)
