"""The run's data from its `data` section: bundled or TFDS records, preference records by
concern and rating, and the train / eval pipelines."""

from __future__ import annotations

import logging
from typing import Any

import ml_collections

from experiments.sections import from_section
from llama_jax.data import (
  PipelineConfig,
  bundled,
  load_source,
  make_eval_pipeline,
  make_pipeline,
  make_tokenize_fn,
  ranking,
)
from llama_jax.data.pipeline import probe_schema
from llama_jax.rl.rollouts import select_prompts
from llama_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def load_records(cfg: ml_collections.ConfigDict, split: str):
  """Records of one split: the bundled data, or a TFDS dataset built by `data.builders`."""
  if cfg.source == "bundled":
    return bundled.load(cfg.name, split)
  if cfg.source == "tfds":
    return load_source(cfg.name, split, cfg.data_dir or None)
  raise ValueError(f"data.source={cfg.source!r}; expected 'bundled' or 'tfds'")


def _names(csv: str) -> tuple[str, ...]:
  return tuple(s.strip() for s in csv.split(",") if s.strip())


def load_preference_records(cfg: ml_collections.ConfigDict, split: str, ratings: str) -> list:
  """The split's preference records of the configured concerns and the given ratings (the
  first `max_records` of them, if set): the data of reward-model training and DPO."""
  records = load_records(cfg, split)
  kept = ranking.filter_records(records, concerns=_names(cfg.concerns), ratings=_names(ratings))
  kept = kept[: cfg.max_records] if cfg.get("max_records") else kept
  if not kept:
    raise ValueError(f"no {split} records with concerns={cfg.concerns!r} and ratings={ratings!r}")
  log.info("%s: %d of %d preference records", split, len(kept), len(records))
  return kept


def pipeline_config(cfg: ml_collections.ConfigDict) -> PipelineConfig:
  return from_section(PipelineConfig, cfg)


def tokenize_fn(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer):
  """The `data` section's tokenize function; sft data may set `loss_on` ("all_assistant",
  or "last_assistant" as for Ghost Attention dialogues)."""
  options = {"loss_on": cfg.loss_on} if cfg.loss_on else {}
  return make_tokenize_fn(cfg.kind, tokenizer, **options)


def check_data_kind(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer) -> None:
  """The train split's first records are of the kind `data.kind` reads (`KindMismatchError`
  names the dataset, record and fields otherwise), checked before anything is written."""
  probe_schema(load_records(cfg, cfg.train_split), tokenize_fn(cfg, tokenizer))


def make_train_pipeline(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, mesh):
  tokenize = tokenize_fn(cfg, tokenizer)
  return make_pipeline(
    load_records(cfg, cfg.train_split), tokenize, pipeline_config(cfg), mesh=mesh
  )


def make_eval_batches(cfg: ml_collections.ConfigDict, tokenizer: Tokenizer, mesh):
  """A function returning a fresh pass over the evaluation split (None if there is none)."""
  if not cfg.eval_split:
    return None
  records = load_records(cfg, cfg.eval_split)
  tokenize = tokenize_fn(cfg, tokenizer)
  return lambda: make_eval_pipeline(records, tokenize, pipeline_config(cfg), mesh=mesh)


def prompt_records(cfg: ml_collections.ConfigDict) -> list[dict[str, Any]]:
  """The `data` section's prompts (`rollouts.select_prompts`): those of `split` whose task is
  in `tasks` (comma-separated; "" = all), from index `start`, `num_prompts` of them (0 =
  all)."""
  records = load_records(cfg, cfg.split)
  tasks = _names(cfg.get("tasks", ""))
  try:
    return select_prompts(records, tasks=tasks, start=cfg.get("start", 0),
                          num_prompts=cfg.num_prompts)  # fmt: skip
  except ValueError as e:
    raise ValueError(f"data.{e} in split {cfg.split!r}") from None
