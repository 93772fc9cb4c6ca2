"""The notebooks: committed without outputs, and the model tour runs top to bottom on the 8
emulated devices (the post-training walk-through runs in `test_recipes` on a recipe's
workdir)."""

import re

import nbformat

from llama_jax.testing import NOTEBOOKS, execute_notebook, notebook_text


def test_notebooks_are_committed_without_outputs():
  paths = sorted(NOTEBOOKS.glob("*.ipynb"))
  assert [p.name for p in paths] == ["model_tour.ipynb", "post_training_walkthrough.ipynb"]
  for path in paths:
    for cell in nbformat.read(path, as_version=4).cells:
      if cell.cell_type == "code":
        assert cell.outputs == [] and cell.execution_count is None, path.name


def test_model_tour_runs():
  text = notebook_text(execute_notebook("model_tour.ipynb"))
  assert "8 devices" in text and "mesh {'data': 1, 'fsdp': 4, 'tensor': 2}" in text
  assert "['embed']" in text and "P('tensor', 'fsdp')" in text  # the embedding's sharding
  (delta,) = re.findall(r"max \|Δ logits\| after the round trip: (\S+)", text)
  assert float(delta) < 1e-5
