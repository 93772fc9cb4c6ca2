"""Every shipped real-size config on the hardware its docstring names: the list that

    python -m experiments.compile_check --targets [--readme=README.md] [--json=out.json]

checks by compiling every function of every target (minutes per 70B / 405B stage on a CPU
host; `compile_check.check_targets`), printing the per-function tables and a summary with one
row per (target, stage), and with `--readme` rewriting the README's table between the
`compile-check` markers (`write_readme`). The opt-in test `tests/experiments/test_real_sizes.py`
(`pytest -m real_size`) fails when a target stops fitting.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from pathlib import Path


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
  Target("generate", "llama3p1_8b", "v5p-8"),
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


def write_readme(path: str, table: str) -> None:
  """Replaces the text between the README's compile-check markers with `table`."""
  text = Path(path).read_text()
  start, end = MARKERS
  pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
  if not pattern.search(text):
    raise ValueError(f"{path} has no {start} … {end} markers to put the table between")
  Path(path).write_text(pattern.sub(lambda _: f"{start}\n{table}\n{end}", text))
