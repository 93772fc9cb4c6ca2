"""PPO with a KL penalty (Llama 2 section 3.2.3): policy, frozen reference, value model, reward.

    python -m experiments.ppo --config=experiments/configs/ppo.py:tiny --workdir=DIR \
      --config.init_from=SFT_WORKDIR [--config.value.init_from=RM_WORKDIR] \
      [--config.reward.kind=llama2 --config.reward.helpful=RM_H --config.reward.safety=RM_S]

The policy and the reference start from `init_from`; the value model from `value.init_from`
(a reward-model workdir, as Llama 2) or, if empty, the policy's trunk with a fresh head. Each
iteration samples one response per prompt, scores it (`reward`), computes per-token KL
penalties, GAE advantages and returns, and takes `train.num_minibatches` policy and value
steps. Writes DIR/metrics.jsonl (reward, objective/kl, entropy, clip fraction, approx KL,
value loss, explained variance, response length, EOS rate, time split), metrics.png,
TensorBoard events and checkpoints of both models; a rerun resumes.
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

from experiments import common
from experiments.grpo import (
  check_minibatches,
  load_policy_and_reference,
  prompt_iterator,
  rollout_programs,
  sampler,
)
from experiments.rejection_sampling import build_scorer
from llama_jax import aot, online, reward_model, rollouts, sharding, workdirs
from llama_jax import train_state as ts
from llama_jax.steps import common as step_lib
from llama_jax.steps import ppo as ppo_steps

log = logging.getLogger(__name__)

PLOT_PANELS = (*online.PLOT_PANELS, ("loss/value", "value/explained_variance"))


def value_params(cfg, model_cfg, policy_params, mesh):
  """`(value_config, params)`: a reward-model workdir's, or the policy trunk + a fresh head."""
  if cfg.value.init_from:
    return workdirs.load_model(cfg.value.init_from, mesh, kind="reward_model")
  rng = jax.random.PRNGKey(cfg.train.seed + 1)
  trunk = jax.tree.map(lambda x: x.copy(), policy_params)  # own buffers: updates donate them
  return model_cfg, reward_model.from_lm_params(model_cfg, trunk, rng, mesh)


@dataclasses.dataclass(frozen=True)
class PPOSteps:
  """The compiled functions of a PPO run (`build_steps`)."""

  ppo: ppo_steps.PPOConfig
  policy_opt: optax.GradientTransformation
  value_opt: optax.GradientTransformation
  abstract_state: online.PPOState
  score_fn: Any  # jitted (policy, reference, value params, rows, scores, β) -> (out, metrics)
  policy_step: Any  # jitted (policy state, minibatch) -> (state, metrics)
  value_step: Any  # jitted (value state, minibatch) -> (state, metrics)


def build_steps(cfg: ml_collections.ConfigDict, model_cfg, value_cfg, mesh) -> PPOSteps:
  """The optimizers and jitted functions of `cfg` on `mesh`: what `run` trains with and
  `programs` compiles ahead of time."""
  ppo = common.from_section(ppo_steps.PPOConfig, cfg.ppo, loss_chunk_size=cfg.train.loss_chunk_size)
  num_updates = cfg.train.num_steps * cfg.train.num_minibatches
  policy_opt = ts.make_optimizer(common.optimizer_config(cfg.optimizer, num_updates))
  value_opt = ts.make_optimizer(common.optimizer_config(cfg.value.optimizer, num_updates))
  policy_sh = ts.state_shardings(model_cfg, policy_opt, mesh)
  value_sh = reward_model.state_shardings(value_cfg, value_opt, mesh)
  accum = cfg.train.grad_accum_steps
  rows, rep = step_lib.batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
  score_fn = jax.jit(
    ppo_steps.make_score_fn(model_cfg, value_cfg, ppo, mesh=mesh),
    in_shardings=(policy_sh.params, policy_sh.params, value_sh.params, rows, rows, rep),
    out_shardings=(rows, rep),
  )
  return PPOSteps(
    ppo=ppo,
    policy_opt=policy_opt,
    value_opt=value_opt,
    abstract_state=online.PPOState(
      policy=ts.abstract_train_state(model_cfg, policy_opt, mesh),
      value=reward_model.abstract_train_state(value_cfg, value_opt, mesh),
      kl_coef=jax.ShapeDtypeStruct((), jnp.float32, sharding=rep),
      step=jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
    ),
    score_fn=score_fn,
    policy_step=step_lib.jit_train_step(
      ppo_steps.make_policy_step(model_cfg, policy_opt, ppo, mesh=mesh, grad_accum_steps=accum),
      policy_sh, mesh,
    ),
    value_step=step_lib.jit_train_step(
      ppo_steps.make_value_step(value_cfg, value_opt, ppo, mesh=mesh, grad_accum_steps=accum),
      value_sh, mesh,
    ),
  )  # fmt: skip


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """One iteration's compiled functions with abstract arguments (`experiments.compile_check`):
  sampling, reward models, scoring (policy, reference and value passes), both updates. The
  value model is assumed to have the policy's architecture (Llama 2: the helpfulness RM)."""
  common.check_config(cfg, common.reference_config("ppo"))
  model_cfg = common.model_config(cfg)
  check_minibatches(cfg, mesh, cfg.generation.num_samples)
  sharding.check_fits_mesh(model_cfg, mesh)
  steps = build_steps(cfg, model_cfg, model_cfg, mesh)
  state = steps.abstract_state
  ref = sharding.abstract_sharded_params(model_cfg, mesh)
  out, num_rows, t, rms = rollout_programs(
    cfg, model_cfg, mesh, assumed, cfg.generation.num_samples, resident=(state, ref)
  )
  rows_sh = step_lib.batch_sharding(mesh)
  float_fields = ("old_logp", "advantages", "old_values", "returns")
  rows = aot.rows(rows_sh, num_rows, t, rollouts.ROW_FIELDS)
  scores = jax.ShapeDtypeStruct((num_rows,), np.float32, sharding=rows_sh)
  kl_coef = state.kl_coef
  mb = num_rows // cfg.train.num_minibatches
  minibatch = aot.rows(rows_sh, mb, t, (*rollouts.ROW_FIELDS, *float_fields),
                       dtypes=dict.fromkeys(float_fields, np.float32))  # fmt: skip
  forward = model_cfg.flops_per_token(t) / 3 * t
  note = f"{mb} rows × {t}"
  return out + [
    aot.Program("score", steps.score_fn, (state.policy.params, ref, state.value.params, rows,
                scores, kl_coef), 3 * forward * num_rows,
                resident=(state.policy.opt_state, state.value.opt_state, rms),
                note=f"{num_rows} rows × {t}"),
    aot.Program("policy_step", steps.policy_step, (state.policy, minibatch), 3 * forward * mb,
                resident=(state.value, ref, rms), note=note),
    aot.Program("value_step", steps.value_step, (state.value, minibatch), 3 * forward * mb,
                resident=(state.policy, ref, rms), note=note),
  ]  # fmt: skip


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) PPO in `workdir`; returns start vs end means of the iteration metrics."""
  common.check_config(cfg, common.reference_config("ppo"))
  tokenizer, mesh, model_cfg, params, ref_params = load_policy_and_reference(
    cfg, cfg.generation.num_samples
  )
  common.write_run_files(workdir, cfg, model_cfg)
  value_cfg, v_params = value_params(cfg, model_cfg, ref_params, mesh)
  steps = build_steps(cfg, model_cfg, value_cfg, mesh)
  ppo = steps.ppo
  iteration = online.make_iteration(
    online.PPO(steps.score_fn, steps.policy_step, steps.value_step, ppo.kl_target,
               ppo.kl_horizon),
    sampler(cfg, model_cfg, tokenizer, mesh, cfg.generation.num_samples),
    build_scorer(cfg.reward, tokenizer, mesh),
    ref_params,
    num_minibatches=cfg.train.num_minibatches,
    no_eos_penalty=ppo.no_eos_penalty,
    seed=cfg.train.seed,
  )  # fmt: skip

  def init_state():
    key = jax.random.PRNGKey(cfg.train.seed)
    return online.PPOState(
      policy=ts.init_train_state(model_cfg, steps.policy_opt, mesh, key, params=params),
      value=reward_model.init_train_state(value_cfg, steps.value_opt, mesh, key, params=v_params),
      kl_coef=jnp.float32(ppo.kl_coef),
      step=jnp.int32(0),
    )

  abstract = steps.abstract_state
  meta = {"model": model_cfg.to_dict(), "ppo": cfg.ppo.to_dict()}
  return online.train_online(
    iteration, init_state=init_state, abstract_state=abstract, prompts=prompt_iterator(cfg),
    workdir=workdir, loop=common.loop_config(cfg.train), meta=meta, plot_panels=PLOT_PANELS,
  )  # fmt: skip


def main(argv):
  del argv
  common.setup_logging()
  run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  common.define_flags()
  app.run(main)
