"""The LM training stage that the `experiments.pretrain` and `experiments.sft` launchers run
(a shared helper: the two differ only in their config).

    python -m experiments.pretrain --config=experiments/configs/pretrain.py:tiny --workdir=DIR
    python -m experiments.sft --config=experiments/configs/sft.py:tiny --workdir=DIR
    python -m experiments.lm --config=experiments/configs/<pretrain|sft>.py:<variant> ...

Config -> `llama_jax.steps.lm.build` -> `llama_jax.training.trainer.fit` -> the workdir's
files (metrics.jsonl, checkpoints/, experiment_config.json, model_config.json, final.json).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections

from experiments import data_sources, models, runs, sections
from llama_jax.parallel import aot
from llama_jax.steps import common as step_lib
from llama_jax.steps import lm as lm_steps
from llama_jax.training.trainer import fit

log = logging.getLogger(__name__)
STAGE = "sft"  # the reference config (pretrain configs have the same keys)


def lm_config(cfg: ml_collections.ConfigDict) -> lm_steps.LMConfig:
  """The objective's fields of the `train` section (z_loss, loss_chunk_size)."""
  return sections.from_section(lm_steps.LMConfig, cfg.train)


def build(cfg: ml_collections.ConfigDict, model_cfg, mesh) -> lm_steps.LM:
  """`cfg`'s LM algorithm on `mesh` (`steps.lm.build`): what `run` trains and `programs`
  compiles."""
  return lm_steps.build(
    models.build_model(cfg, model_cfg),
    mesh,
    lm_config(cfg),
    sections.optimizer_config(cfg.optimizer, cfg.train.num_steps),
    grad_accum_steps=cfg.train.grad_accum_steps,
  )


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """The run's compiled functions with abstract arguments, for `experiments.compile_check`."""
  del assumed  # an LM batch is fully given by the config
  sections.check_config(cfg, sections.reference_config(STAGE))
  model_cfg = sections.model_config(cfg)
  models.check_fits(model_cfg, cfg, None, mesh)
  lm = build(cfg, model_cfg, mesh)
  b, t = cfg.data.batch_size, cfg.data.seq_len
  batch = aot.rows(step_lib.batch_sharding(mesh), b, t, lm_steps.LM_FIELDS)
  flops = model_cfg.flops_per_token(t) * b * t
  return aot.train_and_eval(
    lm.train_step, lm.eval_step, lm.abstract_state(), batch, flops, f"{b} × {t}"
  )


def _check(model_cfg, cfg: ml_collections.ConfigDict, tokenizer, mesh) -> None:
  models.check_fits(model_cfg, cfg, tokenizer, mesh)
  data_sources.check_data_kind(cfg.data, tokenizer)


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final evaluation metrics."""
  start = runs.start_run(cfg, workdir, STAGE, check=_check)
  model_cfg, mesh, tokenizer = start.model_config, start.mesh, start.tokenizer
  log.info("Model: %s parameters on mesh %s", f"{model_cfg.num_params():,}", dict(mesh.shape))
  lm = build(cfg, model_cfg, mesh)
  eval_batches = data_sources.make_eval_batches(cfg.data, tokenizer, mesh)
  results: dict[str, Any] = {}

  def final_eval(state):
    with eval_batches() as batches:
      results.update(lm.evaluate(state.params, batches))
    return results

  with data_sources.make_train_pipeline(cfg.data, tokenizer, mesh) as train_iter:
    state = fit(
      init_state=lambda: lm.init_state(start.params, jax.random.PRNGKey(cfg.train.seed)),
      abstract_state=lm.abstract_state(),
      train_step=lm.train_step,
      train_iter=train_iter,
      workdir=workdir,
      loop=sections.loop_config(cfg.train),
      eval_fn=None if eval_batches is None else final_eval,
      flops_per_token=model_cfg.flops_per_token(cfg.data.seq_len),
      peak_flops_per_device=cfg.train.peak_flops or None,
      meta={"model": model_cfg.to_dict()},
    )
  results = runs.final_results(workdir, results)
  log.info("Finished at step %d: %s", int(state.step), results)
  return results


if __name__ == "__main__":
  runs.launch(run)
