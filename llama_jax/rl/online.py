"""Online RL: one iteration driver, algorithms as plug-ins (`llama_jax.rl.ppo`;
`llama_jax.rl.grpo`: GRPO and its critic-free kin).

    algorithm = grpo.build(model, mesh, GRPOConfig(...), OptimizerConfig(...))
    iteration = make_iteration(algorithm, Sampler(model, tokenizer, gen), scorer, ref_params)
    summary = train_online(iteration, init_state=lambda: algorithm.init_state(params, key),
                           abstract_state=algorithm.abstract_state(), prompts=..., ...)

Words: a response's *score* is what the scorer (a reward model or a program) says of it; its
*reward* is what the objective maximizes (the score plus penalties, e.g. `no_eos_penalty`;
PPO adds a per-token KL penalty); its *advantages* are the per-token training signal after
baselines and whitening.

Every iteration is the same five steps, whatever the algorithm:

    sample     `gen.num_samples` responses per prompt (`rollouts.sample_rollout`), key folded
               from the seed and the iteration, so a resumed run samples what it would have;
               on the sampler's own mesh if it has one (`Sampler.mesh`: the policy's weights
               are resharded onto it first, timed as time/weight_sync)
    reward     the scorer, a `llama_jax.rl.scorers.Scorer` `(records, prompts, responses) ->
               scores [N]` (checked by `scorers.score`); the rewards are the scores plus
               `no_eos_penalty` for responses cut off without a stop token
    advantages `algorithm.advantages(state, ref_params, rows, rewards) -> (arrays, metrics)`,
               one jitted pass: old (and reference) log-probs, advantages, value targets
    updates    `algorithm.update(state, minibatch) -> (state, metrics)` per shuffled minibatch
               (jitted, state-donating steps; Llama 2: 512 prompts, minibatches of 64)
    metrics    the advantage pass's metrics, the updates' means, score/response/time
               statistics; then
               `algorithm.finish(state, metrics)` (PPO's adaptive KL) and the step count + 1

Multi-host: every process runs the same iteration on the same global prompt batch. The
decoder runs over the whole mesh; each process detokenizes and scores the responses its own
devices sampled, and builds its block of the rollout rows, which become global `jax.Array`s
(`sharding.from_process_rows`). Log-probs, advantages, group baselines and whitening are
computed by the jitted functions over those global arrays, so their statistics are global;
minibatches are gathered on the devices; reward and response metrics are gathered from every
process. One process with all devices computes the same numbers.

An algorithm (`Algorithm`) is any object with those three methods over a state that has
`policy` (a `TrainState`) and `step` (the iteration count the trainer checkpoints and resumes
by), two that build that state: `init_state(params, key)` (fresh, from the policy's
parameters) and `abstract_state()` (the checkpoint's restore target, nothing allocated), and
its `mesh` and `num_minibatches`.
Metric names are shared across algorithms: objective/kl (nats per response),
objective/kl_per_token, objective/rewards (the mean reward), policy/entropy, policy/clipfrac,
policy/approxkl, loss/policy, score/* (of the scorer's scores, before penalties), response/*,
time/*, and rollout/logp_mismatch (the largest difference between a token's log-prob as the
sampler gave it and as the training forward computes it).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.generation import GenerationConfig
from llama_jax.parallel import sharding
from llama_jax.rl import scorers
from llama_jax.rl.rollouts import Rollout, sample_rollout
from llama_jax.rl.scorers import Scorer
from llama_jax.steps.common import batch_sharding
from llama_jax.tokenizer import Tokenizer
from llama_jax.training import train_state as ts
from llama_jax.training.metrics import METRICS_FILE, read_metrics
from llama_jax.training.trainer import fit

Metrics = dict[str, Any]

PLOT_PANELS = (
  ("score/mean",),
  ("objective/kl",),
  ("policy/entropy",),
  ("loss/policy",),
  ("policy/clipfrac", "policy/approxkl"),
  ("response/length",),
  ("response/eos_rate",),
  ("time/weight_sync", "time/generation", "time/reward", "time/logps", "time/training"),
  ("rollout/logp_mismatch",),
)


# --------------------------------------------------------------------------- algorithms


class Algorithm(Protocol):
  """What the driver and the launchers need of an algorithm (see the module docstring)."""

  mesh: Mesh  # where its state lives and its rollout rows are placed
  num_minibatches: int  # updates per iteration, each on a shuffled share of the rows

  def init_state(self, params, key: jax.Array) -> Any: ...

  def abstract_state(self) -> Any: ...

  def advantages(self, state, ref_params, rows, rewards) -> tuple[Mapping[str, Any], Metrics]: ...

  def update(self, state, minibatch) -> tuple[Any, Metrics]: ...

  def finish(self, state, metrics: Metrics) -> tuple[Any, Metrics]: ...


def init_policy(model, optimizer, mesh: Mesh, key: jax.Array, params) -> ts.TrainState:
  """The policy's train state around `params`, completed with fresh LoRA adapters if `model`
  has adapters that `params` (a plain checkpoint) lack."""
  params = sharding.init_missing(model, params, jax.random.fold_in(key, 2), mesh)
  return ts.init_train_state(model, optimizer, mesh, key, params=params)


def abstract_scalar(dtype, mesh: Mesh) -> jax.ShapeDtypeStruct:
  """A scalar of the state as a restore target: replicated over the mesh."""
  return jax.ShapeDtypeStruct((), dtype, sharding=NamedSharding(mesh, PartitionSpec()))


def replicated_scalar(value, dtype, mesh: Mesh) -> jax.Array:
  """A scalar of the state, replicated over the mesh (a global array on every process, as
  checkpoints need across hosts)."""
  return jax.device_put(np.asarray(value, dtype), NamedSharding(mesh, PartitionSpec()))


def check_minibatches(
  num_rows: int, num_minibatches: int, mesh: Mesh, grad_accum_steps: int = 1
) -> None:
  """The rollout's `num_rows` must split into `num_minibatches` minibatches, and those into
  `grad_accum_steps` micro-batches, each a multiple of the mesh's batch shards."""
  if num_minibatches < 1 or num_rows % num_minibatches:
    raise ValueError(f"{num_rows} rollout rows do not split into num_minibatches={num_minibatches}")
  minibatch = num_rows // num_minibatches
  sharding.check_batch_fits_mesh(minibatch, mesh, "minibatch rows")
  sharding.check_batch_fits_mesh(
    minibatch // grad_accum_steps, mesh, f"micro-batch rows (grad_accum_steps={grad_accum_steps})"
  )


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


def sampling_mesh(mesh: Mesh, shape: Mapping[str, int], num_devices: int = 0) -> Mesh:
  """A mesh of `shape` (data, fsdp, tensor; an axis left out or 0 is 1 wide, one may be -1)
  over `num_devices` of `mesh`'s devices (0 = all): an equal share of each process's, so
  that every process samples (`Sampler.mesh`)."""
  by_process: dict[int, list[jax.Device]] = {}
  for d in sorted(mesh.devices.flat, key=lambda d: (d.process_index, d.id)):
    by_process.setdefault(d.process_index, []).append(d)
  n = num_devices or mesh.devices.size
  if n % len(by_process) or not 0 < n <= mesh.devices.size:
    raise ValueError(
      f"num_devices={num_devices}: expected 0 or a multiple of the {len(by_process)} "
      f"processes up to the mesh's {mesh.devices.size} devices"
    )
  devices = [d for ds in by_process.values() for d in ds[: n // len(by_process)]]
  axes = {a: shape.get(a) or 1 for a in ("data", "fsdp", "tensor")}
  return sharding.make_mesh(sharding.MeshConfig(**axes), devices)


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


@functools.lru_cache(maxsize=8)
def _largest_difference(mesh: Mesh):
  """Jitted `(a, b, mask) -> max |a − b|` over the masked entries of global [N, T] arrays,
  replicated (the same scalar on every process)."""
  fn = lambda a, b, mask: jnp.max(jnp.where(mask > 0, jnp.abs(a - b), 0.0))
  return jax.jit(fn, out_shardings=NamedSharding(mesh, PartitionSpec()))


def logp_mismatch(rollout: Rollout, old_logp: jax.Array, rows, rows_sharding) -> float:
  """rollout/logp_mismatch: the largest difference, over every response token, between the
  log-prob the sampler gave a token (the unmodified model's) and the training forward's
  (`old_logp` of the advantage pass, [N, T] on the mesh). The engine and the trainer share
  the model code, so in float32 this is round-off; a large value means the ratios of the
  policy loss start away from 1."""
  n = len(rows["tokens"])
  sampled = sharding.from_process_rows(rollout.sample_logp, rows_sharding, n)
  mesh = rows_sharding.mesh
  return float(_largest_difference(mesh)(old_logp, sampled, rows["response_mask"]))


def rollout_metrics(rollout: Rollout, scores: np.ndarray, group_size: int) -> dict[str, float]:
  """score/* (of the scorer's scores, before penalties) and response/* of one rollout, over
  every process's responses (each process passes its own)."""
  scores, lengths, stopped = (
    sharding.process_allgather(x) for x in (scores, rollout.lengths, rollout.stopped)
  )
  metrics = {
    "score/mean": float(np.mean(scores)),
    "score/std": float(np.std(scores)),
    "response/length": float(lengths.mean()),
    "response/eos_rate": float(stopped.mean()),
    "num_responses": float(len(scores)),
  }
  if group_size > 1:  # how many prompts give a group baseline anything to work with
    groups = scores.reshape(-1, group_size)  # each process holds whole groups
    metrics["score/group_std"] = float(groups.std(axis=1).mean())
    metrics["score/groups_with_signal"] = float((groups.max(1) > groups.min(1)).mean())
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
  scorer: Scorer,
  ref_params: Any,
  *,
  num_minibatches: int | None = None,
  no_eos_penalty: float = 0.0,
  seed: int = 0,
):
  """`iteration(state, batch) -> (state, metrics)` over a batch `{"records": [rl_prompt
  records]}` from `rollouts.PromptIterator`, so `llama_jax.training.trainer.fit` runs it like
  any train step (logging, checkpoints, resume). `scorer` scores the responses; their rewards
  add `no_eos_penalty` to those cut off without a stop token; `num_minibatches` updates per
  iteration (None: the algorithm's). The metrics time each phase: weight_sync, generation,
  reward, logps (the advantage pass) and training, in seconds."""
  mesh = algorithm.mesh
  num_minibatches = num_minibatches or algorithm.num_minibatches
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
    scores = scorers.score(scorer, rollout.records, rollout.texts).astype(np.float32)
    rewards = scores + np.float32(no_eos_penalty) * (~rollout.stopped)
    clock.lap("time/reward")
    rows = rollout.global_rows(rows_sharding)
    n = len(rows["tokens"])
    rewards = sharding.from_process_rows(rewards, rows_sharding, n)
    arrays, pass_metrics = algorithm.advantages(state, ref_params, rows, rewards)
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
    metrics |= {k: float(v) for k, v in jax.device_get(pass_metrics).items()}
    metrics |= rollout_metrics(rollout, scores, sampler.gen.num_samples) | clock.laps
    if rollout.sample_logp is not None and "old_logp" in arrays:  # GRPO's and PPO's passes
      metrics["rollout/logp_mismatch"] = logp_mismatch(rollout, arrays["old_logp"], rows,
                                                       rows_sharding)  # fmt: skip
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
