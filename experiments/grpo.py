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

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags

from experiments import common, rejection_sampling
from experiments import generate as generate_experiment
from llama_jax import aot, online, rollouts, sharding
from llama_jax import train_state as ts
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
  return generate_experiment.generation_config(
    cfg, tokenizer.stop_ids, tokenizer.pad_id, num_samples
  )


def load_policy_and_reference(cfg: ml_collections.ConfigDict, samples_per_prompt: int):
  """`(tokenizer, mesh, model_config, params, ref_params)`: the reference is a copy (the
  policy's arrays are donated to the first update). Checks that the model and the
  minibatches fit the mesh before anything compiles."""
  tokenizer, mesh, model_cfg, params = generate_experiment.load_policy(cfg)
  sharding.check_fits_mesh(model_cfg, mesh)
  check_minibatches(cfg, mesh, samples_per_prompt)
  return tokenizer, mesh, model_cfg, params, jax.tree.map(lambda x: x.copy(), params)


def check_minibatches(cfg: ml_collections.ConfigDict, mesh, samples_per_prompt: int) -> None:
  """The rollout rows must split into minibatches and micro-batches that divide the mesh."""
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


def prompt_iterator(cfg: ml_collections.ConfigDict) -> rollouts.PromptIterator:
  records = generate_experiment.prompt_records(cfg.data)
  return rollouts.PromptIterator(records, cfg.data.batch_size, seed=cfg.data.seed)


@dataclasses.dataclass(frozen=True)
class GRPOSteps:
  """The compiled functions of a GRPO run (`build_steps`)."""

  grpo: grpo_steps.GRPOConfig
  optimizer: optax.GradientTransformation
  shardings: ts.TrainState
  abstract_state: ts.TrainState
  logps_fn: Any  # jitted (params, rows) -> (logp, entropy), policy or reference
  train_step: Any  # jitted (state, minibatch) -> (state, metrics)


def build_steps(cfg: ml_collections.ConfigDict, model_cfg, mesh) -> GRPOSteps:
  """The optimizer and jitted functions of `cfg` on `mesh`: what `run` trains with and
  `programs` compiles ahead of time."""
  grpo = common.from_section(
    grpo_steps.GRPOConfig, cfg.grpo, loss_chunk_size=cfg.train.loss_chunk_size
  )
  opt_cfg = common.optimizer_config(cfg.optimizer, cfg.train.num_steps * cfg.train.num_minibatches)
  optimizer = ts.make_optimizer(opt_cfg)
  shardings = ts.state_shardings(model_cfg, optimizer, mesh)
  step = grpo_steps.make_train_step(
    model_cfg, optimizer, grpo, mesh=mesh, grad_accum_steps=cfg.train.grad_accum_steps
  )
  logps = grpo_steps.make_logps_fn(
    model_cfg, grpo.loss_chunk_size, mesh=mesh, micro_batches=cfg.train.num_minibatches
  )
  return GRPOSteps(
    grpo=grpo,
    optimizer=optimizer,
    shardings=shardings,
    abstract_state=ts.abstract_train_state(model_cfg, optimizer, mesh),
    logps_fn=step_lib.jit_eval_step(logps, shardings.params, mesh),
    train_step=step_lib.jit_train_step(step, shardings, mesh),
  )


def rollout_programs(cfg, model_cfg, mesh, assumed: aot.Assumed, num_samples: int, resident):
  """Sampling `num_samples` responses to each of `data.batch_size` prompts and scoring them
  with the `reward` section's models (PPO and GRPO); returns `(programs, rows, seq_len,
  reward-model params)`."""
  gen = generate_experiment.check_generation_config(cfg, model_cfg, num_samples)
  rms = rejection_sampling.reward_model_params(cfg.reward, model_cfg, mesh)
  seq_len = rollouts.row_length([[0] * assumed.prompt_len], gen.max_new_tokens, 64)
  generate = generate_experiment.generation_program(
    model_cfg, gen, cfg.data.batch_size, assumed.prompt_len, mesh, resident=(resident, rms)
  )
  scoring = rejection_sampling.scorer_programs(cfg.reward, model_cfg, mesh, seq_len, resident)
  return [generate, *scoring], cfg.data.batch_size * num_samples, seq_len, rms


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """One iteration's compiled functions with abstract arguments (`experiments.compile_check`):
  sampling, reward models, the policy's and the reference's log-probs, the update."""
  model_cfg = common.model_config(cfg)
  check_minibatches(cfg, mesh, cfg.grpo.group_size)
  sharding.check_fits_mesh(model_cfg, mesh)
  steps = build_steps(cfg, model_cfg, mesh)
  state = steps.abstract_state
  ref = sharding.abstract_sharded_params(model_cfg, mesh)
  out, num_rows, t, rms = rollout_programs(
    cfg, model_cfg, mesh, assumed, cfg.grpo.group_size, resident=(state, ref)
  )
  rows_sh = step_lib.batch_sharding(mesh)
  rows = aot.rows(rows_sh, num_rows, t, rollouts.ROW_FIELDS)
  minibatch = aot.rows(rows_sh, num_rows // cfg.train.num_minibatches, t, grpo_steps.FIELDS,
                       dtypes={k: np.float32 for k in ("old_logp", "ref_logp", "advantages")})
  minibatch["advantages"] = jax.ShapeDtypeStruct(
    minibatch["advantages"].shape[:1], np.float32, sharding=rows_sh
  )  # one advantage per response
  forward = model_cfg.flops_per_token(t) / 3 * t
  return out + [
    aot.Program("logps", steps.logps_fn, (state.params, rows), forward * num_rows,
                resident=(state.opt_state, ref, rms), note=f"{num_rows} rows × {t}"),
    aot.Program("train_step", steps.train_step, (state, minibatch),
                3 * forward * num_rows // cfg.train.num_minibatches, resident=(ref, rms),
                note=f"{num_rows // cfg.train.num_minibatches} rows × {t}"),
  ]  # fmt: skip


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) GRPO in `workdir`; returns the first and last iterations' metrics."""
  sharding.initialize_distributed()
  tokenizer, mesh, model_cfg, params, ref_params = load_policy_and_reference(
    cfg, cfg.grpo.group_size
  )
  common.write_run_files(workdir, cfg, model_cfg)
  steps = build_steps(cfg, model_cfg, mesh)
  grpo, optimizer, shardings = steps.grpo, steps.optimizer, steps.shardings
  iteration = online.grpo_iteration(
    policy_config=model_cfg,
    tokenizer=tokenizer,
    gen=generation_config(cfg, tokenizer, grpo.group_size),
    reward_fn=rejection_sampling.build_scorer(cfg.reward, tokenizer, mesh),
    ref_params=ref_params,
    logps_fn=steps.logps_fn,
    train_step=steps.train_step,
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
    policy=steps.abstract_state,
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
