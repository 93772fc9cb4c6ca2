"""A run's life in its workdir, shared by the launchers: flags and logging, the workdir lock,
the run files (`experiment_config.json`, `model_config.json`, tokenizer, LoRA config), the
refusal of a changed config, and one-line errors."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
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

from experiments.models import tokenizer_spec
from experiments.sections import ConfigError, lora_config
from llama_jax import LlamaConfig
from llama_jax.checkpoint import workdirs
from llama_jax.checkpoint.orbax import DiskFullError
from llama_jax.parallel import sharding
from llama_jax.training.trainer import read_final

log = logging.getLogger(__name__)


MODEL_CONFIG_FILE = workdirs.MODEL_CONFIG_FILE


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
