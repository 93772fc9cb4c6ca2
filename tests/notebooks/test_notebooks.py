"""The notebooks: committed without outputs; the model tour (`-m full_size`) and the algorithms
notebook run top to bottom on the 8 emulated devices (the post-training walk-through runs in
`test_recipes` on a recipe's workdir)."""

import ast
import math
import re

import nbformat
import pytest

from llama_jax.testing import NOTEBOOKS, execute_notebook, notebook_text


def test_notebooks_are_committed_without_outputs():
  paths = sorted(NOTEBOOKS.glob("*.ipynb"))
  assert [p.name for p in paths] == [
    "algorithms.ipynb", "model_tour.ipynb", "post_training_walkthrough.ipynb"
  ]
  for path in paths:
    for cell in nbformat.read(path, as_version=4).cells:
      if cell.cell_type == "code":
        assert cell.outputs == [] and cell.execution_count is None, path.name


@pytest.mark.full_size  # 10 s; make test executes the algorithms notebook
def test_model_tour_runs():
  text = notebook_text(execute_notebook("model_tour.ipynb"))
  assert "8 devices" in text and "mesh {'data': 1, 'fsdp': 4, 'tensor': 2}" in text
  assert "['embed']" in text and "P('tensor', 'fsdp')" in text  # the embedding's sharding
  (delta,) = re.findall(r"max \|Δ logits\| after the round trip: (\S+)", text)
  assert float(delta) < 1e-5


def _imports(path) -> set[str]:
  """Top-level packages the notebook's code cells import."""
  cells = nbformat.read(path, as_version=4).cells
  tree = ast.parse("\n".join(c.source for c in cells if c.cell_type == "code"))
  names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  return {name.split(".")[0] for name in names}


def test_algorithms_notebook_drives_the_library():
  # The library alone: no launcher, no experiment config (jax and the standard library aside).
  assert _imports(NOTEBOOKS / "algorithms.ipynb") == {"itertools", "os", "jax", "llama_jax"}
  text = notebook_text(execute_notebook("algorithms.ipynb"))
  assert "8 devices, mesh {'data': 1, 'fsdp': 4, 'tensor': 2}" in text
  dpo = re.findall(r"DPO step \d: loss (\S+), margin (\S+), pair accuracy (\S+)", text)
  grpo = re.findall(r"GRPO iteration (\d): score (\S+), KL (\S+), loss (\S+), (\S+) tokens", text)
  assert len(dpo) == 3 and [g[0] for g in grpo] == ["1", "2"], text[-2000:]
  losses = [float(loss) for loss, _, _ in dpo]
  assert all(math.isfinite(x) for x in losses)
  # The first step starts at the reference: every margin is 0 and the loss is log 2 plus the NLL.
  assert float(dpo[0][1]) == 0.0 and losses[0] > math.log(2)
  assert all(0.0 <= float(s) <= 1.0 for _, s, _, _, _ in grpo)
  assert all(float(kl) >= 0.0 and 0 < float(n) <= 24 for _, _, kl, _, n in grpo)
