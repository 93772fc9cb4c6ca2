"""GRPO: K samples per prompt, group-normalized rewards, clipped ratio, k3 KL to the reference.

    python -m experiments.grpo --config=experiments/configs/grpo.py:tiny --workdir=DIR \
      --config.init_from=SFT_WORKDIR [--config.reward.kind=reward_model ...]

The policy and the reference start from `init_from`. Each iteration samples
`grpo.group_size` responses to `data.batch_size` prompts, scores them (`reward`: as in
`experiments.rejection_sampling`, default the bundled prompts' answer check) and takes
`train.num_minibatches` GRPO steps. Writes DIR/metrics.jsonl (reward, KL, clip fraction,
response length, EOS rate, time split), metrics.png, TensorBoard events and checkpoints; a
rerun resumes.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from experiments import common
from experiments import generate as generate_experiment
from experiments.rejection_sampling import build_scorer
from llama_jax import online, rollouts, sharding
from llama_jax import train_state as ts
from llama_jax.generation import GenerationConfig, SamplingConfig
from llama_jax.steps import common as step_lib
from llama_jax.steps import grpo as grpo_steps
from llama_jax.trainer import fit

log = logging.getLogger(__name__)

PLOT_PANELS = (
  ("reward/mean",),
  ("kl",),
  ("objective/entropy",),
  ("loss",),
  ("policy/clipfrac",),
  ("response/length",),
  ("response/eos_rate",),
  ("time/generation", "time/scoring", "time/training"),
)


def generation_config(cfg: ml_collections.ConfigDict, tokenizer, num_samples: int):
  g = cfg.generation
  return GenerationConfig(
    max_new_tokens=g.max_new_tokens,
    num_samples=num_samples,
    sampling=SamplingConfig(temperature=g.temperature, top_k=g.top_k, top_p=g.top_p),
    stop_ids=tokenizer.stop_ids,
    pad_id=tokenizer.pad_id,
    prompt_bucket=g.prompt_bucket,
  )


def load_policy_and_reference(cfg: ml_collections.ConfigDict, samples_per_prompt: int):
  """`(tokenizer, mesh, model_config, params, ref_params)`: the reference is a copy (the
  policy's arrays are donated to the first update). Checks that the model and the
  minibatches fit the mesh before anything compiles."""
  tokenizer, mesh, model_cfg, params = generate_experiment.load_policy(cfg)
  sharding.check_fits_mesh(model_cfg, mesh)
  rows = cfg.data.batch_size * samples_per_prompt
  if rows % cfg.train.num_minibatches:
    raise ValueError(
      f"data.batch_size × samples = {rows} rows do not split into "
      f"train.num_minibatches={cfg.train.num_minibatches}"
    )
  minibatch = rows // cfg.train.num_minibatches
  sharding.check_batch_fits_mesh(minibatch, mesh, "minibatch rows")
  sharding.check_batch_fits_mesh(
    minibatch // cfg.train.grad_accum_steps, mesh, "micro-batch rows (train.grad_accum_steps)"
  )
  return tokenizer, mesh, model_cfg, params, jax.tree.map(lambda x: x.copy(), params)


def prompt_iterator(cfg: ml_collections.ConfigDict) -> rollouts.PromptIterator:
  records = generate_experiment.prompt_records(cfg.data)
  return rollouts.PromptIterator(records, cfg.data.batch_size, seed=cfg.data.seed)


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) GRPO in `workdir`; returns the first and last iterations' metrics."""
  sharding.initialize_distributed()
  tokenizer, mesh, model_cfg, params, ref_params = load_policy_and_reference(
    cfg, cfg.grpo.group_size
  )
  common.write_run_files(workdir, cfg, model_cfg)
  grpo = common.from_section(
    grpo_steps.GRPOConfig, cfg.grpo, loss_chunk_size=cfg.train.loss_chunk_size
  )
  opt_cfg = common.optimizer_config(cfg.optimizer, cfg.train.num_steps * cfg.train.num_minibatches)
  optimizer = ts.make_optimizer(opt_cfg)
  shardings = ts.state_shardings(model_cfg, optimizer, mesh)
  logps_fn = step_lib.jit_eval_step(
    grpo_steps.make_logps_fn(model_cfg, grpo.loss_chunk_size, mesh=mesh), shardings.params, mesh
  )
  train_step = step_lib.jit_train_step(
    grpo_steps.make_train_step(
      model_cfg, optimizer, grpo, mesh=mesh, grad_accum_steps=cfg.train.grad_accum_steps
    ),
    shardings,
    mesh,
  )
  iteration = online.grpo_iteration(
    policy_config=model_cfg,
    tokenizer=tokenizer,
    gen=generation_config(cfg, tokenizer, grpo.group_size),
    reward_fn=build_scorer(cfg.reward, tokenizer, mesh),
    ref_params=ref_params,
    logps_fn=logps_fn,
    train_step=train_step,
    num_minibatches=cfg.train.num_minibatches,
    scale=grpo.scale,
    use_reference=grpo.beta > 0,
    chat=cfg.chat,
    mesh=mesh,
    seed=cfg.train.seed,
  )

  def init_state():
    key = jax.random.PRNGKey(cfg.train.seed)
    policy = ts.init_train_state(model_cfg, optimizer, mesh, key, params=params)
    return online.GRPOState(policy=policy, step=jnp.int32(0))

  abstract = online.GRPOState(
    policy=ts.abstract_train_state(model_cfg, optimizer, mesh),
    step=jax.ShapeDtypeStruct((), jnp.int32, sharding=shardings.step),
  )
  meta = {"model": model_cfg.to_dict(), "grpo": cfg.grpo.to_dict()}
  return train_online(cfg, workdir, iteration, init_state, abstract, meta, PLOT_PANELS)


def train_online(cfg, workdir, iteration, init_state, abstract_state, meta, plot_panels):
  """Runs `iteration` under `llama_jax.trainer.fit` over the configured prompts; returns
  `summarize` of this run's iterations."""
  history: list[dict[str, float]] = []

  def logged(state, batch):
    state, metrics = iteration(state, batch)
    history.append(metrics)
    return state, metrics

  fit(
    init_state=init_state,
    abstract_state=abstract_state,
    train_step=logged,
    train_iter=prompt_iterator(cfg),
    workdir=workdir,
    loop=common.loop_config(cfg.train),
    meta=meta,
    plot_panels=plot_panels,
  )
  return summarize(history)


def summarize(history: list[dict[str, float]], window: int = 3) -> dict[str, Any]:
  """Means of the first and the last `window` iterations of this run (start vs end)."""
  if not history:
    return {}

  def mean(rows):
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}

  return {
    "start": mean(history[:window]),
    "end": mean(history[-window:]),
    "iterations": len(history),
  }


def main(argv):
  del argv
  common.setup_logging()
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  common.define_flags()
  app.run(main)
