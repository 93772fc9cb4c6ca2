"""Attention kernels as a table, plus the XLA attention that decoding uses.

Dimension vocabulary as in `llama_jax.model.llama`: B batch, T query length, S key length, N query
heads, K kv heads, G = N/K, H head dim.

The cache-free path (training, scoring, prefill) goes through `attend(impl, q, k, v,
segment_ids, extra_mask)`, where `impl` is `LlamaConfig.attention_impl` and names an entry of
`KERNELS`. Every entry computes the same thing: causal attention within segments (a query
sees a key iff both carry the same segment id and the key is not later; segment 0 is padding,
seen only by padding), optionally ANDed with an extra mask [B, T, T]. Each entry states what
it can do (`AttentionKernel`); `attend` checks that against the call and raises, naming the
kernel and what is missing, instead of dropping part of a mask. The next kernel (ring
attention, a new Pallas kernel) is one more entry in `KERNELS` and one more name in
`llama_jax.model.config.AttentionImpl`.

Decoding against a KV cache uses `attend_xla`, which scores several KV parts (a shared
prefix, the cache) under one softmax. The rollout engine's paged pool has its own table,
`PAGED_KERNELS` (`paged_attention`): the XLA path everywhere, TPU's Pallas ragged paged
attention on TPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as ragged
from jax.sharding import PartitionSpec as P

# A large finite negative instead of -inf: rows with every key masked (padding queries)
# then give a harmless uniform average instead of NaNs.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def segment_mask(q_segments: jax.Array, kv_segments: jax.Array, causal: bool) -> jax.Array:
  """[B, T, S] bool: same segment and, if causal, key slot ≤ query slot."""
  mask = q_segments[:, :, None] == kv_segments[:, None, :]
  if causal:
    t, s = q_segments.shape[1], kv_segments.shape[1]
    mask &= jnp.arange(t)[:, None] >= jnp.arange(s)[None, :]
  return mask


# --------------------------------------------------------------------------- XLA

# One attention input part: keys [B/R, S, K, H], values [B/R, S, K, H], mask [B, T, S].
KVPart = tuple[jax.Array, jax.Array, jax.Array]


def attend_xla(q: jax.Array, parts: Sequence[KVPart]) -> jax.Array:
  """Softmax attention of q [B, T, N, H] over the concatenation of key/value parts.

  GQA without repeating K/V: queries are viewed as [B, T, K, G, H], so KV head j serves
  query heads j·G … (j+1)·G−1. Scores and softmax are float32 whatever the input dtype.
  Several parts (a KV cache and the new tokens) are scored separately and share one
  softmax, so the cache is never concatenated with, or copied into, a new buffer.

  A part may hold fewer rows than q: with B/R rows, key row i serves the R consecutive
  query rows i·R … (i+1)·R−1 (a prompt prefilled once and shared by R samples), without
  repeating it. Masks are per query row, [B, T, S], for every part.

  Scores are laid out [B, K, T, G, S]: the batched matmul's own output order (batch B, K;
  then the query rows T, G in q's order; then the keys), so neither the scores nor their
  gradient are transposed on the way in or out of the softmax (an order with G before T
  costs XLA:CPU two more transposed copies of the [B, N, T, S] scores per layer in a train
  step).

  A decode step on a CPU (one query token, parts of B rows) scores every query head against
  every kv head and keeps the matching pairs: a batched matmul over (B, K) wants each cache
  layer as [B, K, S, H], i.e. a transposed copy of it per step, while batching over B alone
  reads the [B, S, K, H] cache as stored (`small_50m`, batch 8, 128 tokens on a 2-core CPU:
  1.63 s -> 1.39 s).
  The K-fold work is small next to the weights' matmuls at one token; elsewhere (GPU, TPU,
  long contexts with many kv heads) the plain batched matmul stays.
  """
  b, t, n, h = q.shape
  kv_heads = parts[0][0].shape[2]
  g = n // kv_heads
  q = q.reshape(b, t, kv_heads, g, h) * (h**-0.5)
  all_pairs = t == 1 and (mesh_platform() or jax.default_backend()) == "cpu"

  def scores(k, mask):  # [B, K, T, G, S]
    r = b // k.shape[0]
    if r == 1 and all_pairs:  # [B, S, J, K, G] -> the pairs J = K
      full = jnp.einsum("BSJH,BKGH->BSJKG", k, q[:, 0], preferred_element_type=jnp.float32)
      s = jnp.diagonal(full, axis1=2, axis2=3)  # [B, S, G, K]
      s = jnp.transpose(s, (0, 3, 2, 1))[:, :, None]
    elif r == 1:
      s = jnp.einsum("BTKGH,BSKH->BKTGS", q, k, preferred_element_type=jnp.float32)
    else:
      qr = q.reshape(b // r, r, t, kv_heads, g, h)
      s = jnp.einsum("BRTKGH,BSKH->BRKTGS", qr, k, preferred_element_type=jnp.float32)
      s = s.reshape(b, kv_heads, t, g, -1)
    return jnp.where(mask[:, None, :, None, :], s, _MASK_VALUE)

  def values(p, v):  # [B, T, K, G, H]
    r = b // v.shape[0]
    if r == 1 and all_pairs:  # [B, K, G, J, H] -> the pairs J = K
      full = jnp.einsum("BKGS,BSJH->BKGJH", p[:, :, 0], v)
      return jnp.moveaxis(jnp.diagonal(full, axis1=1, axis2=3), -1, 1)[:, None]  # [B,1,K,G,H]
    if r == 1:
      return jnp.einsum("BKTGS,BSKH->BTKGH", p, v)
    pr = p.reshape(b // r, r, kv_heads, t, g, -1)
    return jnp.einsum("BRKTGS,BSKH->BRTKGH", pr, v).reshape(b, t, kv_heads, g, h)

  logits = jnp.concatenate([scores(k, mask) for k, _, mask in parts], axis=-1)
  probs = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  sizes = np.cumsum([k.shape[1] for k, _, _ in parts])[:-1]
  out = sum(
    values(p, v) for p, (_, v, _) in zip(jnp.split(probs, sizes, axis=-1), parts, strict=True)
  )
  return out.reshape(b, t, n, h)


def _xla(q, k, v, segment_ids, extra_mask):
  mask = segment_mask(segment_ids, segment_ids, causal=True)
  if extra_mask is not None:
    mask &= extra_mask
  return attend_xla(q, [(k, v, mask)])


# --------------------------------------------------------------------------- jax.nn


def attend_dot_product(
  q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, implementation
) -> jax.Array:
  """`jax.nn.dot_product_attention` (cuDNN flash attention on GPU), causal + segments."""
  mask = None if segment_ids is None else segment_mask(segment_ids, segment_ids, False)[:, None]
  return jax.nn.dot_product_attention(
    q, k, v, mask=mask, is_causal=True, implementation=implementation
  )


def _dot_product(q, k, v, segment_ids, extra_mask, *, implementation=None):
  del extra_mask  # refused by the capability check in `attend`
  return attend_dot_product(q, k, v, segment_ids, implementation)


# --------------------------------------------------------------------------- splash (TPU)

SPLASH_MAX_BLOCK = 512  # query / key block of the splash kernel, capped to the padded length
_LANES = 128  # splash's key blocks are multiples of the TPU lane width
_PAD_SEGMENT = -1  # segment id of the slots that round T up to a block: seen by no real query


def attend_splash(
  q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
  extra_mask: jax.Array | None = None, *, max_block: int = SPLASH_MAX_BLOCK,
) -> jax.Array:
  """Pallas splash (flash) attention on TPU: q [B, T, N, H], k, v [B, T, K, H] -> [B, T, N, H].

  Causal + segment-id masking inside the kernel (`CausalMask` and `SegmentIds`), with block
  sparsity, so the [T, T] mask is never built; K < N kv heads are read without repeating
  (the kernel maps query head n to kv head n // G); the running max and sum of the softmax
  are float32 whatever the input dtype. The kernel does not scale queries: we do, by H^-0.5.

  T is padded up to a multiple of 128 (at most 127 slots) with their own segment id, which
  no real query sees; blocks are the largest of 512, 256, 128 that divide the padded T.
  Under a mesh (`jax.sharding.get_abstract_mesh()`), the kernel runs per device through
  `jax.shard_map`, rows split like "act_batch" and heads like "act_heads" in the current
  logical-axis rules (batch over data × fsdp, heads over tensor by default; heads that the
  mesh does not divide stay whole, see `fit_rules`). On CPU the kernel runs in Pallas
  interpret mode (slow; for tests).

  Raises ValueError for an `extra_mask`: splash masks by causality and segment ids only.
  """
  if extra_mask is not None:
    raise ValueError(_extra_mask_error("splash", "attend_splash"))
  b, t, n, h = q.shape
  padded = -(-t // _LANES) * _LANES
  pad = padded - t
  if pad:
    width = ((0, 0), (0, pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, width) for a in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, 0), (0, pad)), constant_values=_PAD_SEGMENT)
  heads_first = lambda a: jnp.swapaxes(a, 1, 2)  # [B, T, N, H] <-> [B, N, T, H]
  run = functools.partial(
    _splash_local, block=math.gcd(padded, max_block),
    interpret=(mesh_platform() or jax.default_backend()) == "cpu",
  )
  if jnp.dtype(q.dtype).itemsize < 4:
    run = _at_default_precision(run)
  out = _per_device(
    run, heads_first(q * (h**-0.5)), heads_first(k), heads_first(v),
    segment_ids.astype(jnp.int32),
  )
  return heads_first(out)[:, :t]


def _at_default_precision(fn):
  """fn with its forward and backward traced at the default matmul precision.

  Mosaic refuses 16-bit matmuls at a "highest" default precision (as the tests set it);
  their products are exact in one pass, so nothing is lost. The backward kernels are traced
  when gradients are taken, outside any context around the forward call, hence the vjp.
  """
  default = functools.partial(jax.default_matmul_precision, "default")

  @jax.custom_vjp
  def wrapped(*args):
    with default():
      return fn(*args)

  def forward(*args):
    with default():
      return jax.vjp(fn, *args)  # (out, the vjp function: a pytree of the residuals)

  def backward(vjp, d_out):
    with default():
      return vjp(d_out)

  wrapped.defvjp(forward, backward)
  return wrapped


def _splash_local(q, k, v, segment_ids, *, block: int, interpret: bool) -> jax.Array:
  """The kernel on one device's rows: q [B, N, T, H], k, v [B, K, T, H], segment ids [B, T]."""
  n, t = q.shape[1], q.shape[2]
  sizes = splash.BlockSizes(
    block_q=block, block_kv=block, block_kv_compute=block,
    block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
    block_q_dq=block, block_kv_dq=block,
  )
  # The mask is static (causal, the same for every head); splash caches its block layout.
  mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * n)
  kernel = splash.make_splash_mha(
    mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
  )
  one_row = lambda q, k, v, s: kernel(q, k, v, segment_ids=splash.SegmentIds(q=s, kv=s))
  return jax.vmap(one_row)(q, k, v, segment_ids)


# Used when no logical-axis rules are active (the model's own constraints are then no-ops).
_FALLBACK_RULES = (
  ("act_batch", ("data", "fsdp")), ("act_heads", "tensor"), ("act_kv_heads", "tensor")
)


def _per_device(fn, q, k, v, segment_ids) -> jax.Array:
  """fn(q [B, N, T, H], k, v [B, K, T, H], segment ids [B, T]) per device of the current mesh.

  A Pallas TPU kernel sees one device's arrays, so under a mesh it runs inside `shard_map`:
  rows split over the batch axes, heads over the head axes of the current rules, fitted to
  N and K (`fit_rules`). Where query and kv heads split alike, contiguous head ranges keep
  GQA groups whole: device d holds query heads d·N/n… and kv heads d·K/n…. Where the kv
  heads stay whole but the query heads split (K = 2 on tensor = 4), a device's query heads
  need kv heads that no contiguous range of K holds, so K and V are first repeated to N
  heads (kv head j to j·G … (j+1)·G−1) and split like the queries. A batch that does not
  divide (e.g. the single row of `init`) gets dummy rows, as XLA pads an uneven sharding.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.are_all_axes_manual:  # no mesh, or already inside a shard_map
    return fn(q, k, v, segment_ids)
  n, kv_heads = q.shape[1], k.shape[1]
  rules = fit_rules(
    nn.get_logical_axis_rules() or _FALLBACK_RULES, mesh.shape,
    {"act_heads": n, "act_kv_heads": kv_heads},
  )
  batch, heads, kv_axes = (
    _mesh_axes(mesh, name, rules) for name in ("act_batch", "act_heads", "act_kv_heads")
  )
  if kv_axes != heads:
    k, v = (jnp.repeat(a, n // kv_heads, axis=1) for a in (k, v))
  b = q.shape[0]
  pad = -b % math.prod(mesh.shape[a] for a in batch)
  if pad:  # dummy rows: one segment of their own, every query sees itself
    q, k, v = (jnp.pad(a, ((0, pad), (0, 0), (0, 0), (0, 0))) for a in (q, k, v))
    segment_ids = jnp.pad(segment_ids, ((0, pad), (0, 0)), constant_values=_PAD_SEGMENT)
  spec = P(batch or None, heads or None, None, None)
  out = jax.shard_map(
    fn, mesh=mesh, in_specs=(spec, spec, spec, P(batch or None, None)), out_specs=spec,
    check_vma=False,  # pallas_call outputs carry no varying-axes annotation
  )(q, k, v, segment_ids)
  return out[:b]


def _mesh_axes(mesh, logical: str, rules=None) -> tuple[str, ...]:
  """The mesh axes a logical activation axis maps to, under `rules` (default: the current
  rules)."""
  rules = rules or nn.get_logical_axis_rules() or _FALLBACK_RULES
  axes = nn.logical_to_mesh_axes((logical,), rules)[0]
  axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
  return tuple(a for a in axes if a in mesh.axis_names)


def fit_rules(rules, mesh_shape: Mapping[str, int], sizes: Mapping[str, int]) -> tuple:
  """`rules` (logical axis -> mesh axes) with each logical axis named in `sizes` left
  unsharded (None) where the mesh axes it maps to do not divide its size.

  This is how attention heads meet a tensor axis wider than their count (SmolLM2's 3 kv
  heads on tensor = 2, Llama 3 70B's 8 on tensor = 16): as in MaxText, the small kv
  projections and their activations are replicated over tensor, the query heads stay split
  where tensor divides them, and MLP / vocab shard as before. Every other entry, and every
  entry that divides, is returned unchanged, so a mesh that fits keeps its shardings.
  """
  def fits(name, axes):
    if name not in sizes or axes is None:
      return True
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    return sizes[name] % math.prod(mesh_shape.get(a, 1) for a in names) == 0

  return tuple((name, axes if fits(name, axes) else None) for name, axes in rules)


def mesh_platform() -> str | None:
  """The platform of the current mesh's devices ("cpu", "gpu", "tpu"), None without a mesh.

  Under a mesh that is where the traced program runs, also when compiling ahead of time for
  devices this host does not have. Without one it is unknown: the default backend is a guess
  (`jax.eval_shape` of the parameters, say, runs nowhere).
  """
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  if device is None:
    return None
  return {"cuda": "gpu", "rocm": "gpu"}.get(device.platform, device.platform)


# --------------------------------------------------------------------------- the table

# (q [B, T, N, H], k [B, S, K, H], v [B, S, K, H], segment_ids [B, T], extra_mask [B, T, S]
#  bool or None) -> [B, T, N, H]
KernelFn = Callable[
  [jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array
]


@dataclasses.dataclass(frozen=True)
class AttentionKernel:
  """One cache-free attention kernel and what it can express."""

  name: str  # the `LlamaConfig.attention_impl` that selects it
  fn: KernelFn
  platforms: tuple[str, ...]  # jax platforms it runs on ("cpu" may mean an interpreter)
  extra_mask: bool  # takes an extra [B, T, T] mask besides causality and segment ids
  native_gqa: bool  # reads K < N kv heads without repeating them
  about: str  # one line for error messages


KERNELS: dict[str, AttentionKernel] = {
  k.name: k
  for k in (
    AttentionKernel(
      "xla", _xla, ("cpu", "gpu", "tpu"), extra_mask=True, native_gqa=True,
      about="XLA einsums, dense [B, T, T] mask, float32 scores",
    ),
    AttentionKernel(
      "dot_product", _dot_product, ("cpu", "gpu", "tpu"), extra_mask=False, native_gqa=True,
      about="jax.nn.dot_product_attention (XLA), mask built from segment ids",
    ),
    AttentionKernel(
      "cudnn", functools.partial(_dot_product, implementation="cudnn"), ("gpu",),
      extra_mask=False, native_gqa=True,
      about="cuDNN flash attention via jax.nn.dot_product_attention, mask from segment ids",
    ),
    AttentionKernel(
      "splash", attend_splash, ("tpu", "cpu"), extra_mask=False, native_gqa=True,
      about="Pallas splash attention (TPU; interpret mode on CPU), causal + segment ids",
    ),
  )
}


# attention_impl="auto": the fastest kernel of the platform the program runs on (the mesh's
# devices), XLA where none is listed or where the call carries an extra mask (the ranking
# reward model's shared-prompt rows), which only XLA can take.
AUTO = {"tpu": "splash", "gpu": "cudnn"}


def resolve(name: str, *, extra_mask: bool = False, platform: str | None = None) -> str:
  """The kernel an `attention_impl` stands for: itself, or for "auto" `AUTO`'s choice."""
  if name != "auto":
    return name
  return "xla" if extra_mask else AUTO.get(platform, "xla")


def _extra_mask_error(name: str, caller: str) -> str:
  able = " or ".join(f"attention_impl={k!r}" for k, e in KERNELS.items() if e.extra_mask)
  return (
    f"{caller}: attention_mask needs {able}: kernel {name!r} ({KERNELS[name].about}) "
    "cannot take an extra [B, T, T] mask"
  )


def check_kernel(name: str, *, extra_mask: bool = False, platform: str | None = None,
                 caller: str = "attention") -> AttentionKernel:
  """The kernel called `name`, after checking it can serve the call; raises ValueError.

  Args:
    name: an `attention_impl` (a key of `KERNELS`, or "auto", see `resolve`).
    extra_mask: the call carries an extra [B, T, T] mask.
    platform: the platform the call runs on (see `mesh_platform`); None skips that check.
    caller: prefix of the error messages.
  """
  name = resolve(name, extra_mask=extra_mask, platform=platform)
  if name not in KERNELS:
    raise ValueError(
      f"{caller}: unknown attention_impl {name!r}; known: {sorted(KERNELS)} and 'auto'"
    )
  kernel = KERNELS[name]
  if extra_mask and not kernel.extra_mask:
    raise ValueError(_extra_mask_error(name, caller))
  if platform is not None and platform not in kernel.platforms:
    raise ValueError(
      f"{caller}: attention_impl={name!r} ({kernel.about}) runs on {kernel.platforms}, "
      f"not on {platform!r}"
    )
  return kernel


def attend(impl: str, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array,
           extra_mask: jax.Array | None = None) -> jax.Array:
  """Causal self-attention within segments through the kernel `impl`.

  q [B, T, N, H], k and v [B, T, K, H], segment_ids int [B, T] (0 = padding), extra_mask
  optional bool [B, T, T] ANDed with the causal segment mask. Returns [B, T, N, H].
  Under a mesh, the kernel must run on its devices' platform; without one, a kernel off its
  platform fails when it is lowered (cuDNN, Mosaic), not here: tracing for shapes is fine.
  """
  kernel = check_kernel(impl, extra_mask=extra_mask is not None, platform=mesh_platform())
  return kernel.fn(q, k, v, segment_ids, extra_mask)


# --------------------------------------------------------------------------- paged attention

# Attention over a paged KV pool (the rollout engine's steps): q [B, T, N, H] of T new tokens
# per row, attending to the row's first `lengths[b] + t + 1` positions. The new tokens' keys
# and values are already written. `pages` [pages, page_size, 2K, H] holds keys and values
# interleaved on the head axis (`model.llama.PagedKV`), `page_table` [B, W] a row's pages in
# position order, `lengths` [B] the tokens each row had cached before this call, `mask`
# [B, T, W · page_size] those positions (rows right-padded: a padding query's output is
# never read). Returns [B, T, N, H].
PagedFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def _paged_xla(q, pages, page_table, lengths, mask):
  """Each row's pages gathered in position order, then `attend_xla`."""
  del lengths  # in the mask
  b, w = page_table.shape
  _, page_size, two_k, h = pages.shape
  rows = pages[page_table].reshape(b, w * page_size, two_k // 2, 2, h).astype(q.dtype)
  return attend_xla(q, [(rows[..., 0, :], rows[..., 1, :], mask)])


def ragged_arguments(q, page_table, lengths):
  """The arguments of `ragged_paged_attention` for a [B, T] step: the B·T query tokens flat
  (padding included: each row's T queries), each row's key count with its new tokens
  (`lengths + T`: query t then sees positions up to lengths + t, the causal rule), the
  cumulative query counts and the row count. Returns `(q [B·T, N, H], kv_lens [B],
  cu_q_lens [B + 1], num_seqs [1])`."""
  b, t, n, h = q.shape
  return (
    q.reshape(b * t, n, h),
    lengths.astype(jnp.int32) + t,
    jnp.arange(b + 1, dtype=jnp.int32) * t,
    jnp.asarray([b], jnp.int32),
  )


def _ragged_local(q, pages, page_table, lengths):
  """jax's ragged paged attention Pallas kernel on one device's heads."""
  b, t, n, h = q.shape
  flat, kv_lens, cu_q_lens, num_seqs = ragged_arguments(q, page_table, lengths)
  # Block sizes as the kernel's tuned table has them for TPU v5/v6 (a sixteenth of a row's
  # pages, 32 queries), given here because the table is looked up on `jax.devices()`, which
  # compiling ahead of time for a TPU from another host does not have (its untuned default,
  # 128 pages, overflows VMEM at page_size 16). Traced at the default matmul precision:
  # Mosaic refuses 16-bit matmuls at "highest" (see `_at_default_precision`; no gradient).
  pages_per_block = min(max(page_table.shape[1] // 16, 1), 16)
  sixteen_bit = jnp.dtype(q.dtype).itemsize < 4
  with jax.default_matmul_precision("default") if sixteen_bit else contextlib.nullcontext():
    out = ragged.ragged_paged_attention(
      flat, pages.astype(q.dtype), kv_lens, page_table.astype(jnp.int32), cu_q_lens, num_seqs,
      sm_scale=h**-0.5, num_kv_pages_per_block=pages_per_block,
      num_queries_per_block=min(b * t, 32),
    )  # fmt: skip
  return out.reshape(b, t, n, h)


def _paged_ragged(q, pages, page_table, lengths, mask):
  """The ragged paged attention kernel (TPU: Mosaic), per device under a mesh: query heads and
  the pool's kv heads split alike over the head axes of the current rules (contiguous ranges
  keep GQA groups and each head's key and value together); where the kv heads cannot split,
  neither do the query heads. Rows stay whole, as the engine's steps keep them."""
  del mask  # the kernel's causal rule over `kv_lens`, see `ragged_arguments`
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.are_all_axes_manual:
    return _ragged_local(q, pages, page_table, lengths)
  n, kv_heads = q.shape[2], pages.shape[2] // 2
  rules = fit_rules(
    nn.get_logical_axis_rules() or _FALLBACK_RULES, mesh.shape,
    {"act_heads": n, "act_kv_heads": kv_heads},
  )
  heads, kv_axes = (_mesh_axes(mesh, name, rules) for name in ("act_heads", "act_kv_heads"))
  if heads != kv_axes:
    heads = kv_axes = ()
  q_spec = P(None, None, heads or None, None)
  return jax.shard_map(
    _ragged_local, mesh=mesh,
    in_specs=(q_spec, P(None, None, kv_axes or None, None), P(), P()), out_specs=q_spec,
    check_vma=False,  # pallas_call outputs carry no varying-axes annotation
  )(q, pages, page_table, lengths)


@dataclasses.dataclass(frozen=True)
class PagedKernel:
  """One paged attention kernel and where it runs."""

  name: str  # the `EngineConfig.attention` that selects it
  fn: PagedFn
  platforms: tuple[str, ...]
  min_head_dim: int  # head_dim must be a multiple of this (TPU lanes: 128)
  about: str


PAGED_KERNELS: dict[str, PagedKernel] = {
  k.name: k
  for k in (
    PagedKernel("xla", _paged_xla, ("cpu", "gpu", "tpu"), 1,
                "each row's pages gathered, then XLA einsums (attend_xla)"),
    PagedKernel("ragged_paged", _paged_ragged, ("tpu",), 128,
                "Pallas ragged paged attention (TPU, jax.experimental.pallas.ops.tpu)"),
  )
}  # fmt: skip

# EngineConfig.attention="auto": the platform's kernel where the model can use it, else XLA.
# On GPU, jax's Pallas paged attention (`ops.gpu.paged_attention`) takes one query token per
# row and separate key / value pools of another layout, so it cannot serve the prefill steps
# or this pool; GPUs use the XLA path.
PAGED_AUTO = {"tpu": "ragged_paged"}


def check_paged_kernel(name: str, head_dim: int, platform: str | None,
                       caller: str = "EngineConfig.attention") -> str:
  """The paged kernel `name` stands for ("auto": `PAGED_AUTO`'s, if it can serve head_dim),
  after checking it can run here; raises ValueError naming what is missing."""
  if name == "auto":
    name = PAGED_AUTO.get(platform, "xla")
    if head_dim % PAGED_KERNELS[name].min_head_dim:
      name = "xla"
  if name not in PAGED_KERNELS:
    raise ValueError(f"{caller}={name!r}: unknown; known: {sorted(PAGED_KERNELS)} and 'auto'")
  kernel = PAGED_KERNELS[name]
  if platform is not None and platform not in kernel.platforms:
    raise ValueError(
      f"{caller}={name!r} ({kernel.about}) runs on {kernel.platforms}, not on {platform!r}"
    )
  if head_dim % kernel.min_head_dim:
    raise ValueError(
      f"{caller}={name!r} ({kernel.about}) needs head_dim a multiple of {kernel.min_head_dim}; "
      f"the model has {head_dim}"
    )
  return name


def paged_attention(impl: str, q, pages, page_table, lengths, mask) -> jax.Array:
  """Attention of q [B, T, N, H] over a paged pool through the kernel `impl` (a resolved
  `PAGED_KERNELS` name, see `check_paged_kernel`); shapes as `PagedFn` says."""
  return PAGED_KERNELS[impl].fn(q, pages, page_table, lengths, mask)
