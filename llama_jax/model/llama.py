"""The Llama 2 / Llama 3 decoder in Flax linen.

Dimension vocabulary (used in every einsum, name and comment of the project):
  B batch, T query length, S key length, D model width (d_model), N query heads,
  K kv heads, G = N/K query heads per kv head, H head dim, F MLP hidden, V vocab, L layers,
  R query rows that share one row of a KV part (samples per prompt, see `attend_xla`).

Attention masks come from segment ids: a query attends to a key iff both carry the same
segment id and the key is not later than the query. Segment 0 marks padding (and empty KV
cache slots), so one rule covers plain causal attention, padded batches, packed documents
and decoding against a cache. The cache-free path (training, scoring, prefill) runs the
kernel `LlamaConfig.attention_impl` names in the table of `llama_jax.model.attention`; decoding
against a cache runs `attend_xla`.

Every parameter carries logical axis names (see `parallel.sharding` for the table that maps
them to mesh axes), and the main activations are constrained with logical names prefixed
`act_`. Query and kv heads that the mesh does not divide stay whole (`head_axis_sizes`).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.model import attention
from llama_jax.model.attention import (  # noqa: F401  (re-exported: decode code and tests use them)
  KVPart,
  attend_dot_product,
  attend_xla,
  segment_mask,
)
from llama_jax.model.config import LlamaConfig, RopeScaling
from llama_jax.model.lora import LoraConfig, project

# --------------------------------------------------------------------------- RoPE


def rope_inv_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """Inverse frequencies [H/2] of the rotary embedding, with optional Llama 3.1 scaling."""
  inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  if scaling is not None:
    inv_freq = llama3_scale_frequencies(inv_freq, scaling)
  return inv_freq.astype(np.float32)


def llama3_scale_frequencies(inv_freq: np.ndarray, s: RopeScaling) -> np.ndarray:
  """Llama 3.1 "llama3" scaling: keep high frequencies, divide low ones, blend between."""
  wavelen = 2 * np.pi / inv_freq
  old_ctx = s.original_max_position_embeddings
  high_freq_wavelen, low_freq_wavelen = old_ctx / s.high_freq_factor, old_ctx / s.low_freq_factor
  blend = (old_ctx / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
  blended = (1 - blend) * inv_freq / s.factor + blend * inv_freq
  return np.where(
    wavelen < high_freq_wavelen,
    inv_freq,
    np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, blended),
  )


def rope_tables(positions: jax.Array, inv_freq: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """`(sin, cos)` [B, T, 1, H/2] float32 of positions [B, T]: computed once per forward pass
  (`Llama.hidden_states`) and shared by every layer, which all rotate by the same angles."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, H/2]
  return jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates x [B, T, N, H] by positions [B, T] in the half-split layout of HF Llama.

  Pairs are (x[i], x[i + H/2]); Meta's checkpoints pair neighbours instead, which
  `llama_jax.checkpoint.meta` undoes once at import time.
  """
  return rotate(x, rope_tables(positions, inv_freq))


def rotate(x: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
  """`apply_rope` with the `(sin, cos)` tables of `rope_tables`."""
  sin, cos = rope
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


# --------------------------------------------------------------------------- masks


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Positions [B, T] that restart at 0 where the segment id changes (packed documents)."""
  t = jnp.arange(segment_ids.shape[1])
  starts = jnp.concatenate(
    [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
  )
  return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


# --------------------------------------------------------------------------- KV cache


@flax.struct.dataclass
class KVCache:
  """Keys and values of earlier tokens, for decoding through `Llama.__call__`.

  All rows write the same slot range: a call with T new tokens writes slots
  [index, index + T). Rows of different lengths are left-padded (segment id 0), so padding
  occupies slots that no real query attends to. The cache is a plain pytree, so it can be
  donated to, and carried through, a compiled decode loop.
  """

  k: jax.Array  # [L, B, S, K, H]
  v: jax.Array  # [L, B, S, K, H]
  segment_ids: jax.Array  # [B, S] int32; 0 = empty slot or padding
  index: jax.Array  # [] int32; the next slot to write

  @classmethod
  def init(cls, config: LlamaConfig, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache with room for `max_len` tokens per row."""
    dtype = jnp.dtype(dtype or config.dtype)
    shape = (config.num_layers, batch_size, max_len, config.num_kv_heads, config.head_dim)
    return cls(
      k=jnp.zeros(shape, dtype),
      v=jnp.zeros(shape, dtype),
      segment_ids=jnp.zeros((batch_size, max_len), jnp.int32),
      index=jnp.zeros((), jnp.int32),
    )

  @property
  def max_len(self) -> int:
    return self.segment_ids.shape[1]

  def lengths(self) -> jax.Array:
    """Number of real (non-padding) tokens stored per row [B]."""
    return jnp.sum(self.segment_ids != 0, axis=1, dtype=jnp.int32)

  def write(self, new_k: jax.Array, new_v: jax.Array, segment_ids: jax.Array) -> KVCache:
    """Writes new keys/values [L, B, T, K, H] and their segment ids [B, T] at `index`."""
    at = (0, 0, self.index, 0, 0)
    return KVCache(
      k=jax.lax.dynamic_update_slice(self.k, new_k.astype(self.k.dtype), at),
      v=jax.lax.dynamic_update_slice(self.v, new_v.astype(self.v.dtype), at),
      segment_ids=jax.lax.dynamic_update_slice(self.segment_ids, segment_ids, (0, self.index)),
      index=self.index + segment_ids.shape[1],
    )


@flax.struct.dataclass
class PagedKV:
  """Keys and values in fixed-size pages of one pool, for the rollout engine
  (`llama_jax.generation.engine`).

  Row b's token at position p lives in page `page_table[b, p // page_size]` at offset
  `p % page_size`. Rows may share pages (the prompt of several samples). A call with T new
  tokens per row writes them at positions `lengths[b]` … and attends to every earlier position
  of its row; tokens with segment id 0 are padding, written to page 0, which the engine keeps
  as scratch and never hands out.

  The pool is the layout of TPU's ragged paged attention kernel: keys and values interleaved
  on one head axis (kv head j's key at 2j, its value at 2j + 1), so a tensor-parallel split of
  that axis keeps each head's key and value together, as the k / v weights are split.
  `impl` names the paged attention kernel (`attention.PAGED_KERNELS`).
  """

  kv: jax.Array  # [L, pages, page_size, 2K, H]
  page_table: jax.Array  # [B, pages per row] int32
  lengths: jax.Array  # [B] int32: tokens already cached per row
  impl: str = flax.struct.field(pytree_node=False, default="xla")

  @classmethod
  def init_pages(cls, config: LlamaConfig, num_pages: int, page_size: int, dtype=None):
    """An empty page pool [L, num_pages, page_size, 2K, H]."""
    shape = (config.num_layers, num_pages, page_size, 2 * config.num_kv_heads, config.head_dim)
    return jnp.zeros(shape, jnp.dtype(dtype or config.dtype))


@flax.struct.dataclass
class PagedLayerCache:
  """A `PagedKV` as carried through the layers of one call: where each new token goes."""

  kv: jax.Array  # [L, pages, page_size, 2K, H]
  layer: jax.Array  # [] int32: the layer about to run
  page_table: jax.Array  # [B, pages per row]
  lengths: jax.Array  # [B]: tokens cached per row before this call
  write_page: jax.Array  # [B, T]: the page of each new token (0 for padding)
  write_offset: jax.Array  # [B, T]
  impl: str = flax.struct.field(pytree_node=False, default="xla")


# --------------------------------------------------------------------------- attention


@flax.struct.dataclass
class AttentionMasks:
  """What every layer needs to mask attention, built once per call by `Llama.hidden_states`.

  The cache-free path (training, scoring, prefill) gives `segment_ids` and `extra_mask` to
  the kernel that `attention_impl` names (see `llama_jax.model.attention`), which builds its own
  causal segment mask from them. Decoding against a cache uses `part_masks` instead: the
  dense masks of `attend_xla`, one per prefix part, then the cache's.
  """

  segment_ids: jax.Array | None = None  # [B, T] int; 0 = padding
  extra_mask: jax.Array | None = None  # [B, T, T] bool, ANDed with the causal segment mask
  part_masks: tuple[jax.Array, ...] = ()  # [B, T, S] bool per KV part


# --------------------------------------------------------------------------- layers


def flat_matmul(x: jax.Array, w: jax.Array, **kwargs) -> jax.Array:
  """`x [..., I] · w [I, O…] -> [..., O…]` as one matmul [M, I] @ [I, O…], x's leading
  dimensions merged into M (B·T).

  The same product as `einsum("BTD,DNH->BTNH", x, w)`, but its weight gradient is then one
  matmul [I, M] @ [M, O…] that reads both operands in place. The einsum's contracts two
  dimensions (B and T), which XLA:CPU lowers with transposed copies of the activation
  gradient (a [F, B·T] copy of the SiLU backward per MLP weight, a [V, B·T] copy of the
  logits' gradient for the head): one `small_50m` MLP layer's backward took 116 ms that
  way and takes 70 ms this way on a 2-core CPU.
  `kwargs` go to `jax.lax.dot_general` (e.g. `preferred_element_type`).
  """
  dims = (((1,), (0,)), ((), ()))
  y = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), w, dims, **kwargs)  # [M, O…]
  return y.reshape(*x.shape[:-1], *w.shape[1:])


def _projection(module: nn.Module, name: str, x: jax.Array, spec: str, shape, axes) -> jax.Array:
  """`einsum(spec, x, W)` of the projection parameter `name` (with its LoRA adapter if the
  module's `lora` targets it, see `llama_jax.model.lora`); `spec` lists x's dimensions, then W's
  (inputs first, as in "BTD,DNH->BTNH")."""
  cfg = module.config
  init = nn.initializers.normal(cfg.initializer_range)
  w = module.param(name, nn.with_logical_partitioning(init, axes), shape, cfg.param_dtype)
  w = w.astype(cfg.dtype)
  x_letters, w_letters = spec.split("->")[0].split(",")
  # `flat_matmul` for one contracted dimension. The output projection (N and H contracted)
  # keeps the einsum of `lora.project`: under a mesh that splits N, the merged-rows matmul
  # sums the heads in another order, and a fresh LoRA model must give the plain model's
  # logits bit for bit. Its weight gradient is [N·H, D], small next to the MLP's.
  if (module.lora is not None and name in module.lora.targets) or w_letters[1] in x_letters:
    return project(module, name, x, w, spec, axes, module.lora, cfg.dtype)
  return flat_matmul(x, w)


class RMSNorm(nn.Module):
  """Root-mean-square normalization, computed in float32 whatever the activation dtype."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    scale = self.param(
      "scale",
      nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
      (x.shape[-1],),
      cfg.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.norm_eps)
    return (x32 * scale.astype(jnp.float32)).astype(cfg.dtype)


@flax.struct.dataclass
class LayerCache:
  """A `KVCache` as carried through the layers of one call."""

  k: jax.Array  # [L, B, S, K, H]
  v: jax.Array  # [L, B, S, K, H]
  layer: jax.Array  # [] int32: the layer about to run
  index: jax.Array  # [] int32: the slot of the first new token
  # Static: the new tokens fill the whole cache (a prefill), so attention needs nothing
  # from it and takes the cache-free path (the kernel of `attention_impl`).
  prefill: bool = flax.struct.field(pytree_node=False, default=False)


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE; optionally attends to cached keys too.

  With a `cache`, the layer first writes its new keys/values into the cache at
  [layer, :, index:index+T], then attends to the read-only `prefix_kv` parts (keys, values
  [B/R, P, K, H]) and to its whole updated cache slice. Writing before reading lets XLA
  update the cache in place; reading the old cache and writing after makes it copy the
  whole cache on every decode step. `masks.part_masks` then holds one mask per prefix part,
  then the cache's; a prefill takes the cache-free path, the kernel of `attention_impl`.
  """

  config: LlamaConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x, rope, masks: AttentionMasks, prefix_kv=(), cache: LayerCache | None = None):
    """`rope`: the `(sin, cos)` tables of the tokens' positions (`rope_tables`)."""
    cfg = self.config
    d, n, kh, h = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    proj = functools.partial(_projection, self)
    # The current rules with the heads that the mesh does not divide left whole, as
    # `sharding.rules_for` places the q / k / v / o weights (e.g. 3 kv heads on tensor = 2).
    constrain = functools.partial(nn.with_logical_constraint, rules=fitted_rules(cfg))
    heads = ("act_batch", "act_seq", "act_heads", None)
    kv_heads = ("act_batch", "act_seq", "act_kv_heads", None)
    q = proj("q", x, "BTD,DNH->BTNH", (d, n, h), ("embed", "q_heads", "head_dim"))
    k = proj("k", x, "BTD,DKH->BTKH", (d, kh, h), ("embed", "kv_heads", "head_dim"))
    v = proj("v", x, "BTD,DKH->BTKH", (d, kh, h), ("embed", "kv_heads", "head_dim"))
    q, k, v = constrain(q, heads), constrain(k, kv_heads), constrain(v, kv_heads)
    q, k = rotate(q, rope), rotate(k, rope)

    if isinstance(cache, PagedLayerCache):  # write the new tokens into their pages, then read
      out, cache = _paged_attention(q, k, v, masks.part_masks[0], cache)
      out = constrain(out, heads)
      y = proj("o", out, "BTNH,NHD->BTD", (n, h, d), ("q_heads", "head_dim", "embed"))
      return y, cache
    if cache is not None:  # write first, then read (see the class docstring)
      layer, at = cache.layer, (cache.layer, 0, cache.index, 0, 0)
      cache = cache.replace(
        k=jax.lax.dynamic_update_slice(cache.k, k[None].astype(cache.k.dtype), at),
        v=jax.lax.dynamic_update_slice(cache.v, v[None].astype(cache.v.dtype), at),
        layer=layer + 1,
      )
    if cache is not None and not cache.prefill:
      own = lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False).astype(q.dtype)
      parts = [
        (pk.astype(q.dtype), pv.astype(q.dtype), m)
        for (pk, pv), m in zip(prefix_kv, masks.part_masks[:-1], strict=True)
      ]
      out = attend_xla(q, [*parts, (own(cache.k), own(cache.v), masks.part_masks[-1])])
    else:
      out = attention.attend(cfg.attention_impl, q, k, v, masks.segment_ids, masks.extra_mask)
    out = constrain(out, heads)
    y = proj("o", out, "BTNH,NHD->BTD", (n, h, d), ("q_heads", "head_dim", "embed"))
    return y, cache


def _paged_attention(q, k, v, mask, cache: PagedLayerCache):
  """Writes this layer's new keys/values k, v [B, T, K, H] into their pages, then attends q
  [B, T, N, H] to each row's earlier positions through the kernel `cache.impl`
  (`attention.paged_attention`; `mask` [B, T, S] marks them for the XLA path)."""
  layer = cache.layer
  b, t, kh, h = k.shape
  new = jnp.stack([k, v], axis=3).reshape(b, t, 2 * kh, h)  # interleaved: k_j at 2j, v_j at 2j+1
  kv = cache.kv.at[layer, cache.write_page, cache.write_offset].set(new.astype(cache.kv.dtype))
  pages = jax.lax.dynamic_index_in_dim(kv, layer, keepdims=False)  # [pages, page_size, 2K, H]
  out = attention.paged_attention(cache.impl, q, pages, cache.page_table, cache.lengths, mask)
  return out, cache.replace(kv=kv, layer=layer + 1)


class MLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x))."""

  config: LlamaConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, x):
    cfg = self.config
    d, f = cfg.d_model, cfg.mlp_dim
    proj = functools.partial(_projection, self)
    hidden = ("act_batch", "act_seq", "act_mlp")
    gate = proj("gate", x, "BTD,DF->BTF", (d, f), ("embed", "mlp"))
    up = proj("up", x, "BTD,DF->BTF", (d, f), ("embed", "mlp"))
    gate, up = (nn.with_logical_constraint(a, hidden) for a in (gate, up))
    return proj("down", jax.nn.silu(gate) * up, "BTF,FD->BTD", (f, d), ("mlp", "embed"))


class Block(nn.Module):
  """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)).

  The carry is `(x, cache)` (cache a `LayerCache` or None) and the result `(carry, None)`,
  the shape `nn.scan` over layers needs.
  """

  config: LlamaConfig
  lora: LoraConfig | None = None

  @nn.compact
  def __call__(self, carry, rope, masks, prefix_kv=()):
    cfg = self.config
    x, cache = carry
    residual = ("act_batch", "act_seq", "act_embed")
    attn_out, cache = Attention(cfg, self.lora, name="attn")(
      RMSNorm(cfg, name="attn_norm")(x), rope, masks, prefix_kv, cache
    )
    x = nn.with_logical_constraint(x + attn_out, residual)
    x = x + MLP(cfg, self.lora, name="mlp")(RMSNorm(cfg, name="mlp_norm")(x))
    return (nn.with_logical_constraint(x, residual), cache), None


_REMAT_POLICIES = {
  "full": None,  # save nothing, recompute the whole layer
  "dots": jax.checkpoint_policies.checkpoint_dots,
  "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
  # The projections' outputs kept in host memory between the forward and the backward pass:
  # "dots_no_batch" without its device memory, at the cost of host transfers.
  "offload_dots_no_batch": jax.checkpoint_policies.offload_dot_with_no_batch_dims(
    "device", "pinned_host"
  ),
}


def _block_class(cfg: LlamaConfig):
  if cfg.remat_policy == "none":
    return Block
  return nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat_policy], prevent_cse=not cfg.scan_layers)


class Llama(nn.Module):
  """The Llama decoder: embeddings, L pre-norm blocks, final RMSNorm, LM head.

  `apply({"params": p}, tokens [B, T], positions=None, segment_ids=None)` returns float32
  logits [B, T, V]. With `cache=KVCache(...)` it returns `(logits, new_cache)`: the new
  tokens attend to the cached ones and are appended at `cache.index`. With also
  `prefix=KVCache(...)` of B/R rows (a prompt prefilled once), each prefix row is attended,
  read-only and without copies, by R consecutive rows of tokens (R samples of that prompt).

  Args of `__call__` / `hidden_states`:
    tokens: int [B, T].
    positions: int [B, T] RoPE positions. Default: 0… per segment (restarting where
      `segment_ids` changes); with a cache, the number of real tokens already cached.
    segment_ids: int [B, T]; 0 = padding, equal ids = one document. Default: all ones.
    cache: optional `KVCache`.
    prefix: optional read-only `KVCache` of B/R rows, attended before `cache` (needs one).
    attention_mask: optional bool [B, T, T] of `hidden_states` without a cache: which keys
      each query may see, ANDed with the causal segment mask (e.g. responses packed after
      one shared prompt, see `llama_jax.data.ranking`). Needs a kernel that takes one
      (`AttentionKernel.extra_mask`: "xla"); the others raise.

  Fields: `config`; `head=False` builds a trunk without the untied LM head (a reward or value
  model puts its own head on `hidden_states`); `lora` adds low-rank adapters to the
  projections (`llama_jax.model.lora`).
  """

  config: LlamaConfig
  head: bool = True
  lora: LoraConfig | None = None

  def setup(self):
    cfg = self.config
    self.embedding = self.param(
      "embed",
      nn.with_logical_partitioning(
        nn.initializers.normal(cfg.initializer_range), ("vocab", "embed")
      ),
      (cfg.vocab_size, cfg.d_model),
      cfg.param_dtype,
    )
    block = _block_class(cfg)
    if cfg.scan_layers:
      self.layers = nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, nn.broadcast, 0),
        length=cfg.num_layers,
        metadata_params={nn.PARTITION_NAME: "layers"},
      )(cfg, self.lora, name="layers")
    else:
      self.layers = [block(cfg, self.lora, name=f"layers_{i}") for i in range(cfg.num_layers)]
    self.final_norm = RMSNorm(cfg, name="final_norm")
    if self.head and not cfg.tie_embeddings:
      self.lm_head = self.param(
        "lm_head",
        nn.with_logical_partitioning(
          nn.initializers.normal(cfg.initializer_range), ("embed", "vocab")
        ),
        (cfg.d_model, cfg.vocab_size),
        cfg.param_dtype,
      )

  def __call__(
    self,
    tokens,
    positions=None,
    segment_ids=None,
    cache: KVCache | PagedKV | None = None,
    *,
    prefix: KVCache | None = None,
  ):
    if isinstance(cache, PagedKV):
      hidden, cache = self.paged_hidden_states(tokens, segment_ids, cache)
    else:
      hidden, cache = self.hidden_states(tokens, positions, segment_ids, cache, prefix=prefix)
    logits = self.logits(hidden)
    return logits if cache is None else (logits, cache)

  def paged_hidden_states(self, tokens, segment_ids, cache: PagedKV):
    """Final-normed hidden states [B, T, D] of T new tokens per row appended to a `PagedKV`
    (right-padded: segment id 0 after a row's real tokens), and the cache with them written.
    Positions follow `cache.lengths`; `lengths` is not advanced (the engine's pool tracks it).
    """
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    valid = segment_ids != 0
    page_size = cache.kv.shape[2]
    positions = cache.lengths[:, None] + jnp.arange(tokens.shape[1])[None, :]  # [B, T]
    pages = jnp.take_along_axis(cache.page_table, positions // page_size, axis=1, mode="clip")
    keys = jnp.arange(cache.page_table.shape[1] * page_size)  # [S]: positions in page order
    mask = (keys[None, None, :] <= positions[:, :, None]) & valid[:, :, None]  # [B, T, S]
    layer_cache = PagedLayerCache(
      kv=cache.kv,
      layer=jnp.zeros((), jnp.int32),
      page_table=cache.page_table,
      lengths=cache.lengths,
      write_page=jnp.where(valid, pages, 0),
      write_offset=positions % page_size,
      impl=cache.impl,
    )
    x = jnp.take(self.embedding, tokens, axis=0).astype(self.config.dtype)
    x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))
    masks = AttentionMasks(part_masks=(mask,))
    x, layer_cache = self._run_layers(x, positions, masks, (), layer_cache)
    return self.final_norm(x), cache.replace(kv=layer_cache.kv)

  def hidden_states(
    self, tokens, positions=None, segment_ids=None, cache=None, *, prefix=None, attention_mask=None
  ):
    """Final-normed hidden states [B, T, D] (and the updated cache, or None)."""
    cfg = self.config
    attention.check_kernel(
      cfg.attention_impl, extra_mask=attention_mask is not None, caller="Llama"
    )
    if attention_mask is not None and cache is not None:
      raise ValueError("Llama: attention_mask is for calls without a cache (got a cache)")
    if prefix is not None and cache is None:
      raise ValueError("Llama: a shared `prefix` needs a `cache` for the new tokens")
    if prefix is not None and tokens.shape[0] % prefix.k.shape[1]:
      raise ValueError(
        f"Llama: {tokens.shape[0]} rows of tokens cannot share a prefix of "
        f"{prefix.k.shape[1]} rows; the prefix rows must divide the token rows"
      )
    if segment_ids is None:
      segment_ids = jnp.ones(tokens.shape, jnp.int32)
    caches = [c for c in (prefix, cache) if c is not None]
    if positions is None:
      positions = (
        positions_from_segments(segment_ids)
        if cache is None
        else sum(_per_row(c.lengths(), tokens.shape[0]) for c in caches)[:, None]
        + jnp.cumsum(segment_ids != 0, axis=1)
        - 1
      )
    x = jnp.take(self.embedding, tokens, axis=0).astype(cfg.dtype)
    x = nn.with_logical_constraint(x, ("act_batch", "act_seq", "act_embed"))

    if cache is None:
      masks = AttentionMasks(segment_ids=segment_ids, extra_mask=attention_mask)
      x, _ = self._run_layers(x, positions, masks, (), None)
      return self.final_norm(x), None

    t, rows = tokens.shape[1], tokens.shape[0]
    # Writing T tokens into T slots replaces the whole cache: a prefill, attended as without
    # a cache. (The write starts at slot 0: dynamic_update_slice clamps the index.)
    prefill = prefix is None and cache.max_len == t
    written = jax.lax.dynamic_update_slice(
      cache.segment_ids, segment_ids.astype(jnp.int32), (0, cache.index)
    )
    # New token t sits in slot index + t and sees the slots up to its own (same segment).
    causal = jnp.arange(cache.max_len)[None, :] <= cache.index + jnp.arange(t)[:, None]
    part_masks = (segment_mask(segment_ids, written, causal=False) & causal[None],)
    prefix_kv = ()
    if prefix is not None:
      shared = segment_mask(segment_ids, _per_row(prefix.segment_ids, rows), causal=False)
      part_masks, prefix_kv = (shared, *part_masks), ((prefix.k, prefix.v),)
    masks = (
      AttentionMasks(segment_ids=segment_ids) if prefill else AttentionMasks(part_masks=part_masks)
    )
    layer_cache = LayerCache(cache.k, cache.v, jnp.zeros((), jnp.int32), cache.index, prefill)
    x, layer_cache = self._run_layers(x, positions, masks, prefix_kv, layer_cache)
    cache = KVCache(k=layer_cache.k, v=layer_cache.v, segment_ids=written, index=cache.index + t)
    return self.final_norm(x), cache

  def _run_layers(self, x, positions, masks, prefix_kv, cache):
    cfg = self.config
    inv_freq = rope_inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    rope = rope_tables(positions, inv_freq)  # once here, not once per layer
    carry = (x, cache)
    if cfg.scan_layers:
      carry, _ = self.layers(carry, rope, masks, prefix_kv)
      return carry
    for i, layer in enumerate(self.layers):
      carry, _ = layer(carry, rope, masks, jax.tree.map(lambda a, i=i: a[i], prefix_kv))
    return carry

  def logits(self, hidden: jax.Array) -> jax.Array:
    """LM-head logits [B, T, V] in float32 from hidden states [B, T, D]."""
    cfg = self.config
    if not self.head:
      raise ValueError("Llama(head=False) is a trunk: it has hidden states, no logits")
    f32 = jnp.float32
    if cfg.tie_embeddings:  # Llama 3.2 1B/3B: the embedding is the head, no extra scaling
      # "BTD,VD->BTV" as one [B·T, D] @ [V, D]ᵀ matmul (see `flat_matmul`).
      rows, emb = hidden.reshape(-1, cfg.d_model), self.embedding.astype(cfg.dtype)
      out = jax.lax.dot_general(rows, emb, (((1,), (1,)), ((), ())), preferred_element_type=f32)
      out = out.reshape(*hidden.shape[:-1], cfg.vocab_size)
    else:  # "BTD,DV->BTV"
      out = flat_matmul(hidden, self.lm_head.astype(cfg.dtype), preferred_element_type=f32)
    return nn.with_logical_constraint(out, ("act_batch", "act_seq", "act_vocab"))


def _per_row(x: jax.Array, rows: int) -> jax.Array:
  """x [B/R, ...] of a prefix shared by R consecutive rows, repeated to [B, ...]."""
  return jnp.repeat(x, rows // x.shape[0], axis=0) if x.shape[0] != rows else x


# --------------------------------------------------------------------------- the model seam
#
# Library functions that run, shard, initialize or checkpoint a model take the module itself
# (`Llama(config, lora=...)`, `reward_model.RewardModel(config)`, or any linen module with a
# `config` field whose `init(rng, tokens [1, 1])` gives its parameters); a bare `LlamaConfig`
# stands for `Llama(config)`.


def head_axis_sizes(config: LlamaConfig) -> dict[str, int]:
  """The logical axes that stay whole (replicated) on a mesh whose axes do not divide them,
  with their sizes: query heads N and kv heads K, parameters and activations alike (see
  `attention.fit_rules`). Every other axis that does not divide its mesh axes is an error."""
  n, k = config.num_heads, config.num_kv_heads
  return {"q_heads": n, "act_heads": n, "kv_heads": k, "act_kv_heads": k}


def fitted_rules(config: LlamaConfig) -> tuple:
  """The current logical-axis rules fitted to the heads of `config` on the current mesh;
  () (constraints are no-ops) when no rules are active."""
  rules, mesh = nn.get_logical_axis_rules(), jax.sharding.get_abstract_mesh()
  if not rules or mesh.empty:
    return tuple(rules)
  return attention.fit_rules(rules, dict(mesh.shape), head_axis_sizes(config))


def as_model(model: nn.Module | LlamaConfig) -> nn.Module:
  """`model`, or `Llama(model)` if given a `LlamaConfig`."""
  return Llama(model) if isinstance(model, LlamaConfig) else model


def init_boxed(model: nn.Module | LlamaConfig, rng: jax.Array):
  """The model's parameters as `nn.Partitioned` boxes (logical axis names attached)."""
  return as_model(model).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
