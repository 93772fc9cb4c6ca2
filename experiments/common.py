"""Config -> library objects, shared by the experiment modules (no algorithms here).

Every experiment config (`experiments/configs/<stage>.py:get_config(variant)`) has the
sections read below: `model`, `tokenizer`, `init_from`, `mesh`, `data`, `optimizer`,
`train`. Their fields are documented in `experiments/configs/base.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import difflib
import functools
import importlib
import inspect
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import flags
from ml_collections import config_flags

from llama_jax import LlamaConfig
from llama_jax.checkpoint import workdirs
from llama_jax.checkpoint.orbax import DiskFullError
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
from llama_jax.model import lora
from llama_jax.model.llama import Llama
from llama_jax.parallel import sharding
from llama_jax.tokenizer import Tokenizer, load_tokenizer, tiny_tokenizer
from llama_jax.training.train_state import OptimizerConfig
from llama_jax.training.trainer import LoopConfig, read_final

log = logging.getLogger(__name__)

MODEL_CONFIG_FILE = workdirs.MODEL_CONFIG_FILE
_COMPUTE_FIELDS = ("dtype", "param_dtype", "attention_impl", "scan_layers", "remat_policy")


class ConfigError(ValueError):
  """A config names a key its stage does not know, or gives a value of the wrong type."""


class ConfigChanged(ValueError):
  """A workdir holds a run whose config differs from the one given (beyond SAFE_TO_CHANGE)."""


EXPERIMENT_CONFIG_FILE = "experiment_config.json"
# What a resumed run may change: how long it runs, how often it logs, evaluates and saves,
# and where it runs (checkpoints restore onto any mesh at the exact data position). Keys
# ending in "." cover their whole section.
SAFE_TO_CHANGE = (
  "resume", "train.num_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
  "train.keep_checkpoints", "train.async_checkpoint", "train.peak_flops", "mesh.",
  "sampling_mesh.",
)  # fmt: skip


@contextlib.contextmanager
def one_line_errors():
  """For a launcher's `main`: the errors that say all there is to say (a full disk, a workdir
  in use, a changed config) end the process with their message alone, exit status 1."""
  try:
    yield
  except (DiskFullError, workdirs.WorkdirLocked, ConfigChanged) as e:
    sys.exit(f"error: {e}")


def locked_run(run):
  """`run(..., workdir, ...)` holding `workdir`'s lock (`workdirs.locked`) throughout: one
  writer per workdir, a second run refused before it writes anything. Joins the multi-host
  job first, so that only process 0 locks."""

  @functools.wraps(run)
  def locked(*args, **kwargs):
    workdir = inspect.signature(run).bind(*args, **kwargs).arguments["workdir"]
    sharding.initialize_distributed()
    with workdirs.locked(workdir):
      return run(*args, **kwargs)

  return locked


def final_results(workdir: str, results: dict[str, Any]) -> dict[str, Any]:
  """A training stage's results: this call's final evaluation, or, when an earlier call
  finished the run, the evaluation it recorded (`trainer.read_final`)."""
  if results:
    return results
  final = read_final(workdir)
  return dict(final["eval"]) if final else {}


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}


def config_changes(
  saved: dict[str, Any], cfg: ml_collections.ConfigDict, safe: tuple[str, ...] = SAFE_TO_CHANGE
) -> list[str]:
  """`key: old -> new` for every field of `cfg` that differs from the `saved` config (JSON),
  beyond the `safe` ones."""
  old, new = _flat(saved), _flat(json.loads(cfg.to_json_best_effort()))
  absent = "(absent)"
  return [
    f"{key}: {old.get(key, absent)!r} -> {new.get(key, absent)!r}"
    for key in sorted(old.keys() | new.keys())
    if old.get(key, absent) != new.get(key, absent)
    and not any(key == s or (s.endswith(".") and key.startswith(s)) for s in safe)
  ]


def check_same_run(workdir: str, cfg: ml_collections.ConfigDict) -> None:
  """Refuses (`ConfigChanged`, with the diff) to continue the run in `workdir` with a config
  that differs from its `experiment_config.json` beyond `SAFE_TO_CHANGE`, before anything is
  written; `resume="override"` continues anyway, keeping the old config beside the new."""
  if cfg.get("resume", "auto") not in ("auto", "override"):
    raise ConfigError(f"resume={cfg.resume!r}; expected 'auto' or 'override'")
  path = Path(workdir) / EXPERIMENT_CONFIG_FILE
  if not path.exists():
    return
  try:
    changes = config_changes(json.loads(path.read_text()), cfg)
  except json.JSONDecodeError as e:
    changes = [f"{path.name} is unreadable ({e})"]
  if not changes:
    return
  diff = "\n  ".join(changes)
  if cfg.get("resume") == "override":
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    log.warning("%s: continuing with a changed config (resume=override):\n  %s", workdir, diff)
    if jax.process_index() == 0:
      path.rename(path.with_name(f"experiment_config.{stamp}.json"))
    return
  raise ConfigChanged(
    f"{workdir} holds a run with another config ({path}); nothing was written. Changed:\n  "
    f"{diff}\nSafe to change when resuming: {', '.join(SAFE_TO_CHANGE[1:])}. Use a new "
    "workdir, or pass --config.resume=override to continue this run with the new config."
  )


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


def define_flags() -> None:
  """`--config=experiments/configs/<stage>.py:<variant>` (+ `--config.a.b=v`) and `--workdir`."""
  config_flags.DEFINE_config_file(
    "config", None, "Experiment config file:variant.", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "Where metrics, checkpoints and reports go.")
  flags.mark_flags_as_required(["config", "workdir"])


def setup_logging() -> None:
  # force: importing grain or orbax already gave the root logger a WARNING-level handler.
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
  # Orbax logs every save step at INFO through absl; keep its warnings only, less the one
  # it gives each time a checkpoint is opened read-only to load a model (by design here).
  absl_logger = logging.getLogger("absl")
  absl_logger.setLevel(logging.WARNING)
  absl_logger.addFilter(lambda record: "is read only" not in record.getMessage())


def tokenizer_spec(name: str, init_from: str = "") -> str:
  """The tokenizer a run uses: `name` if set, else the one `init_from` brings (its Hugging
  Face files, its GGUF metadata, or what its experiment workdir kept)."""
  if name:
    return name
  if not init_from:
    raise ValueError("tokenizer is empty and there is no init_from to take one from; set "
                     "--config.tokenizer (tiny:llama3, a tokenizer file or an HF directory)")
  return workdirs.tokenizer_source(init_from)


def build_tokenizer(name: str, init_from: str = "") -> Tokenizer:
  """`tiny:llama3` / `tiny:llama2` (bundled), a tokenizer file or directory (tokenizer.json,
  tokenizer.model), a .gguf file, or with `name` empty the tokenizer of `init_from`."""
  spec = tokenizer_spec(name, init_from)
  if spec.startswith("tiny:"):
    return tiny_tokenizer(spec.split(":", 1)[1])
  if workdirs.is_gguf(spec):
    from llama_jax.checkpoint.gguf import load_gguf_tokenizer  # noqa: PLC0415

    return load_gguf_tokenizer(spec)
  return load_tokenizer(spec)


def _special_id(tokenizer: Tokenizer, name: str) -> int | None:
  """`tokenizer.bos_id` / `eos_id`, or None for a checkpoint that defines no such token."""
  try:
    return getattr(tokenizer, name)
  except ValueError:
    return None


def check_tokenizer(model_cfg: LlamaConfig, tokenizer: Tokenizer, cfg) -> None:
  """Refuses a tokenizer whose vocabulary or special ids disagree with the model's (a model
  fine-tuned with another model's tokenizer trains on wrong ids without any error)."""
  problems = []
  if tokenizer.vocab_size > model_cfg.vocab_size:
    problems.append(f"{tokenizer.vocab_size} tokens > the model's vocab_size="
                    f"{model_cfg.vocab_size}")  # fmt: skip
  bos = _special_id(tokenizer, "bos_id")
  if None not in (model_cfg.bos_token_id, bos) and bos != model_cfg.bos_token_id:
    problems.append(f"BOS id {bos} != the model's bos_token_id={model_cfg.bos_token_id}")
  eos = model_cfg.eos_token_id
  eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
  ends = {_special_id(tokenizer, "eos_id"), *tokenizer.stop_ids} - {None}
  if eos and not ends & set(eos):
    problems.append(f"EOS/stop ids {sorted(ends)} are not among the model's eos_token_id="
                    f"{model_cfg.eos_token_id}")  # fmt: skip
  if not problems:
    return
  init_from = cfg.get("init_from", "")
  where = f" (init_from={init_from!r})" if init_from else ""
  hint = (" set --config.tokenizer='' to use the checkpoint's own tokenizer"
          if cfg.get("init_from") else " set --config.model.vocab_size / the special ids")
  spec = tokenizer_spec(cfg.tokenizer, init_from)
  problems = "; ".join(problems)
  raise ValueError(f"tokenizer={spec!r} does not fit the model{where}: {problems};{hint}")


def build_mesh(cfg: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """The `mesh` section over `devices` (default: all of this job's)."""
  mesh = sharding.MeshConfig(data=cfg.data, fsdp=cfg.fsdp, tensor=cfg.tensor)
  return sharding.make_mesh(mesh, devices)


def _model_overrides(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  return {k: v for k, v in cfg.to_dict().items() if k != "preset"}


def load_model(cfg: ml_collections.ConfigDict, mesh) -> tuple[LlamaConfig, Any]:
  """`(model_config, params or None)`: the LM in `cfg.init_from` if set (a Hugging Face
  directory or an experiment workdir with Orbax checkpoints), else the preset (params None:
  fresh).

  When loading, only the compute fields of `cfg.model` (dtype, remat, ...) apply; the
  architecture is the checkpoint's.
  """
  compute = {k: v for k, v in _model_overrides(cfg.model).items() if k in _COMPUTE_FIELDS}
  if not cfg.init_from:
    return LlamaConfig.preset(cfg.model.preset, **_model_overrides(cfg.model)), None
  log.info("Initializing from %s", cfg.init_from)
  try:
    return workdirs.load_model(cfg.init_from, mesh, kind="lm", **compute)
  except (FileNotFoundError, ValueError) as e:
    message = f"init_from={cfg.init_from!r}: {e}"
    try:
      wrapped = type(e)(message)
    except TypeError:  # a constructor of other arguments (json.JSONDecodeError's)
      wrapped = None
    if wrapped is None:  # keep the exception as it is and say where it came from
      e.add_note(f"init_from={cfg.init_from!r}")
      raise
    raise wrapped from e


def model_config(cfg: ml_collections.ConfigDict) -> LlamaConfig:
  """The config's model without reading any checkpoint: the preset with every override
  (what `experiments.compile_check` sizes; with `init_from` the preset stands for the
  checkpoint's architecture)."""
  return LlamaConfig.preset(cfg.model.preset, **_model_overrides(cfg.model))


def lora_config(cfg: ml_collections.ConfigDict) -> lora.LoraConfig | None:
  """The run's `LoraConfig` (its `lora` section), or None: `lora.rank` 0 trains every
  weight."""
  section = cfg.get("lora")
  return None if section is None or section.rank == 0 else lora.LoraConfig(**section.to_dict())


def build_model(cfg: ml_collections.ConfigDict, model_cfg: LlamaConfig) -> Llama:
  """The trained LM: `Llama(model_cfg)`, with the config's LoRA adapters if it has any."""
  return Llama(model_cfg, lora=lora_config(cfg))


def trainable(cfg: ml_collections.ConfigDict):
  """The optimizer's `trainable` mask function (`train_state.make_optimizer`): only the
  adapters (and heads) under LoRA, else None (everything)."""
  return None if lora_config(cfg) is None else lora.trainable_mask


def add_adapters(cfg: ml_collections.ConfigDict, model, params, mesh):
  """`params` (loaded or fresh weights of the plain model) with fresh LoRA adapters of
  `model` beside them, if the config trains adapters; else `params` unchanged."""
  if lora_config(cfg) is None:
    return params
  rng = jax.random.fold_in(jax.random.PRNGKey(cfg.train.seed), 7)  # not the step key's stream
  return sharding.init_missing(model, params, rng, mesh)


def write_run_files(workdir: str, cfg: ml_collections.ConfigDict, model_cfg: LlamaConfig) -> None:
  """Writes `experiment_config.json` (after `check_same_run`: a changed run is refused before
  anything is written) and `model_config.json` (what later stages load), the
  tokenizer (`workdirs.save_tokenizer`), and `lora_config.json` for a run that trains LoRA
  adapters (`workdirs.load_model` merges them)."""
  check_same_run(workdir, cfg)
  if jax.process_index() != 0:
    return
  os.makedirs(workdir, exist_ok=True)
  Path(workdir, EXPERIMENT_CONFIG_FILE).write_text(cfg.to_json_best_effort(indent=2))
  Path(workdir, MODEL_CONFIG_FILE).write_text(json.dumps(model_cfg.to_dict(), indent=2))
  if cfg.get("tokenizer") is not None:
    workdirs.save_tokenizer(workdir, tokenizer_spec(cfg.tokenizer, cfg.get("init_from", "")))
  adapters = lora_config(cfg)
  if adapters is not None:
    text = json.dumps(dataclasses.asdict(adapters), indent=2)
    Path(workdir, workdirs.LORA_CONFIG_FILE).write_text(text)


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


def from_section(cls, section: ml_collections.ConfigDict, **extra):
  """The dataclass `cls` from the config section's fields of the same names (a section may
  hold other keys, read elsewhere: `check_config` is what refuses unknown ones)."""
  names = {f.name for f in dataclasses.fields(cls)}
  return cls(**{k: v for k, v in section.items() if k in names}, **extra)


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


def check_fits(
  model_cfg: LlamaConfig, cfg: ml_collections.ConfigDict, tokenizer: Tokenizer | None, mesh
) -> None:
  """Everything that would otherwise fail late (or silently) checked before compiling (the
  tokenizer's part only when one is given)."""
  if tokenizer is not None:
    check_tokenizer(model_cfg, tokenizer, cfg)
  if cfg.data.seq_len > model_cfg.max_seq_len:
    raise ValueError(
      f"data.seq_len={cfg.data.seq_len} exceeds the model's max_seq_len={model_cfg.max_seq_len}"
    )
  sharding.check_fits_mesh(model_cfg, mesh)
  sharding.check_batch_fits_mesh(cfg.data.batch_size, mesh, "data.batch_size")
  accum = cfg.train.grad_accum_steps
  if cfg.data.batch_size % accum:
    raise ValueError(
      f"data.batch_size={cfg.data.batch_size} is not divisible by train.grad_accum_steps={accum}"
    )
  sharding.check_batch_fits_mesh(
    cfg.data.batch_size // accum, mesh, f"micro-batch data.batch_size / {accum}"
  )
