"""Critic-free online RL as one object: GRPO and its variants Dr. GRPO, RLOO and REINFORCE++
(`GRPOConfig.advantage`, `.scale`, `.aggregation`), built from a model, a mesh and configs.

    algorithm = build(model, mesh, GRPOConfig(group_size=4), OptimizerConfig(...))
    state = algorithm.init_state(params, key)             # or abstract_state(): a restore target
    iteration = online.make_iteration(algorithm, sampler, scorer, ref_params)
    state, metrics = iteration(state, {"records": prompts})

`build` makes the optimizer, the state's shardings and the jitted `steps.grpo` functions (the
advantage pass and the train step); the launcher (`experiments.grpo`) and the compile check
use it alike.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.model.llama import as_model
from llama_jax.parallel import sharding
from llama_jax.rl import online
from llama_jax.steps import common as step_lib
from llama_jax.steps import grpo as grpo_steps
from llama_jax.steps.grpo import GRPOConfig
from llama_jax.training import train_state as ts
from llama_jax.training.train_state import OptimizerConfig, TrainState

__all__ = ["GRPO", "GRPOConfig", "GRPOState", "build"]


@flax.struct.dataclass
class GRPOState:
  """A critic-free algorithm's state: the policy's train state and the iteration count
  (`step`)."""

  policy: TrainState
  step: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPO:
  """Critic-free policy gradient over `GRPOState` (`online.Algorithm`): the jitted advantage
  pass and train step, and the policy's architecture, optimizer and mesh (what its state is
  built from). Made by `build`."""

  model: sharding.Model  # the policy (`Llama(config)`, with LoRA adapters if it trains them)
  optimizer: optax.GradientTransformation
  mesh: Mesh
  config: GRPOConfig
  advantage_fn: Callable  # (policy params, ref params, rows, rewards) -> (out, metrics)
  train_step: Callable  # (policy state, minibatch) -> (state, metrics), donates the state
  num_minibatches: int = 1  # updates per iteration

  def init_state(self, params, key: jax.Array) -> GRPOState:
    """Iteration 0: a fresh optimizer state over `params` (placed on the mesh; LoRA adapters
    the model has and `params` lack start fresh)."""
    policy = online.init_policy(self.model, self.optimizer, self.mesh, key, params)
    return GRPOState(policy=policy, step=online.replicated_scalar(0, np.int32, self.mesh))

  def abstract_state(self) -> GRPOState:
    """The restore target of a checkpoint on the mesh (shapes and shardings only)."""
    return GRPOState(
      policy=ts.abstract_train_state(self.model, self.optimizer, self.mesh),
      step=online.abstract_scalar(jnp.int32, self.mesh),
    )

  def advantages(self, state: GRPOState, ref_params, rows, rewards):
    return self.advantage_fn(state.policy.params, ref_params, rows, rewards)

  def update(self, state: GRPOState, minibatch):
    policy, metrics = self.train_step(state.policy, minibatch)
    return state.replace(policy=policy), metrics

  def finish(self, state: GRPOState, metrics: online.Metrics):
    return state, metrics


def build(
  model: sharding.Model,
  mesh: Mesh,
  config: GRPOConfig,
  optimizer: OptimizerConfig,
  *,
  num_minibatches: int = 1,
  grad_accum_steps: int = 1,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> GRPO:
  """The critic-free algorithm of `config` for the policy `model` (a `Llama`, with LoRA
  adapters if only they train, or a `LlamaConfig`) on `mesh`: AdamW of `optimizer` (counted
  in updates: `num_minibatches` per iteration), the jitted advantage pass (its log-prob passes
  `num_minibatches` row-blocks at a time) and train step (`grad_accum_steps` micro-batches
  per minibatch). The reference's parameters are plain weights of the policy's architecture."""
  tx = step_lib.optimizer_for(model, optimizer)
  shardings = ts.state_shardings(model, tx, mesh, rules)
  ref = sharding.param_shardings(as_model(model).config, mesh, rules)
  rows, replicated = step_lib.batch_sharding(mesh, rules), NamedSharding(mesh, PartitionSpec())
  advantage_fn = grpo_steps.make_advantage_fn(
    model, config, mesh=mesh, rules=rules, micro_batches=num_minibatches
  )
  step = grpo_steps.make_train_step(
    model, tx, config, mesh=mesh, rules=rules, grad_accum_steps=grad_accum_steps
  )
  return GRPO(
    model=model,
    optimizer=tx,
    mesh=mesh,
    config=config,
    advantage_fn=jax.jit(
      advantage_fn,
      in_shardings=(shardings.params, ref, rows, rows),
      out_shardings=(rows, replicated),
    ),
    train_step=step_lib.jit_train_step(step, shardings, mesh, rules),
    num_minibatches=num_minibatches,
  )
