"""The LM training run behind `experiments.pretrain` and `experiments.sft`.

Builds the mesh, model (fresh or from `init_from`), optimizer, data pipelines and the
jitted steps from a config, then hands them to `llama_jax.training.trainer.fit`.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
import optax

from experiments import data_sources, models, runs, sections
from llama_jax.objectives import lm as lm_obj
from llama_jax.parallel import aot, sharding
from llama_jax.steps import common as step_lib
from llama_jax.steps import lm as lm_steps
from llama_jax.training import train_state as ts
from llama_jax.training.trainer import fit

log = logging.getLogger(__name__)
STAGE = "sft"  # the reference config (pretrain configs have the same keys)


def make_eval_fn(eval_batches, eval_step):
  """`state -> {loss, accuracy, ...}` over one full pass of the evaluation split."""

  def evaluate(state) -> dict[str, float]:
    total = None
    with eval_batches() as batches:
      for batch in batches:
        sums = eval_step(state.params, batch)
        total = sums if total is None else jax.tree.map(np.add, total, sums)
    _, metrics = lm_obj.token_mean(jax.device_get(total))
    return {k: float(v) for k, v in metrics.items() if k != "z_loss"}

  return evaluate


@dataclasses.dataclass(frozen=True)
class LMSteps:
  """The compiled functions of an LM run and what they need (`build_steps`)."""

  model: Any  # the trained module: `Llama(config)`, with LoRA adapters if configured
  optimizer: optax.GradientTransformation
  abstract_state: ts.TrainState  # ShapeDtypeStructs with shardings: restore target, AOT args
  train_step: Any  # jitted (state, batch) -> (state, metrics), state donated
  eval_step: Any  # jitted (params, batch) -> sums


def build_steps(cfg: ml_collections.ConfigDict, model_cfg, mesh) -> LMSteps:
  """The optimizer and the jitted train / eval steps of `cfg` on `mesh`: what `run` trains
  with and `programs` compiles ahead of time."""
  opt_cfg = sections.optimizer_config(cfg.optimizer, cfg.train.num_steps)
  optimizer = ts.make_optimizer(opt_cfg, trainable=models.trainable(cfg))
  model = models.build_model(cfg, model_cfg)
  shardings = ts.state_shardings(model, optimizer, mesh)
  train_step = lm_steps.make_train_step(
    model,
    optimizer,
    mesh=mesh,
    z_loss=cfg.train.z_loss,
    loss_chunk_size=cfg.train.loss_chunk_size,
    grad_accum_steps=cfg.train.grad_accum_steps,
    learning_rate_fn=ts.learning_rate_schedule(opt_cfg),
  )
  eval_step = lm_steps.make_eval_step(
    model,
    mesh=mesh,
    loss_chunk_size=cfg.train.loss_chunk_size,
    micro_batches=cfg.train.grad_accum_steps,
  )
  return LMSteps(
    model=model,
    optimizer=optimizer,
    abstract_state=ts.abstract_train_state(model, optimizer, mesh),
    train_step=step_lib.jit_train_step(train_step, shardings, mesh),
    eval_step=step_lib.jit_eval_step(eval_step, shardings.params, mesh),
  )


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """The run's compiled functions with abstract arguments, for `experiments.compile_check`."""
  del assumed  # an LM batch is fully given by the config
  sections.check_config(cfg, sections.reference_config(STAGE))
  model_cfg = sections.model_config(cfg)
  models.check_fits(model_cfg, cfg, None, mesh)
  steps = build_steps(cfg, model_cfg, mesh)
  b, t = cfg.data.batch_size, cfg.data.seq_len
  batch = aot.rows(step_lib.batch_sharding(mesh), b, t, lm_steps.LM_FIELDS)
  flops = model_cfg.flops_per_token(t) * b * t
  return aot.train_and_eval(
    steps.train_step, steps.eval_step, steps.abstract_state, batch, flops, f"{b} × {t}"
  )


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the final evaluation metrics."""
  sections.check_config(cfg, sections.reference_config(STAGE))
  sharding.initialize_distributed()  # multi-host TPU / SLURM; a no-op on one process
  tokenizer = models.build_tokenizer(cfg.tokenizer, cfg.init_from)
  mesh = sections.build_mesh(cfg.mesh)
  model_cfg, params = models.load_model(cfg, mesh)
  models.check_fits(model_cfg, cfg, tokenizer, mesh)
  data_sources.check_data_kind(cfg.data, tokenizer)
  runs.write_run_files(workdir, cfg, model_cfg)
  log.info("Model: %s parameters on mesh %s", f"{model_cfg.num_params():,}", dict(mesh.shape))

  steps = build_steps(cfg, model_cfg, mesh)
  eval_batches = data_sources.make_eval_batches(cfg.data, tokenizer, mesh)
  eval_fn = None if eval_batches is None else make_eval_fn(eval_batches, steps.eval_step)

  results: dict[str, Any] = {}

  def final_eval(state):
    results.update(eval_fn(state))
    return results

  with data_sources.make_train_pipeline(cfg.data, tokenizer, mesh) as train_iter:
    state = fit(
      init_state=lambda: ts.init_train_state(
        steps.model, steps.optimizer, mesh, jax.random.PRNGKey(cfg.train.seed),
        params=None if params is None else models.add_adapters(cfg, steps.model, params, mesh),
      ),
      abstract_state=steps.abstract_state,
      train_step=steps.train_step,
      train_iter=train_iter,
      workdir=workdir,
      loop=sections.loop_config(cfg.train),
      eval_fn=None if eval_fn is None else final_eval,
      flops_per_token=model_cfg.flops_per_token(cfg.data.seq_len),
      peak_flops_per_device=cfg.train.peak_flops or None,
      meta={"model": model_cfg.to_dict()},
    )
  results = runs.final_results(workdir, results)
  log.info("Finished at step %d: %s", int(state.step), results)
  return results
