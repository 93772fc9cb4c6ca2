"""Reads `torch.save` files (zip + pickle) into lazy numpy arrays, without torch.

Only tensors, their storages and plain containers are reconstructed; any other pickled
object raises instead of being executed. Each tensor's bytes are read when it is asked for,
so a caller can hold one tensor at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import pickle
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np

_STORAGE_DTYPES = {
  "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
  "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


@dataclasses.dataclass(frozen=True)
class _Storage:
  archive: Path
  member: str
  dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class LazyTensor:
  """A tensor in a torch zip archive; `.numpy()` reads its bytes."""

  storage: _Storage
  offset: int
  shape: tuple[int, ...]
  stride: tuple[int, ...]

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(self.storage.dtype)

  def numpy(self) -> np.ndarray:
    with zipfile.ZipFile(self.storage.archive) as zf:
      flat = np.frombuffer(zf.read(self.storage.member), dtype=self.storage.dtype)
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
      flat[self.offset:], shape=self.shape, strides=[s * item for s in self.stride]
    )
    return np.array(view)  # a contiguous copy that owns its memory


def _rebuild_tensor(storage, offset, shape, stride, *_ignored):
  return LazyTensor(storage, int(offset), tuple(shape), tuple(stride))


def load_torch_file(path: str | Path) -> dict[str, LazyTensor]:
  """The state dict of a `torch.save` zip file, as lazy tensors."""
  path = Path(path)
  with zipfile.ZipFile(path) as zf:
    pkl = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if not pkl:
      raise ValueError(f"{path}: not a torch zip checkpoint (no data.pkl; legacy format?)")
    prefix = pkl[0][: -len("data.pkl")]
    data = zf.read(pkl[0])

  class Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
      if (module, name) in (("torch._utils", "_rebuild_tensor_v2"),
                            ("torch._utils", "_rebuild_tensor")):
        return _rebuild_tensor
      if module == "torch" and name in _STORAGE_DTYPES:
        return name
      if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
      raise pickle.UnpicklingError(f"{path}: refusing to load pickled object {module}.{name}")

    def persistent_load(self, pid):
      kind, storage_type, key, _location, _numel = pid
      if kind != "storage":
        raise pickle.UnpicklingError(f"{path}: unknown persistent id {pid!r}")
      return _Storage(path, f"{prefix}data/{key}", np.dtype(_STORAGE_DTYPES[storage_type]))

  state = Unpickler(io.BytesIO(data)).load()
  if not isinstance(state, dict):
    raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
  return dict(state)
