"""The run's model and tokenizer from its config: presets or `init_from` checkpoints, LoRA
adapters, and the checks that model, tokenizer, data and mesh fit together."""

from __future__ import annotations

import logging
from typing import Any

import ml_collections

from experiments.sections import build_mesh, lora_config, model_overrides
from llama_jax import LlamaConfig
from llama_jax.checkpoint import workdirs
from llama_jax.model.llama import Llama
from llama_jax.parallel import sharding
from llama_jax.rl import policy as policy_lib
from llama_jax.rl.policy import Policy
from llama_jax.tokenizer import Tokenizer, load_tokenizer, tiny_tokenizer

log = logging.getLogger(__name__)


_COMPUTE_FIELDS = ("dtype", "param_dtype", "attention_impl", "scan_layers", "remat_policy")


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


def load_model(cfg: ml_collections.ConfigDict, mesh) -> tuple[LlamaConfig, Any]:
  """`(model_config, params or None)`: the LM in `cfg.init_from` if set (a Hugging Face
  directory or an experiment workdir with Orbax checkpoints), else the preset (params None:
  fresh).

  When loading, only the compute fields of `cfg.model` (dtype, remat, ...) apply; the
  architecture is the checkpoint's.
  """
  compute = {k: v for k, v in model_overrides(cfg.model).items() if k in _COMPUTE_FIELDS}
  if not cfg.init_from:
    return LlamaConfig.preset(cfg.model.preset, **model_overrides(cfg.model)), None
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


def build_model(cfg: ml_collections.ConfigDict, model_cfg: LlamaConfig) -> Llama:
  """The trained LM: `Llama(model_cfg)`, with the config's LoRA adapters if it has any."""
  return Llama(model_cfg, lora=lora_config(cfg))


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


def load_policy(cfg: ml_collections.ConfigDict, *, reference: bool = False) -> Policy:
  """The policy a sampling stage starts from (`llama_jax.rl.policy.load_policy`): the model of
  `init_from` (none: the preset with random weights) with the configured tokenizer, on the
  configured mesh; `reference`: with a frozen copy (online RL)."""
  tokenizer = build_tokenizer(cfg.tokenizer, cfg.init_from)
  mesh = build_mesh(cfg.mesh)
  model_cfg, params = load_model(cfg, mesh)
  check_tokenizer(model_cfg, tokenizer, cfg)
  return policy_lib.load_policy(
    tokenizer, mesh, model_cfg, params, seed=cfg.generation.seed, reference=reference
  )
