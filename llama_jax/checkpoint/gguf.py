"""GGUF (llama.cpp) Llama checkpoints: metadata -> `LlamaConfig`, tensors -> params.

A GGUF file holds `llama.*` hyperparameters, the tokenizer (`tokenizer.ggml.*`) and the
tensors under llama.cpp's names, each either plain (F32/F16/BF16) or block-quantized (Q8_0,
Q4_0, Q4_1, Q4_K, Q6_K, ...). Importing renames every tensor to its HF name
(`_LAYER_NAMES`), dequantizes it to float32 with the `gguf` package's own
`gguf.quants.dequantize`, and hands it to the same table-driven loader as a safetensors
checkpoint (`params.build_params`), so parameters go one at a time into their shardings.

Two layout facts:
  * GGUF lists a matrix's dimensions innermost first (`[in, out]`), so the row-major array
    the reader returns is `[out, in]`: already HF's layout; nothing is transposed here.
  * llama.cpp's converter permutes the rows of `attn_q` / `attn_k` of every head so that
    its RoPE rotates interleaved pairs (x0, x1), (x2, x3), ... (Meta's layout); HF and
    llama_jax rotate half-split pairs. The permutation is undone with the same function as
    for Meta's checkpoints (`meta.interleaved_to_half_split`), as transformers'
    `LlamaTensorProcessor._reverse_permute_weights` does.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from jax.sharding import Mesh
from jax.typing import DTypeLike

from llama_jax.checkpoint.meta import interleaved_to_half_split
from llama_jax.checkpoint.params import (
  CheckpointError,
  _natural_key,
  build_params,
  tensor_specs,
)
from llama_jax.model.config import LlamaConfig, RopeScaling
from llama_jax.parallel import sharding as shd

_ARCH = "llama"

# `llama.<key>` -> LlamaConfig field.
_CONFIG_KEYS = {
  "block_count": "num_layers",
  "embedding_length": "d_model",
  "feed_forward_length": "mlp_dim",
  "attention.head_count": "num_heads",
  "attention.head_count_kv": "num_kv_heads",
  "attention.key_length": "head_dim",
  "attention.layer_norm_rms_epsilon": "norm_eps",
  "rope.freq_base": "rope_theta",
  "context_length": "max_seq_len",
  "vocab_size": "vocab_size",
}
# `llama.<key>` that changes the computation unless it holds this value.
_REQUIRED = {
  "rope.scaling.type": "none",  # "linear" / "yarn": not implemented (llama3 comes as a tensor)
  "expert_count": 0,
  "expert_used_count": 0,
  "attention.causal": True,
  "use_parallel_residual": False,
}
# `llama.<key>` checked against the config in `_config`, or without effect on the function.
_CHECKED = {"rope.dimension_count", "attention.value_length", "rope.scaling.factor"}
_IGNORED = {
  "tensor_data_layout",  # provenance ("Meta AI original pth"); q/k are permuted either way
  "rope.scaling.finetuned",
  "rope.scaling.original_context_length",  # used only by the scaling types refused above
}

# GGUF name -> HF name. Per-layer names sit under `blk.{i}.` / `model.layers.{i}.`.
_TOP_NAMES = {
  "token_embd.weight": "model.embed_tokens.weight",
  "output_norm.weight": "model.norm.weight",
  "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
  "attn_norm.weight": "input_layernorm.weight",
  "attn_q.weight": "self_attn.q_proj.weight",
  "attn_k.weight": "self_attn.k_proj.weight",
  "attn_v.weight": "self_attn.v_proj.weight",
  "attn_output.weight": "self_attn.o_proj.weight",
  "ffn_norm.weight": "post_attention_layernorm.weight",
  "ffn_gate.weight": "mlp.gate_proj.weight",
  "ffn_up.weight": "mlp.up_proj.weight",
  "ffn_down.weight": "mlp.down_proj.weight",
}
# llama.cpp stores Llama 3.1's "llama3" RoPE scaling as per-frequency divisors, not metadata.
_ROPE_FREQS = "rope_freqs.weight"

# Tensor types read (all through `gguf.quants.dequantize`); the first row is tested here.
_TENSOR_TYPES = {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K",
                 "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K"}


def gguf_to_hf_name(name: str) -> str | None:
  """The HF tensor name of a GGUF tensor name (None if it has none)."""
  if name in _TOP_NAMES:
    return _TOP_NAMES[name]
  parts = name.split(".", 2)
  if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}"
  return None


_HF_TOP_NAMES = {hf: g for g, hf in _TOP_NAMES.items()}
_HF_LAYER_NAMES = {hf: g for g, hf in _LAYER_NAMES.items()}


def hf_to_gguf_name(name: str) -> str:
  """The GGUF tensor name of a HF Llama tensor name (inverse of `gguf_to_hf_name`)."""
  if name in _HF_TOP_NAMES:
    return _HF_TOP_NAMES[name]
  _, _, layer, suffix = name.split(".", 3)  # model.layers.{i}.{suffix}
  return f"blk.{layer}.{_HF_LAYER_NAMES[suffix]}"


def _reader(path: str | Path):
  import gguf

  try:
    return gguf.GGUFReader(str(path))
  except Exception as e:  # noqa: BLE001 -- a cut or damaged file fails in numpy, struct, enum...
    size = f"{Path(path).stat().st_size} bytes" if Path(path).is_file() else "missing"
    raise CheckpointError(
      f"{path}: not a readable GGUF file (truncated or damaged? {size}): "
      f"{type(e).__name__}: {e}"
    ) from e


def _metadata(reader) -> dict[str, Any]:
  """Every key-value pair but the tokenizer's long lists (read by `gguf_tokenizer_metadata`)."""
  out = {}
  for key, field in reader.fields.items():
    if key.startswith("GGUF.") or (key.startswith("tokenizer.") and len(field.data) > 1):
      continue
    out[key] = field.contents()
  return out


def _config(path, meta: dict[str, Any], tensors: dict[str, Any], reader) -> dict[str, Any]:
  """LlamaConfig kwargs from `llama.*` metadata; anything that would change the model raises."""
  arch = meta.get("general.architecture")
  if arch != _ARCH:
    raise CheckpointError(
      f"{path}: general.architecture={arch!r} is not supported (need {_ARCH!r})")
  hp = {k[len(_ARCH) + 1:]: v for k, v in meta.items() if k.startswith(_ARCH + ".")}
  unknown = sorted(set(hp) - set(_CONFIG_KEYS) - set(_REQUIRED) - _CHECKED - _IGNORED)
  if unknown:
    raise CheckpointError(
      f"{path}: unsupported metadata {', '.join(f'{_ARCH}.{k}={hp[k]!r}' for k in unknown)}; "
      "llama_jax would silently ignore it")
  for key, value in _REQUIRED.items():
    if key in hp and hp[key] != value:
      raise CheckpointError(
        f"{path}: {_ARCH}.{key}={hp[key]!r} is not supported (need {value!r})")
  for key in ("block_count", "embedding_length", "feed_forward_length", "attention.head_count"):
    if key not in hp:
      raise CheckpointError(f"{path}: metadata {_ARCH}.{key} is missing")
  kwargs = {ours: hp[theirs] for theirs, ours in _CONFIG_KEYS.items() if theirs in hp}
  kwargs.setdefault("num_kv_heads", kwargs["num_heads"])
  kwargs.setdefault("head_dim", kwargs["d_model"] // kwargs["num_heads"])
  for key in ("rope.dimension_count", "attention.value_length"):  # partial RoPE, odd V width
    if key in hp and hp[key] != kwargs["head_dim"]:
      raise CheckpointError(
        f"{path}: {_ARCH}.{key}={hp[key]} is not supported (need head_dim={kwargs['head_dim']})")
  factor = hp.get("rope.scaling.factor", 1.0)
  if hp.get("rope.scaling.type") != "none" and factor not in (0.0, 1.0):
    # llama.cpp applies a factor without a type as linear scaling.
    raise CheckpointError(f"{path}: {_ARCH}.rope.scaling.factor={factor} (linear RoPE scaling) "
                          "is not supported")
  if "vocab_size" not in kwargs:  # older converters: the size of the token list
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
      kwargs["vocab_size"] = len(tokens.data)
    elif "token_embd.weight" in tensors:
      kwargs["vocab_size"] = int(tensors["token_embd.weight"].shape[-1])
  kwargs["bos_token_id"] = meta.get("tokenizer.ggml.bos_token_id")
  # llama.cpp stops generating at any end-of-generation token: eos, and eot / eom if given
  # (Llama 3.1 Instruct: 128009 and 128008, as its HF config's eos_token_id list says).
  stops = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
  stops = list(dict.fromkeys(s for s in stops if s is not None))
  kwargs["eos_token_id"] = tuple(stops) if len(stops) > 1 else (stops or [None])[0]
  kwargs["tie_embeddings"] = "output.weight" not in tensors
  if _ROPE_FREQS in tensors:
    kwargs["rope_scaling"] = _rope_scaling_from_freqs(
      path, _dequantize(tensors[_ROPE_FREQS]), kwargs.get("rope_theta", 10000.0),
      kwargs["head_dim"])
  # GGUF stores these as float32; the shortest decimal that rounds to it (1e-05, not
  # 9.999999747378752e-06) is the value the HF config was written with.
  kwargs["rope_theta"] = float(str(np.float32(kwargs.get("rope_theta", 10000.0))))
  kwargs["norm_eps"] = float(str(np.float32(kwargs.get("norm_eps", 1e-5))))
  return kwargs


def _llama3_rope_divisors(theta: float, head_dim: int, s: RopeScaling) -> np.ndarray:
  """The per-frequency divisors llama.cpp's converter writes as `rope_freqs.weight`."""
  freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  wavelen = 2 * math.pi / freqs
  smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
    s.high_freq_factor - s.low_freq_factor)
  mid = 1 / ((1 - smooth) / s.factor + smooth)
  low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
  high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
  return np.where(wavelen < high_wavelen, 1.0, np.where(wavelen > low_wavelen, s.factor, mid))


def _rope_scaling_from_freqs(path, divisors: np.ndarray, theta: float,
                             head_dim: int) -> RopeScaling | None:
  """The "llama3" scaling that produced `rope_freqs.weight`, or an error naming the tensor.

  The converter writes only the divisors; their maximum is the factor, and the other
  parameters are those every Llama 3.1 / 3.2 release uses (llama.cpp's converter also
  assumes an original context of 8192), verified against the divisors.
  """
  divisors = np.asarray(divisors, np.float64).reshape(-1)
  if np.allclose(divisors, 1.0):
    return None
  scaling = RopeScaling(factor=float(np.round(divisors.max(), 4)), low_freq_factor=1.0,
                        high_freq_factor=4.0, original_max_position_embeddings=8192)
  expected = _llama3_rope_divisors(theta, head_dim, scaling)
  if divisors.shape != expected.shape or not np.allclose(divisors, expected, rtol=1e-4):
    raise CheckpointError(
      f"{path}: tensor {_ROPE_FREQS} {np.round(divisors, 4).tolist()} is not the 'llama3' RoPE "
      f"scaling {scaling} (the only kind supported)")
  return scaling


def _dequantize(tensor) -> np.ndarray:
  """float32 array in the row-major shape of the tensor (HF's `[out, in]` for matrices)."""
  import gguf

  return np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)


def _loader(tensor, num_heads: int | None):
  def read() -> np.ndarray:
    w = _dequantize(tensor)
    return w if num_heads is None else interleaved_to_half_split(w, num_heads)

  return read


def load_gguf_checkpoint(
  path: str | Path,
  *,
  dtype: DTypeLike = "float32",
  compute_dtype: DTypeLike | None = None,
  mesh: Mesh | None = None,
  rules: shd.Rules = shd.DEFAULT_RULES,
  **config_overrides,
) -> tuple[LlamaConfig, dict]:
  """Reads a llama.cpp GGUF file of a Llama model into `(config, params)`.

  Quantized tensors are dequantized to float32 (exactly as llama.cpp's `gguf` package
  does) and then cast to `dtype`; the result is an ordinary dense model.

  Args:
    path: the `.gguf` file (a single file; split GGUFs are not supported).
    dtype: parameter dtype (the config's `param_dtype`): anything `jnp.dtype` takes.
    compute_dtype: activation / matmul dtype (the config's `dtype`); default: `dtype`.
    mesh: if given, every tensor goes straight into its sharding on this mesh.
    rules: logical-axis rules for the shardings.
    **config_overrides: LlamaConfig fields such as `scan_layers=True`.

  Raises:
    CheckpointError: another architecture, metadata that would change the model, a missing
      or unexpected tensor, or a tensor type that cannot be dequantized; the message names
      the file and the field or tensor.
  """
  path = Path(path)
  reader = _reader(path)
  tensors = {t.name: t for t in reader.tensors}
  kwargs = _config(path, _metadata(reader), tensors, reader)
  cfg = LlamaConfig(**kwargs, param_dtype=dtype, dtype=compute_dtype or dtype)
  cfg = cfg.replace(**config_overrides)

  # Checked here, before `build_params` does, so that errors use the names in the file.
  expected = tensor_specs(cfg)
  present = {gguf_to_hf_name(n) for n in tensors}
  missing = [hf_to_gguf_name(n) for n in expected if n not in present]
  unexpected = [n for n in tensors if n != _ROPE_FREQS and gguf_to_hf_name(n) not in expected]
  unexpected.sort(key=_natural_key)
  if missing or unexpected:
    raise CheckpointError(
      f"{path}: tensors do not match the metadata (llama.block_count={cfg.num_layers}): "
      f"missing tensors {missing[:8]}{' …' if len(missing) > 8 else ''}; "
      f"unexpected tensors {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
  for name, t in tensors.items():
    if t.tensor_type.name not in _TENSOR_TYPES:
      raise CheckpointError(
        f"{path}: tensor {name} has type {t.tensor_type.name}, which llama_jax does not read "
        f"(supported: {sorted(_TENSOR_TYPES)})")

  heads = {"attn_q.weight": cfg.num_heads, "attn_k.weight": cfg.num_kv_heads}
  hf_tensors, origins = {}, {}
  for name, t in tensors.items():
    if name == _ROPE_FREQS:
      continue
    hf_tensors[gguf_to_hf_name(name)] = _loader(t, heads.get(name.split(".", 2)[-1]))
    origins[gguf_to_hf_name(name)] = f"{path} ({name}, {t.tensor_type.name})"
  return cfg, build_params(cfg, hf_tensors, source=str(path), mesh=mesh, rules=rules,
                           origins=origins)


# --------------------------------------------------------------------------- tokenizer

_TOKENIZER_KEYS = {  # metadata key under tokenizer.ggml. -> our key
  "model": "model", "pre": "pre",
  "bos_token_id": "bos_token_id", "eos_token_id": "eos_token_id",
  "eot_token_id": "eot_token_id", "eom_token_id": "eom_token_id",
  "padding_token_id": "pad_token_id", "unknown_token_id": "unk_token_id",
  "add_bos_token": "add_bos_token", "add_eos_token": "add_eos_token",
  "add_space_prefix": "add_space_prefix",
}


def gguf_tokenizer_metadata(path: str | Path) -> dict[str, Any]:
  """The tokenizer stored in a GGUF file, as plain Python values.

  Returns a dict with `model` ('gpt2' for byte-level BPE, 'llama' for SentencePiece),
  `pre` (llama.cpp's pre-tokenizer name, e.g. 'smollm', 'llama-bpe'), `tokens` (list[str],
  index = id), `token_types` (list[int], `gguf.TokenType`: 1 normal, 3 control, 4 user
  defined, 6 byte, ...), `merges` (list[str] "a b"; empty for 'llama'), `scores`
  (list[float]; empty if absent), the ids `bos_token_id`, `eos_token_id`, `eot_token_id`,
  `eom_token_id`, `pad_token_id`, `unk_token_id`, the flags `add_bos_token`,
  `add_eos_token`, `add_space_prefix`, and `chat_template` (a Jinja string). Absent
  scalars are None.
  """
  reader = _reader(path)
  fields = reader.fields

  def get(key, default=None):
    field = fields.get(key)
    return default if field is None else field.contents()

  out: dict[str, Any] = {ours: get(f"tokenizer.ggml.{k}") for k, ours in _TOKENIZER_KEYS.items()}
  if out["model"] is None:
    raise CheckpointError(f"{path}: no tokenizer (metadata tokenizer.ggml.model is missing)")
  out["tokens"] = get("tokenizer.ggml.tokens", [])
  out["token_types"] = get("tokenizer.ggml.token_type", [])
  out["merges"] = get("tokenizer.ggml.merges", [])
  out["scores"] = get("tokenizer.ggml.scores", [])
  out["chat_template"] = get("tokenizer.chat_template")
  return out


# llama.cpp's `tokenizer.ggml.pre` -> how text is split before byte-level BPE (its
# `llama-vocab.cpp` regexes). None: GPT-2's own split (the ByteLevel pre-tokenizer's regex).
_LLAMA3_SPLIT = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS: dict[str | None, str | None] = {
  None: None, "default": None, "gpt2": None, "gpt-2": None,
  # Every digit on its own, then GPT-2's split: SmolLM2's tokenizer.json does the same.
  "smollm": "digits", "starcoder": "digits", "refact": "digits",
  "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
}


def gguf_tokenizer_backend(meta: dict[str, Any], source: str = "GGUF") -> Any:
  """A `tokenizers.Tokenizer` from `gguf_tokenizer_metadata` output (byte-level BPE only).

  Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain
  added tokens, so that both are matched whole, as llama.cpp does.

  Raises:
    CheckpointError: a SentencePiece ('llama') tokenizer or an unknown pre-tokenizer,
      naming the metadata field and value.
  """
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

  if meta["model"] != "gpt2":
    raise CheckpointError(
      f"{source}: tokenizer.ggml.model={meta['model']!r} is not supported (need 'gpt2', "
      "byte-level BPE); use gguf_tokenizer_metadata for the raw vocabulary")
  if meta["pre"] not in _PRE_SPLITS:
    raise CheckpointError(
      f"{source}: tokenizer.ggml.pre={meta['pre']!r} is not supported "
      f"(supported: {sorted(k for k in _PRE_SPLITS if k)})")
  vocab = {token: i for i, token in enumerate(meta["tokens"])}
  merges = [tuple(m.split(" ", 1)) for m in meta["merges"]]
  backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
  split = _PRE_SPLITS[meta["pre"]]
  if split is None:
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  elif split == "digits":
    backend.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Digits(individual_digits=True),
       pre_tokenizers.ByteLevel(add_prefix_space=False)])
  else:
    backend.pre_tokenizer = pre_tokenizers.Sequence(
      [pre_tokenizers.Split(Regex(split), behavior="isolated"),
       pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  backend.decoder = decoders.ByteLevel()
  types = meta["token_types"] or [1] * len(meta["tokens"])
  backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                              for t, kind in zip(meta["tokens"], types, strict=True) if kind == 3])
  backend.add_tokens([AddedToken(t, special=False, normalized=False)
                      for t, kind in zip(meta["tokens"], types, strict=True) if kind == 4])
  return backend


def load_gguf_tokenizer(path: str | Path):
  """The GGUF file's tokenizer as a `llama_jax.tokenizer.hf.HFTokenizer`.

  BOS / EOS / padding come from `tokenizer.ggml.*_token_id`, `add_bos` from
  `tokenizer.ggml.add_bos_token`, the chat template from `tokenizer.chat_template`, and the
  end-of-turn / end-of-message tokens (if any) join EOS as stop tokens.
  """
  from llama_jax.tokenizer.hf import HFTokenizer

  meta = gguf_tokenizer_metadata(path)
  tokens = meta["tokens"]
  name = lambda key: None if meta[key] is None else tokens[meta[key]]
  stops = [name(k) for k in ("eot_token_id", "eom_token_id") if meta[k] is not None]
  tokenizer = HFTokenizer(
    gguf_tokenizer_backend(meta, str(path)),
    bos_token=name("bos_token_id"),
    eos_token=name("eos_token_id"),
    pad_token=name("pad_token_id"),
    add_bos_token=bool(meta["add_bos_token"]),
    chat_template=meta["chat_template"],
    stop_tokens=stops,
  )
  tokenizer.path = str(path)
  tokenizer.unk_token = name("unk_token_id")
  return tokenizer
