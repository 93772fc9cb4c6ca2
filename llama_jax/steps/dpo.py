"""DPO train and eval steps on preference pairs (`llama_jax.data.make_pair_pipeline`).

    dpo = build(model, mesh, DPOConfig(beta=0.1, nll_coef=0.2), OptimizerConfig(...),
                reference="precomputed")                    # or "in_step"
    reference = dpo.reference_table(ref_params, eval_pass, num_records)  # "in_step": ref_params
    state = dpo.init_state(params, jax.random.PRNGKey(0))
    state, metrics = dpo.train_step(state, batch, reference)  # jitted, state donated
    metrics = dpo.evaluate(state.params, eval_batches, reference)

`build` wires the pure step functions below (`make_train_step`, `make_eval_step`,
`make_reference_step`) with the optimizer, the shardings and `jax.jit`.

The batch is `{"chosen": rows, "rejected": rows}`, two pad-mode batches [B, T] whose row i is
pair i (fields `tokens`, `positions`, `segment_ids`, `targets`, `target_mask`, `format_mask`,
`valid`, and `index` from an `Indexed` source). Both sides go through the policy in one
forward pass of 2B rows, interleaved (row 2i chosen, 2i + 1 rejected) so that each device
keeps its own pairs and no rows move between devices.

The reference log-probabilities come from one of two places, chosen by `reference`:

- "precomputed": a table [N, 2] (chosen, rejected per source record) made by
  `reference_logps_table` in one pass over the dataset before training; the step looks its
  rows up by `index`. The reference model need not stay in memory while training.
- "in_step": the reference parameters are a frozen argument of the step and the reference
  forward pass runs inside it, outside the gradient.

Both give the same step (tested). Log-probabilities are summed over each response's target
tokens, without the formatting tokens (headers, end-of-turn) when `mask_formatting` (Llama
3); the NLL term is the token-mean LM loss of the chosen response (all its target tokens,
end-of-turn included, as SFT trains them).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.model import lora
from llama_jax.model.llama import as_model
from llama_jax.objectives import dpo as dpo_obj
from llama_jax.objectives import logprobs as lp
from llama_jax.parallel import sharding
from llama_jax.steps import common
from llama_jax.steps.common import (
  Batch,
  map_microbatches,
  row_logprobs,
  sum_microbatches,
  sums_train_step,
)
from llama_jax.training import train_state as ts
from llama_jax.training.train_state import OptimizerConfig, TrainState

SIDES = ("chosen", "rejected")
ROW_FIELDS = ("tokens", "positions", "segment_ids", "targets", "target_mask", "format_mask")
REFERENCES = ("precomputed", "in_step")


@dataclasses.dataclass(frozen=True)
class DPOConfig:
  """The DPO objective. Llama 3: beta 0.1, nll_coef 0.2, mask_formatting True.

  Attributes:
    beta: β, the strength of the implicit KL constraint.
    loss_type: "sigmoid" (DPO), "ipo" or "hinge".
    label_smoothing: ε of conservative DPO (sigmoid only).
    nll_coef: coefficient of the NLL term on the chosen responses (0 = off).
    mask_formatting: leave header and end-of-turn tokens out of the log-probabilities.
    loss_chunk_size: compute log-probs over sequence chunks of this size (0 = all at once).
  """

  beta: float = 0.1
  loss_type: str = "sigmoid"
  label_smoothing: float = 0.0
  nll_coef: float = 0.0
  mask_formatting: bool = True
  loss_chunk_size: int = 0

  def __post_init__(self):
    dpo_obj.check_loss_type(self.loss_type, self.label_smoothing)
    if self.beta <= 0:
      raise ValueError(f"dpo beta={self.beta} must be positive")


def interleave(batch: Batch) -> dict[str, jax.Array]:
  """The row fields of both sides as one [2B, T] batch: row 2i chosen i, row 2i + 1
  rejected i (a reshape, so rows stay on the devices that hold their pair)."""
  return {
    k: jnp.stack([batch["chosen"][k], batch["rejected"][k]], axis=1).reshape(
      -1, *batch["chosen"][k].shape[1:]
    )
    for k in ROW_FIELDS
  }


def logp_mask(rows: Batch, mask_formatting: bool) -> jax.Array:
  """[2B, T] the target tokens a response's log-probability sums over."""
  mask = rows["target_mask"]
  if mask_formatting:  # format_mask is token-aligned; targets are the next tokens
    mask = mask * (1 - lp.shift_left(rows["format_mask"]))
  return mask


def pair_logps(model: sharding.Model, params: Any, batch: Batch, dpo: DPOConfig) -> jax.Array:
  """[B, 2] summed log-probabilities of (chosen, rejected) under `params`."""
  rows = interleave(batch)
  logps = lp.sequence_logprobs(
    row_logprobs(model, params, rows, dpo.loss_chunk_size), logp_mask(rows, dpo.mask_formatting)
  )
  return logps.reshape(-1, 2)


def loss_sums(
  model: sharding.Model,
  params: Any,
  batch: Batch,
  reference_logps: jax.Array,  # [B, 2]
  dpo: DPOConfig,
  nll_scale: jax.Array | float = 1.0,
) -> dict[str, jax.Array]:
  """Summed DPO terms of one (micro-)batch (`objectives.dpo`), with `loss_sum` = the DPO loss
  sum + nll_coef · nll_scale · the NLL sum. `nll_scale` = pairs / chosen tokens of the whole
  batch turns the step's division by the pair count into a token mean for the NLL term."""
  rows = interleave(batch)
  token = row_logprobs(model, params, rows, dpo.loss_chunk_size)  # [2B, T]
  logps = lp.sequence_logprobs(token, logp_mask(rows, dpo.mask_formatting)).reshape(-1, 2)
  ref = jax.lax.stop_gradient(reference_logps.astype(jnp.float32))
  sums = dpo_obj.dpo_sums(
    logps[:, 0],
    logps[:, 1],
    ref[:, 0],
    ref[:, 1],
    batch["chosen"]["valid"],
    beta=dpo.beta,
    loss_type=dpo.loss_type,
    label_smoothing=dpo.label_smoothing,
  )
  sums |= dpo_obj.nll_sums(token[0::2], rows["target_mask"][0::2])
  sums["loss_sum"] = sums["dpo_loss_sum"] + dpo.nll_coef * nll_scale * sums["nll_sum"]
  return sums


def reference_fn(model: sharding.Model, reference: str, dpo: DPOConfig):
  """`(batch, frozen) -> [B, 2]` reference log-probs: a table lookup by `index`, or a
  forward pass of the reference parameters."""
  if check_reference(reference) == "precomputed":
    return lambda batch, table: table[batch["chosen"]["index"]]
  # The reference parameters are a plain model's (under LoRA: the frozen base weights).
  ref_model = lora.without_adapters(as_model(model))
  return lambda batch, ref_params: pair_logps(ref_model, ref_params, batch, dpo)


def _nll_scale(batch: Batch) -> jax.Array:
  pairs = jnp.sum(batch["chosen"]["valid"]).astype(jnp.float32)
  tokens = jnp.sum(batch["chosen"]["target_mask"]).astype(jnp.float32)
  return pairs / jnp.maximum(tokens, 1.0)


def _side_fields(reference: str) -> tuple[str, ...]:
  return (*ROW_FIELDS, "valid", "index") if reference == "precomputed" else (*ROW_FIELDS, "valid")


def make_train_step(
  model: sharding.Model,
  optimizer: optax.GradientTransformation,
  dpo: DPOConfig,
  *,
  reference: str = "precomputed",
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  grad_accum_steps: int = 1,
  learning_rate_fn: optax.Schedule | None = None,
) -> Callable[..., tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step(state, batch, reference_table_or_params) -> (state, metrics)`, not jitted.

  Metrics: those of `objectives.dpo.dpo_mean` (loss, dpo_loss, nll, rewards/*, logps/*,
  pairs), grad_norm (before clipping), finite, skipped, learning_rate if given.
  """
  ref_fn = reference_fn(model, reference, dpo)
  fields = _side_fields(reference)

  def sums_fn(params, batch, frozen, nll_scale):
    return loss_sums(model, params, batch, ref_fn(batch, frozen), dpo, nll_scale)

  step = sums_train_step(
    sums_fn,
    lambda sums: dpo_obj.dpo_mean(sums, nll_coef=dpo.nll_coef),
    optimizer,
    fields=SIDES,
    count_key="pairs",
    mesh=mesh,
    rules=rules,
    grad_accum_steps=grad_accum_steps,
    learning_rate_fn=learning_rate_fn,
  )

  def train_step(state: TrainState, batch: Batch, frozen):
    batch = {side: {k: batch[side][k] for k in fields} for side in SIDES}
    return step(state, batch, frozen, _nll_scale(batch))

  return train_step


def make_eval_step(
  model: sharding.Model,
  dpo: DPOConfig,
  *,
  reference: str = "precomputed",
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  micro_batches: int = 1,
) -> Callable[[Any, Batch, Any], dict[str, jax.Array]]:
  """`eval_step(params, batch, reference_table_or_params) -> sums`; add them up over the
  evaluation set and call `objectives.dpo.dpo_mean` once (`evaluate`). The batch is
  evaluated `micro_batches` row-blocks at a time, as the train step accumulates."""
  ref_fn = reference_fn(model, reference, dpo)
  fields = _side_fields(reference)

  def eval_step(params, batch: Batch, frozen):
    batch = {side: {k: batch[side][k] for k in fields} for side in SIDES}
    nll_scale = _nll_scale(batch)  # of the whole batch, as in training
    fn = lambda b: loss_sums(model, params, b, ref_fn(b, frozen), dpo, nll_scale)
    with sharding.activation_sharding(mesh, rules):
      sums = sum_microbatches(fn, batch, micro_batches)
    return {k: v for k, v in sums.items() if k != "loss_sum"}

  return eval_step


def evaluate(
  eval_step, params: Any, batches: Iterable[Batch], frozen: Any, dpo: DPOConfig
) -> dict[str, float]:
  """DPO metrics of one pass over `batches` (sums added up, divided once)."""
  total = None
  for batch in batches:
    sums = eval_step(params, batch, frozen)
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  _, metrics = dpo_obj.dpo_mean(total, nll_coef=dpo.nll_coef)
  return {k: float(v) for k, v in jax.device_get(metrics).items()}


def make_reference_step(
  model: sharding.Model,
  dpo: DPOConfig,
  *,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  micro_batches: int = 1,
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """`ref_step(ref_params, batch) -> {logps [B, 2], index [B], valid [B]}` for
  `reference_logps_table` (jit it with `steps.common.jit_eval_step`), `micro_batches`
  row-blocks at a time."""

  def ref_step(params, batch: Batch):
    rows = {side: {k: batch[side][k] for k in ROW_FIELDS} for side in SIDES}
    with sharding.activation_sharding(mesh, rules):
      logps = map_microbatches(lambda b: pair_logps(model, params, b, dpo), rows, micro_batches)
    return {"logps": logps, "index": batch["chosen"]["index"], "valid": batch["chosen"]["valid"]}

  return ref_step


def reference_logps_table(
  ref_step, ref_params: Any, batches: Iterable[Batch], num_records: int
) -> np.ndarray:
  """float32 [num_records, 2]: each record's (chosen, rejected) reference log-probabilities,
  from one pass of an evaluation pair pipeline over an `Indexed` source.

  Raises if a record is missing or seen twice (the pass must cover the source exactly once).
  """
  table = np.full((num_records, 2), np.nan, np.float32)
  seen = np.zeros(num_records, np.int64)
  for batch in batches:
    out = jax.device_get(ref_step(ref_params, batch))
    rows = out["valid"] != 0
    index = out["index"][rows]
    table[index] = out["logps"][rows]
    np.add.at(seen, index, 1)
  if (seen != 1).any():
    bad = int(np.flatnonzero(seen != 1)[0])
    raise ValueError(
      f"reference pass saw record {bad} {seen[bad]} times (and {(seen != 1).sum()} records "
      "not exactly once); it needs one evaluation pass over an Indexed source"
    )
  return table


def check_reference(reference: str) -> str:
  """`reference` if it is a reference mode (`REFERENCES`), else a ValueError naming it."""
  if reference not in REFERENCES:
    raise ValueError(f"dpo reference={reference!r}; expected one of {REFERENCES}")
  return reference


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPO(common.OfflineAlgorithm):
  """DPO built by `build`, in one reference mode. Its jitted functions take the reference as
  their last argument: the table of `reference_table` ("precomputed") or the reference's
  parameters ("in_step").

  `train_step(state, batch, reference) -> (state, metrics)` (state donated),
  `eval_step(params, batch, reference) -> sums`, `reference_step(ref_params, batch) ->
  {logps, index, valid}` (the pass that fills a table, either mode may run it).
  `reference_sharding`: where the reference argument lives (the table replicated, or the
  reference's parameter shardings).
  """

  config: DPOConfig
  reference: str
  reference_model: sharding.Model  # the plain model (a LoRA policy's frozen base)
  reference_step: Callable
  reference_sharding: Any

  def reference_table(self, ref_params: Any, batches: Iterable[Batch], num_records: int):
    """The table [num_records, 2] of one evaluation pass of `ref_params` over an `Indexed`
    source (`reference_logps_table`), placed on the mesh as the steps take it."""
    table = reference_logps_table(self.reference_step, ref_params, batches, num_records)
    return self.place_table(table)

  def place_table(self, table: np.ndarray) -> jax.Array:
    """A host table [N, 2] (e.g. a stored one) replicated on the mesh."""
    return jax.device_put(np.asarray(table, np.float32), NamedSharding(self.mesh, PartitionSpec()))

  def abstract_reference_params(self) -> Any:
    """The reference's parameters as `jax.ShapeDtypeStruct`s with shardings (the reference
    pass's argument, and the steps' in "in_step" mode)."""
    return sharding.abstract_sharded_params(self.reference_model, self.mesh, self.rules)

  def abstract_reference(self, num_records: int) -> Any:
    """The steps' reference argument as `jax.ShapeDtypeStruct`s with shardings: a table of
    `num_records` rows ("precomputed"), or the reference's parameters ("in_step")."""
    if self.reference == "precomputed":
      return jax.ShapeDtypeStruct((num_records, 2), np.float32, sharding=self.reference_sharding)
    return self.abstract_reference_params()

  def evaluate(self, params: Any, batches: Iterable[Batch], reference: Any) -> dict[str, float]:
    """DPO metrics of one pass over `batches` against `reference` (`evaluate`)."""
    return evaluate(self.eval_step, params, batches, reference, self.config)


def build(
  model: sharding.Model,
  mesh: Mesh,
  config: DPOConfig,
  optimizer: OptimizerConfig,
  *,
  reference: str = "precomputed",
  grad_accum_steps: int = 1,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> DPO:
  """DPO of the policy `model` (`Llama(config)`, with LoRA adapters if it trains them, or a
  `LlamaConfig`) on `mesh`, with the reference log-probs from `reference`: "precomputed" (a
  table made by `DPO.reference_table` before training) or "in_step" (the reference's forward
  pass inside each step). The optimizer of `optimizer` (only the adapters under LoRA), the
  train step over `grad_accum_steps` micro-batches, the eval step and the reference pass a
  micro-batch at a time, jitted with the state's shardings."""
  check_reference(reference)
  tx = common.optimizer_for(model, optimizer)
  shardings = ts.state_shardings(model, tx, mesh, rules)
  ref_model = lora.without_adapters(as_model(model))
  ref_shardings = sharding.param_shardings(ref_model, mesh, rules)
  if reference == "precomputed":
    frozen_sharding = NamedSharding(mesh, PartitionSpec())
  else:
    frozen_sharding = ref_shardings
  train_step = make_train_step(
    model,
    tx,
    config,
    reference=reference,
    mesh=mesh,
    rules=rules,
    grad_accum_steps=grad_accum_steps,
    learning_rate_fn=ts.learning_rate_schedule(optimizer),
  )
  eval_step = make_eval_step(
    model, config, reference=reference, mesh=mesh, rules=rules, micro_batches=grad_accum_steps
  )
  ref_step = make_reference_step(
    ref_model, config, mesh=mesh, rules=rules, micro_batches=grad_accum_steps
  )
  frozen = (frozen_sharding,)
  return DPO(
    model=model,
    optimizer=tx,
    mesh=mesh,
    rules=rules,
    config=config,
    reference=reference,
    reference_model=ref_model,
    train_step=common.jit_train_step(train_step, shardings, mesh, rules, frozen),
    eval_step=common.jit_eval_step(eval_step, shardings.params, mesh, rules, frozen),
    reference_step=common.jit_eval_step(ref_step, ref_shardings, mesh, rules),
    reference_sharding=frozen_sharding,
  )
