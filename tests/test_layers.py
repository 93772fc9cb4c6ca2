"""The import graph holds to the declared layer order (docs/architecture.md).

Every `import` inside `llama_jax` (including ones inside functions) goes to the same layer or a
lower one, and no module imports, directly or through others, itself. `experiments/`: stage
launchers and shared helpers import no launcher; only the compositions (recipes, findings,
studies) run other stages.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Lowest first. A module may import from its own layer and from the layers before it.
LAYERS = (
  "model",  # config, attention kernels, the decoder, LoRA, the reward-model head
  "tokenizer",
  "data",
  "objectives",  # model-free loss math
  "parallel",  # meshes, sharding rules, device descriptions, AOT compile-and-fit
  "checkpoint",  # HF / Meta / GGUF / Orbax formats, loading from workdirs
  "training",  # train state, the fit loop, metrics, averaging
  "steps",  # jitted step functions
  "generation",
  "rl",  # rollouts, rewards, scorers, rejection sampling, the online driver
  "evaluation",
  "testing",
  "assets",
)


def _modules(package: str) -> dict[str, pathlib.Path]:
  out = {}
  for path in sorted((ROOT / package).rglob("*.py")):
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path], prefixes: tuple[str, ...]):
  """Modules of `modules` that `path` imports, anywhere in the file."""

  def resolve(name: str) -> str | None:
    while name and name not in modules:
      name = name.rpartition(".")[0]
    return name or None

  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(prefixes):
      for alias in node.names:
        found.add(resolve(f"{node.module}.{alias.name}"))
    elif isinstance(node, ast.Import):
      found.update(resolve(a.name) for a in node.names if a.name.startswith(prefixes))
  found.discard(None)
  return found


def _graph(package: str) -> dict[str, set[str]]:
  modules = _modules(package)
  return {m: _imports(p, modules, (package,)) - {m} for m, p in modules.items()}


def _layer(module: str) -> int:
  parts = module.split(".")
  if len(parts) == 1:  # the package root re-exports the public names
    return len(LAYERS)
  name = parts[1]
  if name not in LAYERS:
    raise AssertionError(f"{module}: layer {name!r} is not in LAYERS; declare it")
  return LAYERS.index(name)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  cycles, state = [], {}

  def visit(node, stack):
    state[node] = "open"
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == "open":
        cycles.append([*stack[stack.index(nxt):], nxt])
      elif nxt not in state:
        visit(nxt, [*stack, nxt])
    state[node] = "done"

  for node in sorted(graph):
    if node not in state:
      visit(node, [node])
  return cycles


def _package_inits(graph: dict[str, set[str]]) -> dict[str, set[str]]:
  """Drop edges into a package's `__init__` from its own submodules' re-exports: `a/__init__`
  importing `a.b` is how a package names its API, not a dependency of `a.b` on `a`."""
  return {m: {t for t in deps if not m.startswith(t + ".")} for m, deps in graph.items()}


def test_library_imports_follow_the_layer_order():
  graph = _graph("llama_jax")
  climbs = [
    f"{m} -> {t}"
    for m, deps in graph.items()
    for t in deps
    if len(m.split(".")) > 1 and len(t.split(".")) > 1 and _layer(t) > _layer(m)
  ]
  assert not climbs, "imports that climb a layer:\n" + "\n".join(sorted(climbs))


@pytest.mark.parametrize("package", ["llama_jax", "experiments"])
def test_no_import_cycles(package):
  cycles = _cycles(_package_inits(_graph(package)))
  assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_layer_check_catches_a_climb_and_a_cycle():
  assert _layer("llama_jax.model.llama") < _layer("llama_jax.steps.lm")
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
  with pytest.raises(AssertionError, match="not in LAYERS"):
    _layer("llama_jax.nowhere.x")


# Compositions run other stages; everything else in experiments/ is a stage launcher or a
# shared helper and imports no launcher.
COMPOSITIONS = {"experiments.recipes", "experiments.llama2_recipe", "experiments.llama3_recipe",
                "experiments.findings", "experiments.smollm2_study"}  # fmt: skip
HELPERS = {"experiments", "experiments.runs", "experiments.sections", "experiments.models",
           "experiments.data_sources", "experiments.lm", "experiments.targets",
           "experiments.report", "experiments.online_rl"}  # fmt: skip


def test_launchers_import_no_launcher():
  graph = _graph("experiments")
  launchers = {m for m in graph if not m.startswith("experiments.configs")} - HELPERS - COMPOSITIONS
  wrong = [
    f"{m} -> {t}"
    for m, deps in graph.items()
    if m not in COMPOSITIONS and not m.startswith("experiments.configs")
    for t in deps & launchers
  ]
  assert not wrong, "launcher imports outside the compositions:\n" + "\n".join(sorted(wrong))
