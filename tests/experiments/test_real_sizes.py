"""Every shipped real-size config fits the hardware its docstring names (opt-in: minutes to
an hour of compiling on a CPU host; needs the `aot` / `aot-gpu` extras and cuDNN for GPUs).

    pytest -m real_size tests/experiments/test_real_sizes.py [-k dpo]

The same check as `python -m experiments.compile_check --targets`, which also rewrites the
README's table.
"""

import pytest

from experiments import compile_check, targets
from llama_jax.parallel import aot

pytestmark = pytest.mark.real_size


@pytest.mark.parametrize("target", targets.TARGETS, ids=lambda t: f"{t.name}@{t.topology}")
def test_target_fits(target):
  if target.topology.startswith("v"):
    pytest.importorskip("libtpu")
  else:  # GPU descriptions, and cuDNN to lower flash attention ("auto")
    pytest.importorskip("jax_plugins.xla_cuda12")
    pytest.importorskip("nvidia.cudnn")
  rows = compile_check.check_target(target, aot.Assumed())
  assert rows and all(r.report is not None for r in rows), [r.error for r in rows]
  too_big = [(r.stage, r.report.name, r.report.total_bytes / aot.GiB) for r in rows if not r.fits]
  assert not too_big, f"{target.name} on {target.topology}: does not fit: {too_big}"
