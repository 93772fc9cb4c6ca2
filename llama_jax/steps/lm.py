"""The LM train and eval steps (pretraining and SFT): masked cross entropy on `targets`.

    step = make_train_step(model_config, optimizer, mesh=mesh, grad_accum_steps=4)
    step = steps.common.jit_train_step(step, state_shardings, mesh)   # donated state
    state, metrics = step(state, batch)

The batch is the data pipeline's: `tokens`, `positions`, `segment_ids`, `targets`,
`target_mask`, each [B, T] (global B). With `grad_accum_steps=A` the B rows are split into
A micro-batches of B / A run one after another; summed losses and gradients are divided
once by the token count of the whole batch, so the update equals one step on all B rows.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax
from jax.sharding import Mesh

from llama_jax.model.llama import as_model
from llama_jax.objectives import lm as lm_obj
from llama_jax.parallel import sharding
from llama_jax.steps.common import Batch, sum_microbatches, sums_train_step
from llama_jax.training.train_state import TrainState

LM_FIELDS = ("tokens", "positions", "segment_ids", "targets", "target_mask")


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
