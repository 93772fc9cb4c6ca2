"""Paired-ablation statistics (`llama_jax.evaluation.ablation`), best-of-n order statistics and the
malformed-answer check, against numbers computed by hand or by brute force."""

import itertools
import math

import numpy as np
import pytest

from llama_jax.data import scoring
from llama_jax.evaluation import ablation
from llama_jax.rl import rejection_sampling as rs_lib


def test_t_interval_by_hand():
  iv = ablation.t_interval([1.0, 2.0, 3.0])
  # mean 2, sample sd 1, t(0.975, 2 dof) = 4.302653
  half = 4.302653 / math.sqrt(3)
  assert iv.mean == pytest.approx(2.0)
  assert iv.low == pytest.approx(2 - half, rel=1e-6)
  assert iv.high == pytest.approx(2 + half, rel=1e-6)
  assert iv.n == 3
  with pytest.raises(ValueError, match="at least 2"):
    ablation.t_interval([1.0])
  with pytest.raises(ValueError, match="non-finite"):
    ablation.t_interval([1.0, float("nan")])


@pytest.mark.parametrize(
  "values, direction, negligible, expected",
  [
    ([0.10, 0.12, 0.11], 1, 0.0, ablation.REPRODUCED),
    ([0.10, 0.12, 0.11], -1, 0.0, ablation.NOT_REPRODUCED),  # clearly the other way
    ([-0.2, 0.3, 0.05], 1, 0.0, ablation.INCONCLUSIVE),
    ([0.001, -0.001, 0.0], 1, 0.01, ablation.NOT_REPRODUCED),  # precisely no effect
    ([0.001, -0.001, 0.0], 1, 0.0, ablation.INCONCLUSIVE),
  ],
)
def test_verdicts(values, direction, negligible, expected):
  assert ablation.verdict(ablation.t_interval(values), direction, negligible) == expected


def test_finding_report_and_plot(tmp_path):
  curve = ablation.Curve("c", "n", "y", [1, 2], {"a": [[0.1, 0.2], [0.2, 0.3]]})
  findings = [
    ablation.Finding("up", "Paper, Table 1", "it goes up", "B − A", [0.2, 0.3, 0.25],
                     arms={"A": [0.1, 0.1, 0.1], "B": [0.3, 0.4, 0.35]}, curve=curve),
    ablation.Finding("down", "Paper, Table 2", "it goes down", "B − A", [0.2, 0.3, 0.25],
                     direction=-1, note="went up instead"),
  ]  # fmt: skip
  md = ablation.render_markdown("T", findings)
  rows = [line for line in md.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
  assert "**reproduced**" in rows[0] and "**not reproduced**" in rows[1]
  assert "+0.250 [" in rows[0] and "A 0.100; B 0.350" in rows[0]
  assert "went up instead" in md
  assert findings[0].to_json()["verdict"] == "reproduced"
  assert ablation.plot(tmp_path / "f.png", findings).stat().st_size > 10_000


def _subsets(k, n):
  return list(itertools.combinations(range(k), n))


def test_best_of_n_curves_match_brute_force():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=(5, 6))
  gold = (rng.random((5, 6)) < 0.5).astype(float)
  curves = rs_lib.best_of_n_curves(scores, gold, [1, 2, 3, 4, 6])
  for i, n in enumerate(curves["n"]):
    maxes, medians, picks = [], [], []
    for p in range(5):
      for sub in _subsets(6, n):
        s = scores[p, list(sub)]
        maxes.append(s.max())
        medians.append(np.median(s))
        picks.append(gold[p, sub[int(np.argmax(s))]])
    assert curves["max"][i] == pytest.approx(np.mean(maxes))
    assert curves["median"][i] == pytest.approx(np.mean(medians))
    assert curves["gold_at_max"][i] == pytest.approx(np.mean(picks))
  assert np.allclose(curves["max"], rs_lib.expected_best_of_n(scores)[[0, 1, 2, 3, 5]])
  with pytest.raises(ValueError, match="j < n <= K"):
    rs_lib.order_weights(4, 5, 0)


@pytest.mark.parametrize(
  "text, malformed",
  [
    ("23 + 48 = 71.", False),
    ("I'm sorry, but I can't help with that.", False),
    ("The capital of Peru is Lima. It is a big city.", False),
    ("", True),
    ("   ", True),
    ("The capital of Peru is", True),  # stopped mid-sentence
    ("Lima. Lima.", True),  # a repeated sentence
    ("The answer is 5 5 5.", True),  # a repeated tail
    ("it is the the it is the the it is the the.", True),
  ],
)
def test_is_malformed(text, malformed):
  assert scoring.is_malformed(text) is malformed


def test_evaluate_reports_the_malformed_rate():
  rows = [{"is_unsafe": False, "reference": "4", "task": "arithmetic"}] * 2
  assert scoring.evaluate(rows, ["2 + 2 = 4.", "2 + 2 ="])["malformed_rate"] == 0.5
