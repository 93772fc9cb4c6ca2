"""Ahead-of-time compile-and-fit: lower and compile a stage's functions for any device set
(chips this host does not have included, see `llama_jax.parallel.topologies`) and read what each
would hold per device.

    program = Program("train_step", jitted_step, (abstract_state, abstract_batch),
                      flops=model_flops)
    report = compile_program(program, hbm_bytes=95 * 2**30)
    report.total_bytes, report.fits, report.compile_seconds

A `Program` is one compiled function of a stage with the abstract arguments of one call
(`jax.ShapeDtypeStruct`s that carry their shardings) and `resident`: the stage's other
arrays that stay on the devices while it runs (the optimizer state during evaluation, the
reference and value models during a PPO policy step). Per device, a program needs

    arguments + outputs − outputs aliased to donated arguments + temporaries + code + resident

and it fits when that is at most the chip's usable HBM. The XLA:TPU compiler refuses a
program that cannot fit (RESOURCE_EXHAUSTED), the GPU compiler never does, and both were
seen to accept programs whose own figures sum above the HBM, so the figures decide.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Program:
  """One jitted function of a stage and the abstract arguments of one call.

  Attributes:
    name: what the stage calls it ("train_step", "reference_logps", "generate", ...).
    fn: the `jax.jit`-wrapped function the stage runs (the same object, so the check and the
      run cannot drift).
    args: positional arguments, `jax.ShapeDtypeStruct`s with shardings (or Python values
      for static arguments).
    flops: model FLOPs of one call (from the config: compilers count a scanned layer once).
    resident: other arrays alive on the devices during the call (abstract, with shardings).
    note: a short description for the report (shapes of the call).
  """

  name: str
  fn: Any
  args: tuple
  flops: float = 0.0
  resident: Any = ()
  note: str = ""


def train_and_eval(
  train_step, eval_step, state: Any, batch: Any, train_flops: float, note: str
) -> list[Program]:
  """A run's train step on `state` and its eval step on `state.params` (the optimizer state
  resident meanwhile), for one batch: the compiled functions of an LM or RM run."""
  return [
    Program("train_step", train_step, (state, batch), train_flops, note=note),
    Program("eval_step", eval_step, (state.params, batch), train_flops / 3,
            resident=state.opt_state, note=note),  # fmt: skip
  ]


@dataclasses.dataclass(frozen=True)
class Assumed:
  """Shapes a config does not fix, because they depend on the data.

  Attributes:
    prompt_len: tokens of the longest prompt in a generation batch (sets the prompt bucket
      and the rollout rows' length).
    num_pairs: preference pairs in a DPO run (the size of the precomputed reference table).
  """

  prompt_len: int = 1024
  num_pairs: int = 100_000


@dataclasses.dataclass(frozen=True)
class Report:
  """Per-device memory of one compiled program (bytes), and how long compiling took."""

  name: str
  note: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  resident_bytes: int
  hbm_bytes: int
  compile_seconds: float
  flops: float
  error: str = ""  # the compiler's refusal (e.g. out of HBM), first line

  @property
  def total_bytes(self) -> int:
    return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
            + self.code_bytes + self.resident_bytes)  # fmt: skip

  @property
  def fits(self) -> bool:
    return not self.error and self.total_bytes <= self.hbm_bytes


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of an abstract (or real) sharded tree: one shard of every leaf
  (a replicated leaf counts whole)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if not hasattr(leaf, "shape"):
      continue
    sh = getattr(leaf, "sharding", None)
    shape = sh.shard_shape(leaf.shape) if sh is not None else leaf.shape
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def abstract(tree: Any, shardings: Any) -> Any:
  """`ShapeDtypeStruct`s of `tree`'s leaves (arrays or structs) placed as `shardings` (a
  matching tree, or one sharding for every leaf)."""
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shardings), tree)
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
  )


def rows(
  sharding: NamedSharding,
  num_rows: int,
  seq_len: int,
  row_fields: Sequence[str],
  scalar_fields: Sequence[str] = (),
  dtypes: dict[str, Any] | None = None,
) -> dict[str, jax.ShapeDtypeStruct]:
  """An abstract batch: `row_fields` [num_rows, seq_len] and `scalar_fields` [num_rows],
  int32 unless `dtypes` says otherwise (what the data pipelines emit)."""
  dtypes = dtypes or {}
  spec = lambda name, shape: jax.ShapeDtypeStruct(
    shape, dtypes.get(name, np.int32), sharding=sharding
  )
  out = {f: spec(f, (num_rows, seq_len)) for f in row_fields}
  return out | {f: spec(f, (num_rows,)) for f in scalar_fields}


# XLA:TPU says "... required for HLO temporaries (1.13T) ..." or "Used 1.13T of 95.74G hbm".
_HBM_USED = re.compile(r"(?:temporaries \(|Used )([\d.]+)([KMGT])")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _refused_bytes(message: str) -> int:
  """What an XLA:TPU out-of-memory error says the program would use (0 if it does not)."""
  m = _HBM_USED.search(message)
  return int(float(m.group(1)) * _UNITS[m.group(2)]) if m else 0


@contextlib.contextmanager
def no_compilation_cache():
  """Compile-only devices cannot load an executable back: keep them out of the cache."""
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)


def compile_program(program: Program, hbm_bytes: int) -> Report:
  """Lowers and compiles `program`, returning its per-device memory against `hbm_bytes`.

  A compiler refusal (out of memory) is a report with `error` set, not an exception; the
  temporaries are then what the message says the program would have used."""
  t0 = time.perf_counter()
  base = dict(
    name=program.name, note=program.note, hbm_bytes=hbm_bytes, flops=program.flops,
    resident_bytes=shard_bytes(program.resident),
  )  # fmt: skip
  try:
    with no_compilation_cache():
      compiled = program.fn.lower(*program.args).compile()
  except Exception as e:  # noqa: BLE001 - any compiler refusal becomes a row of the table
    message = str(e)
    if "RESOURCE_EXHAUSTED" not in message and "out of memory" not in message.lower():
      raise
    line = next((ln for ln in message.splitlines() if "hbm" in ln.lower()), message)
    return Report(
      **base, argument_bytes=shard_bytes(program.args), output_bytes=0, alias_bytes=0,
      temp_bytes=_refused_bytes(message), code_bytes=0,
      compile_seconds=time.perf_counter() - t0, error=line.strip()[:200],
    )  # fmt: skip
  seconds = time.perf_counter() - t0
  m = compiled.memory_analysis()
  return Report(
    **base,
    argument_bytes=int(m.argument_size_in_bytes),
    output_bytes=int(m.output_size_in_bytes),
    alias_bytes=int(m.alias_size_in_bytes),
    temp_bytes=int(m.temp_size_in_bytes),
    code_bytes=int(getattr(m, "generated_code_size_in_bytes", 0) or 0),
    compile_seconds=seconds,
  )


def required_mfu(flops: float, seconds: float, num_devices: int, peak_flops: float) -> float:
  """The model FLOPs utilization a call of `flops` needs to take `seconds`."""
  return flops / (seconds * num_devices * peak_flops)
