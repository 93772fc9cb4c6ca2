"""Model averaging from the command line: the weighted mean of several runs' models.

    python -m experiments.average --inputs=runs/dpo_a,runs/dpo_b [--weights=0.7,0.3] \
      --workdir=runs/dpo_avg [--hf_out=runs/dpo_avg_hf]

Inputs are experiment workdirs (LM or reward model; their newest checkpoint) or Hugging Face
directories, all of one architecture. The workdir gets `model_config.json`, `average.json`
(inputs and normalized weights) and an Orbax checkpoint of the averaged parameters, so any
stage can start from it with `--config.init_from=runs/dpo_avg`; `--hf_out` also writes a
Hugging Face directory (LMs only).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import jax
from absl import app, flags

from experiments import runs
from llama_jax.checkpoint import orbax as ckpt_lib
from llama_jax.checkpoint import save_hf_checkpoint, workdirs
from llama_jax.parallel import sharding
from llama_jax.training import averaging

log = logging.getLogger(__name__)

AVERAGE_FILE = "average.json"


@runs.locked_run
def run(
  inputs: Sequence[str],
  workdir: str,
  weights: Sequence[float] | None = None,
  hf_out: str = "",
) -> dict:
  """Averages `inputs` into `workdir`; returns what `average.json` records."""
  sharding.initialize_distributed()
  mesh = sharding.make_mesh()
  kind = workdirs.model_kind(inputs[0])
  if hf_out and kind != "lm":
    raise ValueError(f"--hf_out: {inputs[0]} is a {kind}; Hugging Face output is for LMs")
  config, params = averaging.average_checkpoints(inputs, weights, mesh=mesh)
  record = {
    "inputs": [str(p) for p in inputs],
    "weights": averaging.normalized_weights(weights, len(inputs)).tolist(),
    "kind": kind,
  }
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    Path(workdir, workdirs.MODEL_CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    Path(workdir, AVERAGE_FILE).write_text(json.dumps(record, indent=2))
  with ckpt_lib.CheckpointManager(ckpt_lib.checkpoint_dir(workdir), async_save=False) as manager:
    manager.save(0, {"params": params}, meta=record, force=True)
  if hf_out:
    save_hf_checkpoint(hf_out, config, params)
  log.info("Averaged %d %s models into %s with weights %s", len(inputs), kind, workdir,
           record["weights"])  # fmt: skip
  return record


def _floats(csv: str) -> list[float] | None:
  return [float(x) for x in csv.split(",")] if csv else None


def main(argv):
  del argv
  runs.setup_logging()
  f = flags.FLAGS
  with runs.one_line_errors():
    run([p for p in f.inputs.split(",") if p], f.workdir, _floats(f.weights), f.hf_out)


if __name__ == "__main__":
  flags.DEFINE_string("inputs", None, "Comma-separated workdirs or Hugging Face directories.")
  flags.DEFINE_string("weights", "", "Comma-separated weights (default: equal).")
  flags.DEFINE_string("workdir", None, "Where the averaged model goes.")
  flags.DEFINE_string("hf_out", "", "Also write a Hugging Face directory here (LMs).")
  flags.mark_flags_as_required(["inputs", "workdir"])
  app.run(main)
