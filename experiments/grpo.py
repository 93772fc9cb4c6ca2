"""Critic-free online RL: GRPO, Dr. GRPO, RLOO, REINFORCE++ (`grpo.advantage`, `grpo.scale`,
`grpo.aggregation`; see `llama_jax.steps.grpo.GRPOConfig`).

    python -m experiments.grpo --config=experiments/configs/grpo.py:tiny --workdir=DIR \
      --config.init_from=SFT_WORKDIR [--config.scorer.kind=reward_model ...]
    ... --config=experiments/configs/grpo.py:tiny_rloo (or tiny_reinforce_pp, tiny_dr_grpo)

The policy and the reference start from `init_from`. Each iteration samples
`grpo.group_size` responses to `data.batch_size` prompts, scores them (the `scorer` section:
`llama_jax.rl.scorers.scorer_from_section`, default the bundled prompts' answer check) and
takes `train.num_minibatches` updates (`llama_jax.rl.online.make_iteration`) of the algorithm
`llama_jax.rl.grpo.build` makes. Writes
DIR/metrics.jsonl (reward, objective/kl, clip fraction, entropy, response length, EOS rate,
time split), metrics.png, TensorBoard events and checkpoints; a rerun resumes.
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import models, online_rl, runs, sections
from llama_jax.parallel import aot, sharding
from llama_jax.rl import grpo
from llama_jax.steps import common as step_lib
from llama_jax.steps import grpo as grpo_steps

log = logging.getLogger(__name__)


def grpo_config(cfg: ml_collections.ConfigDict) -> grpo.GRPOConfig:
  """The `grpo` section (with the train and generation settings it depends on)."""
  return sections.from_section(
    grpo.GRPOConfig, cfg.grpo, loss_chunk_size=cfg.train.loss_chunk_size,
    max_length=cfg.generation.max_new_tokens,
  )  # fmt: skip


def build(cfg: ml_collections.ConfigDict, model_cfg, mesh) -> grpo.GRPO:
  """`llama_jax.rl.grpo.build` of `cfg` on `mesh`: what `run` trains with and `programs`
  compiles ahead of time."""
  model = models.build_model(cfg, model_cfg)  # the policy (LoRA adapters if configured)
  optimizer = online_rl.optimizer_config(cfg, cfg.optimizer)
  return grpo.build(model, mesh, grpo_config(cfg), optimizer, **online_rl.run_shape(cfg))


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """One iteration's compiled functions with abstract arguments (`experiments.compile_check`):
  sampling, reward models, the policy's and the reference's log-probs, the update."""
  sections.check_config(cfg, sections.reference_config("grpo"))
  model_cfg = sections.model_config(cfg)
  online_rl.check_minibatches(cfg, mesh, cfg.grpo.group_size)
  sharding.check_fits_mesh(model_cfg, mesh)
  algorithm = build(cfg, model_cfg, mesh)
  state = algorithm.abstract_state().policy
  ref = sharding.abstract_sharded_params(model_cfg, mesh)
  out, num_rows, t, rms = online_rl.rollout_programs(
    cfg, model_cfg, mesh, assumed, cfg.grpo.group_size, resident=(state, ref)
  )
  rows_sh = step_lib.batch_sharding(mesh)
  rows = aot.rows(rows_sh, num_rows, t, step_lib.ROW_FIELDS)
  rewards = jax.ShapeDtypeStruct((num_rows,), np.float32, sharding=rows_sh)
  mb = num_rows // cfg.train.num_minibatches
  minibatch = aot.rows(
    rows_sh,
    mb,
    t,
    grpo_steps.FIELDS,
    dtypes={k: np.float32 for k in ("old_logp", "ref_logp", "advantages")},
  )
  forward = model_cfg.flops_per_token(t) / 3 * t
  passes = 2 if algorithm.config.uses_reference else 1
  # "logps": the policy's and the reference's log-prob passes and the advantages.
  return out + [
    aot.Program("logps", algorithm.advantage_fn, (state.params, ref, rows, rewards),
                passes * forward * num_rows, resident=(state.opt_state, rms),
                note=f"{num_rows} rows × {t}"),
    aot.Program("train_step", algorithm.train_step, (state, minibatch), 3 * forward * mb,
                resident=(ref, rms), note=f"{mb} rows × {t}"),
  ]  # fmt: skip


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the critic-free algorithm of `cfg.grpo` in `workdir`; returns the first
  and last iterations' metrics (`online.summarize`)."""
  policy = online_rl.start(cfg, workdir, "grpo", cfg.grpo.group_size)
  algorithm = build(cfg, policy.config, policy.mesh)
  key = jax.random.PRNGKey(cfg.train.seed)
  return online_rl.train(
    cfg, workdir, algorithm, lambda: algorithm.init_state(policy.params, key), policy,
    num_samples=cfg.grpo.group_size,
    meta={"model": policy.config.to_dict(), "grpo": cfg.grpo.to_dict()},
  )  # fmt: skip


if __name__ == "__main__":
  runs.launch(run)
