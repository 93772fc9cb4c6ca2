"""Reward-model losses: the binary ranking loss with Llama 2's margins, and Llama 3's ranking
over 2–3 responses per prompt, kept as sums so that means stay exact under accumulation.

Shapes: B prompts (rows), K responses per row (best first), P pairs. For one pair

    loss = −log σ(r_chosen − r_rejected − m) + c · (r_chosen + r_rejected)²

with m the margin of the pair's rating (Llama 2; 0 without a table) and c the optional
reward-centering coefficient (Eisenstein et al. 2023, "Helping or Herding?", and TRL's
`center_rewards_coefficient`): the pairwise loss only sees differences, so the reward's level
drifts freely; the square pins the mean of each pair near 0, which matters where the value
itself is used (Llama 2's safety threshold σ(R_s) < 0.15, PPO whitening). Losses and metrics
are means over pairs: every function returns sums with a pair count, `pair_mean` divides once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.data.records import RATING_CODES

# Rating names by integer code (`llama_jax.data.records.RATING_CODES`; -1: no rating).
RATING_NAMES = tuple(sorted(RATING_CODES, key=RATING_CODES.get))

# Llama 2's margins m(rating) (Touvron et al. 2023, Table 27).
MARGIN_TABLES: dict[str, dict[str, float]] = {
  "small": {
    "significantly_better": 1.0,
    "better": 2 / 3,
    "slightly_better": 1 / 3,
    "negligibly_better": 0.0,
  },
  "large": {
    "significantly_better": 3.0,
    "better": 2.0,
    "slightly_better": 1.0,
    "negligibly_better": 0.0,
  },
}
MARGINS = ("none", *MARGIN_TABLES)

# The (better, worse) response slots of a row with up to three responses, best first.
RANK_PAIRS = ((0, 1), (0, 2), (1, 2))

SUM_KEYS = (
  "loss_sum",
  "nll_sum",
  "centering_sum",
  "correct",
  "pairs",
  "chosen_sum",
  "rejected_sum",
  "margin_sum",
)


def check_margins(name: str) -> str:
  """`name` if it is "none", "small" or "large", else a ValueError naming it."""
  if name not in MARGINS:
    raise ValueError(f"margins={name!r}; expected one of {MARGINS}")
  return name


def margins_for_ratings(ratings: jax.Array, table: str) -> jax.Array:
  """Margins [B] float32 for rating codes [B] (-1 or "none": margin 0)."""
  check_margins(table)
  if table == "none":
    return jnp.zeros(ratings.shape, jnp.float32)
  values = jnp.asarray([MARGIN_TABLES[table][name] for name in RATING_NAMES], jnp.float32)
  return jnp.where(ratings >= 0, values[jnp.clip(ratings, 0, len(RATING_NAMES) - 1)], 0.0)


def pairwise_sums(
  chosen: jax.Array,  # [...] rewards of the better responses
  rejected: jax.Array,  # [...] rewards of the worse responses
  margins: jax.Array | None = None,  # [...]
  weights: jax.Array | None = None,  # [...] 1 for real pairs, 0 for padding
  *,
  centering: float = 0.0,
) -> dict[str, jax.Array]:
  """Sums over the pairs of the loss and its metrics (`SUM_KEYS`), float32."""
  chosen, rejected = chosen.astype(jnp.float32), rejected.astype(jnp.float32)
  w = jnp.ones_like(chosen) if weights is None else weights.astype(jnp.float32)
  m = jnp.zeros_like(chosen) if margins is None else margins.astype(jnp.float32)
  delta = chosen - rejected
  nll = jax.nn.softplus(-(delta - m))  # −log σ(δ − m), stable for any δ
  nll_sum = jnp.sum(w * nll)
  centering_sum = jnp.sum(w * jnp.square(chosen + rejected))
  return {
    "loss_sum": nll_sum + centering * centering_sum,
    "nll_sum": nll_sum,
    "centering_sum": centering_sum,
    "correct": jnp.sum(w * (delta > 0)),
    "pairs": jnp.sum(w),
    "chosen_sum": jnp.sum(w * chosen),
    "rejected_sum": jnp.sum(w * rejected),
    "margin_sum": jnp.sum(w * delta),
  }


def pair_mean(sums: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`(loss, metrics)` from accumulated sums, each divided once by the pair count.

  A batch without pairs gives 0 rather than NaN. Metrics: loss, nll (the ranking term
  alone), centering (mean (r_c + r_r)²), accuracy (r_c > r_r), rewards/chosen,
  rewards/rejected, rewards/margins (mean r_c − r_r), pairs.
  """
  count = jnp.maximum(sums["pairs"], 1.0)
  loss = sums["loss_sum"] / count
  return loss, {
    "loss": loss,
    "nll": sums["nll_sum"] / count,
    "centering": sums["centering_sum"] / count,
    "accuracy": sums["correct"] / count,
    "rewards/chosen": sums["chosen_sum"] / count,
    "rewards/rejected": sums["rejected_sum"] / count,
    "rewards/margins": sums["margin_sum"] / count,
    "pairs": sums["pairs"],
  }


def pairwise_loss(
  chosen_rewards: jax.Array,  # [P]
  rejected_rewards: jax.Array,  # [P]
  margins: jax.Array | None = None,  # [P]
  *,
  weights: jax.Array | None = None,  # [P]
  centering: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean over pairs of −log σ(r_c − r_r − m) [+ c · (r_c + r_r)²], and its metrics."""
  sums = pairwise_sums(chosen_rewards, rejected_rewards, margins, weights, centering=centering)
  return pair_mean(sums)


def ranking_pairs(
  rewards: jax.Array,  # [B, K] best first
  present: jax.Array,  # [B, K] bool: the row has response k
  margins: jax.Array | None = None,  # [B] margin of the row's rating
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Every ordered pair (i better than j, i < j) of each row's responses.

  Returns `(chosen [B, P], rejected [B, P], weights [B, P], margins [B, P])`. The rating (and
  so the margin) describes chosen vs rejected, the row's last two responses; the pairs with
  an edited response get margin 0.
  """
  k = rewards.shape[1]
  pairs = [(i, j) for i, j in RANK_PAIRS if j < k]
  i, j = (np.asarray(x) for x in zip(*pairs, strict=True))
  num = jnp.sum(present, axis=1, keepdims=True)  # [B, 1]
  weights = (present[:, i] & present[:, j]).astype(jnp.float32)
  rated = (i[None] == num - 2) & (j[None] == num - 1)
  pair_margins = (
    jnp.zeros_like(weights) if margins is None else jnp.where(rated, margins[:, None], 0.0)
  )
  return rewards[:, i], rewards[:, j], weights, pair_margins


def ranking_sums(
  rewards: jax.Array,  # [B, K]
  present: jax.Array,  # [B, K] bool
  margins: jax.Array | None = None,  # [B]
  *,
  centering: float = 0.0,
) -> dict[str, jax.Array]:
  """`pairwise_sums` over every ordered pair of every row (see `ranking_pairs`)."""
  chosen, rejected, weights, pair_margins = ranking_pairs(rewards, present, margins)
  return pairwise_sums(chosen, rejected, pair_margins, weights, centering=centering)


def ranking_loss(
  rewards: jax.Array,  # [B, K] best first
  present: jax.Array,  # [B, K] bool
  margins: jax.Array | None = None,  # [B]
  *,
  centering: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Llama 3's ranking loss: the pairwise loss over all ordered pairs of 2–3 responses per
  prompt (edited > chosen > rejected), averaged over pairs."""
  return pair_mean(ranking_sums(rewards, present, margins, centering=centering))
