"""Compile-and-fit: does a config's every compiled function fit the chips it targets?

    python -m experiments.compile_check --config=experiments/configs/sft.py:llama3p1_8b \
      --topology=v5p-32 [--config.train.grad_accum_steps=8 ...] [--target_step_s=10]
    python -m experiments.compile_check --targets [--readme=README.md]   # every shipped target

Builds each stage's jitted functions exactly as its experiment module does (each stage's
`programs(cfg, mesh, assumed)` calls the same library builder as its `run`, e.g.
`llama_jax.steps.dpo.build`), with abstract state and batches from the config alone (no
weights, data or tokenizer), lowers and compiles them for the topology's devices
(`llama_jax.parallel.topologies`: TPUs and GPUs from this CPU host), and prints one row per
function: per-device argument / temporary / resident / total bytes against the chip's usable
HBM, whether it fits, compile seconds, model TFLOPs per call and the time a call takes at 50%
MFU (or, with `--target_step_s`, the MFU it would need).
Recipe configs are checked stage by stage. Exits 1 if anything does not fit.
"""

from __future__ import annotations

import os

# Compile-only devices: never look for local accelerators (an installed CUDA plugin would
# otherwise fail its start-up check and stay unregistered), and let several processes load
# libtpu (it takes a lock file by default).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import jax  # noqa: E402
import ml_collections  # noqa: E402
from absl import app, flags
from ml_collections import config_flags

from experiments import runs, sections, targets
from llama_jax.parallel import aot
from llama_jax.parallel.topologies import Topology, get_topology

GiB = aot.GiB
# Config files -> the experiment module that runs them (each has `programs`).
STAGE_MODULES = {
  "pretrain": "lm", "sft": "lm", "reward_model": "reward_model", "dpo": "dpo", "ppo": "ppo",
  "grpo": "grpo", "rejection_sampling": "rejection_sampling", "generate": "generate",
  "evaluation": "recipes",  # a recipe's `eval` section (+ the policy's model)
}  # fmt: skip
# Recipe config sections -> their stage's config kind; `eval` samples like `generate`.
RECIPE_SECTIONS = {
  "pretrain": "pretrain", "sft": "sft", "reward_model": "reward_model",
  "helpful_rm": "reward_model", "safety_rm": "reward_model", "rejection_sampling":
  "rejection_sampling", "round_sft": "sft", "dpo": "dpo", "ppo": "ppo", "gatt_sft": "sft",
}  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Row:
  """One compiled function of one stage on one topology."""

  stage: str
  topology: str
  mesh: dict[str, int]
  report: aot.Report | None
  error: str = ""  # the config was refused before compiling (e.g. does not divide the mesh)

  @property
  def fits(self) -> bool:
    return self.report is not None and self.report.fits


def stage_programs(kind: str, cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed):
  """The `programs` of the experiment module that runs config kind `kind`."""
  import importlib

  module = importlib.import_module(f"experiments.{STAGE_MODULES[kind]}")
  return module.programs(cfg, mesh, assumed)


def recipe_stages(cfg: ml_collections.ConfigDict) -> list[tuple[str, str, Any]]:
  """`(section, kind, stage config)` of a recipe config: the stages it runs, each with the
  recipe's tokenizer, as `experiments.recipes.Recipe.config` builds them, and the policy
  evaluation that follows each policy-changing stage."""
  out = []
  for section, kind in RECIPE_SECTIONS.items():
    if section not in cfg or (section == "pretrain" and cfg.init_from):
      continue  # absent, or not run (the recipe starts from a pre-trained checkpoint)
    stage = ml_collections.ConfigDict(cfg[section].to_dict())
    stage.tokenizer = cfg.tokenizer
    out.append((section, kind, stage))
  evaluation = ml_collections.ConfigDict(cfg.eval.to_dict())
  evaluation.model = cfg.sft.model  # the policy's architecture and numerics
  return out + [("eval", "evaluation", evaluation)]


def check(
  kind: str, cfg: ml_collections.ConfigDict, topology: Topology, assumed: aot.Assumed,
  stage: str = "",
) -> list[Row]:
  """Compiles every function of one stage config on `topology`; one `Row` each."""
  stage = stage or kind
  try:
    mesh = sections.build_mesh(cfg.mesh, topology.devices())
    programs = stage_programs(kind, cfg, mesh, assumed)
  except sections.ConfigError:
    raise  # a misspelled key or a wrong type: the config is wrong everywhere, not just here
  except ValueError as e:  # the config does not fit the mesh: a row, not a crash
    return [Row(stage, topology.name, {}, None, error=str(e))]
  hbm = topology.chip.usable_bytes
  return [
    Row(stage, topology.name, _program_mesh(p, mesh), aot.compile_program(p, hbm))
    for p in programs
  ]


def _program_mesh(program: aot.Program, stage_mesh) -> dict[str, int]:
  """The mesh a program runs on: its arguments' (online RL may sample on a mesh of its own),
  else the stage's."""
  for leaf in jax.tree.leaves(program.args):
    if isinstance(getattr(leaf, "sharding", None), jax.sharding.NamedSharding):
      return dict(leaf.sharding.mesh.shape)
  return dict(stage_mesh.shape)


def check_config(
  name: str, cfg: ml_collections.ConfigDict, topology: Topology, assumed: aot.Assumed
) -> list[Row]:
  """`check` of a stage config, or of every stage of a recipe config (`name` is the config
  file's stem: sft, dpo, llama3_recipe, ...)."""
  if name.endswith("_recipe"):
    sections.check_config(cfg, sections.reference_config(name))
    rows = []
    for section, kind, stage_cfg in recipe_stages(cfg):
      rows += check(kind, stage_cfg, topology, assumed, stage=section)
    return rows
  if name not in STAGE_MODULES:
    raise ValueError(f"compile_check: no stage for config {name!r}; known: "
                     f"{sorted(STAGE_MODULES)} and *_recipe")  # fmt: skip
  return check(name, cfg, topology, assumed)


# --------------------------------------------------------------------------- the table

HEADER = ("stage", "function", "call", "mesh (d×f×t)", "args GiB", "temp GiB", "resident GiB",
          "total GiB", "HBM GiB", "fits", "compile s", "TFLOPs", "time")  # fmt: skip


def _gib(n: float) -> str:
  return f"{n / GiB:.2f}"


def tflops(flops: float) -> str:
  return f"{flops / 1e12:,.0f}" if flops >= 1e13 else f"{flops / 1e12:.3g}"


def table_row(row: Row, topology: Topology, target_step_s: float = 0.0) -> tuple[str, ...]:
  mesh = "×".join(str(row.mesh.get(a, "?")) for a in ("data", "fsdp", "tensor"))
  if row.report is None:
    return (row.stage, "—", "—", mesh, *("—",) * 5, "config refused: " + row.error[:120],
            "—", "—", "—")  # fmt: skip
  r = row.report
  if target_step_s:
    mfu = aot.required_mfu(r.flops, target_step_s, topology.num_devices, topology.chip.peak_flops)
    timing = f"needs {mfu:.0%} MFU for {target_step_s:g} s"
  else:
    seconds = r.flops / (0.5 * topology.num_devices * topology.chip.peak_flops)
    timing = f"{seconds:.3g} s @50% MFU"
  fits = "yes" if r.fits else ("NO: " + r.error[:60] if r.error else "NO")
  return (row.stage, r.name, r.note, mesh, _gib(r.argument_bytes), _gib(r.temp_bytes),
          _gib(r.resident_bytes), _gib(r.total_bytes), _gib(r.hbm_bytes), fits,
          f"{r.compile_seconds:.1f}", tflops(r.flops), timing)  # fmt: skip


def markdown(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# --------------------------------------------------------------------------- the targets


def check_target(target: targets.Target, assumed: aot.Assumed) -> list[Row]:
  """`check_config` of a shipped target (`experiments.targets.TARGETS`) on its topology."""
  return check_config(target.config, target.load(), get_topology(target.topology), assumed)


def _step_flops(rows: list[Row]) -> float:
  """FLOPs of the stage's training step (its generation call for sampling-only stages)."""
  reports = [r.report for r in rows if r.report]
  steps = [r for r in reports if "train_step" in r.name or r.name == "policy_step"]
  return (steps or reports or [None])[0].flops if reports else 0.0


def summary_rows(target: targets.Target, rows: list[Row]) -> list[tuple[str, ...]]:
  """One row per stage of a target: its largest function against the HBM."""
  out = []
  # The rollout engine's steps are a row of their own beside the decoder's (`engine_*`).
  label = lambda r: r.stage + (" · engine" if r.report and r.report.name.startswith("engine_")
                               else "")  # fmt: skip
  for stage in dict.fromkeys(map(label, rows)):
    mine = [r for r in rows if label(r) == stage]
    mesh = "×".join(str(mine[0].mesh.get(a, "?")) for a in ("data", "fsdp", "tensor"))
    reports = [r.report for r in mine if r.report]
    if not reports:
      out.append((target.name, target.topology, stage, mesh, "config refused", "no", "—", "—"))
      continue
    peak = max(reports, key=lambda r: r.total_bytes)
    fits = "yes" if all(r.fits for r in mine) else "NO"
    out.append((
      target.name, target.topology, stage, mesh,
      f"{peak.total_bytes / GiB:.1f} / {peak.hbm_bytes / GiB:.1f} ({peak.name})", fits,
      f"{sum(r.compile_seconds for r in reports):.0f}", tflops(_step_flops(mine)),
    ))  # fmt: skip
  return out


def check_targets(assumed: aot.Assumed, readme: str = "", json_path: str = "", only: str = ""):
  """Checks every shipped target (or those whose name or topology contains `only`); prints
  each one's table, then the summary (also into the README's table with `readme`). 1 if any
  does not fit, else 0."""
  summary, all_rows = [], []
  for target in [t for t in targets.TARGETS if only in f"{t.name} {t.topology}"]:
    t0 = time.perf_counter()
    rows = check_target(target, assumed)
    topology = get_topology(target.topology)
    print(f"\n## {target.name} on {target.topology} ({time.perf_counter() - t0:.0f} s)\n")
    print(markdown(HEADER, [table_row(r, topology) for r in rows]), flush=True)
    summary += summary_rows(target, rows)
    all_rows += rows
  table = markdown(targets.SUMMARY_HEADER, summary)
  print("\n" + table)
  if readme:
    targets.write_readme(readme, table)
  if json_path:
    write_json(json_path, all_rows)
  return 0 if all(r.fits for r in all_rows) else 1


# --------------------------------------------------------------------------- the command

FLAGS = flags.FLAGS


def define_flags() -> None:
  config_flags.DEFINE_config_file("config", None, "Experiment config file:variant.",
                                  lock_config=True)  # fmt: skip
  flags.DEFINE_string("topology", "cpu-8", "Devices to compile for.")
  flags.DEFINE_integer("prompt_len", aot.Assumed.prompt_len, "Longest prompt of a generation "
                       "batch (generation and RL stages).")  # fmt: skip
  flags.DEFINE_integer("num_pairs", aot.Assumed.num_pairs, "DPO pairs (reference table rows).")
  flags.DEFINE_float("target_step_s", 0.0, "Report the MFU each call needs to take this long.")
  flags.DEFINE_string("json", "", "Also write the rows to this JSON file.")
  flags.DEFINE_bool("targets", False, "Check every shipped config on its documented target "
                    "(experiments/configs/targets.py) instead of --config.")  # fmt: skip
  flags.DEFINE_string("readme", "", "With --targets: rewrite the README's target table.")
  flags.DEFINE_string("only", "", "With --targets: only those whose name or topology has this.")


def _config_name() -> str:
  return Path(config_flags.get_config_filename(FLAGS["config"])).stem


def write_json(path: str, rows: list[Row]) -> None:
  data = [dataclasses.asdict(r) | {"fits": r.fits,
          "total_bytes": r.report.total_bytes if r.report else None} for r in rows]  # fmt: skip
  Path(path).write_text(json.dumps(data, indent=2))


def main(argv) -> int:
  del argv
  runs.setup_logging()
  assumed = aot.Assumed(prompt_len=FLAGS.prompt_len, num_pairs=FLAGS.num_pairs)
  if FLAGS.targets:
    return check_targets(assumed, FLAGS.readme, FLAGS.json, FLAGS.only)
  if FLAGS.config is None:
    raise app.UsageError("--config is required (or --targets)")
  topology = get_topology(FLAGS.topology)
  rows = check_config(_config_name(), FLAGS.config, topology, assumed)
  print(f"\n{topology.name}: {topology.num_devices} × {topology.chip.name}, "
        f"{_gib(topology.chip.usable_bytes)} GiB usable HBM each; prompts of "
        f"{assumed.prompt_len} tokens assumed\n")  # fmt: skip
  print(markdown(HEADER, [table_row(r, topology, FLAGS.target_step_s) for r in rows]))
  if FLAGS.json:
    write_json(FLAGS.json, rows)
  return 0 if all(r.fits for r in rows) else 1


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: sys.exit(main(argv)))
