"""Reward-model training: train and eval steps on packed ranking rows (`llama_jax.data.ranking`).

    rm = build(RewardModel(config), mesh, RankingConfig(margins="small"), OptimizerConfig(...))
    params = model.reward_model.from_lm_params(config, lm_params, head_key)  # or None: fresh
    state = rm.init_state(params, jax.random.PRNGKey(0))
    state, metrics = rm.train_step(state, batch)        # jitted, state donated
    metrics = rm.eval_metrics(rm.evaluate(state.params, eval_batches))

`build` wires the pure step functions below (`make_train_step`, `make_eval_step`) with the
optimizer, the shardings and `jax.jit`.

The batch is the ranking pipeline's: `tokens`, `segment_ids`, `response_ids` [B, T] and
`rating`, `valid` [B]; one row holds a prompt and its 2–3 responses, best first, and one
forward pass scores them all. The loss is `objectives.reward_model.ranking_loss` over every
ordered pair of a row's responses (Llama 2's pairs are the 2-response case), with the
rating's margin on the chosen-vs-rejected pair. With `grad_accum_steps=A` the rows run as A
micro-batches whose summed losses and gradients are divided once by the pair count of the
whole batch, so the update equals one step on all B rows.

Evaluation: `make_eval_step` returns each row's rewards, `evaluate` gathers a full pass on
the host, `eval_metrics` reports accuracy overall and per rating bucket (the shape of the
Llama 2 tables) and reward mean / std / quantiles;
`llama_jax.training.metrics.plot_score_distribution` draws the score histograms.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from llama_jax.data import ranking
from llama_jax.data.records import CONCERNS
from llama_jax.model import reward_model
from llama_jax.objectives import reward_model as rm_obj
from llama_jax.parallel import sharding
from llama_jax.steps import common
from llama_jax.steps.common import Batch, map_microbatches, sums_train_step
from llama_jax.training import metrics as metrics_lib
from llama_jax.training import train_state as ts
from llama_jax.training.train_state import OptimizerConfig, TrainState

RANKING_FIELDS = ("tokens", "segment_ids", "response_ids", "rating", "valid")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclasses.dataclass(frozen=True)
class RankingConfig:
  """The reward model's ranking objective (`objectives.reward_model`).

  Attributes:
    margins: "none", "small" or "large": Llama 2's margin tables by rating.
    centering: coefficient c of the reward-centering term c · (r_chosen + r_rejected)²
      (0 = off).
  """

  margins: str = "none"
  centering: float = 0.0

  def __post_init__(self):
    rm_obj.check_margins(self.margins)
    if self.centering < 0:
      raise ValueError(f"reward centering={self.centering} must be >= 0")


def ranking_rewards(
  model: sharding.Model,
  params: Any,
  tokens: jax.Array,  # [B, T]
  segment_ids: jax.Array,  # [B, T]
  response_ids: jax.Array,  # [B, T]
  max_responses: int = ranking.MAX_RESPONSES,
) -> tuple[jax.Array, jax.Array]:
  """`(rewards [B, K], present [B, K])` of packed ranking rows (`llama_jax.data.ranking`):
  one forward pass per row scores every response of its prompt."""
  positions, mask, last = ranking.ranking_inputs(segment_ids, response_ids, max_responses)
  rm = reward_model.as_reward_model(model)
  scores = rm.apply({"params": params}, tokens, positions, segment_ids, mask)
  return reward_model.gather_last(scores, last), last >= 0


def row_rewards(
  model: sharding.Model, params: Any, batch: Batch, max_responses: int = ranking.MAX_RESPONSES
) -> tuple[jax.Array, jax.Array]:
  """`(rewards [B, K], present [B, K])`; padding rows (`valid` 0) have no responses."""
  rewards, present = ranking_rewards(
    model, params, batch["tokens"], batch["segment_ids"], batch["response_ids"], max_responses
  )
  return rewards, present & (batch["valid"][:, None] != 0)


def loss_sums(
  model: sharding.Model,
  params: Any,
  batch: Batch,
  *,
  margins: str = "none",
  centering: float = 0.0,
  max_responses: int = ranking.MAX_RESPONSES,
) -> dict[str, jax.Array]:
  """Summed ranking-loss terms of one (micro-)batch (`objectives.reward_model.SUM_KEYS`)."""
  rewards, present = row_rewards(model, params, batch, max_responses)
  row_margins = rm_obj.margins_for_ratings(batch["rating"], margins)
  return rm_obj.ranking_sums(rewards, present, row_margins, centering=centering)


def make_train_step(
  model: sharding.Model,
  optimizer: optax.GradientTransformation,
  *,
  mesh: Mesh | None = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
  margins: str = "none",
  centering: float = 0.0,
  grad_accum_steps: int = 1,
  learning_rate_fn: optax.Schedule | None = None,
  max_responses: int = ranking.MAX_RESPONSES,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
  """`train_step(state, batch) -> (state, metrics)`, pure and not yet jitted.

  `margins`: "none", "small" or "large" (Llama 2's tables); `centering`: the coefficient of
  the reward-centering term. Metrics: those of `objectives.reward_model.pair_mean`, grad_norm
  (before clipping), finite, skipped, and learning_rate if `learning_rate_fn` is given.
  """
  rm_obj.check_margins(margins)

  def sums_fn(params, batch):
    return loss_sums(
      model, params, batch, margins=margins, centering=centering, max_responses=max_responses
    )

  return sums_train_step(
    sums_fn,
    rm_obj.pair_mean,
    optimizer,
    fields=RANKING_FIELDS,
    count_key="pairs",
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
  max_responses: int = ranking.MAX_RESPONSES,
  micro_batches: int = 1,
) -> Callable[[Any, Batch], dict[str, jax.Array]]:
  """`eval_step(params, batch) -> {rewards [B, K], present [B, K], rating [B], concern [B]}`
  (jit it with `steps.common.jit_eval_step`: replicated outputs, readable on every host),
  `micro_batches` row-blocks at a time."""

  def eval_step(params, batch: Batch):
    rows = {k: batch[k] for k in RANKING_FIELDS}
    fn = lambda b: row_rewards(model, params, b, max_responses)
    with sharding.activation_sharding(mesh, rules):
      rewards, present = map_microbatches(fn, rows, micro_batches)
    return {
      "rewards": rewards,
      "present": present,
      "rating": batch["rating"],
      "concern": batch["concern"],
    }

  return eval_step


def evaluate(eval_step, params: Any, batches: Iterable[Batch]) -> dict[str, np.ndarray]:
  """One pass: the rows of every batch that have responses, as host numpy arrays."""
  parts = [jax.device_get(eval_step(params, batch)) for batch in batches]
  rows = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  keep = rows["present"].any(axis=1)
  return {k: v[keep] for k, v in rows.items()}


def eval_metrics(
  rows: Mapping[str, np.ndarray], *, margins: str = "none", centering: float = 0.0
) -> dict[str, float]:
  """Metrics of an evaluation pass (`evaluate`'s rows).

  loss, nll, accuracy, rewards/{chosen,rejected,margins}: as in training, over every ordered
  pair. accuracy/<rating> and pairs/<rating>: the chosen-vs-rejected pair of the rows of
  each Llama 2 bucket; accuracy/chosen_rejected all of them; accuracy/<concern> likewise per
  concern. rewards/mean, rewards/std, rewards/q05 … q95: every response's reward.
  """
  rewards, present = rows["rewards"], rows["present"].astype(bool)
  row_margins = rm_obj.margins_for_ratings(jnp.asarray(rows["rating"]), margins)
  _, pair_metrics = rm_obj.ranking_loss(
    jnp.asarray(rewards), jnp.asarray(present), row_margins, centering=centering
  )
  out = {k: float(v) for k, v in pair_metrics.items() if k != "centering" or centering}
  chosen, rejected = ranking.chosen_rejected(rewards, present)
  correct = chosen > rejected
  out["accuracy/chosen_rejected"] = float(correct.mean())
  for code, name in enumerate(rm_obj.RATING_NAMES):
    bucket = rows["rating"] == code
    if bucket.any():
      out[f"accuracy/{name}"] = float(correct[bucket].mean())
      out[f"pairs/{name}"] = int(bucket.sum())
  for code, name in enumerate(CONCERNS):
    if (bucket := rows["concern"] == code).any():
      out[f"accuracy/{name}"] = float(correct[bucket].mean())
  scores = rewards[present]
  out["rewards/mean"], out["rewards/std"] = float(scores.mean()), float(scores.std())
  for q, value in zip(QUANTILES, np.quantile(scores, QUANTILES), strict=True):
    out[f"rewards/q{round(q * 100):02d}"] = float(value)
  return out


# Re-exported: the plot moved to `llama_jax.training.metrics` (plotting is no step's business).
plot_score_distribution = metrics_lib.plot_score_distribution


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardModelTrainer(common.OfflineAlgorithm):
  """Reward-model training built by `build`: `train_step(state, batch) -> (state, metrics)`
  (jitted, state donated), `eval_step(params, batch) -> per-row rewards` (jitted),
  `evaluate` (one pass, on the host) and `eval_metrics` (its accuracy table and statistics)."""

  config: RankingConfig
  max_responses: int = ranking.MAX_RESPONSES

  def evaluate(self, params: Any, batches: Iterable[Batch]) -> dict[str, np.ndarray]:
    """Every row of one pass over `batches` that has responses (`evaluate`)."""
    return evaluate(self.eval_step, params, batches)

  def eval_metrics(self, rows: Mapping[str, np.ndarray]) -> dict[str, float]:
    """`eval_metrics` of `evaluate`'s rows under this run's margins and centering."""
    return eval_metrics(rows, margins=self.config.margins, centering=self.config.centering)


def build(
  model: sharding.Model,
  mesh: Mesh,
  config: RankingConfig,
  optimizer: OptimizerConfig,
  *,
  grad_accum_steps: int = 1,
  max_responses: int = ranking.MAX_RESPONSES,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> RewardModelTrainer:
  """Reward-model training of `model` (`RewardModel(config)`, with LoRA adapters on the trunk
  if it trains them, or a `LlamaConfig`) on `mesh`: the optimizer of `optimizer` (only the
  adapters and the head under LoRA), the train step over `grad_accum_steps` micro-batches and
  the eval step a micro-batch at a time, for rows of up to `max_responses` responses (2:
  chosen / rejected pairs), jitted with the state's shardings."""
  model = reward_model.as_reward_model(model)
  tx = common.optimizer_for(model, optimizer)
  shardings = ts.state_shardings(model, tx, mesh, rules)
  train_step = make_train_step(
    model,
    tx,
    mesh=mesh,
    rules=rules,
    margins=config.margins,
    centering=config.centering,
    grad_accum_steps=grad_accum_steps,
    learning_rate_fn=ts.learning_rate_schedule(optimizer),
    max_responses=max_responses,
  )
  eval_step = make_eval_step(
    model, mesh=mesh, rules=rules, max_responses=max_responses, micro_batches=grad_accum_steps
  )
  return RewardModelTrainer(
    model=model,
    optimizer=tx,
    mesh=mesh,
    rules=rules,
    config=config,
    max_responses=max_responses,
    train_step=common.jit_train_step(train_step, shardings, mesh, rules),
    eval_step=common.jit_eval_step(eval_step, shardings.params, mesh, rules),
  )


def bucket_table(metrics: Mapping[str, float]) -> str:
  """The per-rating accuracy table of `eval_metrics` as text (Llama 2, Table 8 layout)."""
  names = [n for n in reversed(rm_obj.RATING_NAMES) if f"accuracy/{n}" in metrics]
  header = " | ".join(["", *names, "all pairs (c>r)", "ranking (all ordered pairs)"])
  cells = [f"{metrics[f'accuracy/{n}']:.3f} (n={metrics[f'pairs/{n}']})" for n in names]
  cells += [f"{metrics['accuracy/chosen_rejected']:.3f}", f"{metrics['accuracy']:.3f}"]
  return header + "\n" + " | ".join(["accuracy", *cells])
