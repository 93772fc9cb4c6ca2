"""Test set-up: 8 emulated CPU devices, configured before JAX starts."""

import os

# The tests' programs are tiny, so compiling them is most of the suite's time; LLVM's
# optimizations are about 30% of a compile and buy run time these programs do not need.
# Prepended, so an optimization level in the caller's XLA_FLAGS wins. Subprocesses the
# tests start (relaunched runs, notebook kernels) inherit these flags.
os.environ["XLA_FLAGS"] = (
  "--xla_backend_optimization_level=0 "
  + os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# xdist workers may each load libtpu (compiling for TPU descriptions); it locks by default.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# The experiment tests build the same tiny model many times (fresh run, resume, SFT from it);
# a compilation cache lets identical programs compile once per test session. The directory
# is per session and per xdist worker: JAX writes cache entries in place (not via rename),
# so a worker reading an entry another one is still writing can crash on a torn executable.
import tempfile  # noqa: E402

_run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
jax.config.update(
  "jax_compilation_cache_dir",
  os.path.join(tempfile.gettempdir(), f"llama_jax_jit_{_run_id}_{_worker}"),
)
# Programs that compile in under 0.5 s are not cached: caching every one took 18% less CPU on
# the LoRA and findings tests, but a fresh clone's suite with it used 1981 CPU-s (794 tests)
# against 1812 (787 tests) without.
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)

# xdist hands tests out in collection order. The long files go first, longest first, so that
# two workers share them instead of one worker finishing them alone at the end of the run.
LONG_FILES = (  # (file, whether all of it is end-to-end: marked slow)
  ("test_findings.py", True),
  ("test_recipes.py", True),
  ("test_multihost.py", True),
  ("test_rl_experiments.py", True),
  ("test_attention.py", False),  # splash kernels in Pallas' interpreter
  ("test_reliability.py", True),
  ("test_dpo_experiment.py", True),
  ("test_lora.py", False),
  ("test_post_training.py", False),
  ("test_lm_experiment.py", True),
  ("test_smollm2.py", True),
)
SLOW_FILES = tuple(name for name, slow in LONG_FILES if slow)
_ORDER = {name: i for i, (name, _) in enumerate(LONG_FILES)}


def pytest_collection_modifyitems(items):
  for item in items:  # `-m "not slow"` for a quick pass; `make test` still runs them all
    if item.path.name in SLOW_FILES:
      item.add_marker(pytest.mark.slow)
  items.sort(key=lambda item: _ORDER.get(item.path.name, len(_ORDER)))  # stable: files together
