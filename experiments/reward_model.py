"""Reward-model training: Llama 2's helpfulness / safety RMs and Llama 3's ranking RM.

    python -m experiments.reward_model --config=experiments/configs/reward_model.py:tiny_helpful \
      --workdir=DIR [--config.init_from=LM_WORKDIR_OR_HF_DIR]

Builds the reward model (an LM's trunk from `init_from` with a fresh head, or a fresh tiny
one), the ranking pipelines and the jitted steps from a config, then hands them to
`llama_jax.training.trainer.fit`. Writes DIR/metrics.jsonl (eval/accuracy/<rating> is the per-bucket
table), DIR/metrics.png, DIR/reward_scores.png (score histograms of the last evaluation),
TensorBoard events and Orbax checkpoints of `{"lm", "head"}` parameters under
DIR/checkpoints/ (`llama_jax.checkpoint.workdirs.load_reward_model` reads them); a rerun resumes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections
import optax
from absl import app, flags

from experiments import data_sources, models, runs, sections
from llama_jax.data import ranking
from llama_jax.model import reward_model
from llama_jax.parallel import aot, sharding
from llama_jax.steps import common as step_lib
from llama_jax.steps import reward as reward_steps
from llama_jax.training import metrics as metrics_lib
from llama_jax.training import train_state as ts
from llama_jax.training.trainer import fit

log = logging.getLogger(__name__)

SCORES_PLOT = "reward_scores.png"


def make_eval_fn(batches_fn, eval_step, cfg: ml_collections.ConfigDict, workdir: str):
  """`state -> metrics` over one pass of the evaluation split; also draws the histograms."""

  def evaluate(state) -> dict[str, float]:
    with batches_fn() as batches:
      rows = reward_steps.evaluate(eval_step, state.params, batches)
    metrics = reward_steps.eval_metrics(
      rows, margins=cfg.reward.margins, centering=cfg.reward.centering
    )
    if jax.process_index() == 0:
      metrics_lib.plot_score_distribution(Path(workdir) / SCORES_PLOT, rows)
    log.info("Evaluation:\n%s", reward_steps.bucket_table(metrics))
    return metrics

  return evaluate


@dataclasses.dataclass(frozen=True)
class RMSteps:
  """The compiled functions of a reward-model run (`build_steps`)."""

  model: Any  # `RewardModel(config)`, with LoRA adapters on the trunk if configured
  optimizer: optax.GradientTransformation
  abstract_state: ts.TrainState
  train_step: Any  # jitted (state, batch) -> (state, metrics)
  eval_step: Any  # jitted (params, batch) -> per-row rewards


def build_steps(cfg: ml_collections.ConfigDict, model_cfg, mesh, num_steps: int) -> RMSteps:
  """The optimizer and jitted steps of `cfg` on `mesh`: what `run` trains with and
  `programs` compiles ahead of time."""
  opt_cfg = sections.train_optimizer_config(cfg, num_steps)
  optimizer = ts.make_optimizer(opt_cfg, trainable=models.trainable(cfg))
  model = reward_model.RewardModel(model_cfg, lora=sections.lora_config(cfg))
  shardings = ts.state_shardings(model, optimizer, mesh)
  max_responses = ranking.MAX_RESPONSES if cfg.data.use_edited else 2
  train_step = reward_steps.make_train_step(
    model, optimizer, mesh=mesh, margins=cfg.reward.margins,
    centering=cfg.reward.centering, grad_accum_steps=cfg.train.grad_accum_steps,
    learning_rate_fn=ts.learning_rate_schedule(opt_cfg), max_responses=max_responses,
  )  # fmt: skip
  eval_step = reward_steps.make_eval_step(
    model, mesh=mesh, max_responses=max_responses,
    micro_batches=cfg.train.grad_accum_steps,
  )  # fmt: skip
  return RMSteps(
    model=model,
    optimizer=optimizer,
    abstract_state=ts.abstract_train_state(model, optimizer, mesh),
    train_step=step_lib.jit_train_step(train_step, shardings, mesh),
    eval_step=step_lib.jit_eval_step(eval_step, shardings.params, mesh),
  )


def model_config(cfg: ml_collections.ConfigDict, model_cfg):
  """Ranking rows need a per-row attention mask: kernels that cannot take one fall back to
  XLA attention ("auto" does so itself; see the config docstring)."""
  if model_cfg.attention_impl not in ("xla", "auto"):
    log.warning("Reward model: attention_impl %r -> 'xla'", model_cfg.attention_impl)
    model_cfg = model_cfg.replace(attention_impl="xla")
  return model_cfg


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """The run's compiled functions with abstract arguments (`experiments.compile_check`)."""
  sections.check_config(cfg, sections.reference_config("reward_model"))
  del assumed
  model_cfg = model_config(cfg, sections.model_config(cfg))
  models.check_fits(model_cfg, cfg, None, mesh)
  steps = build_steps(cfg, model_cfg, mesh, 1000)
  b, t = cfg.data.batch_size, cfg.data.seq_len
  batch = aot.rows(step_lib.batch_sharding(mesh), b, t, ("tokens", "segment_ids", "response_ids"),
                   ("rating", "concern", "valid"))  # fmt: skip
  flops = reward_model.flops_per_token(model_cfg, t) * b * t
  return aot.train_and_eval(
    steps.train_step, steps.eval_step, steps.abstract_state, batch, flops, f"{b} rows × {t}"
  )


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the reward model in `workdir`; returns the final eval metrics."""
  sections.check_config(cfg, sections.reference_config("reward_model"))
  sharding.initialize_distributed()
  tokenizer = models.build_tokenizer(cfg.tokenizer, cfg.init_from)
  mesh = sections.build_mesh(cfg.mesh)
  model_cfg, lm_params = models.load_model(cfg, mesh)
  model_cfg = model_config(cfg, model_cfg)
  models.check_fits(model_cfg, cfg, tokenizer, mesh)
  runs.write_run_files(workdir, cfg, model_cfg)

  train_records = data_sources.load_preference_records(
    cfg.data, cfg.data.train_split, cfg.data.train_ratings
  )
  num_steps = cfg.train.num_steps or cfg.train.epochs * math.ceil(
    len(train_records) / cfg.data.batch_size
  )
  steps = build_steps(cfg, model_cfg, mesh, num_steps)
  pipeline_cfg = data_sources.pipeline_config(cfg.data)
  pipeline = lambda records, **kw: ranking.make_ranking_pipeline(
    records, tokenizer, pipeline_cfg, use_edited=cfg.data.use_edited, mesh=mesh, **kw
  )
  eval_fn = None
  if cfg.data.eval_split:
    eval_records = data_sources.load_preference_records(
      cfg.data, cfg.data.eval_split, cfg.data.eval_ratings
    )
    eval_fn = make_eval_fn(
      lambda: pipeline(eval_records, evaluation=True), steps.eval_step, cfg, workdir
    )
  log.info(
    "Reward model: %s parameters on mesh %s, %d steps",
    f"{reward_model.num_params(model_cfg):,}",
    dict(mesh.shape),
    num_steps,
  )

  head_rng, state_rng = jax.random.split(jax.random.PRNGKey(cfg.train.seed))
  params = None
  if lm_params is not None:
    params = reward_model.from_lm_params(model_cfg, lm_params, head_rng, mesh)
    params = models.add_adapters(cfg, steps.model, params, mesh)
    del lm_params  # the LM head is no longer referenced
  train = cfg.train.to_dict() | {"num_steps": num_steps}
  results: dict[str, Any] = {}

  def final_eval(state):
    results.update(eval_fn(state))
    return results

  with pipeline(train_records) as train_iter:
    state = fit(
      init_state=lambda: ts.init_train_state(
        steps.model, steps.optimizer, mesh, state_rng, params=params
      ),
      abstract_state=steps.abstract_state,
      train_step=steps.train_step,
      train_iter=train_iter,
      workdir=workdir,
      loop=sections.loop_config(ml_collections.ConfigDict(train)),
      eval_fn=None if eval_fn is None else final_eval,
      flops_per_token=reward_model.flops_per_token(model_cfg, cfg.data.seq_len),
      peak_flops_per_device=cfg.train.peak_flops or None,
      meta={"model": model_cfg.to_dict(), "reward_model": True},
    )
  results = runs.final_results(workdir, results)
  log.info("Finished at step %d: %s", int(state.step), results)
  return results


def main(argv):
  del argv
  runs.setup_logging()
  with runs.one_line_errors():
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  runs.define_flags()  # here, not at import: tests import `run` beside other launchers
  app.run(main)
