"""Pieces every train step shares: micro-batching, gradient accumulation, the guarded
optimizer update, jitting with explicit shardings and a donated state, and
`OfflineAlgorithm`, what the offline builders (`steps.lm.build`, `steps.reward_model.build`,
`steps.dpo.build`) return."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.model import lora
from llama_jax.model.llama import as_model
from llama_jax.objectives import logprobs as lp
from llama_jax.parallel import sharding
from llama_jax.training import train_state as ts
from llama_jax.training.train_state import OptimizerConfig, TrainState

Batch = Mapping[str, jax.Array]
SumsFn = Callable[[Any, Batch], dict[str, jax.Array]]


def row_logprobs(
  model: sharding.Model,
  params: Any,
  rows: Batch,
  chunk_size: int = 0,
  *,
  with_entropy: bool = False,
):
  """log π(targets) [B, T] of rows with `tokens`, `positions`, `segment_ids` and `targets`
  (and the entropy [B, T] too if `with_entropy`), the logits `chunk_size` positions at a time
  (`objectives.logprobs.chunked_token_logprobs`)."""
  model = as_model(model)
  variables = {"params": params}
  hidden, _ = model.apply(
    variables, rows["tokens"], rows["positions"], rows["segment_ids"], method="hidden_states"
  )
  return lp.chunked_token_logprobs(
    hidden,
    lambda h: model.apply(variables, h, method="logits"),
    rows["targets"],
    chunk_size=chunk_size,
    with_entropy=with_entropy,
  )


def split_microbatches(batch: Batch, num: int) -> Batch:
  """[B, ...] -> [num, B / num, ...], micro-batch a = rows a, a + num, a + 2·num, ...

  Strided rather than contiguous: each device's block of rows splits into `num` local
  pieces, so forming micro-batches needs no communication across the batch axes.
  """

  def split(x):
    if x.shape[0] % num:
      raise ValueError(f"batch of {x.shape[0]} rows does not split into {num} micro-batches")
    return jnp.swapaxes(x.reshape(x.shape[0] // num, num, *x.shape[1:]), 0, 1)

  return jax.tree.map(split, dict(batch))


def accumulate_gradients(
  sums_fn: SumsFn, params: Any, batch: Batch, num: int
) -> tuple[dict[str, jax.Array], Any]:
  """Sums of `sums_fn` and gradients of their `"loss_sum"`, added up over `num` micro-batches.

  Objectives return sums (not means), so the caller divides once by the whole batch's count
  and the result equals a single step on all rows.
  """

  # Gradients with respect to the trainable parameters only (all of them, unless `params`
  # holds LoRA adapters): the frozen weights' gradients are never formed.
  mask = lora.trainable_mask(params)
  trainable, frozen = lora.split(params, mask)

  def loss_and_sums(t, b):
    sums = sums_fn(lora.merge_trees(t, frozen), b)
    return sums["loss_sum"], sums

  sums, grads = _accumulate(jax.grad(loss_and_sums, has_aux=True), trainable, batch, num)
  zeros = jax.tree.map(lambda p, m: None if m else jnp.zeros_like(p), params, mask)
  return sums, lora.merge_trees(grads, zeros)


def _accumulate(grad_fn, params, batch: Batch, num: int):
  if num == 1:
    grads, sums = grad_fn(params, batch)
    return sums, grads

  micro = split_microbatches(batch, num)

  def body(carry, mb):
    grads, sums = grad_fn(params, mb)
    return jax.tree.map(jnp.add, carry, (sums, grads)), None

  first = jax.tree.map(lambda x: x[0], micro)
  shapes = jax.eval_shape(lambda: grad_fn(params, first))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), (shapes[1], shapes[0]))
  (sums, grads), _ = jax.lax.scan(body, zeros, micro)
  return sums, grads


def map_microbatches(fn: Callable[[Batch], Any], batch: Batch, num: int) -> Any:
  """`fn(batch)` of per-row outputs [B, ...], computed `num` micro-batches at a time (a
  scan) and put back in row order."""
  if num == 1:
    return fn(batch)
  out = jax.lax.map(fn, split_microbatches(batch, num))  # [num, B / num, ...]
  return jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:]), out)


def sum_microbatches(sums_fn: Callable[[Batch], Any], batch: Batch, num: int) -> Any:
  """`sums_fn(batch)` added up over `num` micro-batches, one at a time (a scan), so only one
  micro-batch's activations are alive: evaluation at the training batch size fits where a
  training step does."""
  if num == 1:
    return sums_fn(batch)
  micro = split_microbatches(batch, num)
  shapes = jax.eval_shape(sums_fn, jax.tree.map(lambda x: x[0], micro))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  total, _ = jax.lax.scan(lambda c, mb: (jax.tree.map(jnp.add, c, sums_fn(mb)), None), zeros, micro)
  return total


def apply_gradients(
  state: TrainState, grads: Any, optimizer: optax.GradientTransformation
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer update, or none (counted in `skipped`) if any gradient is non-finite.

  The step counter advances either way so the schedule and the data stay in step; the
  training loop decides whether a skipped step is tolerated or stops the run.
  """
  grad_norm = optax.global_norm(grads)
  finite = jnp.isfinite(grad_norm)
  mask = lora.trainable_mask(state.params)

  def update(params, opt_state):
    updates, opt_state = optimizer.update(grads, opt_state, params)
    new = optax.apply_updates(params, updates)
    # Frozen parameters stay exactly as they were, even under an optimizer that was not
    # masked to the trainable ones (whose weight decay would otherwise move them).
    return lora.merge_trees(lora.split(new, mask)[0], lora.split(params, mask)[1]), opt_state

  # A branch rather than a `where` over every parameter and moment: the skipped path costs
  # nothing and the taken one no extra pass over the state.
  params, opt_state = jax.lax.cond(
    finite, update, lambda *state_: state_, state.params, state.opt_state
  )
  new_state = state.replace(
    step=state.step + 1,
    params=params,
    opt_state=opt_state,
    skipped=state.skipped + (~finite).astype(jnp.int32),
  )
  return new_state, {"grad_norm": grad_norm, "finite": finite, "skipped": new_state.skipped}


def sums_train_step(
  sums_fn: SumsFn,
  finalize: Callable[[dict[str, jax.Array]], tuple[jax.Array, dict[str, jax.Array]]],
  optimizer: optax.GradientTransformation,
  *,
  fields: tuple[str, ...],
  count_key: str,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  grad_accum_steps: int = 1,
  learning_rate_fn: optax.Schedule | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """The train step every objective shares: `train_step(state, batch, *frozen) -> (state,
  metrics)`; `frozen` are inputs that are not trained (a reference model, a lookup table).

  `sums_fn(params, batch, *frozen)` returns summed loss terms of a (micro-)batch with
  `"loss_sum"` and the normalizer `count_key` (tokens, pairs, ...); `finalize(sums) -> (loss,
  metrics)` turns the batch's totals into means. Gradients of the summed loss are divided
  once by the total count, so `grad_accum_steps` micro-batches give the update of one step
  on all rows.
  Only the batch's `fields` go in. Metrics: `finalize`'s, grad_norm (before clipping),
  finite, skipped, and learning_rate if `learning_rate_fn` is given.
  """

  def train_step(state: TrainState, batch: Batch, *frozen):
    with sharding.activation_sharding(mesh, rules):
      sums, grads = accumulate_gradients(
        lambda p, b: sums_fn(p, b, *frozen),
        state.params,
        {k: batch[k] for k in fields},
        grad_accum_steps,
      )
    count = jnp.maximum(sums[count_key], 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss, metrics = finalize(sums)
    new_state, update_metrics = apply_gradients(state, grads, optimizer)
    metrics |= update_metrics
    metrics["finite"] = update_metrics["finite"] & jnp.isfinite(loss)
    if learning_rate_fn is not None:
      metrics["learning_rate"] = learning_rate_fn(state.step)
    return new_state, metrics

  return train_step


def batch_sharding(mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES) -> NamedSharding:
  """Rows over the batch axes (data × fsdp), everything else replicated: a prefix sharding
  that fits every field of a batch dict, [B], [B, T] or [B, T, ...]."""
  return sharding.named_sharding(mesh, ("act_batch",), rules)


def jit_train_step(
  step_fn,
  state_shardings: TrainState,
  mesh: Mesh,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  frozen_shardings: tuple[Any, ...] = (),
):
  """`step_fn(state, batch, *frozen)` jitted with explicit shardings and the state donated
  (`frozen_shardings`: one sharding tree per frozen argument)."""
  return jax.jit(
    step_fn,
    in_shardings=(state_shardings, batch_sharding(mesh, rules), *frozen_shardings),
    out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
    donate_argnums=0,
  )


def jit_eval_step(
  eval_fn,
  params_shardings: Any,
  mesh: Mesh,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  frozen_shardings: tuple[Any, ...] = (),
):
  """`eval_fn(params, batch, *frozen)` jitted with explicit shardings (nothing donated)."""
  return jax.jit(
    eval_fn,
    in_shardings=(params_shardings, batch_sharding(mesh, rules), *frozen_shardings),
    out_shardings=NamedSharding(mesh, PartitionSpec()),
  )


# Fields of a rollout row (`llama_jax.rl.rollouts.rollout_rows`): what the RL steps read.
ROW_FIELDS = ("tokens", "positions", "segment_ids", "targets", "response_mask")


def make_logps_fn(
  model: sharding.Model,
  chunk_size: int = 0,
  *,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  micro_batches: int = 1,
):
  """`logps(params, rows) -> (logp, entropy)`, each [B, T]: log-probs of the rows' targets
  and the entropy of the model's distribution at each position (policy or reference),
  `micro_batches` row-blocks at a time. Not jitted."""

  def logps(params, rows: Batch):
    rows = {k: rows[k] for k in ("tokens", "positions", "segment_ids", "targets")}
    fn = lambda b: row_logprobs(model, params, b, chunk_size, with_entropy=True)
    with sharding.activation_sharding(mesh, rules):
      return map_microbatches(fn, rows, micro_batches)

  return logps


# --------------------------------------------------------------------------- built algorithms

ADAPTER_STREAM = 7  # fresh LoRA adapters draw from fold_in(key, 7), apart from the state's key


def trains_adapters(model: sharding.Model) -> bool:
  """Whether `model` (a module or a `LlamaConfig`) has LoRA adapters, so only they (and any
  head) are trained."""
  return getattr(as_model(model), "lora", None) is not None


def optimizer_for(model: sharding.Model, config: OptimizerConfig) -> optax.GradientTransformation:
  """`train_state.make_optimizer(config)`, restricted to the adapters and heads
  (`lora.trainable_mask`) when `model` trains LoRA adapters."""
  trainable = lora.trainable_mask if trains_adapters(model) else None
  return ts.make_optimizer(config, trainable=trainable)


def new_state(
  model: sharding.Model,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  key: jax.Array,
  params: Any = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> TrainState:
  """A fresh train state of `model` on `mesh`: new parameters from `key` if `params` is None,
  else `params` (loaded weights of the plain model, any placement) with fresh LoRA adapters
  beside them if the model has adapters. `key` is a `jax.random.PRNGKey`."""
  if params is not None and trains_adapters(model):
    adapter_key = jax.random.fold_in(key, ADAPTER_STREAM)
    params = sharding.init_missing(model, params, adapter_key, mesh, rules)
  return ts.init_train_state(model, optimizer, mesh, key, params=params, rules=rules)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OfflineAlgorithm:
  """An algorithm trained by `training.trainer.fit` over a dataset: its model (a module, LoRA
  adapters included if it trains them), optimizer and mesh, and its jitted functions.

  `train_step(state, batch, ...) -> (state, metrics)` donates the state;
  `eval_step(params, batch, ...)` returns per-batch sums or rows (see the subclass).
  `abstract_state()` is the checkpoint's restore target and the compile check's argument;
  `init_state(params, key)` the real state a run starts from.
  """

  model: sharding.Model
  optimizer: optax.GradientTransformation
  mesh: Mesh
  train_step: Callable
  eval_step: Callable
  rules: sharding.Rules = sharding.DEFAULT_RULES

  def abstract_state(self) -> TrainState:
    """`jax.ShapeDtypeStruct`s with shardings: nothing allocated."""
    return ts.abstract_train_state(self.model, self.optimizer, self.mesh, self.rules)

  def init_state(self, params: Any, key: jax.Array) -> TrainState:
    """Step 0 around `params` (None: fresh from `key`), placed on the mesh (`new_state`)."""
    return new_state(self.model, self.optimizer, self.mesh, key, params, self.rules)

  def state_shardings(self) -> TrainState:
    return ts.state_shardings(self.model, self.optimizer, self.mesh, self.rules)
