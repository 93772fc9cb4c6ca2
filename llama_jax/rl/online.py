"""Online RL: one iteration driver, algorithms as plug-ins (PPO; GRPO and its critic-free kin).

    algorithm = GRPO(config=..., optimizer=..., mesh=..., score_fn=..., train_step=...)
    iteration = make_iteration(algorithm, sampler, reward_fn, ref_params, num_minibatches=2)
    summary = train_online(iteration, init_state=lambda: algorithm.init_state(params, key),
                           abstract_state=algorithm.abstract_state(), prompts=..., ...)

Every iteration is the same five steps, whatever the algorithm:

    sample     `gen.num_samples` responses per prompt (`rollouts.sample_rollout`), key folded
               from the seed and the iteration, so a resumed run samples what it would have;
               on the sampler's own mesh if it has one (`Sampler.mesh`: the policy's weights
               are resharded onto it first, timed as time/weight_sync)
    reward     the reward function, a `llama_jax.rl.scorers.Scorer` `(records, prompts,
               responses) -> scores [N]` (checked by `scorers.score`), plus
               `no_eos_penalty` for responses cut off without a stop token
    advantages `algorithm.score(state, ref_params, rows, scores) -> (arrays, metrics)`, one
               jitted pass: old (and reference) log-probs, advantages, value targets
    updates    `algorithm.update(state, minibatch) -> (state, metrics)` per shuffled minibatch
               (jitted, state-donating steps; Llama 2: 512 prompts, minibatches of 64)
    metrics    the scoring metrics, the updates' means, reward/response/time statistics; then
               `algorithm.finish(state, metrics)` (PPO's adaptive KL) and the step count + 1

Multi-host: every process runs the same iteration on the same global prompt batch. The
decoder runs over the whole mesh; each process detokenizes and rewards the responses its own
devices sampled, and builds its block of the rollout rows, which become global `jax.Array`s
(`sharding.from_process_rows`). Log-probs, advantages, group baselines and whitening are
computed by the jitted functions over those global arrays, so their statistics are global;
minibatches are gathered on the devices; reward and response metrics are gathered from every
process. One process with all devices computes the same numbers.

An algorithm is any object with those three methods over a state that has `policy` (a
`TrainState`) and `step` (the iteration count the trainer checkpoints and resumes by), and
two that build that state: `init_state(params, key)` (fresh, from the policy's parameters)
and `abstract_state()` (the checkpoint's restore target, nothing allocated).
Metric names are shared across algorithms: objective/kl (nats per response),
objective/kl_per_token, objective/scores, policy/entropy, policy/clipfrac, policy/approxkl,
loss/policy, reward/*, response/*, time/*.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.generation import GenerationConfig
from llama_jax.model import reward_model
from llama_jax.model.config import LlamaConfig
from llama_jax.model.llama import as_model
from llama_jax.objectives import ppo as ppo_obj
from llama_jax.parallel import sharding
from llama_jax.rl import scorers
from llama_jax.rl.rollouts import Rollout, sample_rollout
from llama_jax.rl.scorers import Scorer
from llama_jax.steps.common import batch_sharding
from llama_jax.tokenizer import Tokenizer
from llama_jax.training import train_state as ts
from llama_jax.training.metrics import METRICS_FILE, read_metrics
from llama_jax.training.train_state import TrainState
from llama_jax.training.trainer import fit

Metrics = dict[str, Any]

PLOT_PANELS = (
  ("reward/mean",),
  ("objective/kl",),
  ("policy/entropy",),
  ("loss/policy",),
  ("policy/clipfrac", "policy/approxkl"),
  ("response/length",),
  ("response/eos_rate",),
  ("time/weight_sync", "time/generation", "time/reward", "time/logps", "time/training"),
)


# --------------------------------------------------------------------------- states


@flax.struct.dataclass
class PolicyState:
  """A critic-free algorithm's state (GRPO, Dr. GRPO, RLOO, REINFORCE++): the policy's train
  state and the iteration count (`step`)."""

  policy: TrainState
  step: jax.Array


GRPOState = PolicyState


@flax.struct.dataclass
class PPOState:
  """The policy's and the value model's train states, the current KL coefficient β and the
  iteration count (`step`, what the trainer counts; each iteration takes several updates)."""

  policy: TrainState
  value: TrainState
  kl_coef: jax.Array
  step: jax.Array


# --------------------------------------------------------------------------- algorithms


class Algorithm(Protocol):
  """What the driver and the launchers need of an algorithm (see the module docstring)."""

  mesh: Mesh  # where its state lives and its rollout rows are placed

  def init_state(self, params, key: jax.Array) -> Any: ...

  def abstract_state(self) -> Any: ...

  def score(self, state, ref_params, rows, scores) -> tuple[Mapping[str, Any], Metrics]: ...

  def update(self, state, minibatch) -> tuple[Any, Metrics]: ...

  def finish(self, state, metrics: Metrics) -> tuple[Any, Metrics]: ...


def _init_policy(model, optimizer, mesh: Mesh, key: jax.Array, params) -> ts.TrainState:
  """The policy's train state around `params`, completed with fresh LoRA adapters if `model`
  has adapters that `params` (a plain checkpoint) lack."""
  params = sharding.init_missing(model, params, jax.random.fold_in(key, 2), mesh)
  return ts.init_train_state(model, optimizer, mesh, key, params=params)


def _scalar(dtype, mesh: Mesh) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct((), dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def _replicated(value, dtype, mesh: Mesh) -> jax.Array:
  """A scalar of the state, replicated over the mesh (a global array on every process, as
  checkpoints need across hosts)."""
  return jax.device_put(np.asarray(value, dtype), NamedSharding(mesh, PartitionSpec()))


@dataclasses.dataclass(frozen=True, kw_only=True)
class GRPO:
  """Critic-free policy gradient over `PolicyState`: the jitted `steps.grpo` score function
  (its `GRPOConfig` picks GRPO, Dr. GRPO, RLOO or REINFORCE++) and train step, and the
  policy's architecture, optimizer and mesh (what its state is built from)."""

  model: sharding.Model  # the policy (`Llama(config)`, with LoRA adapters if it trains them)
  optimizer: optax.GradientTransformation
  mesh: Mesh
  score_fn: Callable  # (policy params, ref params, rows, scores) -> (out, metrics)
  train_step: Callable  # (policy state, minibatch) -> (state, metrics), donates the state

  def init_state(self, params, key: jax.Array) -> PolicyState:
    """Iteration 0: a fresh optimizer state over `params` (placed on the mesh; LoRA adapters
    the model has and `params` lack start fresh)."""
    policy = _init_policy(self.model, self.optimizer, self.mesh, key, params)
    return PolicyState(policy=policy, step=_replicated(0, np.int32, self.mesh))

  def abstract_state(self) -> PolicyState:
    """The restore target of a checkpoint on the mesh (shapes and shardings only)."""
    return PolicyState(
      policy=ts.abstract_train_state(self.model, self.optimizer, self.mesh),
      step=_scalar(jnp.int32, self.mesh),
    )

  def score(self, state: PolicyState, ref_params, rows, scores):
    return self.score_fn(state.policy.params, ref_params, rows, scores)

  def update(self, state: PolicyState, minibatch):
    policy, metrics = self.train_step(state.policy, minibatch)
    return state.replace(policy=policy), metrics

  def finish(self, state: PolicyState, metrics: Metrics):
    return state, metrics


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPO:
  """PPO with a value model over `PPOState`: the jitted `steps.ppo` functions, the initial KL
  coefficient and the adaptive KL controller (on when `kl_target` > 0), and both models'
  architectures and optimizers and the mesh (what its state is built from)."""

  model: sharding.Model  # the policy (`Llama(config)`, with LoRA adapters if it trains them)
  value_config: LlamaConfig  # the value model is `RewardModel(value_config)`
  policy_opt: optax.GradientTransformation
  value_opt: optax.GradientTransformation
  mesh: Mesh
  score_fn: Callable  # (policy, ref, value params, rows, scores, β) -> (out, metrics)
  policy_step: Callable  # (policy state, minibatch) -> (state, metrics)
  value_step: Callable  # (value state, minibatch) -> (state, metrics)
  kl_coef: float = 0.01
  kl_target: float = 0.0
  kl_horizon: int = 10000

  @property
  def value_model(self) -> reward_model.RewardModel:
    return reward_model.RewardModel(self.value_config)

  def init_state(self, params, key: jax.Array, value_params=None) -> PPOState:
    """Iteration 0 at β = `kl_coef`: fresh optimizer states over the policy's `params` and
    `value_params` (e.g. a reward model's, Llama 2) or, if None, the policy's trunk with a
    fresh head (then `value_config` must be the policy's)."""
    if value_params is None:
      if self.value_config != as_model(self.model).config:
        raise ValueError("a value model from the policy's trunk needs the policy's config")
      trunk = jax.tree.map(lambda x: x.copy(), params)  # own buffers: updates donate them
      head_key = jax.random.fold_in(key, 1)
      value_params = reward_model.from_lm_params(self.value_config, trunk, head_key, self.mesh)
    return PPOState(
      policy=_init_policy(self.model, self.policy_opt, self.mesh, key, params),
      value=ts.init_train_state(self.value_model, self.value_opt, self.mesh, key, value_params),
      kl_coef=_replicated(self.kl_coef, np.float32, self.mesh),
      step=_replicated(0, np.int32, self.mesh),
    )

  def abstract_state(self) -> PPOState:
    """The restore target of a checkpoint on the mesh (shapes and shardings only)."""
    return PPOState(
      policy=ts.abstract_train_state(self.model, self.policy_opt, self.mesh),
      value=ts.abstract_train_state(self.value_model, self.value_opt, self.mesh),
      kl_coef=_scalar(jnp.float32, self.mesh),
      step=_scalar(jnp.int32, self.mesh),
    )

  def score(self, state: PPOState, ref_params, rows, scores):
    params = (state.policy.params, ref_params, state.value.params)
    return self.score_fn(*params, rows, scores, state.kl_coef)

  def update(self, state: PPOState, minibatch):
    policy, pm = self.policy_step(state.policy, minibatch)
    value, vm = self.value_step(state.value, minibatch)
    metrics = pm | {k: v for k, v in vm.items() if k.startswith(("loss/", "value/"))}
    metrics |= {"value/grad_norm": vm["grad_norm"], "finite": pm["finite"] & vm["finite"]}
    return state.replace(policy=policy, value=value), metrics

  def finish(self, state: PPOState, metrics: Metrics):
    beta = float(state.kl_coef)
    if self.kl_target > 0:
      num = metrics["num_responses"]
      new = ppo_obj.adaptive_kl_beta(
        beta, metrics["objective/kl"], num, target=self.kl_target, horizon=self.kl_horizon
      )
      state = state.replace(kl_coef=_replicated(new, np.float32, self.mesh))
    return state, metrics | {"kl_coef": beta}


# --------------------------------------------------------------------------- the driver


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How rollouts are drawn: the policy model, tokenizer, generation settings
  (`gen.num_samples` responses per prompt), chat template and the mesh to sample on.

  `mesh` None or the training mesh: sample where the policy's weights are. Another mesh (a
  different layout, e.g. data-parallel sampling beside fsdp training, or a subset of the
  devices; it must span every process): each iteration copies the weights onto it first
  (`place`), and the copy lives beside the training state while sampling."""

  model: sharding.Model
  tokenizer: Tokenizer
  gen: GenerationConfig
  chat: bool = True
  mesh: Mesh | None = None

  def place(self, params, train_mesh: Mesh):
    """`params` (on `train_mesh`) on the sampling mesh: the same arrays when it is the
    training mesh, else a resharded copy (finished before this returns, so it can be timed)."""
    if self.mesh is None or self.mesh == train_mesh:
      return params
    return jax.block_until_ready(
      jax.device_put(params, sharding.param_shardings(self.model, self.mesh))
    )

  def __call__(self, params, records, key) -> Rollout:
    return sample_rollout(
      self.model, params, self.tokenizer, records, key, self.gen, chat=self.chat, mesh=self.mesh
    )


def minibatch_indices(num_rows: int, num_minibatches: int, rng: np.random.Generator):
  """A shuffled split of the rows into `num_minibatches` equal parts."""
  if num_rows % num_minibatches:
    raise ValueError(f"{num_rows} rollout rows do not split into {num_minibatches} minibatches")
  return np.split(rng.permutation(num_rows), num_minibatches)


@functools.lru_cache(maxsize=8)
def _take_rows(mesh: Mesh):
  """Jitted `(arrays, index) -> arrays[index]` over global rows: a minibatch gathered on the
  devices (rows move between processes where they must), laid out over the batch axes."""
  take = lambda arrays, index: jax.tree.map(lambda x: x[index], arrays)
  return jax.jit(take, out_shardings=batch_sharding(mesh))


def rollout_metrics(rollout: Rollout, scores: np.ndarray, group_size: int) -> dict[str, float]:
  """reward/* (of the reward function, before shaping) and response/* of one rollout, over
  every process's responses (each process passes its own)."""
  scores, lengths, stopped = (
    sharding.process_allgather(x) for x in (scores, rollout.lengths, rollout.stopped)
  )
  metrics = {
    "reward/mean": float(np.mean(scores)),
    "reward/std": float(np.std(scores)),
    "response/length": float(lengths.mean()),
    "response/eos_rate": float(stopped.mean()),
    "num_responses": float(len(scores)),
  }
  if group_size > 1:  # how many prompts give a group baseline anything to work with
    groups = scores.reshape(-1, group_size)  # each process holds whole groups
    metrics["reward/group_std"] = float(groups.std(axis=1).mean())
    metrics["reward/groups_with_signal"] = float((groups.max(1) > groups.min(1)).mean())
  return metrics


def mean_metrics(per_step: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """The minibatch updates' metrics averaged; `finite` only if every update's was."""
  fetched = jax.device_get(list(per_step))
  out = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0] if k != "finite"}
  out["finite"] = float(all(bool(m["finite"]) for m in fetched))
  return out


def make_iteration(
  algorithm: Algorithm,
  sampler: Sampler,
  reward_fn: Scorer,
  ref_params: Any,
  *,
  num_minibatches: int,
  no_eos_penalty: float = 0.0,
  seed: int = 0,
):
  """`iteration(state, batch) -> (state, metrics)` over a batch `{"records": [rl_prompt
  records]}` from `rollouts.PromptIterator`, so `llama_jax.training.trainer.fit` runs it like any
  train step (logging, checkpoints, resume). The metrics time each phase: weight_sync,
  generation, reward, logps (the scoring pass) and training, in seconds."""
  mesh = algorithm.mesh
  rows_sharding = batch_sharding(mesh)
  replicated = NamedSharding(mesh, PartitionSpec())

  def iteration(state, batch):
    step = int(state.step)
    clock = _Clock()
    params = sampler.place(state.policy.params, mesh)
    clock.lap("time/weight_sync")
    rollout = sampler(params, batch["records"], jax.random.fold_in(jax.random.key(seed), step))
    del params
    clock.lap("time/generation")
    raw = scorers.score(reward_fn, rollout.records, rollout.texts).astype(np.float32)
    scores = raw + np.float32(no_eos_penalty) * (~rollout.stopped)
    clock.lap("time/reward")
    rows = rollout.global_rows(rows_sharding)
    n = len(rows["tokens"])
    scores = sharding.from_process_rows(scores, rows_sharding, n)
    arrays, score_metrics = algorithm.score(state, ref_params, rows, scores)
    arrays = jax.block_until_ready(rows | dict(arrays))
    clock.lap("time/logps")
    updates = []
    # Shuffled rows keep minibatches alike (whole groups per minibatch would also do).
    for index in minibatch_indices(n, num_minibatches, np.random.default_rng(step)):
      minibatch = _take_rows(mesh)(arrays, sharding.to_global(index, replicated))
      state, m = algorithm.update(state, minibatch)
      updates.append(m)
    metrics = mean_metrics(updates)  # waits for the updates
    clock.lap("time/training")
    metrics |= {k: float(v) for k, v in jax.device_get(score_metrics).items()}
    metrics |= rollout_metrics(rollout, raw, sampler.gen.num_samples) | clock.laps
    metrics["loss"] = metrics["loss/policy"]
    state, metrics = algorithm.finish(state, metrics)
    return state.replace(step=state.step + 1), metrics

  return iteration


class _Clock:
  """Seconds between successive `lap(name)` calls, collected in `laps`."""

  def __init__(self):
    self.laps: dict[str, float] = {}
    self._last = time.perf_counter()

  def lap(self, name: str) -> None:
    now = time.perf_counter()
    self.laps[name], self._last = now - self._last, now


def train_online(
  iteration: Callable,
  *,
  init_state: Callable[[], Any],
  abstract_state: Any,
  prompts: Iterator[dict[str, Any]],
  workdir: str,
  loop: Any,
  meta: Mapping[str, Any] | None = None,
  plot_panels: Sequence[Sequence[str]] = PLOT_PANELS,
) -> dict[str, Any]:
  """Runs `iteration` under `llama_jax.training.trainer.fit` over `prompts` (a `PromptIterator`;
  `loop` a `trainer.LoopConfig`); returns `summarize` of this call's iterations (of the
  logged ones if an earlier call finished the run)."""
  history: list[dict[str, float]] = []

  def logged(state, batch):
    state, metrics = iteration(state, batch)
    history.append(metrics)
    return state, metrics

  fit(
    init_state=init_state,
    abstract_state=abstract_state,
    train_step=logged,
    train_iter=prompts,
    workdir=workdir,
    loop=loop,
    meta=meta,
    plot_panels=plot_panels,
  )
  if not history and os.path.exists(os.path.join(workdir, METRICS_FILE)):
    # An earlier call finished the run: summarize what it logged, never an empty result.
    return summarize([r for r in read_metrics(workdir) if "loss/policy" in r]) | {"iterations": 0}
  return summarize(history)


def summarize(history: Sequence[Mapping[str, float]], window: int = 3) -> dict[str, Any]:
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
