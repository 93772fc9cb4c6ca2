"""Findings configs (`experiments.findings`): the Llama 2 / Llama 3 papers' findings as paired
ablations over seeds.

    python -m experiments.findings --config=experiments/configs/findings.py:<variant> \
      --workdir=DIR

Fields
  name, tokenizer, init_from, eval   as in `llama2_recipe.py` (eval: the held-out prompts every
                  policy is checked on by programs)
  ablations       which ablations run (comma-separated; default all): reward_models,
                  best_of_n, pooling, dpo, ghost_attention, kl_penalty. A rerun may add some:
                  the finished ones' stages are reused.
  seeds           how many seeds every ablation runs (>= 2; the findings need >= 3). Seed s
                  sets train.seed, data.seed and the sampling seeds of every stage after SFT;
                  the pre-trained and SFT models are shared by all seeds and arms. The one
                  field a workdir's run may change: more seeds reuse the finished ones.
  tasks           the rl_prompt tasks the sampling stages draw prompts from (the helpfulness
                  RM judges them; the gold check is `llama_jax.data.scoring.check_answer`)
  margins         the RM margin arms (Llama 2 Table 28); the first is the baseline, and the
                  one named "small" (Llama 2's choice) scores the sampling stages
  best_of_n       num_prompts, num_samples (K), ns (the curve's n values; n <= K)
  pooling         prompt_stride (round 2's prompts start there), mix_with (what the round
                  SFTs train on besides the pool: "" none, "bundled" the human chats)
  gatt            as in `llama2_recipe.py`, plus turns (the dialogue lengths whose last answer
                  is checked, comma-separated) and control (what the no-GAtt arm trains on for
                  the same steps: the bundled chats alone)
  ppo_betas       KL coefficients β of the PPO arms (comma-separated); the smallest and the
                  largest are the finding's pair
  pretrain, sft, reward_model, rejection_sampling, round_sft, dpo, gatt_sft, ppo
                  the stage configs (experiments/configs/<stage>.py)

Variants
  full    the tiny model, 6 seeds: 18 RMs, best-of-16, two-round pooling, 18 DPO runs and
          their average, Ghost Attention, 18 PPO runs; about 42 minutes on 2 CPU cores
          (2 for the shared models, 6-7 per seed).
  smoke   the tests' variant: 2 seeds, a one-layer model, a few steps per stage (every
          finding computed; the numbers mean nothing).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import dpo, llama2_recipe, ppo, reward_model, sft
from experiments.configs.base import pick
from experiments.configs.llama3_recipe import eval_section, quiet, tiny_stages, without_stage_plots


def get_config(variant: str = "full") -> ml_collections.ConfigDict:
  return pick("findings", variant, full, smoke)


def full():
  config = ml_collections.ConfigDict(
    {
      "name": "tiny model, CPU",
      "tokenizer": "tiny:llama3",
      "init_from": "",
      "ablations": "reward_models,best_of_n,pooling,dpo,ghost_attention,kl_penalty",
      "seeds": 6,
      "tasks": "arithmetic,fact",
      "eval": eval_section(num_prompts=150, batch_size=50),
      "margins": "none,small,large",
      "best_of_n": {"num_prompts": 64, "num_samples": 16, "ns": "1,2,4,8,16"},
      "pooling": {"prompt_stride": 48, "mix_with": ""},
      # The tiny Llama 2 recipe's Ghost Attention (always on here), checked at these turns.
      "gatt": {k: v for k, v in llama2_recipe.tiny().gatt.items() if k != "enabled"}
      | {"turns": "2,3,4"},
      "ppo_betas": "0,0.02,0.2",
    }
  )
  tiny_stages(config, pretrain_steps=400, sft_steps=150, round_sft_steps=40)
  config.rejection_sampling.data.tasks = config.tasks
  config.reward_model = quiet(reward_model.tiny_helpful(), 100)
  # The longest bundled pair is 82 tokens before its chat headers (too long raises).
  config.reward_model.data.seq_len = 128
  config.dpo = quiet(dpo.tiny(), 80)  # the tiny config's lr 3e-4, cosine
  config.dpo.data.update(batch_size=16, max_records=640, concerns="helpfulness", seq_len=128)
  config.dpo.train.update(eval_every=16)
  config.gatt_sft = quiet(sft.tiny(), 60)
  config.gatt_sft.optimizer.update(learning_rate=3e-4, warmup_steps=0)
  config.ppo = ppo.tiny()
  config.ppo.data.update(tasks=config.tasks, num_prompts=64, batch_size=32)
  config.ppo.scorer.update(kind="reward_model")
  config.ppo.train.update(num_steps=32, checkpoint_every=32, async_checkpoint=False)
  return config


def smoke():
  """Every finding computed from a few steps per stage; the numbers mean nothing."""
  config = full()
  config.update(name="smoke", seeds=2)
  config.pretrain.model.update(num_layers=1, d_model=64, head_dim=16, mlp_dim=128)
  config.eval = eval_section(num_prompts=16, batch_size=16)
  config.best_of_n.update(num_prompts=8, num_samples=4, ns="1,2,4")
  config.pooling.prompt_stride = 8
  config.gatt.update(num_dialogues=8, num_eval=8, turns="2,3")
  config.ppo_betas = "0,0.2"
  for name, steps in (("pretrain", 4), ("sft", 4), ("reward_model", 3), ("round_sft", 2),
                      ("dpo", 2), ("gatt_sft", 2)):  # fmt: skip
    quiet(config[name], steps)
    config[name].data.batch_size = 8
  config.reward_model.data.max_records = 16
  config.dpo.data.max_records = 16
  config.dpo.train.eval_every = 1
  config.rejection_sampling.data.update(num_prompts=8, batch_size=8)
  config.rejection_sampling.generation.update(num_samples=2, max_new_tokens=16)
  config.ppo.data.update(num_prompts=16, batch_size=16)
  config.ppo.generation.max_new_tokens = 16
  config.ppo.train.update(num_steps=2, checkpoint_every=2)
  return without_stage_plots(config)
