"""Hugging Face Llama checkpoints: config.json + safetensors (single file or sharded index).

`load_hf_checkpoint` reads tensor by tensor into the target sharding;
`save_hf_checkpoint` writes a directory that `transformers.LlamaForCausalLM` loads.
config.json is accepted both as published with the Llama checkpoints (`rope_theta` +
`rope_scaling`) and in the `rope_parameters` form that recent `transformers` writes. Any
field that is neither handled nor known not to change the computation raises, and so does
a known field whose value would change it (`attention_bias: true`, `rope_interleaved: true`,
`pretraining_tp: 2`, ...), naming the field and the value.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh
from jax.typing import DTypeLike
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from llama_jax.checkpoint.params import (
  CheckpointError,
  build_params,
  iter_hf_tensors,
  read_json,
)
from llama_jax.model.config import LlamaConfig, RopeScaling
from llama_jax.parallel import sharding as shd

# HF field -> LlamaConfig field.
_FIELDS = {
  "vocab_size": "vocab_size",
  "num_hidden_layers": "num_layers",
  "hidden_size": "d_model",
  "num_attention_heads": "num_heads",
  "num_key_value_heads": "num_kv_heads",
  "head_dim": "head_dim",
  "intermediate_size": "mlp_dim",
  "rms_norm_eps": "norm_eps",
  "max_position_embeddings": "max_seq_len",
  "tie_word_embeddings": "tie_embeddings",
  "bos_token_id": "bos_token_id",
  "eos_token_id": "eos_token_id",
  "initializer_range": "initializer_range",
}
# Fields that change the computation unless they hold this one value (the only one the model
# implements); any other value raises, naming the field and the value.
_REQUIRED = {
  "model_type": "llama",
  "hidden_act": "silu",
  "attention_bias": False,
  "mlp_bias": False,
  "attention_dropout": 0.0,  # dropout on the attention probabilities while training
  "pretraining_tp": 1,  # > 1: transformers splits every projection into that many slices
  "rope_interleaved": False,  # nanotron's flag (SmolLM2 publishes it): true = Meta's pairs
}
# Fields that do not affect the model's function: special-token ids the tokenizer owns,
# provenance, tool metadata, and the generic attributes `PretrainedConfig` writes for every
# model (`to_json_string(use_diff=False)`).
_IGNORED = {
  # token ids (bos/eos are mapped above; these are the tokenizer's business)
  "pad_token_id", "unk_token_id", "sep_token_id", "cls_token_id", "mask_token_id",
  "decoder_start_token_id",
  # provenance and tool metadata
  "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
  "is_llama_config", "transformers.js_config", "use_cache",
  # generic PretrainedConfig attributes (heads, outputs, fine-tuning tasks)
  "output_attentions", "output_hidden_states", "return_dict", "id2label", "label2id",
  "chunk_size_feed_forward", "is_encoder_decoder", "problem_type", "tokenizer_class",
  "prefix", "task_specific_params", "finetuning_task", "torchscript", "tie_encoder_decoder",
}
# Fields without which the architecture is unknown (the others have defaults).
_NEEDED = ("vocab_size", "num_hidden_layers", "hidden_size", "num_attention_heads",
           "intermediate_size")
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor",
              "high_freq_factor", "original_max_position_embeddings"}


def config_from_hf(hf: dict[str, Any], source: str = "config.json", **overrides) -> LlamaConfig:
  """LlamaConfig from a HF config dict; unknown fields and unsupported values raise."""
  if not isinstance(hf, dict):
    raise CheckpointError(f"{source}: expected a JSON object, got {type(hf).__name__}: "
                          f"{str(hf)[:80]}")  # fmt: skip
  missing = [k for k in _NEEDED if k not in hf]
  if missing:
    raise CheckpointError(f"{source}: required field(s) {missing} missing")
  known = set(_FIELDS) | set(_REQUIRED) | _IGNORED | {"rope_theta", "rope_scaling",
                                                      "rope_parameters"}
  unknown = sorted(set(hf) - known)
  if unknown:
    raise CheckpointError(
      f"{source}: unsupported field(s) {unknown} (values {[hf[k] for k in unknown]}); "
      "llama_jax would silently ignore them"
    )
  for key, value in _REQUIRED.items():
    if key in hf and hf[key] != value:
      raise CheckpointError(f"{source}: {key}={hf[key]!r} is not supported (need {value!r})")
  kwargs = {ours: hf[theirs] for theirs, ours in _FIELDS.items() if theirs in hf}
  kwargs.setdefault("num_kv_heads", hf["num_attention_heads"])
  kwargs.setdefault("head_dim", hf["hidden_size"] // hf["num_attention_heads"])
  if isinstance(kwargs.get("eos_token_id"), list):
    kwargs["eos_token_id"] = tuple(kwargs["eos_token_id"])
  kwargs["rope_theta"], kwargs["rope_scaling"] = _rope_from_hf(hf, source)
  return LlamaConfig(**kwargs).replace(**overrides)


def _rope_from_hf(hf: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
  """(theta, scaling) from `rope_theta` + `rope_scaling` or from `rope_parameters`."""
  theta = hf.get("rope_theta")
  rope = hf.get("rope_parameters") or hf.get("rope_scaling")
  if rope is None:
    return float(theta if theta is not None else 10000.0), None
  field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
  unknown = sorted(set(rope) - _ROPE_KEYS)
  if unknown:
    raise CheckpointError(f"{source}: unsupported {field} key(s) {unknown} in {rope}")
  theta = rope.get("rope_theta", theta)
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return float(theta if theta is not None else 10000.0), None
  if kind != "llama3":
    raise CheckpointError(
      f"{source}: {field} type {kind!r} is not supported (supported: 'default', 'llama3')"
    )
  try:
    scaling = RopeScaling(
      factor=float(rope["factor"]),
      low_freq_factor=float(rope["low_freq_factor"]),
      high_freq_factor=float(rope["high_freq_factor"]),
      original_max_position_embeddings=int(rope["original_max_position_embeddings"]),
    )
  except KeyError as e:
    raise CheckpointError(f"{source}: {field} of type 'llama3' lacks {e.args[0]!r}: {rope}") from e
  return float(theta), scaling


def config_to_hf(cfg: LlamaConfig) -> dict[str, Any]:
  """HF config dict in the form published with the Llama checkpoints."""
  hf = {theirs: getattr(cfg, ours) for theirs, ours in _FIELDS.items()}
  if isinstance(hf["eos_token_id"], tuple):
    hf["eos_token_id"] = list(hf["eos_token_id"])
  required = {k: v for k, v in _REQUIRED.items() if k != "rope_interleaved"}  # nanotron's only
  hf |= dict(required, architectures=["LlamaForCausalLM"], rope_theta=cfg.rope_theta,
             torch_dtype=cfg.param_dtype, rope_scaling=None)
  if cfg.rope_scaling is not None:
    s = cfg.rope_scaling
    hf["rope_scaling"] = {"rope_type": "llama3", "factor": s.factor,
                          "low_freq_factor": s.low_freq_factor,
                          "high_freq_factor": s.high_freq_factor,
                          "original_max_position_embeddings": s.original_max_position_embeddings}
  return hf


def _tensor_names(file: Path) -> list[str]:
  """The tensors a safetensors file holds; opening it checks its header against its size,
  so a truncated or damaged file fails here, by name, before any tensor is read."""
  try:
    with safe_open(file, framework="numpy") as f:
      return list(f.keys())
  except (SafetensorError, OSError) as e:
    size = f"{file.stat().st_size} bytes" if file.exists() else "missing"
    raise CheckpointError(
      f"{file}: not a readable safetensors file (truncated or damaged? {size}): {e}"
    ) from e


def _tensor_files(path: Path) -> dict[str, Path]:
  """Tensor name -> safetensors file, from the sharded index or the single file; every
  file's header is read (cheap: no tensor data) so a bad shard fails before loading."""
  index = path / "model.safetensors.index.json"
  if index.exists():
    weight_map = read_json(index)
    if not isinstance(weight_map, dict) or not isinstance(weight_map.get("weight_map"), dict):
      raise CheckpointError(f"{index}: no 'weight_map' object (tensor name -> file)")
    files = {name: path / file for name, file in weight_map["weight_map"].items()}
    for file in sorted(set(files.values())):
      held = set(_tensor_names(file))
      absent = sorted(n for n, f in files.items() if f == file and n not in held)
      if absent:
        raise CheckpointError(f"{file}: lacks tensor(s) {absent[:8]} that {index.name} puts there")
    return files
  files = sorted(path.glob("*.safetensors"))
  if not files:
    raise CheckpointError(f"{path}: no model.safetensors, no index, no *.safetensors files")
  out = {}
  for file in files:
    for name in _tensor_names(file):
      if name in out:
        raise CheckpointError(f"{path}: tensor {name} is in both {out[name]} and {file}")
      out[name] = file
  return out


def _reader(file: Path, name: str):
  def read() -> np.ndarray:
    try:
      with safe_open(file, framework="numpy") as f:
        return f.get_tensor(name)
    except (SafetensorError, OSError) as e:  # e.g. the file changed since it was opened
      raise CheckpointError(f"{file}: cannot read tensor {name}: {e}") from e

  return read


def load_hf_checkpoint(
  path: str | Path,
  *,
  dtype: DTypeLike = "float32",
  compute_dtype: DTypeLike | None = None,
  mesh: Mesh | None = None,
  rules: shd.Rules = shd.DEFAULT_RULES,
  **config_overrides,
) -> tuple[LlamaConfig, dict]:
  """Reads a HF Llama directory into `(config, params)`.

  Args:
    path: directory with config.json and model.safetensors (or an index + shards).
    dtype: parameter dtype (the config's `param_dtype`): anything `jnp.dtype` takes.
    compute_dtype: activation / matmul dtype (the config's `dtype`); default: `dtype`.
    mesh: if given, every tensor goes straight into its sharding on this mesh.
    rules: logical-axis rules for the shardings.
    **config_overrides: LlamaConfig fields such as `dtype="bfloat16"` or `scan_layers=True`.
  """
  path = Path(path)
  config_file = path / "config.json"
  if not config_file.exists():
    raise CheckpointError(f"{path}: no config.json")
  cfg = config_from_hf(read_json(config_file), str(config_file),
                       param_dtype=dtype,
                       dtype=compute_dtype or dtype, **config_overrides)
  files = _tensor_files(path)
  tensors = {name: _reader(file, name) for name, file in files.items()}
  ignore = {n for n in tensors if n.endswith("rotary_emb.inv_freq")}
  if cfg.tie_embeddings and "lm_head.weight" in tensors:
    _check_tied_head(tensors, path)
    ignore.add("lm_head.weight")
  origins = {name: str(file) for name, file in files.items()}
  return cfg, build_params(cfg, tensors, source=str(path), mesh=mesh, rules=rules, ignore=ignore,
                           origins=origins)


def _check_tied_head(tensors, path):
  """Some exports store the tied head anyway; accept it only if it equals the embedding."""
  if not np.array_equal(tensors["lm_head.weight"](), tensors["model.embed_tokens.weight"]()):
    raise CheckpointError(
      f"{path}: tie_word_embeddings=true but lm_head.weight differs from model.embed_tokens.weight"
    )


def save_hf_checkpoint(path: str | Path, config: LlamaConfig, params, *,
                       max_shard_bytes: int = 2 * 1024**3) -> None:
  """Writes config.json + safetensors that `transformers.LlamaForCausalLM` loads.

  Tensors are fetched one at a time; host memory peaks at about `max_shard_bytes`. With
  several processes every process must call this (sharded parameters are gathered), and
  process 0 writes.
  """
  path = Path(path)
  write = jax.process_index() == 0
  if write:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config_to_hf(config), indent=2) + "\n")
  shards: list[dict[str, np.ndarray]] = [{}]
  files: list[Path] = []
  weight_map: dict[str, str] = {}
  total = 0

  def flush():
    file = path / f"model-{len(files) + 1:05d}.safetensors"
    if write:
      save_file(shards[-1], file, metadata={"format": "pt"})
    files.append(file)
    weight_map.update({name: file.name for name in shards[-1]})
    shards.append({})

  for name, array in iter_hf_tensors(config, params):
    if shards[-1] and sum(a.nbytes for a in shards[-1].values()) + array.nbytes > max_shard_bytes:
      flush()
    shards[-1][name] = array
    total += array.nbytes
  flush()
  if not write:
    return
  if len(files) == 1:
    files[0].rename(path / "model.safetensors")
    return
  count = len(files)
  for i, file in enumerate(files, 1):  # HF's naming: model-00001-of-00003.safetensors
    final = path / f"model-{i:05d}-of-{count:05d}.safetensors"
    file.rename(final)
    weight_map = {n: (final.name if f == file.name else f) for n, f in weight_map.items()}
  index = {"metadata": {"total_size": total}, "weight_map": weight_map}
  (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
