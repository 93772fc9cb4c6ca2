"""Loading models from what the experiments leave behind: an experiment workdir (its
`model_config.json` and newest Orbax checkpoint; an LM or a reward model) or a Hugging Face
directory (`config.json` + safetensors).

    config, params = load_model("runs/sft", mesh)              # LM params
    config, params = load_model("runs/rm_helpful", mesh)       # {"lm", "head"} params
    kind = model_kind("runs/rm_helpful")                       # "reward_model"

A run also keeps the tokenizer it trained with under `tokenizer/` (`save_tokenizer`): the
tokenizer files copied, or a `SPEC` file naming a bundled one ("tiny:llama3"), so the next
stage (`tokenizer_source`) and an export bring the same tokenizer without being told.

A run with LoRA adapters also writes `lora_config.json`; its checkpoints hold the adapters
beside the frozen weights, and `load_model` returns them merged (`llama_jax.model.lora.merge`), so
the next stage, an export or a notebook sees a plain model.

One run writes a workdir at a time: `locked(workdir)` holds an OS lock on `workdir/.lock`
for the run (`WorkdirLocked` names the holder's host and pid).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
from jax.sharding import Mesh

from llama_jax.checkpoint import orbax as ckpt_lib
from llama_jax.checkpoint.hf import load_hf_checkpoint
from llama_jax.checkpoint.params import check_finite
from llama_jax.model import lora
from llama_jax.model.config import MODEL_CONFIG_FILE, LlamaConfig
from llama_jax.model.llama import Llama
from llama_jax.model.reward_model import RewardModel
from llama_jax.parallel import sharding

KINDS = ("lm", "reward_model")
LORA_CONFIG_FILE = "lora_config.json"
TOKENIZER_DIR = "tokenizer"
_SPEC_FILE = "SPEC"
# The files of a Hugging Face directory that make up its tokenizer and chat template.
TOKENIZER_FILES = (
  "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
  "generation_config.json", "tokenizer.model", "original/tokenizer.model",
)  # fmt: skip


log = logging.getLogger(__name__)
LOCK_FILE = ".lock"


# --------------------------------------------------------------------------- locking


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir."""


_held: dict[str, tuple[int, int]] = {}  # workdir's real path -> (lock file descriptor, depth)


@contextlib.contextmanager
def locked(workdir: str | Path) -> Iterator[None]:
  """Holds an exclusive OS lock (`flock`) on `workdir/.lock` while the block runs, so a
  second run on the same workdir is refused (`WorkdirLocked`, naming the holder) instead of
  interleaving checkpoints and metrics with this one.

  The lock file records host, pid, start time and command; the kernel drops the lock when
  its process dies, so a killed run's lock is taken over (and logged) by the next run. In a
  multi-host job only process 0, the one that writes the shared files, locks. Re-entrant in
  one process (a recipe's stage may lock what the recipe holds).
  """
  if jax.process_index() != 0:
    yield
    return
  path = Path(workdir)
  path.mkdir(parents=True, exist_ok=True)
  key = str(path.resolve())
  if key in _held:
    fd, depth = _held[key]
    _held[key] = (fd, depth + 1)
    try:
      yield
    finally:
      _held[key] = (fd, depth)
    return
  fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = _read_holder(fd)
    os.close(fd)
    raise WorkdirLocked(
      f"{path} is in use by another run ({_describe(holder)}); wait for it to finish or use "
      "another workdir"
    ) from None
  previous = _read_holder(fd)
  if previous:  # the last holder never released it: killed, or its host went down
    log.warning("%s: taking over the lock of a run that did not finish (%s)", path,
                _describe(previous))  # fmt: skip
  holder = {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "command": " ".join(sys.argv),
  }
  os.ftruncate(fd, 0)
  os.pwrite(fd, json.dumps(holder).encode(), 0)
  _held[key] = (fd, 0)
  try:
    yield
  finally:
    del _held[key]
    os.ftruncate(fd, 0)  # a clean exit leaves an empty lock file
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _read_holder(fd: int) -> dict[str, Any]:
  text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
  try:
    return json.loads(text) if text else {}
  except json.JSONDecodeError:
    return {"unreadable": text[:200]}


def _describe(holder: dict[str, Any]) -> str:
  if not holder:
    return "holder unknown"
  if "unreadable" in holder:
    return f"lock file reads {holder['unreadable']!r}"
  return (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}: "
          f"{holder.get('command', '')}")  # fmt: skip


# --------------------------------------------------------------------------- model files


def is_hf_checkpoint(path: str | Path) -> bool:
  return (Path(path) / "config.json").exists()


def is_gguf(path: str | Path) -> bool:
  return Path(path).suffix == ".gguf" and Path(path).is_file()


# --------------------------------------------------------------------------- tokenizers


def save_tokenizer(workdir: str | Path, spec: str) -> None:
  """Keeps the tokenizer `spec` ("tiny:llama3", a tokenizer file, a Hugging Face or experiment
  directory, a .gguf file) in `workdir/tokenizer/`: files are copied (a GGUF file is not: its
  path is recorded), so the workdir stays self-contained when the source moves."""
  out = Path(workdir) / TOKENIZER_DIR
  if out.exists():
    shutil.rmtree(out)
  out.mkdir(parents=True)
  source = Path(tokenizer_source(spec)) if not spec.startswith("tiny:") else None
  if source is None or source.suffix == ".gguf":
    (out / _SPEC_FILE).write_text(spec if source is None else str(source.resolve()))
  elif source.is_file():
    shutil.copy(source, out / source.name)
  else:
    for name in TOKENIZER_FILES:
      if (source / name).is_file():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source / name, out / name)


def tokenizer_source(path: str | Path) -> str:
  """Where the tokenizer of `path` is: a Hugging Face directory or tokenizer file itself, a
  .gguf file itself, or what an experiment workdir kept (`save_tokenizer`)."""
  path = Path(path)
  if path.is_file() or is_hf_checkpoint(path):
    return str(path)
  kept = path / TOKENIZER_DIR
  if (kept / _SPEC_FILE).is_file():
    return (kept / _SPEC_FILE).read_text().strip()
  if kept.is_dir() and any(kept.iterdir()):
    files = list(kept.iterdir())
    return str(files[0] if len(files) == 1 and files[0].is_file() else kept)
  if (path / MODEL_CONFIG_FILE).exists():
    raise FileNotFoundError(
      f"{path!s}: this workdir kept no tokenizer (it predates tokenizer/); set the tokenizer "
      "explicitly (--config.tokenizer=...)"
    )
  return str(path)  # a directory of tokenizer files


def read_model_config(workdir: str | Path, **overrides: Any) -> LlamaConfig:
  """The `LlamaConfig` an experiment wrote to `workdir`, with field `overrides`."""
  config_file = Path(workdir) / MODEL_CONFIG_FILE
  if not config_file.exists():
    raise FileNotFoundError(
      f"{workdir!s} is neither a Hugging Face checkpoint (no config.json) nor an experiment "
      f"workdir (no {MODEL_CONFIG_FILE})"
    )
  return LlamaConfig.from_dict(json.loads(config_file.read_text())).replace(**overrides)


def read_lora_config(workdir: str | Path) -> lora.LoraConfig | None:
  """The `LoraConfig` of a run that trained adapters (its `lora_config.json`), else None."""
  path = Path(workdir) / LORA_CONFIG_FILE
  return lora.LoraConfig(**json.loads(path.read_text())) if path.exists() else None


# What a workdir's newest saved state holds, told by where its parameters sit: (a path prefix
# of the saved state, the kind of model, the state field holding its TrainState). First match.
_LAYOUTS = (
  ("params/head/", "reward_model", ""),  # `reward_model` params: {"lm", "head"}
  ("policy/params/", "lm", "policy"),  # PPO / GRPO: the policy (next to a value model)
  ("params/", "lm", ""),  # pretrain, SFT, DPO: an LM TrainState
)


def _layout(path: str | Path) -> tuple[str, str]:
  """`(kind, state field)` of an experiment workdir, from its model_config.json and what its
  newest checkpoint holds; a clear error if it has neither or holds no model we know."""
  read_model_config(path)  # not a workdir at all: say so before opening any checkpoint
  saved = ckpt_lib.saved_shapes(path)
  for prefix, kind, within in _LAYOUTS:
    if any(p.startswith(prefix) for p in saved):
      return kind, within
  expected = " or ".join(f"{prefix}..." for prefix, *_ in _LAYOUTS)
  fields = sorted({p.split("/")[0] for p in saved})
  raise ValueError(
    f"{path!s}: its newest checkpoint holds no model parameters ({expected}); saved: {fields}"
  )


def model_kind(path: str | Path) -> str:
  """ "lm" or "reward_model": what `path` holds (a Hugging Face directory or GGUF file: "lm"; an
  experiment workdir: what its newest checkpoint saved; a PPO or GRPO workdir: its policy)."""
  return "lm" if is_hf_checkpoint(path) or is_gguf(path) else _layout(path)[0]


def load_model(
  path: str | Path, mesh: Mesh, *, kind: str | None = None, **overrides: Any
) -> tuple[LlamaConfig, Any]:
  """`(config, params)` on `mesh` from a Hugging Face directory or an experiment workdir.

  `overrides` replace config fields (compute ones: dtype, param_dtype, remat...; for a
  Hugging Face directory `param_dtype` is the dtype the weights load in). `kind` ("lm" or
  "reward_model") is checked against what the checkpoint holds if given. From a PPO or
  GRPO workdir the LM is the policy.
  """
  if is_gguf(path):
    from llama_jax.checkpoint.gguf import load_gguf_checkpoint  # noqa: PLC0415  (gguf package)

    overrides = dict(overrides)
    if kind not in (None, "lm"):
      raise ValueError(f"{path!s} is a GGUF file: it holds an LM, not a {kind}")
    return load_gguf_checkpoint(
      path, dtype=overrides.pop("param_dtype", "float32"),
      compute_dtype=overrides.pop("dtype", None), mesh=mesh, **overrides,
    )  # fmt: skip
  found = model_kind(path)
  if kind is not None and kind != found:
    raise ValueError(f"{path!s} holds a {found} checkpoint, not a {kind}")
  if is_hf_checkpoint(path):
    overrides = dict(overrides)
    param_dtype = overrides.pop("param_dtype", "float32")
    compute_dtype = overrides.pop("dtype", None)
    return load_hf_checkpoint(
      path, dtype=param_dtype, compute_dtype=compute_dtype, mesh=mesh, **overrides
    )
  config, adapters = read_model_config(path, **overrides), read_lora_config(path)
  module = RewardModel if found == "reward_model" else Llama
  abstract = sharding.abstract_sharded_params(module(config, lora=adapters), mesh)
  params = ckpt_lib.load_params(ckpt_lib.checkpoint_dir(path), abstract, within=_layout(path)[1])
  check_finite(params, str(ckpt_lib.checkpoint_dir(path)))
  return config, params if adapters is None else lora.merge(params, adapters)


# --------------------------------------------------------------------------- loading


def load_reward_model(
  workdir: str, mesh: Mesh | None = None, **overrides: Any
) -> tuple[LlamaConfig, Any]:
  """`(config, params)` of a reward-model workdir (`experiments.reward_model`); LoRA adapters
  come merged (`load_model`).

  `overrides` replace config fields (compute ones such as dtype); `mesh` defaults to all
  devices along fsdp.
  """
  config_file = Path(workdir) / MODEL_CONFIG_FILE
  if not config_file.exists():
    raise FileNotFoundError(f"{workdir}: no {MODEL_CONFIG_FILE}; not a reward-model workdir")
  return load_model(workdir, mesh or sharding.make_mesh(), kind="reward_model",
                             **overrides)  # fmt: skip
