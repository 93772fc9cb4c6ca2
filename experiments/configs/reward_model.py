"""Reward-model configs (Llama 2: helpfulness and safety RMs with margins; Llama 3: ranking).

    python -m experiments.reward_model --config=experiments/configs/reward_model.py:<variant> \
      --workdir=DIR [--config.init_from=LM_WORKDIR_OR_HF_DIR]

Every variant reads preference records as packed ranking rows (`llama_jax.data.ranking`): the
prompt once, then its responses best first, each seeing only the prompt and itself; a Llama 2
pair is the 2-response case. The reward model is the LM's trunk with a fresh scalar head
(`llama_jax.model.reward_model`); `init_from` empty trains the tiny model from scratch.

Sections beyond `experiments/configs/base.py`:
  data.concerns        comma-separated concerns to train and evaluate on ("" = all)
  data.train_ratings   comma-separated ratings kept for training ("" = all)
  data.eval_ratings    the same for evaluation ("" = all: the per-bucket table needs them)
  data.use_edited      rank edited > chosen > rejected where a record has an edited response
  data.on_too_long     "raise" or "skip" (truncating would cut responses off)
  ranking.margins      "none", "small" or "large" (Llama 2 margin tables)
  ranking.centering    coefficient c of c · mean (r_c + r_r)² (0: off)
  train.num_steps      0 = train.epochs passes over the (filtered) training records
  train.warmup_fraction  > 0: warmup is this fraction of the run (overrides warmup_steps)

Variants
  tiny_helpful       Llama 2 helpfulness RM: helpfulness pairs, margin "small". CPU, minutes.
  tiny_safety        Llama 2 safety RM: safety pairs, margin "small". CPU, minutes.
  tiny_llama3        Llama 3 RM: both concerns, significantly_better / better pairs only,
                     edited > chosen > rejected, no margin. CPU, minutes.
                     The tiny variants train from scratch unless --config.init_from points at a
                     tiny pretrain / SFT workdir: 400 steps of 32 rows, ~5 min each on 2 CPU
                     cores. The bundled labels follow the better response only as often as
                     annotators agree at each rating (`llama_jax.data.bundled.AGREEMENT`), so
                     no RM scores above 0.86 on the 184 held-out helpfulness pairs; per-bucket
                     accuracies are in eval/accuracy/<rating>, and `experiments.findings`
                     measures them over seeds (README, "The papers' findings").
  llama2_7b_helpful  Llama 2-Chat 7B helpfulness / safety RMs, initialized from the chat model:
  llama2_7b_safety   lr 1e-5 cosine to 10%, 3% warmup, 512 pairs per batch, 1 epoch, seq
                     4096, margin "small". Target: one host of 8 × H100/A100 80GB (fsdp=8),
                     bf16 compute, fp32 master weights; 64 micro-batches of one row per GPU.
  llama2_70b_helpful lr 5e-6, otherwise as 7B. Target: 8 hosts × 8 H100 (fsdp=64, 8
                     micro-batches) or TPU v5p-128 (64 chips); remat "full".
  llama3p1_8b        Llama 3 RM from the pre-trained Llama 3.1 8B: lr 1e-5, 512 prompts per
                     batch (2–3 responses each: 1–3 pairs), seq 4096, no margin.
                     Target: 8 × H100 80GB (fsdp=8, 64 micro-batches) or TPU v5p-32 (16 chips,
                     fsdp=-1; set train.grad_accum_steps=32).
  Packed ranking rows need a per-row attention mask, which only attention_impl "xla" takes
  (the flash kernels build their masks from segment ids), so "auto" runs the RMs on "xla". XLA
  attention materializes the [T, T] scores; remat "dots_no_batch" recomputes them in the
  backward pass instead of keeping 32 layers of them (what "dots" would save), and one row
  per device per micro-batch keeps the transient at ~2 GB per layer at T = 4096.
"""

from __future__ import annotations

import ml_collections

from experiments.configs.base import (
  TINY_MODEL,
  dataclass_section,
  lm_config,
  pick,
  use_preference_data,
)
from llama_jax.steps.reward_model import RankingConfig


def get_config(variant: str = "tiny_helpful") -> ml_collections.ConfigDict:
  return pick("reward_model", variant, tiny_helpful, tiny_safety, tiny_llama3,
              llama2_7b_helpful, llama2_7b_safety, llama2_70b_helpful, llama3p1_8b)  # fmt: skip


def rm_config(**model_fields) -> ml_collections.ConfigDict:
  """The LM defaults with the reward-model data and loss fields."""
  config = use_preference_data(lm_config(**model_fields))
  config.data.use_edited = False
  config.ranking = dataclass_section(RankingConfig)  # the ranking objective
  return config


def _tiny(concerns: str, margins: str):
  config = rm_config(**TINY_MODEL)
  config.data.update(concerns=concerns, batch_size=32)
  config.ranking.margins = margins
  config.optimizer.update(learning_rate=1e-3, warmup_steps=20, weight_decay=0.0)
  config.train.update(num_steps=400, log_every=20, checkpoint_every=200)
  return config


def tiny_helpful():
  return _tiny("helpfulness", "small")


def tiny_safety():
  return _tiny("safety", "small")


def tiny_llama3():
  config = _tiny("", "none")
  config.data.update(train_ratings="significantly_better,better", use_edited=True)
  return config


def _real(preset: str, tokenizer: str, seq_len: int, lr: float, grad_accum: int):
  """Meta's RM optimisation: 1 epoch, cosine to 10%, 3% warmup, 512 pairs per batch."""
  config = rm_config(
    preset=preset,
    dtype="bfloat16",
    param_dtype="float32",
    remat_policy="dots_no_batch",
    scan_layers=True,
    attention_impl="auto",
  )
  config.tokenizer = tokenizer
  config.init_from = "/path/to/Llama-2-7b-chat-hf"
  config.data.update(
    source="tfds",
    name="my_preference_data",
    data_dir="",
    eval_split="test",
    seq_len=seq_len,
    batch_size=512,
    on_too_long="skip",
    num_threads=16,
    prefetch_batches=2,
  )
  config.optimizer.update(learning_rate=lr, schedule="cosine", final_lr_fraction=0.1)
  config.train.update(
    num_steps=0,
    epochs=1,
    warmup_fraction=0.03,
    grad_accum_steps=grad_accum,
    log_every=10,
    checkpoint_every=200,
  )
  config.mesh.update(fsdp=-1)
  return config


def _llama2(concern: str, preset: str = "llama2_7b", lr: float = 1e-5, grad_accum: int = 64):
  config = _real(preset, "/path/to/llama2/tokenizer.model", 4096, lr, grad_accum)
  config.data.concerns = concern
  config.ranking.margins = "small"
  return config


def llama2_7b_helpful():
  return _llama2("helpfulness")


def llama2_7b_safety():
  return _llama2("safety")


def llama2_70b_helpful():
  config = _llama2("helpfulness", "llama2_70b", lr=5e-6, grad_accum=8)
  # One row per device; saving the 80 layers' projections ("dots_no_batch") would take 74 GiB
  # of an H100's 59 usable, the layer inputs alone ("full") take 5.
  config.model.remat_policy = "full"
  return config


def llama3p1_8b():
  config = _real("llama3p1_8b", "/path/to/llama3/tokenizer.model", 4096, 1e-5, grad_accum=64)
  config.init_from = "/path/to/Llama-3.1-8B"  # the pre-trained (not instruct) checkpoint
  config.data.update(train_ratings="significantly_better,better", use_edited=True)
  return config
