"""PPO with a KL penalty (Llama 2 section 3.2.3): policy, frozen reference, value model, reward.

    python -m experiments.ppo --config=experiments/configs/ppo.py:tiny --workdir=DIR \
      --config.init_from=SFT_WORKDIR [--config.value.init_from=RM_WORKDIR] \
      [--config.scorer.kind=llama2 --config.scorer.helpful=RM_H --config.scorer.safety=RM_S]

The policy and the reference start from `init_from`; the value model from `value.init_from`
(a reward-model workdir, as Llama 2) or, if empty, the policy's trunk with a fresh head. Each
iteration samples one response per prompt, scores it (`scorer`), computes per-token KL
penalties, GAE advantages and returns, and takes `train.num_minibatches` policy and value
steps (the algorithm `llama_jax.rl.ppo.build` makes). Writes DIR/metrics.jsonl (reward,
objective/kl, entropy, clip fraction, approx KL, value loss, explained variance, response
length, EOS rate, time split), metrics.png, TensorBoard events and checkpoints of both
models; a rerun resumes.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import models, online_rl, runs, sections
from llama_jax.checkpoint import workdirs
from llama_jax.parallel import aot, sharding
from llama_jax.rl import online, ppo
from llama_jax.rl.policy import Policy
from llama_jax.steps import common as step_lib

log = logging.getLogger(__name__)

PLOT_PANELS = (*online.PLOT_PANELS, ("loss/value", "value/explained_variance"))


def ppo_config(cfg: ml_collections.ConfigDict) -> ppo.PPOConfig:
  """The `ppo` section (with the train settings it depends on)."""
  chunk = cfg.train.loss_chunk_size
  return sections.from_section(ppo.PPOConfig, cfg.ppo, loss_chunk_size=chunk)


def load_value_model(cfg: ml_collections.ConfigDict, policy: Policy):
  """`(value_config, params)` of the reward-model workdir `value.init_from`, or the policy's
  config and None (`rl.ppo.PPO.init_state` then starts from the policy's trunk)."""
  if cfg.value.init_from:
    return workdirs.load_model(cfg.value.init_from, policy.mesh, kind="reward_model")
  return policy.config, None


def build(cfg: ml_collections.ConfigDict, model_cfg, value_cfg, mesh) -> ppo.PPO:
  """`llama_jax.rl.ppo.build` of `cfg` on `mesh`: what `run` trains with and `programs`
  compiles ahead of time."""
  model = models.build_model(cfg, model_cfg)  # the policy (LoRA adapters if configured)
  return ppo.build(
    model, mesh, ppo_config(cfg), online_rl.optimizer_config(cfg, cfg.optimizer),
    value_config=value_cfg, value_optimizer=online_rl.optimizer_config(cfg, cfg.value.optimizer),
    **online_rl.run_shape(cfg),
  )  # fmt: skip


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """One iteration's compiled functions with abstract arguments (`experiments.compile_check`):
  sampling, reward models, the advantage pass (policy, reference and value passes), both
  updates. The value model is assumed to have the policy's architecture (Llama 2: the
  helpfulness RM)."""
  sections.check_config(cfg, sections.reference_config("ppo"))
  model_cfg = sections.model_config(cfg)
  online_rl.check_minibatches(cfg, mesh, cfg.generation.num_samples)
  sharding.check_fits_mesh(model_cfg, mesh)
  algorithm = build(cfg, model_cfg, model_cfg, mesh)
  state = algorithm.abstract_state()
  ref = sharding.abstract_sharded_params(model_cfg, mesh)
  out, num_rows, t, rms = online_rl.rollout_programs(
    cfg, model_cfg, mesh, assumed, cfg.generation.num_samples, resident=(state, ref)
  )
  rows_sh = step_lib.batch_sharding(mesh)
  float_fields = ("old_logp", "advantages", "old_values", "returns")
  rows = aot.rows(rows_sh, num_rows, t, step_lib.ROW_FIELDS)
  rewards = jax.ShapeDtypeStruct((num_rows,), np.float32, sharding=rows_sh)
  kl_coef = state.kl_coef
  mb = num_rows // cfg.train.num_minibatches
  minibatch = aot.rows(rows_sh, mb, t, (*step_lib.ROW_FIELDS, *float_fields),
                       dtypes=dict.fromkeys(float_fields, np.float32))  # fmt: skip
  forward = model_cfg.flops_per_token(t) / 3 * t
  note = f"{mb} rows × {t}"
  # "logps": the policy's, the reference's and the value model's passes and the advantages.
  return out + [
    aot.Program("logps", algorithm.advantage_fn, (state.policy.params, ref, state.value.params,
                rows, rewards, kl_coef), 3 * forward * num_rows,
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
  policy = online_rl.start(cfg, workdir, "ppo", cfg.generation.num_samples)
  value_cfg, value_params = load_value_model(cfg, policy)
  algorithm = build(cfg, policy.config, value_cfg, policy.mesh)
  key = jax.random.PRNGKey(cfg.train.seed)
  return online_rl.train(
    cfg, workdir, algorithm, lambda: algorithm.init_state(policy.params, key, value_params),
    policy, num_samples=cfg.generation.num_samples,
    meta={"model": policy.config.to_dict(), "ppo": cfg.ppo.to_dict()},
    no_eos_penalty=algorithm.config.no_eos_penalty, plot_panels=PLOT_PANELS,
  )  # fmt: skip


if __name__ == "__main__":
  runs.launch(run)
