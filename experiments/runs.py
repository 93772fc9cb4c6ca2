"""A run's life in its workdir, shared by the launchers: flags and logging, the workdir lock,
the run's start (`start_run`: config check, mesh, tokenizer, model, fit checks, run files),
the run files (`experiment_config.json`, `model_config.json`, tokenizer, LoRA config), the
refusal of a changed config, one-line errors and a launcher's `__main__` (`launch`)."""

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import app, flags
from jax.sharding import Mesh
from ml_collections import config_flags

from experiments import models, sections
from experiments.sections import ConfigError, lora_config
from llama_jax import LlamaConfig
from llama_jax.checkpoint import workdirs
from llama_jax.checkpoint.orbax import DiskFullError
from llama_jax.parallel import sharding
from llama_jax.tokenizer import Tokenizer
from llama_jax.training.trainer import read_final

log = logging.getLogger(__name__)


MODEL_CONFIG_FILE = workdirs.MODEL_CONFIG_FILE


class ConfigChanged(ValueError):
  """A workdir holds a run whose config differs from the one given (beyond SAFE_TO_CHANGE)."""


EXPERIMENT_CONFIG_FILE = "experiment_config.json"


# What a resumed run may change: how long it runs, how often it logs, evaluates, saves and
# plots, and where and in how much memory it runs (checkpoints restore onto any mesh at the
# exact data position; the rollout engine's pool and step shapes change no sample, and a run
# from before the section existed has none). Keys ending in "." cover their whole section.
SAFE_TO_CHANGE = (
  "resume", "train.num_steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
  "train.keep_checkpoints", "train.async_checkpoint", "train.peak_flops", "train.plot", "mesh.",
  "sampling_mesh.", "engine.",
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
    workdirs.save_tokenizer(workdir, models.tokenizer_spec(cfg.tokenizer, cfg.get("init_from", "")))
  adapters = lora_config(cfg)
  if adapters is not None:
    text = json.dumps(dataclasses.asdict(adapters), indent=2)
    Path(workdir, workdirs.LORA_CONFIG_FILE).write_text(text)


@dataclasses.dataclass(frozen=True)
class RunStart:
  """What a run starts from (`start_run`): the tokenizer, the mesh, the model's config and
  the parameters of `init_from` (None: the run starts from fresh weights)."""

  tokenizer: Tokenizer
  mesh: Mesh
  model_config: LlamaConfig
  params: Any


FitCheck = Callable[[LlamaConfig, ml_collections.ConfigDict, Tokenizer, Mesh], None]


def start_run(
  cfg: ml_collections.ConfigDict,
  workdir: str,
  stage: str,
  *,
  model_config: Callable[[LlamaConfig], LlamaConfig] | None = None,
  check: FitCheck = models.check_fits,
) -> RunStart:
  """A training run's start, the same for every launcher: refuses unknown config keys (the
  reference config of `stage`), joins the multi-host job, builds the tokenizer and the mesh,
  loads the model of `init_from` (or the preset's config, params None), adapts its config
  (`model_config`, e.g. the attention a reward model's rows need), runs `check(model_config,
  cfg, tokenizer, mesh)` (by default `models.check_fits`: tokenizer, sequence length, mesh
  and batch) and writes the run files (`write_run_files`, which refuses a changed config),
  all before anything compiles."""
  sections.check_config(cfg, sections.reference_config(stage))
  sharding.initialize_distributed()  # multi-host TPU / SLURM; a no-op on one process
  tokenizer = models.build_tokenizer(cfg.tokenizer, cfg.init_from)
  mesh = sections.build_mesh(cfg.mesh)
  model_cfg, params = models.load_model(cfg, mesh)
  if model_config is not None:
    model_cfg = model_config(model_cfg)
  check(model_cfg, cfg, tokenizer, mesh)
  write_run_files(workdir, cfg, model_cfg)
  return RunStart(tokenizer, mesh, model_cfg, params)


def launch(run: Callable[[ml_collections.ConfigDict, str], Any]) -> None:
  """A launcher's `__main__`: `--config` / `--workdir` (defined here, not at import: tests
  import several launchers), logging, and `run(config, workdir)` with one-line errors."""
  define_flags()

  def main(argv):
    del argv
    setup_logging()
    with one_line_errors():
      run(flags.FLAGS.config, flags.FLAGS.workdir)

  app.run(main)
