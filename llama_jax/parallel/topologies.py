"""Device descriptions of chips this host does not have, for ahead-of-time compilation.

    topology = get_topology("v5p-32")      # 16 TPU v5p devices on 4 hosts
    mesh = sharding.make_mesh(devices=topology.devices(), fsdp=-1)
    compiled = jax.jit(step, in_shardings=..., out_shardings=...).lower(*abstract).compile()
    compiled.memory_analysis()              # bytes per device, vs topology.chip.usable_bytes

`Topology.devices()` returns compile-only `jax.Device`s: they go into a `Mesh` and
`jit(...).lower(...).compile()` like real ones, but cannot hold arrays or run programs. A
multi-host topology compiles from this one process (the devices carry their hosts'
`process_index`).

Names (`known_topologies()` lists the concrete ones):

- `v4-N`, `v5p-N`: Cloud TPU names, N counts TensorCores, two per chip. Both chips are
  megacore, so JAX sees one device per chip: v5p-8 is 4 chips, 4 devices, one host.
- `v5e-N` (also `v5litepod-N`), `v6e-N`: N counts chips, one device each.
- Any TPU name + `xK`: K slices of it joined over the data-center network (`v5p-256x2`).
- `h100-N`, `a100-N`: SXM 80 GB GPUs, 8 per host (N = 1, 2, 4 or a multiple of 8).
- `cpu-N`: the first N CPU devices of this process (8 under the test suite, which sets
  `--xla_force_host_platform_device_count=8`).

TPU descriptions come from libtpu (`pip install 'llama_jax[aot]'`), GPU ones from the CUDA
PJRT plugin (`pip install 'llama_jax[aot-gpu]'`) and the XLA target specs shipped in
`assets/gpu_targets/`. Neither needs the hardware nor any driver.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib.util
import math
import os
import re
from collections.abc import Iterator, Mapping
from pathlib import Path

import jax

GiB = 2**30
_GPU_TARGETS = Path(__file__).parents[1] / "assets" / "gpu_targets"


@dataclasses.dataclass(frozen=True)
class Chip:
  """One JAX device of a kind of accelerator (a whole chip for megacore TPUs).

  Attributes:
    name: "TPU v5p", "H100 SXM 80GB", ...
    platform: "tpu", "cuda" or "cpu".
    hbm_bytes: memory of one device.
    peak_flops: dense bfloat16 matmul FLOP/s of one device.
    usable_fraction: share of `hbm_bytes` a program may use: what the TPU compiler reports
      as available, JAX's default preallocation on GPUs.
  """

  name: str
  platform: str
  hbm_bytes: int
  peak_flops: float
  usable_fraction: float

  @property
  def usable_bytes(self) -> int:
    """Bytes one program may occupy on one device."""
    return int(self.hbm_bytes * self.usable_fraction)


@dataclasses.dataclass(frozen=True)
class Topology:
  """A set of devices to compile for: `num_devices` of `chip` on `num_hosts` hosts.

  Attributes:
    name: canonical name ("v5p-32", "h100-64", "cpu-8", "v5p-256x2").
    chip: the kind of device.
    num_devices: JAX devices in all slices.
    num_hosts: processes (TPU VMs, GPU hosts) in all slices.
    shape: one slice's layout: chips per ICI axis (TPU), (hosts, GPUs per host), (devices,).
    host_shape: chips of one TPU host per axis (x, y, z); () elsewhere.
    wrap: per ICI axis, whether it closes into a ring (torus links); () off TPU.
    num_slices: TPU slices joined over the data-center network.
  """

  name: str
  chip: Chip
  num_devices: int
  num_hosts: int
  shape: tuple[int, ...] = ()
  host_shape: tuple[int, ...] = ()
  wrap: tuple[bool, ...] = ()
  num_slices: int = 1

  def devices(self) -> list[jax.Device]:
    """The devices, ordered as the backend lists them (built once per topology)."""
    return list(_devices(self))


# --------------------------------------------------------------------------- chips

# TPU figures per chip, which is one JAX device for all four. Peak FLOP/s and HBM are Google
# Cloud's published numbers (v4: 275 TFLOP/s, 32 GiB; v5e: 197, 16 GiB; v5p: 459, "95 GB";
# v6e: 918, 32 GiB). The usable share is what libtpu 0.0.42's compiler reports as available
# HBM when a program is too large ("exceeds available HBM (95.74G)"), which a bisection over
# argument sizes confirms to within 10 MB: v4 30.75 GiB, v5e 15.75, v5p 95.74, v6e 31.25.
# v5p's 95.74 GiB available is more than the "95 GB" quoted, so we take its HBM as 96 GiB.
TPU_V4 = Chip("TPU v4", "tpu", 32 * GiB, 275e12, 30.75 / 32)
TPU_V5E = Chip("TPU v5e", "tpu", 16 * GiB, 197e12, 15.75 / 16)
TPU_V5P = Chip("TPU v5p", "tpu", 96 * GiB, 459e12, 95.74 / 96)
TPU_V6E = Chip("TPU v6e", "tpu", 32 * GiB, 918e12, 31.25 / 32)


def _target_memory_bytes(target_file: str) -> int:
  """`device_memory_size` of an XLA GPU target spec: the HBM the device itself reports."""
  text = (_GPU_TARGETS / target_file).read_text()
  return int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))


# GPU HBM is what the device reports (from the XLA target spec); JAX preallocates 75% of it
# by default (XLA_PYTHON_CLIENT_MEM_FRACTION), so programs get that share. Peak FLOP/s are
# NVIDIA's dense BF16 tensor-core rates (half the "with sparsity" datasheet figure), the
# same as `llama_jax.training.metrics.PEAK_FLOPS`; H100's equals 132 SMs × 4 tensor cores × 512
# bf16 FMAs/clock × 1.83 GHz × 2 from its target spec.
_GPU_TARGET_FILES = {"H100 SXM 80GB": "h100_sxm.txtpb", "A100 SXM 80GB": "a100_sxm_80.txtpb"}
H100 = Chip("H100 SXM 80GB", "cuda", _target_memory_bytes("h100_sxm.txtpb"), 989.5e12, 0.75)
A100 = Chip("A100 SXM 80GB", "cuda", _target_memory_bytes("a100_sxm_80.txtpb"), 312e12, 0.75)

# Nominal figure for an emulated CPU device, only so that throughput arithmetic has a finite
# denominator: no measurement, and CPU utilization numbers mean nothing.
CPU_NOMINAL_PEAK_FLOPS = 1e11


def _host_memory_bytes() -> int:
  try:
    import psutil

    return int(psutil.virtual_memory().total)
  except ImportError:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def cpu_chip(num_devices: int) -> Chip:
  """An emulated CPU device: the devices of one process share its host's memory equally."""
  return Chip("CPU", "cpu", _host_memory_bytes() // num_devices, CPU_NOMINAL_PEAK_FLOPS, 1.0)


# --------------------------------------------------------------------------- TPU slices


@dataclasses.dataclass(frozen=True)
class _TpuFamily:
  chip: Chip
  libtpu_name: str  # prefix of libtpu's topology name: "v5p" -> "v5p:4x4x8"
  chip_config: str  # "megacore": the two TensorCores of a chip form one device
  cores_per_chip_in_name: int  # v4-N / v5p-N count TensorCores, v5e-N / v6e-N chips
  shapes: Mapping[int, tuple[int, ...]]  # chips -> slice shape (the Cloud TPU default)


# v4 and v5p slices are 3D; hosts hold 2x2x1 chips; from 4x4x4 (a full cube) up the
# optical switches close every axis into a ring.
_CUBE_SHAPES = {
  4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
  256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16),
}
# v5e and v6e slices are 2D parts of a 16x16 pod; only an axis spanning the pod is a ring.
# Slices of up to 8 chips are one host (machine types ct5lp-hightpu-8t, ct6e-standard-8t);
# larger ones are built of 4-chip (2x2) hosts.
_GRID_SHAPES = {
  1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16),
  256: (16, 16),
}


def _cubes_up_to(max_chips: int) -> dict[int, tuple[int, ...]]:
  return {chips: shape for chips, shape in _CUBE_SHAPES.items() if chips <= max_chips}


# libtpu knows v5e and v6e chips only as "default" (one TensorCore, one device).
_TPU_FAMILIES = {
  "v4": _TpuFamily(TPU_V4, "v4", "megacore", 2, _cubes_up_to(2048)),  # up to v4-4096
  "v5p": _TpuFamily(TPU_V5P, "v5p", "megacore", 2, _cubes_up_to(4096)),  # up to v5p-8192
  "v5e": _TpuFamily(TPU_V5E, "v5e", "default", 1, _GRID_SHAPES),
  "v6e": _TpuFamily(TPU_V6E, "v6e", "default", 1, _GRID_SHAPES),
}
_TPU_ALIASES = {"v5litepod": "v5e"}
_LIBTPU_NAMES = {family.chip: family for family in _TPU_FAMILIES.values()}


def _tpu_host_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
  if len(shape) == 2 and math.prod(shape) <= 8:
    return (*shape, 1)  # single-host v5e / v6e slice
  return (2, 2, 1)


def _tpu_wrap(shape: tuple[int, ...]) -> tuple[bool, bool, bool]:
  if len(shape) == 3:
    return (min(shape) >= 4,) * 3
  return (shape[0] == 16, shape[1] == 16, False)


def _tpu_topology(family_name: str, size: int, num_slices: int) -> Topology:
  family = _TPU_FAMILIES[family_name]
  chips = size // family.cores_per_chip_in_name
  if size % family.cores_per_chip_in_name or chips not in family.shapes:
    sizes = [c * family.cores_per_chip_in_name for c in family.shapes]
    raise ValueError(f"no {family_name} slice with {size}; known sizes: {sizes}")
  shape = family.shapes[chips]
  host_shape = _tpu_host_shape(shape)
  suffix = f"x{num_slices}" if num_slices > 1 else ""
  return Topology(
    name=f"{family_name}-{size}{suffix}",
    chip=family.chip,
    num_devices=chips * num_slices,
    num_hosts=chips // math.prod(host_shape) * num_slices,
    shape=shape,
    host_shape=host_shape,
    wrap=_tpu_wrap(shape),
    num_slices=num_slices,
  )


def _tpu_devices(topology: Topology) -> list[jax.Device]:
  from jax.experimental import topologies

  family = _LIBTPU_NAMES[topology.chip]
  layout = "x".join(map(str, topology.shape))
  try:
    with _libtpu_without_tpus():
      description = topologies.get_topology_desc(
        platform="tpu",
        topology_name=f"{family.libtpu_name}:{layout}",
        chip_config_name=family.chip_config,
        chips_per_host_bounds=topology.host_shape,
        num_slices=topology.num_slices,
        wrap=topology.wrap,
      )
  except RuntimeError as e:
    if "TPU support not installed" not in str(e):
      raise
    raise RuntimeError(
      f"{topology.name} needs libtpu to describe TPU devices: pip install "
      f"'jax[tpu]=={jax.__version__}' (or 'llama_jax[aot]'); no TPU is needed"
    ) from e
  return description.devices


@contextlib.contextmanager
def _libtpu_without_tpus() -> Iterator[None]:
  """Lets libtpu start, for compile-only devices, on a host without TPUs.

  libtpu takes /tmp/libtpu_lockfile so that one process owns the TPUs; with no TPUs there is
  nothing to own, and the lock would stop a second process (an xdist worker, a compile check
  running beside the tests) from describing TPUs at all, so ALLOW_MULTIPLE_LIBTPU_LOAD lifts
  it. Away from a TPU VM libtpu also cannot look up its accelerator type and worker hostnames
  and logs an error for each; any valid value silences them and changes none of the
  compile-only topologies (their fingerprints stay the same). libtpu reads all three when it
  starts, so they are set only while the call runs: later code (`sharding` takes
  TPU_WORKER_HOSTNAMES for a sign of a TPU pod) and subprocesses never see them. On a host
  with TPUs attached nothing is changed.
  """
  settings = {
    "ALLOW_MULTIPLE_LIBTPU_LOAD": "1",
    "TPU_ACCELERATOR_TYPE": "v5p-8",
    "TPU_WORKER_HOSTNAMES": "localhost",
  }
  missing = {k: v for k, v in settings.items() if k not in os.environ}
  if not missing or _tpu_chips_attached():
    yield
    return
  os.environ.update(missing)
  try:
    yield
  finally:
    for key in missing:
      os.environ.pop(key, None)


def _tpu_chips_attached() -> bool:
  try:
    from jax._src import hardware_utils

    return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
  except Exception:  # private API moved: assume TPUs, i.e. change no environment
    return True


# --------------------------------------------------------------------------- GPUs and CPUs

_GPU_FAMILIES = {"h100": H100, "a100": A100}
_GPUS_PER_HOST = 8


def _gpu_topology(family_name: str, count: int) -> Topology:
  if count in (1, 2, 4, 8) or (count > 0 and count % _GPUS_PER_HOST == 0):
    hosts = max(1, count // _GPUS_PER_HOST)
    return Topology(f"{family_name}-{count}", _GPU_FAMILIES[family_name], count, hosts,
                    shape=(hosts, count // hosts))
  raise ValueError(f"{family_name}-{count}: use 1, 2, 4 or a multiple of {_GPUS_PER_HOST} GPUs")


def _gpu_devices(topology: Topology) -> list[jax.Device]:
  from jax.experimental import topologies

  hosts, per_host = topology.shape
  target = (_GPU_TARGETS / _GPU_TARGET_FILES[topology.chip.name]).read_text()
  try:
    description = topologies.get_topology_desc(
      platform="cuda", topology_name="", topology=f"1x{hosts}x{per_host}", target_config=target
    )
  except NotImplementedError as e:  # no "cuda" topology factory registered
    if importlib.util.find_spec("jax_plugins.xla_cuda12") is not None:
      # Installed, but its start-up check found no CUDA libraries, which it skips only when
      # JAX_PLATFORMS leaves CUDA out; the check runs once per process.
      raise RuntimeError(
        f"{topology.name}: JAX's CUDA plugin is installed but did not start (no CUDA on this "
        "host); set JAX_PLATFORMS=cpu (or JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1) before JAX starts"
      ) from e
    version = jax.__version__
    raise RuntimeError(
      f"{topology.name} needs JAX's CUDA plugin to describe GPU devices: pip install --no-deps "
      f"jax-cuda12-plugin=={version} jax-cuda12-pjrt=={version} (or 'llama_jax[aot-gpu]'); "
      "no GPU or CUDA driver is needed"
    ) from e
  return description.devices


def _cpu_devices(topology: Topology) -> list[jax.Device]:
  devices = jax.devices("cpu")
  if len(devices) < topology.num_devices:
    raise RuntimeError(
      f"{topology.name} needs {topology.num_devices} CPU devices, this process has "
      f"{len(devices)}: set XLA_FLAGS=--xla_force_host_platform_device_count="
      f"{topology.num_devices} before JAX starts"
    )
  return devices[: topology.num_devices]


@functools.cache
def _devices(topology: Topology) -> tuple[jax.Device, ...]:
  build = {"tpu": _tpu_devices, "cuda": _gpu_devices, "cpu": _cpu_devices}
  devices = build[topology.chip.platform](topology)
  if len(devices) != topology.num_devices:  # a wrong table entry, not a user error
    raise AssertionError(f"{topology.name}: expected {topology.num_devices}, got {len(devices)}")
  return tuple(devices)


# --------------------------------------------------------------------------- names

_TPU_NAME = re.compile(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)(?:x(\d+))?")
_GPU_NAME = re.compile(r"(h100|a100)-(\d+)")
_CPU_NAME = re.compile(r"cpu-(\d+)")


@functools.cache
def get_topology(name: str) -> Topology:
  """The topology called `name` ("v5p-32", "v6e-256x2", "h100-64", "cpu-8"; see the module
  docstring). Raises ValueError for unknown names, listing the known ones."""
  key = name.strip().lower()
  if m := _TPU_NAME.fullmatch(key):
    family = _TPU_ALIASES.get(m[1], m[1])
    num_slices = int(m[3]) if m[3] else 1
    if num_slices < 1:
      raise ValueError(f"{name}: the number of slices must be at least 1")
    return _tpu_topology(family, int(m[2]), num_slices)
  if m := _GPU_NAME.fullmatch(key):
    return _gpu_topology(m[1], int(m[2]))
  if m := _CPU_NAME.fullmatch(key):
    count = int(m[1])
    if count < 1:
      raise ValueError(f"{name}: needs at least one device")
    return Topology(f"cpu-{count}", cpu_chip(count), count, 1, shape=(count,))
  raise ValueError(f"unknown topology {name!r}; known: {_known_summary()}")


def known_topologies() -> list[str]:
  """Concrete names `get_topology` accepts (it also takes `xK` multi-slice suffixes on TPU
  names, other GPU counts and other CPU counts)."""
  names = [
    f"{family_name}-{chips * family.cores_per_chip_in_name}"
    for family_name, family in _TPU_FAMILIES.items()
    for chips in family.shapes
  ]
  names += [f"{gpu}-{n}" for gpu in _GPU_FAMILIES for n in (8, 16, 32, 64, 128, 256, 512)]
  return [*names, "cpu-8"]


def _known_summary() -> str:
  parts = []
  for family_name, family in _TPU_FAMILIES.items():
    sizes = "/".join(str(c * family.cores_per_chip_in_name) for c in family.shapes)
    parts.append(f"{family_name}-{{{sizes}}}")
  return (
    ", ".join(parts) + " (also v5litepod-N for v5e-N); any TPU name + 'xK' for K slices "
    "('v5p-256x2'); h100-N, a100-N (N = 1, 2, 4 or a multiple of 8); cpu-N"
  )
