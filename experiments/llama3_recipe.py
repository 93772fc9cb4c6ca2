"""The Llama 3 post-training recipe, end to end (Llama 3 paper, section 4).

    python -m experiments.llama3_recipe --config=experiments/configs/llama3_recipe.py:demo \
      --workdir=runs/llama3_demo

Stages (each in its own directory under the workdir; a rerun skips finished ones):

  pretrain            the tiny model on the bundled corpus (skipped with `init_from`, a
                      pre-trained checkpoint: a Hugging Face directory or a workdir)
  sft                 SFT of the pre-trained model on the human-written chats
  round<r>/reward_model   ranking RM from the pre-trained model, no margin, edited >
                      chosen > rejected, significantly better / better pairs only; trained
                      in round 1 (and in every round with `retrain_reward_model`)
  round<r>/rejection_sampling   K samples per prompt from the current policy, the RM's best
                      kept, pooled with the earlier rounds' answers
  round<r>/sft_data, round<r>/sft   SFT of the current policy on the pooled answers mixed
                      with the human-written chats
  round<r>/dpo_<i>    `averaging.num_runs` DPO runs from that SFT model (formatting tokens
                      masked, NLL on the chosen responses), differing in data order and seed
  round<r>/average    their weight average: the round's policy
  eval/...            after SFT and every round's SFT and average: held-out task accuracy,
                      refusal and false-refusal rates and KL to the first SFT model

Writes report.md, report.png and report.json in the workdir.
"""

from __future__ import annotations

import functools
from typing import Any

import ml_collections
from absl import app, flags

from experiments import average, dpo, lm, recipes, rejection_sampling, reward_model, runs, sections


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the recipe in `workdir`; returns the report dict."""
  sections.check_config(cfg, sections.reference_config("llama3_recipe"))
  recipe = recipes.Recipe(cfg, workdir, "Llama 3 recipe: " + cfg.name)
  pretrained = recipes.pretrained_model(recipe)
  sft = recipe.path("sft")
  recipe.experiment("sft", "SFT on human-written chats", lm.run,
                    recipe.config("sft", init_from=pretrained))  # fmt: skip
  recipe.evaluate("SFT", sft, sft)

  policy, rm_dir, rs_dir = sft, "", ""
  for r in range(1, cfg.rounds + 1):
    rd = f"round{r}"
    if r == 1 or cfg.retrain_reward_model:
      rm_dir = recipe.path(f"{rd}/reward_model")
      result = recipe.experiment(
        f"{rd}/reward_model", "ranking reward model (edited > chosen > rejected)",
        reward_model.run, recipe.config("reward_model", init_from=pretrained),
      )  # fmt: skip
      recipe.add("reward_models", {"name": f"round {r} ranking RM", **result})
    rs_cfg = recipes.rejection_sampling_config(recipe, r, policy, rs_dir, **{
      "scorer.reward_model": rm_dir})  # fmt: skip
    rs_dir = recipe.path(f"{rd}/rejection_sampling")
    result = recipe.experiment(
      f"{rd}/rejection_sampling", "K samples per prompt, the reward model's best kept, pooled",
      rejection_sampling.run, rs_cfg,
    )  # fmt: skip
    recipe.add("rejection_sampling", {"stage": f"round {r}", **result})
    policy = recipes.sft_on_samples(recipe, r, policy, rs_dir, cfg.round_sft_mix)
    recipe.evaluate(f"round {r} · RS + SFT", policy, sft)

    runs = [recipe.path(f"{rd}/dpo_{i}") for i in range(cfg.averaging.num_runs)]
    for i, run_dir in enumerate(runs):
      recipes.reuse_reference_logps(runs[0], run_dir)  # same reference and pairs
      result = recipe.experiment(
        f"{rd}/dpo_{i}", "DPO: formatting tokens masked, NLL on the chosen responses",
        dpo.run, recipe.config("dpo", init_from=policy, **{"train.seed": i, "data.seed": i}),
      )  # fmt: skip
      recipe.add("dpo", {"run": f"round {r} · run {i}", **result})
    policy = recipe.path(f"{rd}/average")
    recipe.stage(f"{rd}/average", f"average the weights of {len(runs)} DPO runs",
                 functools.partial(average.run, runs))  # fmt: skip
    recipe.evaluate(f"round {r} · DPO average", policy, sft)

  recipe.finish()
  return recipe.report


def main(argv):
  del argv
  runs.setup_logging()
  with runs.one_line_errors():
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  runs.define_flags()
  app.run(main)
