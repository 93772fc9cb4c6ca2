"""Device descriptions for ahead-of-time compilation: names, host layout, compiling on them.

TPU checks need libtpu (`pip install 'llama_jax[aot]'`), GPU ones JAX's CUDA plugin
(`'llama_jax[aot-gpu]'`); without them those tests skip. No accelerator is used.
"""

import collections
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.parallel import sharding
from llama_jax.parallel.topologies import GiB, get_topology, known_topologies
from llama_jax.training import metrics

# name -> (devices, hosts): the Cloud TPU / GPU-host layouts the names stand for.
LAYOUTS = {
  "v4-8": (4, 1), "v4-512": (256, 64),
  "v5p-8": (4, 1), "v5p-32": (16, 4), "v5p-1024": (512, 128), "v5p-256x2": (256, 64),
  "v5e-8": (8, 1), "v5e-16": (16, 4), "v5e-256": (256, 64),
  "v6e-8": (8, 1), "v6e-256": (256, 64),
  "h100-8": (8, 1), "h100-64": (64, 8), "a100-8": (8, 1),
  "cpu-8": (8, 1),
}


def needs_libtpu():
  pytest.importorskip("libtpu", reason="TPU descriptions need libtpu: pip install 'jax[tpu]'")


def needs_cuda_plugin():
  pytest.importorskip(
    "jax_plugins.xla_cuda12",
    reason="GPU descriptions need jax-cuda12-plugin and jax-cuda12-pjrt (llama_jax[aot-gpu])",
  )


def compile_matmul(devices, tensor=2):
  """Compiles a (data, fsdp, tensor)-sharded matmul; returns its memory analysis and the
  argument bytes one device should hold."""
  n = len(devices)
  mesh = Mesh(np.array(devices).reshape(1, n // tensor, tensor), sharding.MESH_AXES)
  rows, width, out = 8 * n, 256, 512
  fn = jax.jit(
    lambda x, w: jnp.tanh(x @ w),
    in_shardings=(NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES, None)),
                  NamedSharding(mesh, PartitionSpec("fsdp", "tensor"))),
    out_shardings=NamedSharding(mesh, PartitionSpec(sharding.BATCH_AXES, "tensor")),
  )
  x = jax.ShapeDtypeStruct((rows, width), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((width, out), jnp.bfloat16)
  analysis = fn.lower(x, w).compile().memory_analysis()
  expected_args = 2 * (rows * width // (n // tensor) + width * out // n)
  return analysis, expected_args


def test_names_map_to_their_devices_and_hosts():
  known = set(known_topologies())
  for name, (devices, hosts) in LAYOUTS.items():
    topology = get_topology(name)
    assert (topology.num_devices, topology.num_hosts) == (devices, hosts), name
    assert "x2" in name or name in known
  assert get_topology("v5p-8").shape == (2, 2, 1) and get_topology("v5p-1024").shape == (8, 8, 8)
  assert get_topology("v5p-128").wrap == (True, True, True)
  assert get_topology("v5p-64").wrap == (False, False, False)
  assert get_topology("v5e-8").host_shape == (2, 4, 1)  # one host of 8 chips
  assert get_topology("V5LITEPOD-16") == get_topology("v5e-16")


@pytest.mark.parametrize("name", ["v7-8", "v5p-12", "v6e-512", "h100-12", "tpu", "cpu-0"])
def test_unknown_names_raise_with_the_known_ones(name):
  with pytest.raises(ValueError, match=r"v5p|h100|known|multiple|at least"):
    get_topology(name)


def test_cpu_8_is_this_process_and_compiles():
  topology = get_topology("cpu-8")
  assert topology.devices() == jax.devices("cpu")[:8]
  assert topology.chip.platform == "cpu" and topology.chip.hbm_bytes > 0
  analysis, expected_args = compile_matmul(topology.devices())
  assert analysis.argument_size_in_bytes == expected_args


LIBTPU_VARIABLES = ("ALLOW_MULTIPLE_LIBTPU_LOAD", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES")


def test_tpu_devices_match_layout_and_kind():
  needs_libtpu()
  environment = {key: os.environ.get(key) for key in LIBTPU_VARIABLES}
  for name in ("v4-8", "v5p-32", "v5e-16", "v6e-8", "v5p-256x2"):
    topology = get_topology(name)
    devices = topology.devices()
    per_host = collections.Counter(d.process_index for d in devices)
    assert len(devices) == topology.num_devices, name
    assert len(per_host) == topology.num_hosts, name
    assert set(per_host.values()) == {topology.num_devices // topology.num_hosts}, name
    assert metrics.peak_flops_for_kind(devices[0].device_kind) == topology.chip.peak_flops
  # libtpu's start-up variables are set only while it starts (sharding looks for them).
  assert {key: os.environ.get(key) for key in LIBTPU_VARIABLES} == environment


@pytest.mark.parametrize("name", ["v5p-8", "v5p-32"])
def test_tpu_compiles_sharded_matmul(name):
  needs_libtpu()
  devices = get_topology(name).devices()  # v5p-32: 4 hosts, compiled from this one process
  analysis, expected_args = compile_matmul(devices)
  assert analysis.argument_size_in_bytes == expected_args
  assert analysis.generated_code_size_in_bytes > 0
  mesh = sharding.make_mesh(devices=devices, tensor=2)
  assert mesh.devices.size == len(devices)


@pytest.mark.parametrize("name", ["v4-8", "v5e-8", "v5p-8", "v6e-8"])
def test_tpu_usable_hbm_is_what_the_compiler_allows(name):
  """A program over the HBM fails to compile, naming the HBM available; the table agrees."""
  needs_libtpu()
  topology = get_topology(name)
  mesh = Mesh(np.array(topology.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  too_big = jax.ShapeDtypeStruct((2 * topology.chip.hbm_bytes // 2**20, 2**20), jnp.int8,
                                 sharding=NamedSharding(mesh, PartitionSpec()))
  with pytest.raises(Exception, match="HBM") as failure:
    jax.jit(lambda x: x + 1).lower(too_big).compile()
  available = re.search(r"available HBM \(([\d.]+)G\)", str(failure.value))
  assert available, str(failure.value)
  assert float(available[1]) * GiB == pytest.approx(topology.chip.usable_bytes, abs=0.01 * GiB)


@pytest.mark.parametrize("name", ["h100-8", "h100-64", "a100-8"])
def test_gpu_devices_and_compile(name):
  needs_cuda_plugin()
  topology = get_topology(name)
  devices = topology.devices()
  assert len({d.process_index for d in devices}) == topology.num_hosts
  assert metrics.peak_flops_for_kind(devices[0].device_kind) == topology.chip.peak_flops
  analysis, expected_args = compile_matmul(devices)
  assert analysis.argument_size_in_bytes == expected_args
  assert 79 * GiB < topology.chip.hbm_bytes < 80 * GiB and topology.chip.usable_fraction == 0.75
