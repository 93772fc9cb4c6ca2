"""Llama 2 recipe configs (`experiments.llama2_recipe`).

    python -m experiments.llama2_recipe --config=experiments/configs/llama2_recipe.py:<variant> \
      --workdir=DIR [--config.rounds=3] [--config.gatt.enabled=False]

Fields (name, tokenizer, init_from, prompt_stride, round_sft_mix, eval as in
`llama3_recipe.py`)
  rounds            rejection-sampling rounds before PPO (Llama 2: 4, PPO on top from round 5)
  ppo_enabled       run PPO after the last round
  gatt              enabled, instructions (names in `llama_jax.data.gatt.INSTRUCTIONS`), mode
                    ("policy" | "rewrite", see that module), num_turns, num_dialogues
                    (training), num_eval (held-out), temperature, seed, the sft data the
                    dialogues are made of (data, train_split, eval_split), and what the
                    dialogues are trained mixed with (mix_with, as round_sft_mix)
  pretrain, sft, helpful_rm, safety_rm, rejection_sampling, round_sft, ppo, gatt_sft
                    the stage configs (experiments/configs/<stage>.py)

Variants
  tiny        the tiny model: 2 rounds, PPO, Ghost Attention; about 20 minutes on 2 CPU cores.
  smoke       the tests' variant: one round, a few steps per stage.
  llama2_7b   Llama 2 7B from the pre-trained checkpoint: real stage configs on 2 hosts ×
              8 H100 80GB (PPO's target: SFT and RMs fsdp=16, the RMs in 32 micro-batches,
              rejection sampling data=8 × tensor=2, PPO as in its config), 4 rounds, GAtt
              in "policy" mode (the RLHF model follows instructions).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import ppo, pretrain, rejection_sampling, reward_model, sft
from experiments.configs.base import pick
from experiments.configs.llama3_recipe import eval_section, quiet, tiny_stages, without_stage_plots


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  return pick("llama2_recipe", variant, tiny, smoke, llama2_7b)


def tiny():
  config = ml_collections.ConfigDict(
    {
      "name": "tiny model, CPU",
      "tokenizer": "tiny:llama3",
      "init_from": "",
      "rounds": 2,
      "prompt_stride": 48,
      "round_sft_mix": "bundled",
      "ppo_enabled": True,
      "eval": eval_section(num_prompts=150, batch_size=50),
      "gatt": {
        "enabled": True,
        "instructions": "capitals,over,ahoy",
        "mode": "rewrite",
        "num_turns": 3,
        "num_dialogues": 240,
        "num_eval": 48,
        "temperature": 0.7,
        "seed": 0,
        "data": {"source": "bundled", "name": "sft", "data_dir": ""},
        "train_split": "train",
        "eval_split": "test",
        "mix_with": "bundled",
      },
    }
  )
  tiny_stages(config, pretrain_steps=400, sft_steps=150, round_sft_steps=40)
  config.helpful_rm = quiet(reward_model.tiny_helpful(), 150)
  config.safety_rm = quiet(reward_model.tiny_safety(), 150)
  config.ppo = ppo.tiny()
  config.ppo.data.update(tasks="", num_prompts=64, batch_size=32)
  config.ppo.scorer.whitening = "running"
  config.ppo.train.update(num_steps=20, checkpoint_every=20, async_checkpoint=False)
  config.gatt_sft = quiet(sft.tiny(), 60)
  config.gatt_sft.optimizer.update(learning_rate=3e-4, warmup_steps=0)
  return config


def smoke():
  """A few steps per stage: every stage runs and reports; the numbers mean little."""
  config = tiny()
  config.update(name="smoke", rounds=1, prompt_stride=8)
  config.eval = eval_section(num_prompts=16, batch_size=16)
  config.gatt.update(num_dialogues=16, num_eval=8)
  for name, steps in (("pretrain", 4), ("sft", 4), ("helpful_rm", 3), ("safety_rm", 3),
                      ("round_sft", 2), ("gatt_sft", 2)):  # fmt: skip
    quiet(config[name], steps)
    config[name].data.batch_size = 8
  for name in ("helpful_rm", "safety_rm"):
    config[name].data.max_records = 16
  config.rejection_sampling.data.update(num_prompts=16, batch_size=16)
  config.rejection_sampling.generation.update(num_samples=2, max_new_tokens=16)
  config.ppo.data.update(num_prompts=16, batch_size=16)
  config.ppo.generation.max_new_tokens = 16
  config.ppo.train.update(num_steps=2, checkpoint_every=2)
  return without_stage_plots(config)


def llama2_7b():
  config = tiny()
  config.update(name="Llama 2 7B", tokenizer="/path/to/llama2/tokenizer.model",
                init_from="/path/to/Llama-2-7b-hf", rounds=4, prompt_stride=0,
                round_sft_mix="/path/to/human_sft.jsonl")  # fmt: skip
  config.eval.data.update(source="tfds", name="my_eval_prompts", num_prompts=0)
  config.eval.update(batch_size=64, max_new_tokens=1024)
  config.eval.mesh.update(data=1, fsdp=-1)  # fp32 policy and reference sharded together
  config.gatt.update(mode="policy", num_turns=4, num_dialogues=2000, num_eval=200,
                     instructions="capitals,lowercase,over,ahoy")  # fmt: skip
  config.gatt.data.update(source="tfds", name="my_sft_data")
  config.gatt.mix_with = "/path/to/human_sft.jsonl"
  config.pretrain = pretrain.llama2_7b()  # unused: init_from is set
  config.sft = sft.llama2_7b()
  config.helpful_rm = reward_model.llama2_7b_helpful()
  config.safety_rm = reward_model.llama2_7b_safety()
  for rm in (config.helpful_rm, config.safety_rm):  # 512 rows: one per GPU on 16 GPUs
    rm.train.grad_accum_steps = 32
  config.rejection_sampling = rejection_sampling.llama2_70b()
  config.rejection_sampling.model.preset = "llama2_7b"
  # 16 H100s: 7B's full-size KV heads (no GQA) need tensor=2 to leave room for the cache.
  config.rejection_sampling.mesh.update(data=-1, fsdp=1, tensor=2)
  config.rejection_sampling.engine.num_pages = 4096  # 16 GiB per GPU: 16 of 32 heads each
  config.rejection_sampling.tokenizer = config.tokenizer
  config.round_sft = sft.llama2_7b()
  config.ppo = ppo.llama2_7b()
  config.gatt_sft = sft.llama2_7b()
  config.gatt_sft.data.eval_split = ""
  return config
