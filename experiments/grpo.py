"""Critic-free online RL: GRPO, Dr. GRPO, RLOO, REINFORCE++ (`grpo.advantage`, `grpo.scale`,
`grpo.aggregation`; see `llama_jax.steps.grpo.GRPOConfig`).

    python -m experiments.grpo --config=experiments/configs/grpo.py:tiny --workdir=DIR \
      --config.init_from=SFT_WORKDIR [--config.reward.kind=reward_model ...]
    ... --config=experiments/configs/grpo.py:tiny_rloo (or tiny_reinforce_pp, tiny_dr_grpo)

The policy and the reference start from `init_from`. Each iteration samples
`grpo.group_size` responses to `data.batch_size` prompts, scores them (`reward`: the scorer of
`experiments.generate.build_scorer`, default the bundled prompts' answer check) and takes
`train.num_minibatches` updates (`llama_jax.rl.online.make_iteration`). Writes
DIR/metrics.jsonl (reward, objective/kl, clip fraction, entropy, response length, EOS rate,
time split), metrics.png, TensorBoard events and checkpoints; a rerun resumes.
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
from llama_jax.parallel import aot, sharding
from llama_jax.rl import online
from llama_jax.steps import common as step_lib
from llama_jax.steps import grpo as grpo_steps
from llama_jax.training import train_state as ts

log = logging.getLogger(__name__)


def grpo_config(cfg: ml_collections.ConfigDict) -> grpo_steps.GRPOConfig:
  """The `grpo` section (with the train and generation settings it depends on)."""
  return sections.from_section(
    grpo_steps.GRPOConfig, cfg.grpo, loss_chunk_size=cfg.train.loss_chunk_size,
    max_length=cfg.generation.max_new_tokens,
  )  # fmt: skip


def build_steps(cfg: ml_collections.ConfigDict, model_cfg, mesh) -> online.GRPO:
  """The optimizer and jitted functions of `cfg` on `mesh` as an `online.GRPO`: what `run`
  trains with and `programs` compiles ahead of time."""
  grpo = grpo_config(cfg)
  num_updates = cfg.train.num_steps * cfg.train.num_minibatches
  opt_cfg = sections.optimizer_config(cfg.optimizer, num_updates)
  optimizer = ts.make_optimizer(opt_cfg, trainable=models.trainable(cfg))
  model = models.build_model(cfg, model_cfg)
  shardings = ts.state_shardings(model, optimizer, mesh)
  step = grpo_steps.make_train_step(
    model, optimizer, grpo, mesh=mesh, grad_accum_steps=cfg.train.grad_accum_steps
  )
  score = grpo_steps.make_score_fn(model, grpo, mesh=mesh, micro_batches=cfg.train.num_minibatches)
  ref = sharding.param_shardings(model_cfg, mesh)  # the reference: plain weights
  rows, rep = step_lib.batch_sharding(mesh), NamedSharding(mesh, PartitionSpec())
  return online.GRPO(
    model=model,
    optimizer=optimizer,
    mesh=mesh,
    score_fn=jax.jit(
      score, in_shardings=(shardings.params, ref, rows, rows),
      out_shardings=(rows, rep),
    ),
    train_step=step_lib.jit_train_step(step, shardings, mesh),
  )  # fmt: skip


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """One iteration's compiled functions with abstract arguments (`experiments.compile_check`):
  sampling, reward models, the policy's and the reference's log-probs, the update."""
  sections.check_config(cfg, sections.reference_config("grpo"))
  model_cfg = sections.model_config(cfg)
  online_rl.check_minibatches(cfg, mesh, cfg.grpo.group_size)
  sharding.check_fits_mesh(model_cfg, mesh)
  algorithm = build_steps(cfg, model_cfg, mesh)
  state = algorithm.abstract_state().policy
  ref = sharding.abstract_sharded_params(model_cfg, mesh)
  out, num_rows, t, rms = online_rl.rollout_programs(
    cfg, model_cfg, mesh, assumed, cfg.grpo.group_size, resident=(state, ref)
  )
  rows_sh = step_lib.batch_sharding(mesh)
  rows = aot.rows(rows_sh, num_rows, t, step_lib.ROW_FIELDS)
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
  passes = 2 if grpo_config(cfg).uses_reference else 1
  # "logps": the policy's and the reference's log-prob passes and the advantages.
  return out + [
    aot.Program("logps", algorithm.score_fn, (state.params, ref, rows, scores),
                passes * forward * num_rows, resident=(state.opt_state, rms),
                note=f"{num_rows} rows × {t}"),
    aot.Program("train_step", algorithm.train_step, (state, minibatch), 3 * forward * mb,
                resident=(ref, rms), note=f"{mb} rows × {t}"),
  ]  # fmt: skip


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the critic-free algorithm of `cfg.grpo` in `workdir`; returns the first
  and last iterations' metrics (`online.summarize`)."""
  sharding.initialize_distributed()
  sections.check_config(cfg, sections.reference_config("grpo"))
  policy = online_rl.load_policy(cfg, cfg.grpo.group_size)
  runs.write_run_files(workdir, cfg, policy.config)
  algorithm = build_steps(cfg, policy.config, policy.mesh)
  key = jax.random.PRNGKey(cfg.train.seed)
  return online_rl.train(
    cfg, workdir, algorithm, lambda: algorithm.init_state(policy.params, key), policy,
    num_samples=cfg.grpo.group_size,
    meta={"model": policy.config.to_dict(), "grpo": cfg.grpo.to_dict()},
  )  # fmt: skip


def main(argv):
  del argv
  runs.setup_logging()
  with runs.one_line_errors():
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  runs.define_flags()
  app.run(main)
