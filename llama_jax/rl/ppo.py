"""PPO with a value model and a KL penalty (Llama 2 section 3.2.3) as one object, built from a
model, a mesh and configs.

    algorithm = build(model, mesh, PPOConfig(kl_coef=0.01), OptimizerConfig(...))
    state = algorithm.init_state(params, key)      # value model: the policy's trunk + a head
    state = algorithm.init_state(params, key, value_params)   # or a reward model's (Llama 2)
    iteration = online.make_iteration(algorithm, sampler, scorer, ref_params,
                                      no_eos_penalty=algorithm.config.no_eos_penalty)

`build` makes both optimizers, the state's shardings and the jitted `steps.ppo` functions
(the advantage pass, the policy step and the value step); the launcher (`experiments.ppo`)
and the compile check use it alike. `finish` runs the adaptive KL controller (on when
`PPOConfig.kl_target` > 0).
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

from llama_jax.model import reward_model
from llama_jax.model.config import LlamaConfig
from llama_jax.model.llama import as_model
from llama_jax.objectives import ppo as ppo_obj
from llama_jax.parallel import sharding
from llama_jax.rl import online
from llama_jax.steps import common as step_lib
from llama_jax.steps import ppo as ppo_steps
from llama_jax.steps.ppo import PPOConfig
from llama_jax.training import train_state as ts
from llama_jax.training.train_state import OptimizerConfig, TrainState

__all__ = ["PPO", "PPOConfig", "PPOState", "build"]


@flax.struct.dataclass
class PPOState:
  """The policy's and the value model's train states, the current KL coefficient β and the
  iteration count (`step`, what the trainer counts; each iteration takes several updates)."""

  policy: TrainState
  value: TrainState
  kl_coef: jax.Array
  step: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPO:
  """PPO over `PPOState` (`online.Algorithm`): the jitted advantage pass, policy step and
  value step, the config (initial β, the adaptive KL controller), and both models'
  architectures and optimizers and the mesh (what its state is built from). Made by `build`."""

  model: sharding.Model  # the policy (`Llama(config)`, with LoRA adapters if it trains them)
  value_config: LlamaConfig  # the value model is `RewardModel(value_config)`
  optimizer: optax.GradientTransformation  # the policy's
  value_optimizer: optax.GradientTransformation
  mesh: Mesh
  config: PPOConfig
  advantage_fn: Callable  # (policy, ref, value params, rows, rewards, β) -> (out, metrics)
  policy_step: Callable  # (policy state, minibatch) -> (state, metrics)
  value_step: Callable  # (value state, minibatch) -> (state, metrics)
  num_minibatches: int = 1  # policy and value updates per iteration

  @property
  def value_model(self) -> reward_model.RewardModel:
    return reward_model.RewardModel(self.value_config)

  def init_state(self, params, key: jax.Array, value_params=None) -> PPOState:
    """Iteration 0 at β = `config.kl_coef`: fresh optimizer states over the policy's `params`
    and `value_params` (e.g. a reward model's, Llama 2) or, if None, the policy's trunk with a
    fresh head (then `value_config` must be the policy's)."""
    if value_params is None:
      if self.value_config != as_model(self.model).config:
        raise ValueError("a value model from the policy's trunk needs the policy's config")
      trunk = jax.tree.map(lambda x: x.copy(), params)  # own buffers: updates donate them
      head_key = jax.random.fold_in(key, 1)
      value_params = reward_model.from_lm_params(self.value_config, trunk, head_key, self.mesh)
    return PPOState(
      policy=online.init_policy(self.model, self.optimizer, self.mesh, key, params),
      value=ts.init_train_state(
        self.value_model, self.value_optimizer, self.mesh, key, value_params
      ),
      kl_coef=online.replicated_scalar(self.config.kl_coef, np.float32, self.mesh),
      step=online.replicated_scalar(0, np.int32, self.mesh),
    )

  def abstract_state(self) -> PPOState:
    """The restore target of a checkpoint on the mesh (shapes and shardings only)."""
    return PPOState(
      policy=ts.abstract_train_state(self.model, self.optimizer, self.mesh),
      value=ts.abstract_train_state(self.value_model, self.value_optimizer, self.mesh),
      kl_coef=online.abstract_scalar(jnp.float32, self.mesh),
      step=online.abstract_scalar(jnp.int32, self.mesh),
    )

  def advantages(self, state: PPOState, ref_params, rows, rewards):
    params = (state.policy.params, ref_params, state.value.params)
    return self.advantage_fn(*params, rows, rewards, state.kl_coef)

  def update(self, state: PPOState, minibatch):
    policy, pm = self.policy_step(state.policy, minibatch)
    value, vm = self.value_step(state.value, minibatch)
    metrics = pm | {k: v for k, v in vm.items() if k.startswith(("loss/", "value/"))}
    metrics |= {"value/grad_norm": vm["grad_norm"], "finite": pm["finite"] & vm["finite"]}
    return state.replace(policy=policy, value=value), metrics

  def finish(self, state: PPOState, metrics: online.Metrics):
    beta = float(state.kl_coef)
    if self.config.kl_target > 0:
      new = ppo_obj.adaptive_kl_beta(
        beta, metrics["objective/kl"], metrics["num_responses"],
        target=self.config.kl_target, horizon=self.config.kl_horizon,
      )  # fmt: skip
      state = state.replace(kl_coef=online.replicated_scalar(new, np.float32, self.mesh))
    return state, metrics | {"kl_coef": beta}


def build(
  model: sharding.Model,
  mesh: Mesh,
  config: PPOConfig,
  optimizer: OptimizerConfig,
  *,
  value_config: LlamaConfig | None = None,
  value_optimizer: OptimizerConfig | None = None,
  num_minibatches: int = 1,
  grad_accum_steps: int = 1,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> PPO:
  """PPO of `config` for the policy `model` (a `Llama`, with LoRA adapters if only they train,
  or a `LlamaConfig`) on `mesh`: AdamW of `optimizer` for the policy and of `value_optimizer`
  (default: `optimizer`) for the value model `RewardModel(value_config)` (default: the
  policy's architecture), both counted in updates (`num_minibatches` per iteration), and the
  jitted advantage pass, policy step and value step (`grad_accum_steps` micro-batches per
  minibatch). The reference's parameters are plain weights of the policy's architecture."""
  policy_config = as_model(model).config
  value_config = value_config or policy_config
  policy_tx = step_lib.optimizer_for(model, optimizer)
  value_tx = ts.make_optimizer(value_optimizer or optimizer)
  policy_sh = ts.state_shardings(model, policy_tx, mesh, rules)
  ref_sh = sharding.param_shardings(policy_config, mesh, rules)
  value_sh = ts.state_shardings(reward_model.RewardModel(value_config), value_tx, mesh, rules)
  rows, replicated = step_lib.batch_sharding(mesh, rules), NamedSharding(mesh, PartitionSpec())
  steps = dict(mesh=mesh, rules=rules, grad_accum_steps=grad_accum_steps)
  policy_step = ppo_steps.make_policy_step(model, policy_tx, config, **steps)
  value_step = ppo_steps.make_value_step(value_config, value_tx, config, **steps)
  return PPO(
    model=model,
    value_config=value_config,
    optimizer=policy_tx,
    value_optimizer=value_tx,
    mesh=mesh,
    config=config,
    advantage_fn=jax.jit(
      ppo_steps.make_advantage_fn(model, value_config, config, mesh=mesh, rules=rules),
      in_shardings=(policy_sh.params, ref_sh, value_sh.params, rows, rows, replicated),
      out_shardings=(rows, replicated),
    ),
    policy_step=step_lib.jit_train_step(policy_step, policy_sh, mesh, rules),
    value_step=step_lib.jit_train_step(value_step, value_sh, mesh, rules),
    num_minibatches=num_minibatches,
  )
