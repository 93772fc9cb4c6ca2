"""Pretraining configs.

    python -m experiments.pretrain --config=experiments/configs/pretrain.py:<variant> \
      --workdir=DIR

Variants
  tiny         ~1.2M-parameter Llama 3-style model on the bundled corpus (1 MB of text),
               CPU, a few minutes on 2 cores. Reaches an eval loss far below the unigram
               baseline of the corpus (see the issue notes for measured figures).
  llama3p2_1b  Llama 3.2 1B architecture from scratch, bf16 compute / fp32 master weights,
               seq 8192, 1M-token batches (128 × 8192) in 4 micro-batches, remat "dots": one
               host of 8 × H100 (fsdp=8) or a TPU v5p-16 slice (fsdp over all chips). Point
               `data` at a TFDS text dataset.
  llama2_7b    The Llama 2 7B recipe: lr 3e-4, 2000 warmup steps, cosine to 10%, 4M-token
               batches (1024 × 4096), AdamW (0.9, 0.95, eps 1e-5), wd 0.1, clip 1.0. Target:
               TPU v5p-256 or 32 × 8 H100 with fsdp=-1 (all devices), tensor=1; remat "dots",
               2 micro-batches.
  The real variants use attention_impl "auto": Pallas splash attention on TPU, cuDNN flash
  attention on GPU. `python -m experiments.compile_check --targets` checks every real
  variant of every stage against its target (see the README's table).
"""

from __future__ import annotations

import ml_collections

from experiments.configs.base import TINY_MODEL, lm_config, pick


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  return pick("pretrain", variant, tiny, llama3p2_1b, llama2_7b)


def tiny():
  config = lm_config(**TINY_MODEL)
  config.data.update(seq_len=256, batch_size=8)
  config.optimizer.update(learning_rate=3e-3, warmup_steps=30, weight_decay=0.1)
  config.train.update(num_steps=600, log_every=20, eval_every=200, checkpoint_every=200)
  return config


def _real(preset: str, tokenizer: str, seq_len: int, batch_size: int, **model):
  config = lm_config(
    preset=preset,
    dtype="bfloat16",
    param_dtype="float32",
    remat_policy="dots",
    scan_layers=True,
    attention_impl="auto",
    **model,
  )
  config.tokenizer = tokenizer
  config.data.update(
    source="tfds",
    name="my_text_corpus",
    data_dir="",
    eval_split="",
    seq_len=seq_len,
    batch_size=batch_size,
    num_threads=16,
    prefetch_batches=2,
  )
  config.train.update(num_steps=250_000, log_every=50, checkpoint_every=1000, loss_chunk_size=1024)
  return config


def llama3p2_1b():
  config = _real("llama3p2_1b", "/path/to/llama3/tokenizer.model", 8192, 128)
  config.mesh.update(fsdp=-1)
  config.train.grad_accum_steps = 4  # 4 rows of 8192 per device per micro-batch on 8 devices
  return config


def llama2_7b():
  config = _real("llama2_7b", "/path/to/llama2/tokenizer.model", 4096, 1024)
  config.optimizer.update(learning_rate=3e-4, warmup_steps=2000)
  config.mesh.update(fsdp=-1)
  config.train.grad_accum_steps = 2  # 4 rows of 4096 per device per micro-batch on 128
  return config
