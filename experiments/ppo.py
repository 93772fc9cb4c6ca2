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

import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags
from jax.sharding import NamedSharding, PartitionSpec

from experiments import models, online_rl, runs, sections
from llama_jax.checkpoint import workdirs
from llama_jax.model import reward_model
from llama_jax.parallel import aot, sharding
from llama_jax.rl import online
from llama_jax.steps import common as step_lib
from llama_jax.steps import ppo as ppo_steps
from llama_jax.training import train_state as ts

log = logging.getLogger(__name__)

PLOT_PANELS = (*online.PLOT_PANELS, ("loss/value", "value/explained_variance"))


def ppo_config(cfg: ml_collections.ConfigDict) -> ppo_steps.PPOConfig:
  """The `ppo` section (with the train settings it depends on)."""
  chunk = cfg.train.loss_chunk_size
  return sections.from_section(ppo_steps.PPOConfig, cfg.ppo, loss_chunk_size=chunk)


def load_value_model(cfg: ml_collections.ConfigDict, policy: online_rl.Policy):
  """`(value_config, params)` of the reward-model workdir `value.init_from`, or the policy's
  config and None (`online.PPO.init_state` then starts from the policy's trunk)."""
  if cfg.value.init_from:
    return workdirs.load_model(cfg.value.init_from, policy.mesh, kind="reward_model")
  return policy.config, None


def build_steps(cfg: ml_collections.ConfigDict, model_cfg, value_cfg, mesh) -> online.PPO:
  """The optimizers and jitted functions of `cfg` on `mesh` as an `online.PPO`: what `run`
  trains with and `programs` compiles ahead of time."""
  ppo = ppo_config(cfg)
  num_updates = cfg.train.num_steps * cfg.train.num_minibatches
  policy_opt = ts.make_optimizer(
    sections.optimizer_config(cfg.optimizer, num_updates), trainable=models.trainable(cfg)
  )
  value_opt = ts.make_optimizer(sections.optimizer_config(cfg.value.optimizer, num_updates))
  model = models.build_model(cfg, model_cfg)  # the policy (LoRA adapters if configured)
  policy_sh = ts.state_shardings(model, policy_opt, mesh)
  ref_sh = sharding.param_shardings(model_cfg, mesh)  # the reference: plain weights
  value_sh = ts.state_shardings(reward_model.RewardModel(value_cfg), value_opt, mesh)
  accum = cfg.train.grad_accum_steps
  rows, rep = step_lib.batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
  score_fn = jax.jit(
    ppo_steps.make_score_fn(model, value_cfg, ppo, mesh=mesh),
    in_shardings=(policy_sh.params, ref_sh, value_sh.params, rows, rows, rep),
    out_shardings=(rows, rep),
  )
  return online.PPO(
    model=model,
    value_config=value_cfg,
    policy_opt=policy_opt,
    value_opt=value_opt,
    mesh=mesh,
    score_fn=score_fn,
    policy_step=step_lib.jit_train_step(
      ppo_steps.make_policy_step(model, policy_opt, ppo, mesh=mesh, grad_accum_steps=accum),
      policy_sh, mesh,
    ),
    value_step=step_lib.jit_train_step(
      ppo_steps.make_value_step(value_cfg, value_opt, ppo, mesh=mesh, grad_accum_steps=accum),
      value_sh, mesh,
    ),
    kl_coef=ppo.kl_coef,
    kl_target=ppo.kl_target,
    kl_horizon=ppo.kl_horizon,
  )  # fmt: skip


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """One iteration's compiled functions with abstract arguments (`experiments.compile_check`):
  sampling, reward models, scoring (policy, reference and value passes), both updates. The
  value model is assumed to have the policy's architecture (Llama 2: the helpfulness RM)."""
  sections.check_config(cfg, sections.reference_config("ppo"))
  model_cfg = sections.model_config(cfg)
  online_rl.check_minibatches(cfg, mesh, cfg.generation.num_samples)
  sharding.check_fits_mesh(model_cfg, mesh)
  algorithm = build_steps(cfg, model_cfg, model_cfg, mesh)
  state = algorithm.abstract_state()
  ref = sharding.abstract_sharded_params(model_cfg, mesh)
  out, num_rows, t, rms = online_rl.rollout_programs(
    cfg, model_cfg, mesh, assumed, cfg.generation.num_samples, resident=(state, ref)
  )
  rows_sh = step_lib.batch_sharding(mesh)
  float_fields = ("old_logp", "advantages", "old_values", "returns")
  rows = aot.rows(rows_sh, num_rows, t, step_lib.ROW_FIELDS)
  scores = jax.ShapeDtypeStruct((num_rows,), np.float32, sharding=rows_sh)
  kl_coef = state.kl_coef
  mb = num_rows // cfg.train.num_minibatches
  minibatch = aot.rows(rows_sh, mb, t, (*step_lib.ROW_FIELDS, *float_fields),
                       dtypes=dict.fromkeys(float_fields, np.float32))  # fmt: skip
  forward = model_cfg.flops_per_token(t) / 3 * t
  note = f"{mb} rows × {t}"
  return out + [
    aot.Program("score", algorithm.score_fn, (state.policy.params, ref, state.value.params,
                rows, scores, kl_coef), 3 * forward * num_rows,
                resident=(state.policy.opt_state, state.value.opt_state, rms),
                note=f"{num_rows} rows × {t}"),
    aot.Program("policy_step", algorithm.policy_step, (state.policy, minibatch),
                3 * forward * mb, resident=(state.value, ref, rms), note=note),
    aot.Program("value_step", algorithm.value_step, (state.value, minibatch), 3 * forward * mb,
                resident=(state.policy, ref, rms), note=note),
  ]  # fmt: skip


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) PPO in `workdir`; returns start vs end means of the iteration metrics."""
  sections.check_config(cfg, sections.reference_config("ppo"))
  policy = online_rl.load_policy(cfg, cfg.generation.num_samples)
  runs.write_run_files(workdir, cfg, policy.config)
  value_cfg, value_params = load_value_model(cfg, policy)
  algorithm = build_steps(cfg, policy.config, value_cfg, policy.mesh)
  key = jax.random.PRNGKey(cfg.train.seed)
  return online_rl.train(
    cfg, workdir, algorithm, lambda: algorithm.init_state(policy.params, key, value_params),
    policy, num_samples=cfg.generation.num_samples,
    meta={"model": policy.config.to_dict(), "ppo": cfg.ppo.to_dict()},
    no_eos_penalty=cfg.ppo.no_eos_penalty, plot_panels=PLOT_PANELS,
  )  # fmt: skip


def main(argv):
  del argv
  runs.setup_logging()
  with runs.one_line_errors():
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  runs.define_flags()
  app.run(main)
