"""A recipe's report: `report.json` → `report.md` (tables) and `report.png` (plots).

The report is a dict with optional sections, each a list of rows (dicts):

  policy             one row per evaluated model: stage, accuracy (task_accuracy,
                     accuracy/<task>), refusal_rate, false_refusal_rate, kl (to the SFT
                     model) and kl_stderr, response_length, gatt/follow_rate (Llama 2)
  reward_models      name, accuracy/<rating> and pairs/<rating>, accuracy/chosen_rejected
  rejection_sampling `llama_jax.rl.rejection_sampling.round_stats` rows
  dpo                run, initial and final held-out DPO metrics
  ppo                run, start and end means of the iteration metrics
  gatt               data statistics of the Ghost Attention stage
  stages             name and seconds of every stage run

Every number is what the run measured; nothing here judges it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPORT_JSON, REPORT_MD, REPORT_PNG = "report.json", "report.md", "report.png"
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
TASKS = ("arithmetic", "fact")


def _f(value: Any, digits: int = 3) -> str:
  if value is None or (isinstance(value, float) and math.isnan(value)):
    return "–"
  return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return lines + ["| " + " | ".join(_f(v) for v in row) + " |" for row in rows]


def policy_table(rows: Sequence[dict[str, Any]]) -> list[str]:
  gatt = any("gatt/follow_rate" in r for r in rows)
  header = ["stage", "task accuracy", *(f"{t} acc." for t in TASKS), "refusal rate (unsafe) ↑",
            "false refusals (safe) ↓", "KL to SFT (nats)", "answer chars"]  # fmt: skip
  header += ["GAtt follow rate"] if gatt else []
  body = []
  for r in rows:
    kl = "0 (is SFT)" if r.get("is_reference") else (
      f"{r['kl']:.2f} ± {r['kl_stderr']:.2f}" if "kl" in r else "–")  # fmt: skip
    row = [r["stage"], r["task_accuracy"], *(r.get(f"accuracy/{t}") for t in TASKS),
           r["refusal_rate"], r["false_refusal_rate"], kl, _f(r["response_length"], 1)]  # fmt: skip
    body.append(row + ([r.get("gatt/follow_rate")] if gatt else []))
  return _table(header, body)


def reward_model_table(rows: Sequence[dict[str, Any]]) -> list[str]:
  header = ["reward model", *(r.replace("_", " ") for r in RATINGS), "all"]
  body = [
    [r["name"], *(_bucket(r, rating) for rating in RATINGS), r.get("accuracy/chosen_rejected")]
    for r in rows
  ]
  return _table(header, body)


def _bucket(row: dict[str, Any], rating: str) -> str:
  acc = row.get(f"accuracy/{rating}")
  return "–" if acc is None else f"{acc:.3f} ({row.get(f'pairs/{rating}', '?')})"


def rejection_sampling_table(rows: Sequence[dict[str, Any]]) -> list[str]:
  header = ["round", "prompts × K", "best RM score", "median", "mean", "kept answer right",
            "any sample right", "pool"]  # fmt: skip
  body = [
    [r["stage"], f"{r['prompts']} × {r['samples_per_prompt']}", r["score/best"],
     r["score/median"], r["score/mean"], r.get("check/best"), r.get("check/all_samples"),
     r.get("pool/size")]
    for r in rows
  ]  # fmt: skip
  return _table(header, body)


def dpo_table(rows: Sequence[dict[str, Any]]) -> list[str]:
  header = ["run", "held-out pair accuracy", "margin", "log p(chosen) start → end",
            "log p(rejected) start → end", "NLL"]  # fmt: skip
  body = []
  for r in rows:
    start = r.get("initial", {})
    arrow = lambda k, r=r, start=start: f"{_f(start.get(k), 2)} → {_f(r.get(k), 2)}"
    body.append([r["run"], r.get("rewards/accuracies"), r.get("rewards/margins"),
                 arrow("logps/chosen"), arrow("logps/rejected"), r.get("nll")])  # fmt: skip
  return _table(header, body)


def online_table(rows: Sequence[dict[str, Any]]) -> list[str]:
  keys = ("score/mean", "objective/kl", "policy/entropy", "response/length")
  header = ["run", "iterations", *(f"{k} start → end" for k in keys)]
  body = [
    [r["run"], r.get("iterations"),
     *(f"{_f(r['start'].get(k), 3)} → {_f(r['end'].get(k), 3)}" for k in keys)]
    for r in rows
  ]  # fmt: skip
  return _table(header, body)


def render_markdown(report: dict[str, Any]) -> str:
  """The report as markdown: one table per section present."""
  out = [f"# {report['title']}", ""]
  if report.get("summary"):
    out += [report["summary"], ""]
  sections = (
    ("policy", "Policy, per stage (held-out prompts, checked by a program, no reward model)",
     policy_table),
    ("reward_models", "Reward models: held-out chosen > rejected accuracy per rating (pairs)",
     reward_model_table),
    ("rejection_sampling", "Rejection sampling rounds", rejection_sampling_table),
    ("dpo", "DPO (held-out preference pairs)", dpo_table),
    ("ppo", "PPO (first vs last iterations)", online_table),
  )  # fmt: skip
  for key, title, table in sections:
    if report.get(key):
      out += [f"## {title}", "", *table(report[key]), ""]
  if report.get("gatt"):
    out += ["## Ghost Attention data", "", *_table(list(report["gatt"]),
            [list(report["gatt"].values())]), ""]  # fmt: skip
  if report.get("stages"):
    total = sum(s["seconds"] for s in report["stages"])
    out += [f"## Stage times ({total / 60:.1f} min in all)", "",
            *_table(["stage", "seconds"], [[s["name"], _f(s["seconds"], 0)]
                                          for s in report["stages"]]), ""]  # fmt: skip
  return "\n".join(out)


def plot_report(path: str | Path, report: dict[str, Any]) -> Path:
  """PNG: policy metrics per stage, KL to SFT per stage, RM accuracy per rating bucket."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(15, 4.2), layout="constrained")
  FigureCanvasAgg(fig)
  metrics_ax, kl_ax, rm_ax = fig.subplots(1, 3)
  rows = report.get("policy", [])
  names = [r["stage"] for r in rows]
  x = range(len(rows))
  for key, style in (("task_accuracy", "o-"), ("refusal_rate", "s-"),
                     ("false_refusal_rate", "v--"), ("gatt/follow_rate", "d:")):  # fmt: skip
    if any(key in r for r in rows):
      metrics_ax.plot(x, [r.get(key, math.nan) for r in rows], style, label=key)
  metrics_ax.set(title="policy per stage", ylim=(-0.02, 1.02), ylabel="rate")
  metrics_ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
  metrics_ax.legend(fontsize=8)
  kls = [0.0 if r.get("is_reference") else r.get("kl", math.nan) for r in rows]
  errs = [r.get("kl_stderr", 0.0) for r in rows]
  kl_ax.bar(list(x), kls, yerr=errs, capsize=3, color="tab:purple")
  kl_ax.set(title="KL(policy ‖ SFT) per response", ylabel="nats")
  kl_ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=8)
  rms = report.get("reward_models", [])
  width = 0.8 / max(len(rms), 1)
  for i, rm in enumerate(rms):
    accs = [rm.get(f"accuracy/{b}", math.nan) for b in RATINGS]
    rm_ax.bar([j + i * width for j in range(len(RATINGS))], accs, width, label=rm["name"])
  rm_ax.set(title="reward-model accuracy per rating", ylim=(0, 1.02), ylabel="accuracy")
  rm_ax.set_xticks([j + 0.4 - width / 2 for j in range(len(RATINGS))],
                   [b.replace("_", "\n") for b in RATINGS], fontsize=8)  # fmt: skip
  if rms:
    rm_ax.legend(fontsize=8)
  fig.savefig(path, dpi=100)
  return Path(path)


def write_report(workdir: str | Path, report: dict[str, Any]) -> str:
  """Writes report.json, report.md and report.png into `workdir`; returns the markdown."""
  workdir = Path(workdir)
  (workdir / REPORT_JSON).write_text(json.dumps(report, indent=2))
  markdown = render_markdown(report)
  (workdir / REPORT_MD).write_text(markdown + f"\n![report]({REPORT_PNG})\n")
  plot_report(workdir / REPORT_PNG, report)
  return markdown
