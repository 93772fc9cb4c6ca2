"""Every shipped real-size config on the hardware its docstring names, checked by compiling.

    python -m experiments.compile_check --targets [--readme=README.md] [--json=out.json]

compiles every function of every target (minutes per 70B / 405B stage on a CPU host),
prints the per-function tables and a summary with one row per (target, stage), and with
`--readme` rewrites the README's table between the `compile-check` markers. The opt-in test
`tests/experiments/test_real_sizes.py` (`pytest -m real_size`) fails when a target stops fitting.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import time
from pathlib import Path

from experiments import compile_check as cc
from llama_jax.parallel import aot
from llama_jax.parallel.topologies import get_topology


@dataclasses.dataclass(frozen=True)
class Target:
  """A shipped config variant and a topology its docstring says it runs on."""

  config: str  # experiments/configs/<config>.py
  variant: str
  topology: str
  overrides: tuple[tuple[str, object], ...] = ()  # --config.<key>=<value> for this hardware

  @property
  def name(self) -> str:
    flags = " ".join(f"--config.{k}={v}" for k, v in self.overrides)
    return f"{self.config}:{self.variant}" + (f" {flags}" if flags else "")

  def load(self):
    cfg = importlib.import_module(f"experiments.configs.{self.config}").get_config(self.variant)
    cfg.update_from_flattened_dict(dict(self.overrides))
    return cfg


TARGETS = (
  Target("pretrain", "llama3p2_1b", "v5p-16"),
  Target("pretrain", "llama3p2_1b", "h100-8"),
  Target("pretrain", "llama2_7b", "v5p-256"),
  Target("sft", "llama2_7b", "h100-8"),
  Target("sft", "llama3p1_8b", "v5p-32"),
  Target("sft", "llama3p1_8b", "h100-8", (("train.grad_accum_steps", 8),)),
  Target("sft", "llama3p1_70b", "v5p-128"),
  Target("sft", "llama3p1_70b", "h100-64"),
  Target("sft", "llama3p1_405b", "v5p-1024"),
  Target("reward_model", "llama2_7b_helpful", "h100-8"),
  Target("reward_model", "llama2_70b_helpful", "v5p-128"),
  Target("reward_model", "llama2_70b_helpful", "h100-64"),
  Target("reward_model", "llama3p1_8b", "h100-8"),
  Target("reward_model", "llama3p1_8b", "v5p-32", (("train.grad_accum_steps", 32),)),
  Target("dpo", "llama3p1_8b", "h100-8"),
  Target("dpo", "llama3p1_8b", "v5p-32", (("train.grad_accum_steps", 16),)),
  Target("dpo", "llama3p1_70b", "v5p-128"),
  Target("dpo", "llama3p1_70b", "h100-64"),
  Target("dpo", "llama3p1_405b", "v5p-1024"),
  Target("generate", "llama3p1_8b", "h100-8"),
  Target("rejection_sampling", "llama3p1_8b", "h100-8"),
  Target("rejection_sampling", "llama2_70b", "h100-64"),
  Target("rejection_sampling", "llama2_70b", "v5p-128"),
  Target("ppo", "llama2_7b", "h100-16"),
  Target("grpo", "llama3p2_1b", "h100-8"),
  Target("llama3_recipe", "llama3p1_8b", "h100-8"),
  Target("llama2_recipe", "llama2_7b", "h100-16"),
)

SUMMARY_HEADER = ("variant", "target", "stage", "mesh (d×f×t)", "peak GiB / HBM (function)",
                  "fits", "compile s", "model TFLOPs/step")  # fmt: skip
MARKERS = ("<!-- compile-check:start -->", "<!-- compile-check:end -->")


def check_target(target: Target, assumed: aot.Assumed) -> list[cc.Row]:
  return cc.check_config(target.config, target.load(), get_topology(target.topology), assumed)


def _step_flops(rows: list[cc.Row]) -> float:
  """FLOPs of the stage's training step (its generation call for sampling-only stages)."""
  reports = [r.report for r in rows if r.report]
  steps = [r for r in reports if "train_step" in r.name or r.name == "policy_step"]
  return (steps or reports or [None])[0].flops if reports else 0.0


def summary_rows(target: Target, rows: list[cc.Row]) -> list[tuple[str, ...]]:
  """One row per stage of a target: its largest function against the HBM."""
  out = []
  for stage in dict.fromkeys(r.stage for r in rows):
    mine = [r for r in rows if r.stage == stage]
    mesh = "×".join(str(mine[0].mesh.get(a, "?")) for a in ("data", "fsdp", "tensor"))
    reports = [r.report for r in mine if r.report]
    if not reports:
      out.append((target.name, target.topology, stage, mesh, "config refused", "no", "—", "—"))
      continue
    peak = max(reports, key=lambda r: r.total_bytes)
    fits = "yes" if all(r.fits for r in mine) else "NO"
    out.append((
      target.name, target.topology, stage, mesh,
      f"{peak.total_bytes / aot.GiB:.1f} / {peak.hbm_bytes / aot.GiB:.1f} ({peak.name})", fits,
      f"{sum(r.compile_seconds for r in reports):.0f}", cc.tflops(_step_flops(mine)),
    ))  # fmt: skip
  return out


def write_readme(path: str, table: str) -> None:
  """Replaces the text between the README's compile-check markers with `table`."""
  text = Path(path).read_text()
  start, end = MARKERS
  pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
  if not pattern.search(text):
    raise ValueError(f"{path} has no {start} … {end} markers to put the table between")
  Path(path).write_text(pattern.sub(lambda _: f"{start}\n{table}\n{end}", text))


def main(assumed: aot.Assumed, readme: str = "", json_path: str = "", only: str = "") -> int:
  """Checks every target (or those whose name contains `only`); prints each one's table,
  then the summary. 1 if any does not fit."""
  summary, all_rows = [], []
  for target in [t for t in TARGETS if only in f"{t.name} {t.topology}"]:
    t0 = time.perf_counter()
    rows = check_target(target, assumed)
    topology = get_topology(target.topology)
    print(f"\n## {target.name} on {target.topology} ({time.perf_counter() - t0:.0f} s)\n")
    print(cc.markdown(cc.HEADER, [cc.table_row(r, topology) for r in rows]), flush=True)
    summary += summary_rows(target, rows)
    all_rows += rows
  table = cc.markdown(SUMMARY_HEADER, summary)
  print("\n" + table)
  if readme:
    write_readme(readme, table)
  if json_path:
    cc.write_json(json_path, all_rows)
  return 0 if all(r.fits for r in all_rows) else 1
