"""Critic-free online RL: GRPO, Dr. GRPO, RLOO, REINFORCE++ (`grpo.advantage`, `grpo.scale`,
`grpo.aggregation`; see `llama_jax.steps.grpo.GRPOConfig`).

    python -m experiments.grpo --config=experiments/configs/grpo.py:tiny --workdir=DIR \
      --config.init_from=SFT_WORKDIR [--config.reward.kind=reward_model ...]
    ... --config=experiments/configs/grpo.py:tiny_rloo (or tiny_reinforce_pp, tiny_dr_grpo)

The policy and the reference start from `init_from`. Each iteration samples
`grpo.group_size` responses to `data.batch_size` prompts, scores them (`reward`: as in
`experiments.rejection_sampling`, default the bundled prompts' answer check) and takes
`train.num_minibatches` updates (`llama_jax.online.make_iteration`). Writes
DIR/metrics.jsonl (reward, objective/kl, clip fraction, entropy, response length, EOS rate,
time split), metrics.png, TensorBoard events and checkpoints; a rerun resumes.
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
from jax.sharding import NamedSharding, PartitionSpec

from experiments import common, rejection_sampling
from experiments import generate as generate_experiment
from llama_jax import aot, online, rollouts, sharding
from llama_jax import train_state as ts
from llama_jax.steps import common as step_lib
from llama_jax.steps import grpo as grpo_steps

log = logging.getLogger(__name__)


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
  score_fn: Any  # jitted (params, ref params, rows, scores) -> (out, metrics)
  train_step: Any  # jitted (state, minibatch) -> (state, metrics)


def build_steps(cfg: ml_collections.ConfigDict, model_cfg, mesh) -> GRPOSteps:
  """The optimizer and jitted functions of `cfg` on `mesh`: what `run` trains with and
  `programs` compiles ahead of time."""
  grpo = common.from_section(
    grpo_steps.GRPOConfig, cfg.grpo, loss_chunk_size=cfg.train.loss_chunk_size,
    max_length=cfg.generation.max_new_tokens,
  )  # fmt: skip
  opt_cfg = common.optimizer_config(cfg.optimizer, cfg.train.num_steps * cfg.train.num_minibatches)
  optimizer = ts.make_optimizer(opt_cfg)
  shardings = ts.state_shardings(model_cfg, optimizer, mesh)
  step = grpo_steps.make_train_step(
    model_cfg, optimizer, grpo, mesh=mesh, grad_accum_steps=cfg.train.grad_accum_steps
  )
  score = grpo_steps.make_score_fn(
    model_cfg, grpo, mesh=mesh, micro_batches=cfg.train.num_minibatches
  )
  rows, rep = step_lib.batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
  return GRPOSteps(
    grpo=grpo,
    optimizer=optimizer,
    shardings=shardings,
    abstract_state=ts.abstract_train_state(model_cfg, optimizer, mesh),
    score_fn=jax.jit(
      score, in_shardings=(shardings.params, shardings.params, rows, rows),
      out_shardings=(rows, rep),
    ),
    train_step=step_lib.jit_train_step(step, shardings, mesh),
  )  # fmt: skip


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
  common.check_config(cfg, common.reference_config("grpo"))
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
  scores = jax.ShapeDtypeStruct((num_rows,), np.float32, sharding=rows_sh)
  mb = num_rows // cfg.train.num_minibatches
  minibatch = aot.rows(
    rows_sh,
    mb,
    t,
    grpo_steps.FIELDS,
    dtypes={k: np.float32 for k in ("old_logp", "ref_logp", "advantages")},
  )
  forward = model_cfg.flops_per_token(t) / 3 * t
  passes = 2 if steps.grpo.uses_reference else 1
  # "logps": the policy's and the reference's log-prob passes and the advantages.
  return out + [
    aot.Program("logps", steps.score_fn, (state.params, ref, rows, scores),
                passes * forward * num_rows, resident=(state.opt_state, rms),
                note=f"{num_rows} rows × {t}"),
    aot.Program("train_step", steps.train_step, (state, minibatch), 3 * forward * mb,
                resident=(ref, rms), note=f"{mb} rows × {t}"),
  ]  # fmt: skip


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the critic-free algorithm of `cfg.grpo` in `workdir`; returns the first
  and last iterations' metrics (`online.summarize`)."""
  sharding.initialize_distributed()
  common.check_config(cfg, common.reference_config("grpo"))
  tokenizer, mesh, model_cfg, params, ref_params = load_policy_and_reference(
    cfg, cfg.grpo.group_size
  )
  common.write_run_files(workdir, cfg, model_cfg)
  steps = build_steps(cfg, model_cfg, mesh)
  iteration = online.make_iteration(
    online.GRPO(steps.score_fn, steps.train_step),
    sampler(cfg, model_cfg, tokenizer, mesh, steps.grpo.group_size),
    rejection_sampling.build_scorer(cfg.reward, tokenizer, mesh),
    ref_params,
    num_minibatches=cfg.train.num_minibatches,
    seed=cfg.train.seed,
  )

  def init_state():
    key = jax.random.PRNGKey(cfg.train.seed)
    policy = ts.init_train_state(model_cfg, steps.optimizer, mesh, key, params=params)
    return online.PolicyState(policy=policy, step=jnp.int32(0))

  abstract = online.PolicyState(
    policy=steps.abstract_state,
    step=jax.ShapeDtypeStruct((), jnp.int32, sharding=steps.shardings.step),
  )
  meta = {"model": model_cfg.to_dict(), "grpo": cfg.grpo.to_dict()}
  return online.train_online(
    iteration, init_state=init_state, abstract_state=abstract, prompts=prompt_iterator(cfg),
    workdir=workdir, loop=common.loop_config(cfg.train), meta=meta,
  )  # fmt: skip


def sampler(cfg: ml_collections.ConfigDict, model_cfg, tokenizer, mesh, num_samples: int):
  """The configured rollout sampler (`online.Sampler`)."""
  gen = generation_config(cfg, tokenizer, num_samples)
  return online.Sampler(model_cfg, tokenizer, gen, chat=cfg.chat, mesh=mesh)


def main(argv):
  del argv
  common.setup_logging()
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  common.define_flags()
  app.run(main)
