"""Llama 3 recipe configs (`experiments.llama3_recipe`).

    python -m experiments.llama3_recipe --config=experiments/configs/llama3_recipe.py:<variant> \
      --workdir=DIR [--config.rounds=3] [--config.dpo.dpo.beta=0.05]

Fields
  name, tokenizer   the run's label; the tokenizer every stage uses
  init_from         a pre-trained checkpoint (HF directory or workdir); "" = pretrain first
  rounds            rounds of RM → rejection sampling → SFT → DPO → averaging
  retrain_reward_model  train a new RM every round (Llama 3 did, on new annotations);
                    False reuses round 1's (the bundled preferences do not change)
  prompt_stride     round r samples the prompts from (r − 1) × prompt_stride on
  round_sft_mix     what the rejection-sampled answers are mixed with for SFT: "bundled"
                    (the bundled chats), comma-separated sft JSONL files, or ""
  averaging.num_runs  DPO runs per round (seeds 0..n−1) whose weights are averaged
  eval              held-out rl_prompt records (data: as experiments/configs/generate.py),
                    mesh, batch_size, max_new_tokens, seed: see `llama_jax.evaluation.policy`
  pretrain, sft, reward_model, rejection_sampling, round_sft, dpo
                    the stage configs (experiments/configs/<stage>.py); the recipe sets
                    tokenizer, init_from and the links between stages

Variants
  demo          `make demo`: the tiny model, one round, ~4 minutes on 2 CPU cores.
  smoke         the tests' variant: two rounds of a few steps each.
  llama3p1_8b   the same recipe on Llama 3.1 8B from the pre-trained checkpoint, 6 rounds:
                the stage sections are the real configs of each stage (one host of
                8 × H100 80GB: SFT/RM/DPO fsdp=8 in bf16 with fp32 master weights, SFT
                in 8 micro-batches, rejection sampling data=8). Point `tokenizer`,
                `init_from` and each section's data at your files.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import dpo, pretrain, rejection_sampling, reward_model, sft
from experiments.configs.base import dataclass_section, pick
from llama_jax.parallel.sharding import MeshConfig


def get_config(variant: str = "demo") -> ml_collections.ConfigDict:
  return pick("llama3_recipe", variant, demo, smoke, llama3p1_8b)


def eval_section(num_prompts: int, batch_size: int) -> ml_collections.ConfigDict:
  """Held-out bundled rl_prompt test prompts, answered greedily (shared with Llama 2)."""
  return ml_collections.ConfigDict(
    {
      "data": {"source": "bundled", "name": "rl_prompt", "data_dir": "", "split": "test",
               "tasks": "", "start": 0, "num_prompts": num_prompts},
      "mesh": dataclass_section(MeshConfig, data=-1, fsdp=1),
      "batch_size": batch_size,
      "max_new_tokens": 40,
      "seed": 0,
    }
  )  # fmt: skip


def quiet(section: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  """`steps` training steps (warmup at most a tenth of them), one checkpoint at the end,
  evaluation only at the end."""
  section.optimizer.warmup_steps = min(section.optimizer.warmup_steps, steps // 10)
  section.train.update(num_steps=steps, checkpoint_every=steps, eval_every=0,
                       log_every=max(1, steps // 5), async_checkpoint=False)  # fmt: skip
  return section


def without_stage_plots(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """No `metrics.png` per stage (a smoke's dozens of short stages would spend a fifth of their
  time drawing them); the recipe's own report is still plotted."""
  for section in config.values():
    if isinstance(section, ml_collections.ConfigDict) and "plot" in section.get("train", {}):
      section.train.plot = False
  return config


def tiny_stages(config, *, pretrain_steps: int, sft_steps: int, round_sft_steps: int):
  """The stage sections both recipes share at tiny scale: pretrain, SFT, rejection sampling
  (48 prompts × 4 samples per round) and the rounds' SFT."""
  config.pretrain = quiet(pretrain.tiny(), pretrain_steps)
  config.pretrain.data.eval_split = ""
  config.sft = quiet(sft.tiny(), sft_steps)
  config.rejection_sampling = rejection_sampling.tiny()
  config.rejection_sampling.data.update(num_prompts=48, batch_size=48)
  config.rejection_sampling.generation.num_samples = 4
  config.round_sft = quiet(sft.tiny(), round_sft_steps)
  config.round_sft.optimizer.update(learning_rate=3e-4, warmup_steps=0)
  return config


def demo():
  config = ml_collections.ConfigDict(
    {
      "name": "demo (tiny model, CPU)",
      "tokenizer": "tiny:llama3",
      "init_from": "",
      "rounds": 1,
      "retrain_reward_model": False,
      "prompt_stride": 48,
      "round_sft_mix": "bundled",
      "averaging": {"num_runs": 2},
      "eval": eval_section(num_prompts=150, batch_size=50),
    }
  )
  tiny_stages(config, pretrain_steps=300, sft_steps=120, round_sft_steps=30)
  config.reward_model = quiet(reward_model.tiny_llama3(), 60)
  config.dpo = quiet(dpo.tiny(), 40)
  config.dpo.optimizer.learning_rate = 1e-4
  config.dpo.data.update(batch_size=16, max_records=640)
  config.dpo.train.eval_every = 0
  return config


def smoke():
  """A few steps per stage: every stage runs and reports; the numbers mean little."""
  config = demo()
  config.name = "smoke"
  config.rounds = 2
  config.prompt_stride = 8
  config.eval = eval_section(num_prompts=16, batch_size=16)
  for name, steps in (("pretrain", 4), ("sft", 4), ("reward_model", 3), ("round_sft", 2),
                      ("dpo", 2)):  # fmt: skip
    quiet(config[name], steps)
    config[name].data.batch_size = 8
  config.reward_model.data.update(max_records=16)
  config.reward_model.data.eval_ratings = ""
  config.dpo.data.max_records = 16
  config.rejection_sampling.data.update(num_prompts=16, batch_size=16)
  config.rejection_sampling.generation.update(num_samples=2, max_new_tokens=16)
  return without_stage_plots(config)


def llama3p1_8b():
  config = demo()
  config.update(name="Llama 3.1 8B", tokenizer="/path/to/llama3.1/original/tokenizer.model",
                init_from="/path/to/Llama-3.1-8B", rounds=6, retrain_reward_model=True,
                prompt_stride=0, round_sft_mix="/path/to/human_sft.jsonl")  # fmt: skip
  config.eval.data.update(source="tfds", name="my_eval_prompts", num_prompts=0)
  config.eval.update(batch_size=64, max_new_tokens=1024)
  config.eval.mesh.update(data=1, fsdp=-1)  # fp32 policy and reference sharded together
  config.pretrain = pretrain.llama3p2_1b()  # unused: init_from is set
  config.sft = sft.llama3p1_8b()
  config.reward_model = reward_model.llama3p1_8b()
  config.rejection_sampling = rejection_sampling.llama3p1_8b()
  config.round_sft = sft.llama3p1_8b()
  for stage in (config.sft, config.round_sft):  # one row of 8192 per GPU on 8 H100s
    stage.train.grad_accum_steps = 8
  config.dpo = dpo.llama3p1_8b()
  return config
