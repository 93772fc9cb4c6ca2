"""Test set-up: 8 emulated CPU devices, configured before JAX starts."""

import os
import tempfile

# The tests' programs are tiny, so compiling them is most of the suite's time (about 85%).
# LLVM's optimizations are about 30% of a compile, and XLA:CPU's newer fusion emitters another
# 30% of what remains (a tiny model's train step: 2.3 s -> 1.5 s, the same loss to the bit);
# neither buys run time these programs need. Eigen's matmul thread pool costs more to wake
# than its threads save on these small matrices, with two xdist workers on two cores (the
# suite: 9% less time).
# Prepended, so an optimization level in the caller's XLA_FLAGS wins. Subprocesses the
# tests start (relaunched runs, notebook kernels) inherit these flags.
os.environ["XLA_FLAGS"] = (
  "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
  "--xla_cpu_multi_thread_eigen=false "
  + os.environ.get("XLA_FLAGS", "")
  + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# xdist workers may each load libtpu (compiling for TPU descriptions); it locks by default.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

# The tests build the same tiny model many times, in both xdist workers and in the runs they
# start as subprocesses (relaunches, killed runs, two-process meshes, notebook kernels), so all
# of them share one compilation cache for this test session. Set through the environment, so
# the subprocesses inherit it. A size limit turns on JAX's file lock around cache reads and
# writes, so no process reads an entry another one is still writing. Programs that compile in
# under 0.2 s are not cached: writing every one cost more than it saved (the recipe smokes:
# 81 s with 0.5, 71 s with 0.2, 79 s with 0.05).

_run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID") or str(os.getpid())
os.environ.setdefault(
  "JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"llama_jax_jit_{_run_id}")
)
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(16 << 30))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# xdist hands tests out in collection order. The long files go first, longest first, so that
# two workers share them instead of one worker finishing them alone at the end of the run.
LONG_FILES = (  # (file, whether all of it is end-to-end: marked slow)
  ("test_rl_experiments.py", True),
  ("test_lora.py", False),
  ("test_recipes.py", True),
  ("test_compile_check.py", False),
  ("test_reliability.py", True),
  ("test_multihost.py", True),
  ("test_findings.py", True),
  ("test_gguf.py", False),  # the real SmolLM2 against transformers
  ("test_lm_experiment.py", True),
  ("test_dpo.py", False),
  ("test_reward_experiment.py", False),
  ("test_tensor_parallel.py", False),
  ("test_notebooks.py", False),
  ("test_attention.py", False),  # splash kernels in Pallas' interpreter
  ("test_dpo_experiment.py", True),  # full size only
  ("test_smollm2.py", True),  # real model: opt-in
)
SLOW_FILES = tuple(name for name, slow in LONG_FILES if slow)
_ORDER = {name: i for i, (name, _) in enumerate(LONG_FILES)}


def pytest_collection_modifyitems(items):
  for item in items:  # `-m "not slow"` for a quick pass; `make test` still runs them all
    if item.path.name in SLOW_FILES:
      item.add_marker(pytest.mark.slow)
  items.sort(key=lambda item: _ORDER.get(item.path.name, len(_ORDER)))  # stable: files together
