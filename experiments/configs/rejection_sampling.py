"""Rejection-sampling configs: one round of K samples per prompt, the best kept and pooled.

    python -m experiments.rejection_sampling \
      --config=experiments/configs/rejection_sampling.py:<variant> --workdir=DIR \
      --config.init_from=<policy: SFT workdir or HF dir> \
      --config.scorer.reward_model=<RM workdir> [--config.pool_from=<earlier round dirs>]

Fields
  model, tokenizer, init_from, mesh, data, generation, chat  as in
              `experiments/configs/generate.py` (generation.num_samples is K; Llama 2 used
              temperatures rising with the round, and found 1.2–1.3 best for the 70B model
              once it had been RLHF-tuned).
  scorer      `llama_jax.rl.scorers.ScorerConfig`: kind "reward_model" (the RM workdir in
              reward_model), "llama2" (Llama 2's combined score of the helpful and safety
              RM workdirs, safety threshold `threshold`), or "check_answer" (a right answer
              scores 1; no reward model). batch_size: rows per RM forward pass (a multiple
              of the mesh's batch axes).
  pool_from   comma-separated workdirs of earlier rounds ("" for the first round); their
              kept answers compete with this round's, re-scored if rescore_pool.
  round       this round's number (0: one more than the largest in pool_from).
  output.name TFDS name of the SFT dataset written under DIR/tfds.

Variants
  tiny          the tiny Llama 3-style policy of the SFT config, 64 bundled rl_prompt train
                prompts × 8 samples at temperature 1.0 scored by one RM; CPU, a minute.
                Set init_from to a tiny SFT workdir and scorer.reward_model to a tiny RM
                workdir (`experiments/configs/reward_model.py:tiny_llama3`).
  llama2_70b    Llama 2-Chat 70B: 1k prompts per batch × K=16 at temperature 1.2, the
                combined helpful/safety score. Target: 8 hosts × 8 H100 or TPU v5p-128: the
                policy and both 70B RMs on one mesh, data=4 × fsdp=2 × tensor=8.
  llama3p1_8b   Llama 3.1 8B: K=8 at temperature 1.0 with one RM, 512 prompts per batch.
                Target: one host of 8 × H100 (data=8: each GPU holds the bf16 weights).
"""

from __future__ import annotations

import ml_collections

from experiments.configs import generate
from experiments.configs.base import pick, scorer_section


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  return pick("rejection_sampling", variant, tiny, llama2_70b, llama3p1_8b)


def _with_rounds(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A generate config plus the rejection-sampling sections."""
  config.scorer = scorer_section("reward_model")
  config.pool_from = ""
  config.rescore_pool = True
  config.round = 0
  config.output = {"name": "rejection_sampled"}
  return config


def tiny():
  config = _with_rounds(generate.tiny())
  config.data.update(split="train", num_prompts=64, batch_size=16)
  config.generation.update(num_samples=8, temperature=1.0, max_new_tokens=48)
  return config


def llama2_70b():
  config = _with_rounds(generate.llama3p1_8b())
  config.model.preset = "llama2_70b"
  config.tokenizer = "/path/to/llama-2-70b-chat/tokenizer.model"
  config.init_from = "/path/to/llama-2-70b-chat-hf"
  # Tensor parallelism within a host (decoding reads every weight per token: no all-gathers
  # across hosts), two hosts per model copy: the policy and both RMs take 26 GiB per GPU.
  config.mesh.update(data=4, fsdp=2, tensor=8)
  config.data.update(num_prompts=1024, batch_size=64)
  config.generation.update(num_samples=16, temperature=1.2, max_new_tokens=1024)
  config.scorer.update(kind="llama2", helpful="/path/to/rm_helpful", safety="/path/to/rm_safety")
  config.scorer.batch_size = 64
  # The pool split over tensor = 8 (one of the 8 kv heads per GPU): 8192 pages of 16 tokens,
  # 5 GiB per GPU, for 256 sequences of up to 2048 tokens.
  config.engine.update(num_pages=8192, max_seqs=256, max_seq_len=2048, prefill_chunk=512)
  return config


def llama3p1_8b():
  config = _with_rounds(generate.llama3p1_8b())
  config.data.split = "train"
  config.scorer.update(reward_model="/path/to/rm_llama3p1_8b", batch_size=64)
  config.engine.num_pages = 8192  # 16 GiB: the reward model's 15 GiB sit beside it
  return config
