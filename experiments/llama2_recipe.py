"""The Llama 2-Chat recipe, end to end (Llama 2 paper, section 3).

    python -m experiments.llama2_recipe --config=experiments/configs/llama2_recipe.py:tiny \
      --workdir=runs/llama2_tiny

Stages (each in its own directory under the workdir; a rerun skips finished ones):

  pretrain            the tiny model on the bundled corpus (skipped with `init_from`)
  sft                 SFT on the human-written chats
  reward_model_helpful, reward_model_safety   binary ranking loss with Llama 2's margin,
                      each on its concern's pairs, initialized from the SFT (chat) model
  round<r>/rejection_sampling, round<r>/sft_data, round<r>/sft   K samples per prompt
                      scored by the combined helpful/safety reward, the best pooled with
                      every earlier round's, SFT of the current policy on the pool
  ppo                 PPO with the combined reward (whitened logit, KL penalty to the
                      rejection-sampling model), value model from the helpfulness RM
  gatt_data, gatt_sft Ghost Attention (with `gatt.enabled`): multi-turn dialogues sampled
                      with the instruction on every user turn, trained with it only in the
                      system message and the loss on the last turn
  eval/...            after every policy-changing stage: held-out task accuracy, refusal
                      and false-refusal rates, KL to the SFT model, and with Ghost
                      Attention how often a 3rd-turn answer follows the system instruction

Writes report.md, report.png and report.json in the workdir.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import app, flags

from experiments import (
  data_sources,
  lm,
  ppo,
  recipes,
  rejection_sampling,
  reward_model,
  runs,
  sections,
)
from llama_jax.checkpoint import workdirs
from llama_jax.data import gatt
from llama_jax.evaluation import policy as evaluation
from llama_jax.generation import encode_prompt

GATT_FILE = "gatt.jsonl"


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the recipe in `workdir`; returns the report dict."""
  sections.check_config(cfg, sections.reference_config("llama2_recipe"))
  recipe = recipes.Recipe(cfg, workdir, "Llama 2 recipe: " + cfg.name)
  pretrained = recipes.pretrained_model(recipe)
  sft = recipe.path("sft")
  recipe.experiment("sft", "SFT on human-written chats", lm.run,
                    recipe.config("sft", init_from=pretrained))  # fmt: skip
  instructions = gatt.get_instructions(cfg.gatt.instructions) if cfg.gatt.enabled else []
  if instructions:  # every evaluation measures instruction following, before GAtt too
    recipe.use_gatt_eval(dialogues(cfg.gatt, cfg.gatt.eval_split, cfg.gatt.num_eval), instructions)
  recipe.evaluate("SFT", sft, sft)

  rms = {}
  for concern in ("helpful", "safety"):
    rms[concern] = recipe.path(f"reward_model_{concern}")
    result = recipe.experiment(
      f"reward_model_{concern}", f"{concern} reward model (margin loss)", reward_model.run,
      recipe.config(f"{concern}_rm", init_from=sft),
    )  # fmt: skip
    recipe.add("reward_models", {"name": f"{concern} RM", **result})
  combined = {"scorer.kind": "llama2", "scorer.helpful": rms["helpful"],
              "scorer.safety": rms["safety"]}  # fmt: skip

  policy, rs_dir = sft, ""
  for r in range(1, cfg.rounds + 1):
    rs_cfg = recipes.rejection_sampling_config(recipe, r, policy, rs_dir, **combined)
    rs_dir = recipe.path(f"round{r}/rejection_sampling")
    result = recipe.experiment(
      f"round{r}/rejection_sampling", "K samples per prompt, the combined reward's best, pooled",
      rejection_sampling.run, rs_cfg,
    )  # fmt: skip
    recipe.add("rejection_sampling", {"stage": f"round {r}", **result})
    policy = recipes.sft_on_samples(recipe, r, policy, rs_dir, cfg.round_sft_mix)
    recipe.evaluate(f"round {r} · RS + SFT", policy, sft)

  if cfg.ppo_enabled:
    ppo_cfg = recipe.config("ppo", init_from=policy, **combined,
                            **{"value.init_from": rms["helpful"]})  # fmt: skip
    result = recipe.experiment("ppo", "PPO on the combined reward with a KL penalty",
                               ppo.run, ppo_cfg)  # fmt: skip
    recipe.add("ppo", {"run": "PPO", **result})
    policy = recipe.path("ppo")
    recipe.evaluate("PPO", policy, sft)

  if instructions:
    data = recipe.stage(
      "gatt_data", "Ghost Attention dialogues sampled from the policy",
      functools.partial(gatt_data, recipe, policy, instructions),
    )  # fmt: skip
    recipe.report["gatt"] = {k: v for k, v in data.items() if k in ("sampled_followed", "kept")}
    recipe.experiment(
      "gatt_sft", "SFT on the Ghost Attention dialogues (loss on the last turn)", lm.run,
      recipe.config("gatt_sft", init_from=policy, **recipes.tfds_data(data),
                    **{"data.loss_on": "last_assistant"}),
    )  # fmt: skip
    recipe.evaluate("GAtt", recipe.path("gatt_sft"), sft)

  recipe.finish()
  return recipe.report


def dialogues(g: ml_collections.ConfigDict, split: str, num: int):
  """`num` multi-turn dialogues of `g.num_turns` exchanges from the `g.data` sft split."""
  pairs = gatt.exchanges(data_sources.load_records(g.data, split))
  return gatt.make_dialogues(pairs, num, g.num_turns, g.seed)


def gatt_data(
  recipe: recipes.Recipe, policy: str, instructions, out_dir: str, g=None
) -> dict[str, Any]:
  """Samples the Ghost Attention dialogues from `policy` and builds them into a TFDS
  dataset; returns its location and the sampling statistics. `g`: the gatt section
  (default the recipe's)."""
  g, e = g or recipe.cfg.gatt, recipe.cfg.eval
  mesh = sections.build_mesh(e.mesh)
  config, params = workdirs.load_model(policy, mesh, kind="lm")
  limit = config.max_seq_len - e.max_new_tokens

  def sample(chats):
    """Answers to the chats; "" (the dialogue is dropped) where one no longer fits."""
    fits = [len(encode_prompt(recipe.tokenizer, c, chat=True)) <= limit for c in chats]
    answers = iter(evaluation.answer_prompts(
      config, params, recipe.tokenizer, [c for c, f in zip(chats, fits, strict=True) if f],
      max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, temperature=g.temperature,
      seed=g.seed, mesh=mesh,
    ) if any(fits) else [])  # fmt: skip
    return [next(answers) if f else "" for f in fits]

  records, stats = gatt.sample_records(
    sample, dialogues(g, g.train_split, g.num_dialogues), instructions, g.mode
  )
  if not records:
    raise ValueError(
      f"gatt: none of {g.num_dialogues} sampled dialogues followed its instruction in every "
      f"turn (gatt.mode={g.mode!r}); use mode 'rewrite' for a model that cannot follow them"
    )
  path = Path(out_dir, GATT_FILE)
  if jax.process_index() == 0:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
  # Mixed with the SFT chats, as Llama 2 mixed GAtt data into its RLHF data: trained alone,
  # the tiny model learned the dialogues' style and lost its answers (0.235 -> 0.078).
  splits = recipes.mixed_splits([str(path)], g.mix_with)
  return stats | recipes.build_sft_dataset("gatt", splits, out_dir)


def main(argv):
  del argv
  runs.setup_logging()
  with runs.one_line_errors():
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  runs.define_flags()
  app.run(main)
