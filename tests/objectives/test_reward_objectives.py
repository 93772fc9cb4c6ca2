"""Reward-model losses against numbers computed by hand (no model)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.data import records
from llama_jax.data.records import RATING_CODES
from llama_jax.objectives import reward_model as obj


def nll(delta: float) -> float:
  return math.log1p(math.exp(-delta))  # −log σ(δ)


CHOSEN = np.array([1.0, 0.5, -0.2, 2.0], np.float32)
REJECTED = np.array([0.0, 0.7, -0.4, -1.0], np.float32)
RATINGS = ["significantly_better", "better", "slightly_better", "negligibly_better"]


def test_rating_codes_and_tables_follow_the_data_and_the_paper():
  assert {name: i for i, name in enumerate(obj.RATING_NAMES)} == RATING_CODES
  assert set(obj.RATING_NAMES) == set(records.RATINGS)
  assert obj.MARGIN_TABLES["small"] == {
    "significantly_better": 1.0,
    "better": 2 / 3,
    "slightly_better": 1 / 3,
    "negligibly_better": 0.0,
  }
  assert obj.MARGIN_TABLES["large"] == {
    "significantly_better": 3.0,
    "better": 2.0,
    "slightly_better": 1.0,
    "negligibly_better": 0.0,
  }


@pytest.mark.parametrize("table", ["none", "small", "large"])
def test_pairwise_loss_by_hand_for_each_margin_table(table):
  codes = jnp.asarray([RATING_CODES[r] for r in RATINGS])
  margins = obj.margins_for_ratings(codes, table)
  m = [0.0 if table == "none" else obj.MARGIN_TABLES[table][r] for r in RATINGS]
  np.testing.assert_allclose(margins, m, rtol=1e-6)
  loss, metrics = obj.pairwise_loss(CHOSEN, REJECTED, margins)
  deltas = CHOSEN.astype(float) - REJECTED
  expected = np.mean([nll(d - mi) for d, mi in zip(deltas, m, strict=True)])
  assert float(loss) == pytest.approx(expected, rel=1e-6)
  assert float(metrics["accuracy"]) == 0.75  # pair 2 is ranked the wrong way
  assert float(metrics["rewards/margins"]) == pytest.approx(deltas.mean(), rel=1e-6)
  assert float(metrics["rewards/chosen"]) == pytest.approx(CHOSEN.mean(), rel=1e-6)
  assert float(metrics["rewards/rejected"]) == pytest.approx(REJECTED.mean(), rel=1e-6)


def test_missing_rating_and_no_table_mean_no_margin():
  codes = jnp.asarray([-1, 3])
  np.testing.assert_array_equal(obj.margins_for_ratings(codes, "large"), [0.0, 3.0])
  loss_none, _ = obj.pairwise_loss(CHOSEN, REJECTED)
  loss_zero, _ = obj.pairwise_loss(CHOSEN, REJECTED, jnp.zeros(4))
  assert float(loss_none) == float(loss_zero)
  with pytest.raises(ValueError, match="margins='huge'"):
    obj.margins_for_ratings(codes, "huge")


def test_reward_centering_adds_the_mean_squared_pair_sum():
  c = 0.01
  loss, metrics = obj.pairwise_loss(CHOSEN, REJECTED, centering=c)
  base = np.mean([nll(d) for d in CHOSEN.astype(float) - REJECTED])
  square = np.mean((CHOSEN.astype(float) + REJECTED) ** 2)
  assert float(loss) == pytest.approx(base + c * square, rel=1e-6)
  assert float(metrics["nll"]) == pytest.approx(base, rel=1e-6)
  assert float(metrics["centering"]) == pytest.approx(square, rel=1e-6)


def test_ranking_loss_is_the_mean_over_all_ordered_pairs():
  # Row 0: edited, chosen, rejected (rating "better"); row 1: chosen, rejected ("slightly").
  rewards = jnp.asarray([[2.0, 1.0, -0.5], [0.3, 0.9, 0.0]])
  present = jnp.asarray([[True, True, True], [True, True, False]])
  margins = obj.margins_for_ratings(jnp.asarray([2, 1]), "large")  # 2 and 1
  loss, metrics = obj.ranking_loss(rewards, present, margins)
  pairs = [nll(2.0 - 1.0), nll(2.0 + 0.5), nll(1.0 + 0.5 - 2.0), nll(0.3 - 0.9 - 1.0)]
  assert float(loss) == pytest.approx(np.mean(pairs), rel=1e-6)
  assert float(metrics["pairs"]) == 4
  assert float(metrics["accuracy"]) == 0.75
  chosen, rejected, weights, pair_margins = obj.ranking_pairs(rewards, present, margins)
  np.testing.assert_array_equal(weights, [[1, 1, 1], [1, 0, 0]])
  np.testing.assert_array_equal(pair_margins, [[0, 0, 2], [1, 0, 0]])  # on chosen vs rejected
  np.testing.assert_array_equal(chosen[0], [2.0, 2.0, 1.0])
  np.testing.assert_array_equal(rejected[0], [1.0, -0.5, -0.5])


def test_two_response_rows_reduce_to_the_pairwise_loss():
  rewards = jnp.stack([CHOSEN, REJECTED], axis=1)
  margins = obj.margins_for_ratings(jnp.asarray([3, 2, 1, 0]), "small")
  a, _ = obj.ranking_loss(rewards, jnp.ones((4, 2), bool), margins)
  b, _ = obj.pairwise_loss(CHOSEN, REJECTED, margins)
  assert float(a) == pytest.approx(float(b), rel=1e-7)


def test_sums_split_over_micro_batches_give_the_same_loss():
  rng = np.random.default_rng(0)
  rewards = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
  present = jnp.asarray([[1, 1, 1], [1, 1, 0], [0, 0, 0], [1, 1, 1], [1, 1, 0], [1, 1, 0]], bool)
  margins = jnp.asarray(rng.uniform(size=6), jnp.float32)
  whole, _ = obj.pair_mean(obj.ranking_sums(rewards, present, margins, centering=0.1))
  parts = [
    obj.ranking_sums(rewards[i::2], present[i::2], margins[i::2], centering=0.1) for i in range(2)
  ]
  split, _ = obj.pair_mean(jax.tree.map(jnp.add, *parts))
  assert float(split) == pytest.approx(float(whole), rel=1e-6)
  # A batch without any pair is a zero loss, not a NaN.
  empty, _ = obj.ranking_loss(rewards, jnp.zeros_like(present))
  assert float(empty) == 0.0
