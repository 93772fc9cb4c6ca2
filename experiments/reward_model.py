"""Reward-model training: Llama 2's helpfulness / safety RMs and Llama 3's ranking RM.

    python -m experiments.reward_model --config=experiments/configs/reward_model.py:tiny_helpful \
      --workdir=DIR [--config.init_from=LM_WORKDIR_OR_HF_DIR]

Config -> `llama_jax.steps.reward_model.build` (the reward model: an LM's trunk from
`init_from` with a fresh head, or a fresh tiny one) -> `llama_jax.training.trainer.fit` over
the ranking pipelines -> the workdir's files: DIR/metrics.jsonl (eval/accuracy/<rating> is
the per-bucket table), DIR/metrics.png, DIR/reward_scores.png (score histograms of the last
evaluation), TensorBoard events and Orbax checkpoints of `{"lm", "head"}` parameters under
DIR/checkpoints/ (`llama_jax.checkpoint.workdirs.load_reward_model` reads them); a rerun
resumes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections

from experiments import data_sources, models, runs, sections
from llama_jax.data import ranking
from llama_jax.model import reward_model
from llama_jax.parallel import aot
from llama_jax.steps import common as step_lib
from llama_jax.steps import reward_model as rm_steps
from llama_jax.training import metrics as metrics_lib
from llama_jax.training.trainer import fit

log = logging.getLogger(__name__)

SCORES_PLOT = "reward_scores.png"


def make_eval_fn(
  batches_fn, trainer: rm_steps.RewardModelTrainer, workdir: str, plot: bool = True
):
  """`state -> metrics` over one pass of the evaluation split; also draws the histograms
  (with `plot`)."""

  def evaluate(state) -> dict[str, float]:
    with batches_fn() as batches:
      rows = trainer.evaluate(state.params, batches)
    metrics = trainer.eval_metrics(rows)
    if plot and jax.process_index() == 0:
      metrics_lib.plot_score_distribution(Path(workdir) / SCORES_PLOT, rows)
    log.info("Evaluation:\n%s", rm_steps.bucket_table(metrics))
    return metrics

  return evaluate


def build(
  cfg: ml_collections.ConfigDict, model_cfg, mesh, num_steps: int
) -> rm_steps.RewardModelTrainer:
  """`cfg`'s reward-model training on `mesh` (`steps.reward_model.build`): what `run` trains
  and `programs` compiles."""
  return rm_steps.build(
    reward_model.RewardModel(model_cfg, lora=sections.lora_config(cfg)),
    mesh,
    sections.from_section(rm_steps.RankingConfig, cfg.ranking),
    sections.train_optimizer_config(cfg, num_steps),
    grad_accum_steps=cfg.train.grad_accum_steps,
    max_responses=ranking.MAX_RESPONSES if cfg.data.use_edited else 2,
  )


def model_config(model_cfg):
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
  model_cfg = model_config(sections.model_config(cfg))
  models.check_fits(model_cfg, cfg, None, mesh)
  trainer = build(cfg, model_cfg, mesh, 1000)
  b, t = cfg.data.batch_size, cfg.data.seq_len
  batch = aot.rows(step_lib.batch_sharding(mesh), b, t, ("tokens", "segment_ids", "response_ids"),
                   ("rating", "concern", "valid"))  # fmt: skip
  flops = reward_model.flops_per_token(model_cfg, t) * b * t
  return aot.train_and_eval(
    trainer.train_step, trainer.eval_step, trainer.abstract_state(), batch, flops,
    f"{b} rows × {t}",
  )  # fmt: skip


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) the reward model in `workdir`; returns the final eval metrics."""
  start = runs.start_run(cfg, workdir, "reward_model", model_config=model_config)
  model_cfg, mesh, tokenizer = start.model_config, start.mesh, start.tokenizer
  train_records = data_sources.load_preference_records(
    cfg.data, cfg.data.train_split, cfg.data.train_ratings
  )
  num_steps = cfg.train.num_steps or cfg.train.epochs * math.ceil(
    len(train_records) / cfg.data.batch_size
  )
  trainer = build(cfg, model_cfg, mesh, num_steps)
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
      lambda: pipeline(eval_records, evaluation=True), trainer, workdir, cfg.train.plot
    )
  log.info(
    "Reward model: %s parameters on mesh %s, %d steps",
    f"{reward_model.num_params(model_cfg):,}",
    dict(mesh.shape),
    num_steps,
  )

  head_rng, state_rng = jax.random.split(jax.random.PRNGKey(cfg.train.seed))
  params = None
  if start.params is not None:  # the LM's trunk and a fresh head
    params = reward_model.from_lm_params(model_cfg, start.params, head_rng, mesh)
  del start  # the LM head is no longer referenced
  train = cfg.train.to_dict() | {"num_steps": num_steps}
  results: dict[str, Any] = {}

  def final_eval(state):
    results.update(eval_fn(state))
    return results

  with pipeline(train_records) as train_iter:
    state = fit(
      init_state=lambda: trainer.init_state(params, state_rng),
      abstract_state=trainer.abstract_state(),
      train_step=trainer.train_step,
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


if __name__ == "__main__":
  runs.launch(run)
