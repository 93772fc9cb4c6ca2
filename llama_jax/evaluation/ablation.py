"""Paired ablations: a finding's per-seed differences → a 95% interval → a verdict.

A finding is a published claim turned into one signed number per seed: the measurement of
arm B minus that of arm A, both arms run with the same data and the same seed, one switch
flipped. `Finding.direction` says which sign the paper's claim predicts. Over the seeds the
mean difference gets a Student-t interval, and the verdict reads it:

  reproduced       the interval lies on the paper's side of zero
  not reproduced   the interval lies on the other side of zero, or inside ±`negligible`
                   (an effect too small to matter, measured precisely enough to say so)
  inconclusive     anything else: the seeds disagree more than the effect's size

With n seeds the interval has n − 1 degrees of freedom (t = 4.30 for 3 seeds), so small
effects need more seeds; that is the honest price of few runs, and why the verdict has a
third value.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import stats

REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"


@dataclasses.dataclass(frozen=True)
class Interval:
  """Mean of `n` values with its two-sided `confidence` interval [low, high]."""

  mean: float
  low: float
  high: float
  n: int
  confidence: float = 0.95

  def __str__(self) -> str:
    return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
  """Student-t interval of the mean of `values` (independent draws, e.g. one per seed)."""
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or len(x) < 2:
    raise ValueError(f"an interval needs at least 2 values, got {x.tolist()}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"non-finite values: {x.tolist()}")
  mean = float(x.mean())
  half = float(stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x)))
  return Interval(mean, mean - half, mean + half, len(x), confidence)


def verdict(interval: Interval, direction: int, negligible: float = 0.0) -> str:
  """`REPRODUCED`, `NOT_REPRODUCED` or `INCONCLUSIVE` for a claim that the difference has
  the sign of `direction` (+1 or −1); see the module docstring."""
  if direction not in (1, -1):
    raise ValueError(f"direction must be +1 or -1, got {direction}")
  low, high = sorted((direction * interval.low, direction * interval.high))
  if low > 0 and high > negligible:
    return REPRODUCED
  if high < 0 or (negligible > 0 and -negligible < low and high < negligible):
    return NOT_REPRODUCED
  return INCONCLUSIVE


@dataclasses.dataclass(frozen=True)
class Curve:
  """A measured curve for the plot: per series, one value per seed at each x."""

  title: str
  xlabel: str
  ylabel: str
  x: Sequence[float]
  series: dict[str, Sequence[Sequence[float]]]  # name -> [seed][x]
  xscale: str = "linear"


@dataclasses.dataclass(frozen=True)
class Finding:
  """One published claim and its paired measurement (`b_minus_a`: one value per seed)."""

  key: str
  source: str  # "Llama 2, Table 8"
  claim: str  # the paper's claim, in one sentence
  measure: str  # what is measured, as "B − A" in words
  b_minus_a: Sequence[float]
  direction: int = 1  # the sign the claim predicts
  negligible: float = 0.0  # |effect| below this counts as no effect
  arms: dict[str, Sequence[float]] = dataclasses.field(default_factory=dict)  # name -> per seed
  note: str = ""
  curve: Curve | None = None

  @property
  def interval(self) -> Interval:
    return t_interval(self.b_minus_a)

  @property
  def verdict(self) -> str:
    return verdict(self.interval, self.direction, self.negligible)

  def to_json(self) -> dict:
    out = dataclasses.asdict(self)
    out["interval"] = dataclasses.asdict(self.interval)
    out["verdict"] = self.verdict
    return out


def _arms_text(arms: dict[str, Sequence[float]]) -> str:
  return "; ".join(f"{name} {np.mean(v):.3f}" for name, v in arms.items())


def render_markdown(title: str, findings: Sequence[Finding], preamble: str = "") -> str:
  """The findings table: claim, measurement (arm means, per-seed differences), the mean
  difference with its 95% interval and the verdict; notes below it."""
  lines = [f"# {title}", ""] + ([preamble, ""] if preamble else [])
  lines += [
    "| # | finding (source) | paper's claim | measured (B − A) | arms (means over seeds) "
    "| B − A, mean [95% CI] (seeds) | verdict |",
    "|---|---|---|---|---|---|---|",
  ]
  for i, f in enumerate(findings, 1):
    iv = f.interval
    lines.append(
      f"| {i} | {f.key} ({f.source}) | {f.claim} | {f.measure} | {_arms_text(f.arms)} "
      f"| {iv} ({iv.n}) | **{f.verdict}** |"
    )
  notes = [(i, f) for i, f in enumerate(findings, 1) if f.note]
  if notes:
    lines += ["", "Notes:", ""] + [f"{i}. **{f.key}**: {f.note}" for i, f in notes]
  per_seed = [f"- {f.key}: " + ", ".join(f"{d:+.3f}" for d in f.b_minus_a) for f in findings]
  return "\n".join(lines + ["", "Per-seed differences (B − A):", "", *per_seed, ""])


_COLORS = {REPRODUCED: "tab:green", NOT_REPRODUCED: "tab:red", INCONCLUSIVE: "tab:gray"}


def plot(path: str | Path, findings: Sequence[Finding]) -> Path:
  """findings.png: the intervals against zero (one row per finding, in the claim's
  direction, colored by verdict), then every finding's curve with the seeds' 95% band."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  curves = [f.curve for f in findings if f.curve is not None]
  cols = 3
  rows = 1 + math.ceil(len(curves) / cols)
  fig = plt.figure(figsize=(5 * cols, 3.6 * rows))
  ax = fig.add_subplot(rows, 1, 1)
  for y, f in enumerate(findings):
    iv = f.interval
    lo, hi, mean = sorted((f.direction * iv.low, f.direction * iv.high)) + [f.direction * iv.mean]
    ax.errorbar(mean, -y, xerr=[[mean - lo], [hi - mean]], fmt="o", capsize=4,
                color=_COLORS[f.verdict])  # fmt: skip
    ax.scatter([f.direction * d for d in f.b_minus_a], [-y] * len(f.b_minus_a), s=10,
               color="black", alpha=0.4, zorder=3)  # fmt: skip
  ax.axvline(0, color="black", lw=0.8)
  ax.set_yticks([-y for y in range(len(findings))], [f"{f.key}: {f.verdict}" for f in findings])
  ax.set_xlabel("effect in the paper's direction (B − A, sign-adjusted): mean, 95% CI, seeds")
  ax.set_title("Findings: paired differences over seeds (right of 0 = as the paper says)")
  for i, c in enumerate(curves):
    ax = fig.add_subplot(rows, cols, cols + i + 1)
    for name, per_seed in c.series.items():
      v = np.asarray(per_seed, np.float64)  # [seed, x]
      mean = v.mean(0)
      half = stats.t.ppf(0.975, max(len(v) - 1, 1)) * v.std(0, ddof=1) / math.sqrt(len(v))
      ax.plot(c.x, mean, marker="o", label=name)
      ax.fill_between(c.x, mean - half, mean + half, alpha=0.2)
    ax.set(title=c.title, xlabel=c.xlabel, ylabel=c.ylabel, xscale=c.xscale)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return Path(path)
