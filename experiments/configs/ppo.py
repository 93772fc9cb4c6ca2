"""PPO configs (Llama 2: β 0.01 for 7B/13B, constant lr 1e-6, 512 prompts per iteration in
minibatches of 64 with one step each, clip 0.2, AdamW 0.9/0.95, weight decay 0.1).

    python -m experiments.ppo --config=experiments/configs/ppo.py:<variant> --workdir=DIR \
      --config.init_from=<SFT/RS workdir or HF dir> [--config.value.init_from=<RM workdir>]

Sections (model, tokenizer, init_from, mesh, sampling_mesh, data, generation, chat, scorer,
optimizer and train as in `experiments/configs/grpo.py`; generation.num_samples responses
per prompt):
  ppo    kl_coef β, kl_estimator ("k1" | "k2" | "k3"), kl_target (> 0: adaptive β) and
         kl_horizon, gamma, lam, clip_eps, value_clip_eps, whiten_advantages, no_eos_penalty
  value  init_from (a reward-model workdir; "" = the policy's trunk with a fresh head) and
         its own optimizer section

Variants
  tiny        the tiny SFT model on 32 bundled arithmetic train prompts with the verifiable
              reward (13% right at the start), all 32 per iteration in 2 minibatches, 40
              iterations; CPU, a few minutes. Start from the tiny SFT workdir.
  llama2_7b   Llama 2-Chat-style PPO on Llama 2 7B: the combined helpful/safety reward
              (whitened logit, running statistics), β 0.01, lr 1e-6, 512 prompts in
              minibatches of 64, 300 iterations, value model from the helpfulness RM.
              Target: 2 hosts × 8 H100 80GB (fsdp=16; policy, reference, value model and
              two 7B reward models live together), bf16 compute, fp32 master weights.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import generate
from experiments.configs.base import dataclass_section, pick
from experiments.configs.grpo import rl_config
from llama_jax.steps.ppo import PPOConfig


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  return pick("ppo", variant, tiny, llama2_7b)


def ppo_section(**overrides) -> ml_collections.ConfigDict:
  """`PPOConfig`'s defaults with `overrides`; loss_chunk_size is train's."""
  return ml_collections.ConfigDict(
    dataclass_section(PPOConfig, drop=("loss_chunk_size",), **overrides)
  )


def tiny():
  config = rl_config(generate.tiny())
  config.ppo = ppo_section(kl_coef=0.02, no_eos_penalty=-1.0)
  config.value = ml_collections.ConfigDict(
    {"init_from": "", "optimizer": config.optimizer.to_dict()}
  )
  config.data.update(tasks="arithmetic", num_prompts=32, batch_size=32)
  config.generation.update(num_samples=1, max_new_tokens=32)
  config.optimizer.learning_rate = 1e-4
  config.value.optimizer.learning_rate = 1e-3
  config.train.update(num_steps=40, num_minibatches=2)
  return config


def llama2_7b():
  config = tiny()
  config.model = ml_collections.ConfigDict(
    {"preset": "llama2_7b", "dtype": "bfloat16", "param_dtype": "float32",
     "attention_impl": "auto", "remat_policy": "dots", "scan_layers": True}
  )  # fmt: skip
  config.tokenizer = "/path/to/llama-2-7b-chat/tokenizer.model"
  config.init_from = "/path/to/llama2_7b_rejection_sampling_sft"
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.data.update(source="tfds", name="my_rl_prompts", tasks="", num_prompts=0, batch_size=512)
  config.generation.update(max_new_tokens=1024, prompt_bucket=128)
  config.scorer.update(
    kind="llama2", helpful="/path/to/rm_helpful", safety="/path/to/rm_safety",
    whitening="running", batch_size=64,
  )  # fmt: skip
  config.ppo = ppo_section(kl_coef=0.01)
  config.value.init_from = "/path/to/rm_helpful"
  config.optimizer.update(learning_rate=1e-6, weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-5)
  config.value.optimizer.update(learning_rate=1e-6, weight_decay=0.1)
  config.train.update(num_steps=300, num_minibatches=8, loss_chunk_size=512, checkpoint_every=25)
  return config
