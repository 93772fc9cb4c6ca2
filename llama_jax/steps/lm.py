"""The LM train and eval steps (pretraining and SFT): masked cross entropy on `targets`.

    lm = build(model, mesh, LMConfig(z_loss=1e-4), OptimizerConfig(...), grad_accum_steps=4)
    state = lm.init_state(params, jax.random.PRNGKey(0))     # params None: fresh
    state, metrics = lm.train_step(state, batch)              # jitted, state donated
    metrics = lm.evaluate(state.params, eval_batches)

`build` wires the pure step functions below (`make_train_step`, `make_eval_step`) with the
optimizer, the shardings and `jax.jit`.

The batch is the data pipeline's: `tokens`, `positions`, `segment_ids`, `targets`,
`target_mask`, each [B, T] (global B). With `grad_accum_steps=A` the B rows are split into
A micro-batches of B / A run one after another; summed losses and gradients are divided
once by the token count of the whole batch, so the update equals one step on all B rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh

from llama_jax.model.llama import as_model
from llama_jax.objectives import lm as lm_obj
from llama_jax.parallel import sharding
from llama_jax.steps import common
from llama_jax.steps.common import Batch, sum_microbatches, sums_train_step
from llama_jax.training import train_state as ts
from llama_jax.training.train_state import OptimizerConfig, TrainState

LM_FIELDS = ("tokens", "positions", "segment_ids", "targets", "target_mask")


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """The LM objective.

  Attributes:
    z_loss: coefficient of the z-loss, mean (log Z)² over target tokens (0 = off).
    loss_chunk_size: compute the logits and the loss over sequence chunks of this size, so
      the [B, T, V] logits never exist at once (0 = all at once).
  """

  z_loss: float = 0.0
  loss_chunk_size: int = 0

  def __post_init__(self):
    if self.z_loss < 0:
      raise ValueError(f"lm z_loss={self.z_loss} must be >= 0")
    if self.loss_chunk_size < 0:
      raise ValueError(f"lm loss_chunk_size={self.loss_chunk_size} must be >= 0")


def loss_sums(
  model: sharding.Model, params: Any, batch: Batch, *, z_loss: float, chunk_size: int
) -> dict[str, jax.Array]:
  """Summed LM loss terms of one (micro-)batch under `params` (see `objectives.lm`)."""
  model = as_model(model)
  variables = {"params": params}
  hidden, _ = model.apply(
    variables, batch["tokens"], batch["positions"], batch["segment_ids"], method="hidden_states"
  )
  return lm_obj.chunked_cross_entropy_sums(
    hidden,
    lambda h: model.apply(variables, h, method="logits"),
    batch["targets"],
    batch["target_mask"],
    chunk_size=chunk_size,
    z_loss=z_loss,
  )


def make_train_step(
  model: sharding.Model,
  optimizer: optax.GradientTransformation,
  *,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  z_loss: float = 0.0,
  loss_chunk_size: int = 0,
  grad_accum_steps: int = 1,
  learning_rate_fn: optax.Schedule | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step(state, batch) -> (state, metrics)`, pure and not yet jitted.

  Metrics: loss (token mean incl. z-loss), nll, z_loss, accuracy, tokens, grad_norm (before
  clipping), finite, skipped, and learning_rate if `learning_rate_fn` is given.
  """

  def sums_fn(params, batch):
    return loss_sums(model, params, batch, z_loss=z_loss, chunk_size=loss_chunk_size)

  return sums_train_step(
    sums_fn,
    lm_obj.token_mean,
    optimizer,
    fields=LM_FIELDS,
    count_key="tokens",
    mesh=mesh,
    rules=rules,
    grad_accum_steps=grad_accum_steps,
    learning_rate_fn=learning_rate_fn,
  )


def make_eval_step(
  model: sharding.Model,
  *,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  loss_chunk_size: int = 0,
  micro_batches: int = 1,
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """`eval_step(params, batch) -> sums` (`objectives.lm.SUM_KEYS`); add them up over the
  evaluation set and call `objectives.lm.token_mean` once. The batch is evaluated
  `micro_batches` rows-blocks at a time (as the train step accumulates)."""

  def eval_step(params, batch: Batch):
    fn = lambda b: loss_sums(model, params, b, z_loss=0.0, chunk_size=loss_chunk_size)
    with sharding.activation_sharding(mesh, rules):
      return sum_microbatches(fn, {k: batch[k] for k in LM_FIELDS}, micro_batches)

  return eval_step


def evaluate(eval_step, params: Any, batches: Iterable[Batch]) -> dict[str, float]:
  """LM metrics of one pass over `batches` (sums added up, divided once): loss, nll,
  accuracy, tokens."""
  total = None
  for batch in batches:
    sums = eval_step(params, batch)
    total = sums if total is None else jax.tree.map(np.add, total, sums)
  _, metrics = lm_obj.token_mean(jax.device_get(total))
  return {k: float(v) for k, v in metrics.items() if k != "z_loss"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LM(common.OfflineAlgorithm):
  """Pretraining / SFT built by `build`: `train_step(state, batch) -> (state, metrics)`
  (jitted, state donated), `eval_step(params, batch) -> sums` (jitted) and `evaluate`."""

  config: LMConfig

  def evaluate(self, params: Any, batches: Iterable[Batch]) -> dict[str, float]:
    """Metrics of one pass over `batches` (an evaluation pipeline)."""
    return evaluate(self.eval_step, params, batches)


def build(
  model: sharding.Model,
  mesh: Mesh,
  config: LMConfig,
  optimizer: OptimizerConfig,
  *,
  grad_accum_steps: int = 1,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> LM:
  """The LM algorithm of `model` (`Llama(config)`, with LoRA adapters if it trains them, or a
  `LlamaConfig`) on `mesh`: the optimizer of `optimizer` (only the adapters under LoRA), the
  train step over `grad_accum_steps` micro-batches and the eval step a micro-batch at a time,
  jitted with the state's shardings."""
  tx = common.optimizer_for(model, optimizer)
  shardings = ts.state_shardings(model, tx, mesh, rules)
  train_step = make_train_step(
    model,
    tx,
    mesh=mesh,
    rules=rules,
    z_loss=config.z_loss,
    loss_chunk_size=config.loss_chunk_size,
    grad_accum_steps=grad_accum_steps,
    learning_rate_fn=ts.learning_rate_schedule(optimizer),
  )
  eval_step = make_eval_step(
    model,
    mesh=mesh,
    rules=rules,
    loss_chunk_size=config.loss_chunk_size,
    micro_batches=grad_accum_steps,
  )
  return LM(
    model=model,
    optimizer=tx,
    mesh=mesh,
    rules=rules,
    config=config,
    train_step=common.jit_train_step(train_step, shardings, mesh, rules),
    eval_step=common.jit_eval_step(eval_step, shardings.params, mesh, rules),
  )
