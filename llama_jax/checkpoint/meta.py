"""Meta's original checkpoints: `params.json` + `consolidated.NN.pth` model-parallel shards.

Meta's reference code rotates *interleaved* pairs (x0, x1), (x2, x3), … of each head, while
llama_jax (like HF) rotates half-split pairs (x_i, x_{i+H/2}). Importing therefore permutes
the rows of `wq` and `wk` once (`interleaved_to_half_split`), after which every tensor goes
through the same HF-named table and loader as a safetensors checkpoint.
"""

from __future__ import annotations

import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np
from jax.sharding import Mesh
from jax.typing import DTypeLike

from llama_jax.checkpoint.params import CheckpointError, build_params, read_json
from llama_jax.checkpoint.torch_pickle import LazyTensor, load_torch_file
from llama_jax.model.config import LlamaConfig, RopeScaling
from llama_jax.parallel import sharding as shd

_PARAMS_FIELDS = {"dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of",
                  "ffn_dim_multiplier", "norm_eps", "rope_theta", "use_scaled_rope",
                  "rope_scaling_factor", "max_seq_len", "max_batch_size"}

# Meta name (per layer under "layers.{i}.") -> (HF suffix, concat axis across MP shards).
# Column-parallel weights are split over output rows (axis 0), row-parallel over input
# columns (axis 1); norms are replicated (None).
_LAYER_NAMES = {
  "attention.wq.weight": ("self_attn.q_proj.weight", 0),
  "attention.wk.weight": ("self_attn.k_proj.weight", 0),
  "attention.wv.weight": ("self_attn.v_proj.weight", 0),
  "attention.wo.weight": ("self_attn.o_proj.weight", 1),
  "feed_forward.w1.weight": ("mlp.gate_proj.weight", 0),
  "feed_forward.w3.weight": ("mlp.up_proj.weight", 0),
  "feed_forward.w2.weight": ("mlp.down_proj.weight", 1),
  "attention_norm.weight": ("input_layernorm.weight", None),
  "ffn_norm.weight": ("post_attention_layernorm.weight", None),
}
_TOP_NAMES = {"norm.weight": ("model.norm.weight", None), "output.weight": ("lm_head.weight", 0)}


def interleaved_to_half_split(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Permutes the rows [heads·H, D] of Meta's wq / wk from interleaved to half-split RoPE.

  Within each head, output row 2i (the real part of pair i) moves to row i and row 2i+1
  (imaginary part) to row i + H/2. For `wk` pass the number of *KV* heads.
  """
  rows, d = w.shape
  head_dim = rows // num_heads
  return w.reshape(num_heads, head_dim // 2, 2, d).transpose(0, 2, 1, 3).reshape(rows, d)


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
  """Meta's FeedForward width: 2/3 · 4·dim, times the multiplier, rounded up."""
  hidden = int(2 * (4 * dim) / 3)
  if ffn_dim_multiplier is not None:
    hidden = int(ffn_dim_multiplier * hidden)
  return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def config_from_meta(params: dict, vocab_size: int, source: str,
                     rope_scaling: RopeScaling | None, **overrides) -> LlamaConfig:
  """LlamaConfig from Meta's params.json (vocab size read from the embedding when -1)."""
  unknown = sorted(set(params) - _PARAMS_FIELDS)
  if unknown:
    raise CheckpointError(f"{source}: unsupported field(s) {unknown} in params.json")
  dim, heads = params["dim"], params["n_heads"]
  if params.get("use_scaled_rope"):
    if rope_scaling is None and "rope_scaling_factor" in params:
      rope_scaling = RopeScaling(factor=float(params["rope_scaling_factor"]))
    if rope_scaling is None:
      raise CheckpointError(
        f"{source}: use_scaled_rope=true but params.json does not give the scaling factor; "
        "pass rope_scaling=RopeScaling(factor=...) (8 for Llama 3.1, 32 for Llama 3.2 1B/3B, "
        "as in their HF config.json)"
      )
  elif rope_scaling is not None:
    raise CheckpointError(f"{source}: rope_scaling given but params.json has no use_scaled_rope")
  return LlamaConfig(
    vocab_size=vocab_size,
    num_layers=params["n_layers"],
    d_model=dim,
    num_heads=heads,
    num_kv_heads=params.get("n_kv_heads") or heads,
    head_dim=dim // heads,
    mlp_dim=ffn_hidden_dim(dim, params.get("multiple_of", 256), params.get("ffn_dim_multiplier")),
    norm_eps=params.get("norm_eps", 1e-5),
    rope_theta=float(params.get("rope_theta", 10000.0)),
    rope_scaling=rope_scaling,
    max_seq_len=params.get("max_seq_len", 131072 if rope_scaling else 4096),
    bos_token_id=None,
    eos_token_id=None,
  ).replace(**overrides)


# What a truncated or damaged zip archive raises (a bad CRC, a cut deflate stream, a cut
# pickle), as opposed to a refusal of its contents.
_DAMAGED = (zipfile.BadZipFile, zlib.error, EOFError, OSError, pickle.UnpicklingError)


def _load_shard(file: Path) -> dict[str, LazyTensor]:
  try:
    return load_torch_file(file)
  except _DAMAGED as e:
    if "refusing to load" in str(e):  # a pickled object other than tensors: its own message
      raise
    raise CheckpointError(
      f"{file}: not a readable torch checkpoint (truncated or damaged? "
      f"{file.stat().st_size} bytes): {type(e).__name__}: {e}"
    ) from e


def _numpy(piece: LazyTensor, name: str) -> np.ndarray:
  try:
    return piece.numpy()
  except (*_DAMAGED, ValueError) as e:  # ValueError: a size no multiple of the dtype's
    raise CheckpointError(
      f"{piece.storage.archive}: cannot read tensor {name} (truncated or damaged?): "
      f"{type(e).__name__}: {e}"
    ) from e


def _concat_shards(name: str, pieces: list[LazyTensor], axis: int | None, source: str):
  """Reader for one tensor split over model-parallel shards."""

  def read() -> np.ndarray:
    if axis is None or len(pieces) == 1:
      return _numpy(pieces[0], name)
    return np.concatenate([_numpy(p, name) for p in pieces], axis=axis)

  shapes = {p.shape for p in pieces}
  if axis is None and len(shapes) > 1:
    raise CheckpointError(f"{source}: replicated tensor {name} differs in shape across shards")
  return read


def _embedding_axis(pieces: list[LazyTensor], dim: int) -> int:
  """Llama 2 splits the embedding over the model width, Llama 3 over the vocabulary."""
  return 0 if pieces[0].shape[1] == dim else 1


def load_meta_checkpoint(
  path: str | Path,
  *,
  dtype: DTypeLike = "float32",
  compute_dtype: DTypeLike | None = None,
  mesh: Mesh | None = None,
  rules: shd.Rules = shd.DEFAULT_RULES,
  rope_scaling: RopeScaling | None = None,
  **config_overrides,
) -> tuple[LlamaConfig, dict]:
  """Imports a Meta checkpoint directory (`params.json`, `consolidated.*.pth`).

  Shards are read lazily with a torch-free reader; each tensor's pieces are concatenated on
  their model-parallel axis, q/k rows are permuted to the half-split RoPE layout, and the
  result is placed like any HF tensor (straight into its sharding when `mesh` is given).
  """
  path = Path(path)
  params_file = path / "params.json"
  shard_files = sorted(path.glob("consolidated.*.pth"))
  if not params_file.exists() or not shard_files:
    raise CheckpointError(f"{path}: expected params.json and consolidated.*.pth files")
  meta = read_json(params_file)
  if not isinstance(meta, dict):
    raise CheckpointError(f"{params_file}: expected a JSON object, got {type(meta).__name__}")
  shards = [_load_shard(f) for f in shard_files]
  names = set(shards[0])
  for f, shard in zip(shard_files[1:], shards[1:], strict=True):
    if set(shard) != names:
      raise CheckpointError(f"{f}: tensor names differ from {shard_files[0].name}: "
                            f"{sorted(set(shard) ^ names)[:8]}")
  if "tok_embeddings.weight" not in names:
    raise CheckpointError(f"{path}: no tok_embeddings.weight in {shard_files[0].name}")

  emb = [s["tok_embeddings.weight"] for s in shards]
  emb_axis = _embedding_axis(emb, meta["dim"]) if len(emb) > 1 else 0
  vocab = sum(p.shape[0] for p in emb) if emb_axis == 0 else emb[0].shape[0]
  cfg = config_from_meta(meta, vocab, str(params_file), rope_scaling, param_dtype=dtype,
                       dtype=compute_dtype or dtype,
                         **config_overrides)

  tensors = {"model.embed_tokens.weight": _concat_shards("tok_embeddings.weight", emb,
                                                         emb_axis, str(path))}
  files = ", ".join(f.name for f in shard_files)
  origins = {"model.embed_tokens.weight": f"{path} (tok_embeddings.weight in {files})"}
  ignore = set()
  for name in sorted(names - {"tok_embeddings.weight"}):
    pieces = [s[name] for s in shards]
    parts = name.split(".")
    if parts[0] == "layers" and ".".join(parts[2:]) in _LAYER_NAMES:
      suffix, axis = _LAYER_NAMES[".".join(parts[2:])]
      hf_name = f"model.layers.{parts[1]}.{suffix}"
    elif name in _TOP_NAMES:
      hf_name, axis = _TOP_NAMES[name]
    else:  # e.g. rope.freqs of Llama 2 checkpoints, or something build_params will reject
      hf_name, axis = name, None
      if name == "rope.freqs":
        ignore.add(name)
    read = _concat_shards(name, pieces, axis, str(path))
    if name.endswith("attention.wq.weight"):
      read = _permuted(read, cfg.num_heads)
    elif name.endswith("attention.wk.weight"):
      read = _permuted(read, cfg.num_kv_heads)
    tensors[hf_name] = read
    origins[hf_name] = f"{path} ({name} in {files})"
  return cfg, build_params(cfg, tensors, source=str(path), mesh=mesh, rules=rules, ignore=ignore,
                           origins=origins)


def _permuted(read, num_heads: int):
  return lambda: interleaved_to_half_split(read(), num_heads)
