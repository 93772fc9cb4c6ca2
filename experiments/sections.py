"""Config sections -> library dataclasses, and the check that refuses unknown keys.

Every experiment config (`experiments/configs/<stage>.py:get_config(variant)`) has the
sections `model`, `tokenizer`, `init_from`, `mesh`, `data`, `optimizer`, `train`; their
fields are documented in `experiments/configs/base.py`."""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import logging
from typing import Any

import jax
import ml_collections

from llama_jax import LlamaConfig
from llama_jax.generation import EngineConfig, GenerationConfig, SamplingConfig
from llama_jax.model import lora
from llama_jax.parallel import sharding
from llama_jax.training.train_state import OptimizerConfig
from llama_jax.training.trainer import LoopConfig

log = logging.getLogger(__name__)


class ConfigError(ValueError):
  """A config names a key its stage does not know, or gives a value of the wrong type."""


# Sections renamed so that each word means one thing (docs/architecture.md "Words"): the old
# name -> the new names (the one a stage's reference has applies). `reward` chose the scorer of
# the generate-then-score stages, and held the reward model's ranking loss.
RENAMED = {"reward": ("scorer", "ranking")}


def reference_config(stage: str) -> ml_collections.ConfigDict:
  """The default variant of `experiments/configs/<stage>.py`: the keys (and value types) every
  config of the stage has; variants change values, never keys."""
  return importlib.import_module(f"experiments.configs.{stage}").get_config()


def _model_reference() -> dict[str, Any]:
  """A `model` section's known keys: `preset` and every `LlamaConfig` field (types are left
  to `LlamaConfig`, which checks its own)."""
  return {"preset": "", **{f.name: None for f in dataclasses.fields(LlamaConfig)}}


def _type_ok(value: Any, expected: Any) -> bool:
  """Whether `value` may stand where the reference has `expected` (None: anything; an int
  where a float is expected; a list where a tuple is)."""
  if expected is None or value is None:
    return True
  if isinstance(expected, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(expected, bool)
  if isinstance(expected, float):
    return isinstance(value, (int, float))
  if isinstance(expected, (list, tuple)):
    return isinstance(value, (list, tuple))
  return isinstance(value, type(expected))


def check_config(cfg: Any, reference: Any, where: str = "config") -> None:
  """Raises `ConfigError` if `cfg` has a key that `reference` (its stage's reference config,
  `reference_config`) lacks, naming the section, the key and the closest known keys, or a
  value of another type than the reference's. Call it first in `run` and `programs`, so a
  misspelled key (`optimizer.learning_rte`) stops the run before anything compiles instead
  of training with the default.
  """
  known = reference.to_dict() if isinstance(reference, ml_collections.ConfigDict) else reference
  given = cfg.to_dict() if isinstance(cfg, ml_collections.ConfigDict) else cfg
  for key, value in given.items():
    path = f"{where}.{key}"
    if key not in known:
      close = difflib.get_close_matches(key, list(known), n=3)
      close = [name for name in RENAMED.get(key, ()) if name in known] or close
      hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
      raise ConfigError(f"{where} has no key {key!r}{hint} (known: {', '.join(sorted(known))})")
    expected = _model_reference() if key == "model" else known[key]
    if isinstance(expected, dict):
      if not isinstance(value, dict):
        raise ConfigError(f"{path} must be a section (a ConfigDict), not {value!r}")
      check_config(value, expected, path)
    elif not _type_ok(value, expected):
      raise ConfigError(
        f"{path}={value!r} is a {type(value).__name__}; expected a {type(expected).__name__}"
      )


def build_mesh(cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """The `mesh` section over `devices` (default: all of this job's)."""
  mesh = sharding.MeshConfig(data=cfg.data, fsdp=cfg.fsdp, tensor=cfg.tensor)
  return sharding.make_mesh(mesh, devices)


def model_overrides(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  return {k: v for k, v in cfg.to_dict().items() if k != "preset"}


def model_config(cfg: ml_collections.ConfigDict) -> LlamaConfig:
  """The config's model without reading any checkpoint: the preset with every override
  (what `experiments.compile_check` sizes; with `init_from` the preset stands for the
  checkpoint's architecture)."""
  return LlamaConfig.preset(cfg.model.preset, **model_overrides(cfg.model))


def lora_config(cfg: ml_collections.ConfigDict) -> lora.LoraConfig | None:
  """The run's `LoraConfig` (its `lora` section), or None: `lora.rank` 0 trains every
  weight."""
  section = cfg.get("lora")
  return None if section is None or section.rank == 0 else lora.LoraConfig(**section.to_dict())


def from_section(cls, section: ml_collections.ConfigDict, **extra):
  """The dataclass `cls` from the config section's fields of the same names (a section may
  hold other keys, read elsewhere: `check_config` is what refuses unknown ones)."""
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in section.items() if k in names}, **extra)


def optimizer_config(cfg: ml_collections.ConfigDict, num_steps: int) -> OptimizerConfig:
  """`optimizer` section; its total_steps 0 means the run length."""
  return OptimizerConfig(**(cfg.to_dict() | {"total_steps": cfg.total_steps or num_steps}))


def train_optimizer_config(cfg: ml_collections.ConfigDict, num_steps: int) -> OptimizerConfig:
  """`optimizer_config` of a whole experiment config; with `train.warmup_fraction` the warmup
  is that share of the run (reward-model training, DPO)."""
  opt = optimizer_config(cfg.optimizer, num_steps)
  if cfg.train.warmup_fraction:
    opt = dataclasses.replace(opt, warmup_steps=round(cfg.train.warmup_fraction * num_steps))
  return opt


def loop_config(cfg: ml_collections.ConfigDict) -> LoopConfig:
  return from_section(LoopConfig, cfg)


def engine_config(cfg: ml_collections.ConfigDict) -> EngineConfig:
  """The `engine` section of `cfg` (the rollout engine's page pool and step shapes)."""
  return from_section(EngineConfig, cfg.engine)


def generation_config(
  cfg: ml_collections.ConfigDict, stop_ids=(), pad_id: int = 0, num_samples: int | None = None
) -> GenerationConfig:
  """The `generation` section of `cfg` as a `GenerationConfig` (`num_samples` overrides its
  own; the stop and pad ids are the tokenizer's, or for a compile check, where the ids do not
  change shapes or memory, the model's EOS ids and 0)."""
  g = cfg.generation
  return GenerationConfig(
    max_new_tokens=g.max_new_tokens,
    num_samples=num_samples or g.num_samples,
    sampling=from_section(SamplingConfig, g),
    stop_ids=stop_ids,
    pad_id=pad_id,
    prompt_bucket=g.prompt_bucket,
  )
