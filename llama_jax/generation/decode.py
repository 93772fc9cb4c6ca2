"""Prefill + decode with a KV cache, in one compiled function per shape bucket.

    gen = GenerationConfig(max_new_tokens=128, num_samples=4, stop_ids=tokenizer.stop_ids,
                           pad_id=tokenizer.pad_id, sampling=SamplingConfig(temperature=0.8))
    out = generate_tokens(config, params, [ids_0, ids_1], jax.random.key(0), gen, mesh=mesh)
    out.tokens, out.logprobs, out.model_logprobs, out.mask    # [B, R, N] each

B prompts, R samples per prompt (`num_samples`), N new tokens (`max_new_tokens`), P the
padded prompt length. How it works:

- Prompts are left-padded (segment id 0) to a bucketed length P (the next power of two, or
  a multiple of `prompt_bucket`), and the batch to a multiple of the mesh's batch shards, so
  prompts of similar lengths reuse one compiled function.
- One `jax.jit` function runs everything: the prefill of the B prompts into a prompt cache
  [L, B, P, K, H], then a `lax.while_loop` that decodes the B·R rows into a sample cache
  [L, B·R, N, K, H] and exits as soon as every row has emitted a stop id. Both caches are
  donated, so XLA updates them in place.
- The R samples of a prompt share its prompt cache: it is the `prefix` of
  `Llama.__call__`, whose attention scores R query rows against one row of keys
  (`model.attend_xla`), so the prompt is neither prefilled nor stored R times.
- Row (b, r) draws step i with `fold_in(key_br, i)`, so a sample depends only on its own
  key: not on the batch, the padding, R, or the device mesh.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.generation.sampling import SamplingConfig, sample
from llama_jax.model.config import LlamaConfig
from llama_jax.model.llama import KVCache, as_model
from llama_jax.parallel import aot, sharding

MIN_BUCKET = 16


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """What to generate. Static: each distinct config compiles its own decoder.

  Attributes:
    max_new_tokens: N, the most tokens generated per sample (the stop id included).
    num_samples: R continuations per prompt, all attending to one prefilled prompt cache.
    sampling: greedy / temperature / top-k / top-p (see `SamplingConfig`).
    stop_ids: a sample ends after emitting any of these (e.g. `tokenizer.stop_ids`).
    pad_id: fills `tokens` after a sample has ended (and pads prompts).
    prompt_bucket: prompts are padded to a multiple of this length; 0 pads to the next
      power of two (at least 16). Fewer distinct lengths mean fewer compilations.
  """

  max_new_tokens: int = 64
  num_samples: int = 1
  sampling: SamplingConfig = SamplingConfig()
  stop_ids: tuple[int, ...] = ()
  pad_id: int = 0
  prompt_bucket: int = 0

  def __post_init__(self):
    # Sets and lists (tokenizer.stop_ids is a frozenset) become a sorted tuple: hashable.
    object.__setattr__(self, "stop_ids", tuple(sorted(int(i) for i in self.stop_ids)))
    for name in ("max_new_tokens", "num_samples"):
      if getattr(self, name) < 1:
        raise ValueError(f"GenerationConfig.{name}={getattr(self, name)}; expected >= 1")
    if self.prompt_bucket < 0:
      raise ValueError(f"GenerationConfig.prompt_bucket={self.prompt_bucket}; expected >= 0")


@flax.struct.dataclass
class GenerationOutput:
  """Sampled continuations, [B, R, N] per field (prompt b, sample r, new token n).

  Attributes:
    tokens: int32 generated ids; a sample's stop id is included, `pad_id` follows it.
    mask: int32 response mask, 1 on generated tokens (stop id included), 0 after.
    logprobs: float32 log-probs under the sampling distribution (0 where mask is 0).
    model_logprobs: float32 log-probs under the unmodified model (0 where mask is 0).
    steps: int32 [], tokens generated per row before the loop ended (≤ N: early exit).
  """

  tokens: jax.Array
  mask: jax.Array
  logprobs: jax.Array
  model_logprobs: jax.Array
  steps: jax.Array

  def lengths(self) -> jax.Array:
    """Generated tokens per sample [B, R]."""
    return jnp.sum(self.mask, axis=-1)


def bucket_length(length: int, bucket: int = 0) -> int:
  """The padded prompt length for `length`: a multiple of `bucket`, or for bucket 0 the
  next power of two, at least `MIN_BUCKET`."""
  if bucket:
    return -(-length // bucket) * bucket
  return max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length())


def pad_prompts(
  prompts: Sequence[Sequence[int]], length: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token lists to `length`: (tokens [B, length], segment_ids [B, length])."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  segments = np.zeros((len(prompts), length), np.int32)
  for row, ids in enumerate(prompts):
    if ids:
      tokens[row, length - len(ids) :] = ids
      segments[row, length - len(ids) :] = 1
  return tokens, segments


# --------------------------------------------------------------------------- the decode loop


def decode(
  model: sharding.Model,
  gen: GenerationConfig,
  params,
  tokens: jax.Array,
  segment_ids: jax.Array,
  keys: jax.Array,
  prompt_cache: KVCache,
  sample_cache: KVCache,
) -> tuple[GenerationOutput, KVCache, KVCache]:
  """Prefills B prompts and samples R continuations each; pure, to be jit-compiled.

  Args:
    model, gen: the model (a `Llama` module, or its `LlamaConfig`) and the generation
      config (static).
    params: model parameters.
    tokens, segment_ids: [B, P] left-padded prompts (segment id 0 on padding).
    keys: [B, R] PRNG keys, one per sample, or their `jax.random.key_data` [B, R, 2].
    prompt_cache: empty `KVCache` of B rows and P slots.
    sample_cache: empty `KVCache` of B·R rows and N slots.

  Returns:
    `(output, prompt_cache, sample_cache)`, the caches filled (returned so that donated
    input buffers are updated in place).
  """
  model = as_model(model)
  apply = functools.partial(model.apply, {"params": params})
  b, r, n = tokens.shape[0], gen.num_samples, gen.max_new_tokens
  if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
    keys = jax.random.wrap_key_data(keys)
  row_keys = keys.reshape(b * r)
  stop_ids = jnp.asarray(gen.stop_ids or [-1], jnp.int32)

  logits, prompt_cache = apply(tokens, segment_ids=segment_ids, cache=prompt_cache)
  prompt_lengths = jnp.repeat(prompt_cache.lengths(), r)  # [B·R]

  def emit(state, logits, i):
    """Samples step i from logits [B·R, V] and records it in the loop state."""
    step_keys = jax.vmap(jax.random.fold_in, (0, None))(row_keys, i)
    token, logprob, model_logprob = sample(step_keys, logits, gen.sampling)
    live = ~state["done"]
    token = jnp.where(live, token, gen.pad_id)
    put = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(
      buf, jnp.where(live, x, 0).astype(buf.dtype)[:, None], i, axis=1
    )
    return state | {
      "token": token,
      "done": state["done"] | jnp.isin(token, stop_ids),
      "tokens": jax.lax.dynamic_update_slice_in_dim(state["tokens"], token[:, None], i, 1),
      "mask": put(state["mask"], jnp.ones_like(token)),
      "logprobs": put(state["logprobs"], logprob),
      "model_logprobs": put(state["model_logprobs"], model_logprob),
      "i": i + 1,
    }

  def body(state):
    i = state["i"]  # feeds token i-1 (at position prompt length + i-1), samples token i
    logits, cache = apply(
      state["token"][:, None],
      positions=(prompt_lengths + i - 1)[:, None],
      segment_ids=jnp.ones((b * r, 1), jnp.int32),
      cache=state["cache"],
      prefix=prompt_cache,
    )
    return emit(state | {"cache": cache}, logits[:, -1], i)

  def cond(state):
    return (state["i"] < n) & ~jnp.all(state["done"])

  zeros = lambda dtype: jnp.zeros((b * r, n), dtype)
  state = {
    "i": jnp.zeros((), jnp.int32),
    "token": jnp.zeros((b * r,), jnp.int32),
    "done": jnp.zeros((b * r,), bool),
    "cache": sample_cache,
    "tokens": jnp.full((b * r, n), gen.pad_id, jnp.int32),
    "mask": zeros(jnp.int32),
    "logprobs": zeros(jnp.float32),
    "model_logprobs": zeros(jnp.float32),
  }
  # The R samples of a prompt start from the same prefill logits, with their own keys.
  state = emit(state, jnp.repeat(logits[:, -1], r, axis=0), jnp.zeros((), jnp.int32))
  state = jax.lax.while_loop(cond, body, state)

  per_sample = lambda x: x.reshape(b, r, n)
  output = GenerationOutput(
    tokens=per_sample(state["tokens"]),
    mask=per_sample(state["mask"]),
    logprobs=per_sample(state["logprobs"]),
    model_logprobs=per_sample(state["model_logprobs"]),
    steps=state["i"],
  )
  return output, prompt_cache, state["cache"]


# --------------------------------------------------------------------------- compiled entry


def cache_shardings(model: sharding.Model, mesh: Mesh) -> KVCache:
  """`NamedSharding`s of a `KVCache` of `model` on `mesh`: rows over the batch axes, kv
  heads over tensor where it divides K and replicated where not, as the k / v weights are
  placed (`sharding.rules_for`)."""
  rules = sharding.rules_for(model, mesh)
  kv = sharding.named_sharding(mesh, (None, "act_batch", "act_seq", "act_kv_heads", None), rules)
  return KVCache(
    k=kv,
    v=kv,
    segment_ids=sharding.named_sharding(mesh, ("act_batch", "act_seq"), rules),
    index=NamedSharding(mesh, PartitionSpec()),
  )


def make_decode_fn(model: sharding.Model, gen: GenerationConfig, mesh: Mesh | None = None):
  """`decode` jit-compiled for (model, gen, mesh), both caches donated; memoized.

  `fn(params, tokens, segment_ids, keys, prompt_cache, sample_cache)` returns
  `(GenerationOutput, prompt_cache, sample_cache)`. With a mesh, batch dimensions are
  sharded over the mesh's batch axes and KV heads (where it divides K, `cache_shardings`)
  and vocab over `tensor`, and `keys` are passed as `jax.random.key_data` [B, R, 2] (host
  data, made global like the tokens). The same function object is returned for equal
  arguments; it compiles once per (B, P) shape, which `fn._cache_size()` counts.
  """
  return _decode_fn(as_model(model), gen, mesh)


@functools.lru_cache(maxsize=64)
def _decode_fn(model: nn.Module, gen: GenerationConfig, mesh: Mesh | None):
  fn = functools.partial(decode, model, gen)
  if mesh is None:
    return jax.jit(fn, donate_argnums=(4, 5))

  def sharded(*args):
    with sharding.activation_sharding(mesh):
      return fn(*args)

  batch = sharding.named_sharding(mesh, ("act_batch", "act_seq"))
  caches = cache_shardings(model, mesh)
  outputs = GenerationOutput(
    tokens=sharding.named_sharding(mesh, ("act_batch", None, None)),
    mask=sharding.named_sharding(mesh, ("act_batch", None, None)),
    logprobs=sharding.named_sharding(mesh, ("act_batch", None, None)),
    model_logprobs=sharding.named_sharding(mesh, ("act_batch", None, None)),
    steps=NamedSharding(mesh, PartitionSpec()),
  )
  keys = sharding.named_sharding(mesh, ("act_batch", None, None))
  return jax.jit(
    sharded,
    in_shardings=(sharding.param_shardings(model, mesh), batch, batch, keys, caches, caches),
    out_shardings=(outputs, caches, caches),
    donate_argnums=(4, 5),
  )


def abstract_decode_args(
  model: sharding.Model, gen: GenerationConfig, num_prompts: int, prompt_len: int, mesh: Mesh
) -> tuple:
  """Abstract arguments of `make_decode_fn(model, gen, mesh)` for `num_prompts` prompts of
  up to `prompt_len` tokens, padded as `generate_tokens` pads them (ahead-of-time checks)."""
  config = as_model(model).config
  shards = sharding.batch_shards(mesh)
  b, r = -(-num_prompts // shards) * shards, gen.num_samples
  p = bucket_length(prompt_len, gen.prompt_bucket)
  batch = sharding.named_sharding(mesh, ("act_batch", "act_seq"))
  caches = jax.eval_shape(
    lambda: (KVCache.init(config, b, p), KVCache.init(config, b * r, gen.max_new_tokens))
  )
  struct = lambda shape, dtype, sh: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  place = lambda c: jax.tree.map(lambda x, sh: struct(x.shape, x.dtype, sh), c,
                                 cache_shardings(model, mesh))  # fmt: skip
  return (
    sharding.abstract_sharded_params(model, mesh),
    struct((b, p), jnp.int32, batch),
    struct((b, p), jnp.int32, batch),
    struct((b, r, 2), jnp.uint32, sharding.named_sharding(mesh, ("act_batch", None, None))),
    place(caches[0]),
    place(caches[1]),
  )


def decode_program(
  model: sharding.Model,
  gen: GenerationConfig,
  num_prompts: int,
  prompt_len: int,
  mesh: Mesh,
  resident=(),
) -> aot.Program:
  """The compiled decoder of `generate_tokens` for one batch of `num_prompts` prompts of up to
  `prompt_len` tokens (prefill + decode loop; both KV caches are its arguments), with model
  FLOPs, for ahead-of-time compile-and-fit checks (`resident`: what else stays on the
  devices meanwhile)."""
  config = as_model(model).config
  args = abstract_decode_args(model, gen, num_prompts, prompt_len, mesh)
  b, p = args[1].shape
  r, n = gen.num_samples, gen.max_new_tokens
  flops = config.flops_per_token(p + n) / 3 * (b * p + b * r * n)
  return aot.Program("generate", make_decode_fn(model, gen, mesh), args, flops, resident,
                     note=f"{b} prompts × {p} + {r} × {n} new")  # fmt: skip


def model_stop_ids(config: LlamaConfig) -> tuple[int, ...]:
  """The ids the model's config says end a response (`eos_token_id`: none, one or several)."""
  eos = config.eos_token_id
  return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)


@functools.lru_cache(maxsize=16)
def _make_init_caches(config: LlamaConfig, mesh: Mesh | None):
  """Jitted `(B, P, B·R, N) -> (prompt_cache, sample_cache)`, allocated in their shardings."""

  def init(prompts, prompt_len, rows, new_tokens):
    return (KVCache.init(config, prompts, prompt_len), KVCache.init(config, rows, new_tokens))

  shardings = None if mesh is None else (cache_shardings(config, mesh),) * 2
  return jax.jit(init, static_argnums=(0, 1, 2, 3), out_shardings=shardings)


def sample_keys(key: jax.Array, num_prompts: int, num_samples: int) -> jax.Array:
  """Keys [B, R] of a call key: sample (b, r) gets `fold_in(fold_in(key, b), r)`, which
  does not depend on B, so padding the batch changes no sample."""
  per_prompt = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(num_prompts))
  return jax.vmap(jax.vmap(jax.random.fold_in, (None, 0)), (0, None))(
    per_prompt, jnp.arange(num_samples)
  )


def _as_key(key) -> jax.Array:
  if isinstance(key, (int, np.integer)):
    return jax.random.key(int(key))
  key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):  # raw uint32 [..., 2] keys
    key = jax.random.wrap_key_data(key)
  return key


def _check_prompts(config: LlamaConfig, gen: GenerationConfig, prompts) -> list[list[int]]:
  if isinstance(prompts, (str, bytes)) or not len(prompts):
    raise ValueError("generate_tokens: prompts must be a non-empty list of token-id lists")
  prompts = [[int(t) for t in p] for p in prompts]
  for i, p in enumerate(prompts):
    if not p:
      raise ValueError(f"generate_tokens: prompts[{i}] is empty")
    bad = [t for t in p if not 0 <= t < config.vocab_size]
    if bad:
      raise ValueError(
        f"generate_tokens: prompts[{i}] has id {bad[0]} outside the vocabulary "
        f"[0, {config.vocab_size})"
      )
  longest = max(map(len, prompts))
  if longest + gen.max_new_tokens > config.max_seq_len:
    raise ValueError(
      f"generate_tokens: the longest prompt ({longest} tokens) + max_new_tokens="
      f"{gen.max_new_tokens} exceeds the model's max_seq_len={config.max_seq_len}"
    )
  return prompts


def generate_tokens(
  model: sharding.Model,
  params,
  prompts: Sequence[Sequence[int]],
  key,
  gen: GenerationConfig,
  *,
  mesh: Mesh | None = None,
) -> GenerationOutput:
  """Samples `gen.num_samples` continuations of each prompt (token ids, unpadded).

  Args:
    model: the model (`Llama(config, lora=...)`, or a `LlamaConfig` for `Llama(config)`).
    params: its parameters (sharded by `sharding.param_shardings` when `mesh` is given).
    prompts: B lists of token ids, of any lengths.
    key: an int seed, a PRNG key (samples derived with `sample_keys`), or keys [B, R],
      one per sample.
    gen: what to generate.
    mesh: optional ('data', 'fsdp', 'tensor') mesh to shard the generation over.

  Returns:
    A `GenerationOutput` with fields [B, R, N].
  """
  config = as_model(model).config
  prompts = _check_prompts(config, gen, prompts)
  num_prompts, r = len(prompts), gen.num_samples
  key = _as_key(key)
  keys = key if key.ndim == 2 else sample_keys(key, num_prompts, r)
  if keys.shape != (num_prompts, r):
    raise ValueError(f"generate_tokens: keys of shape {keys.shape}; expected {(num_prompts, r)}")

  # Pad the batch with copies of the first prompt so that it divides the batch shards.
  shards = 1 if mesh is None else sharding.batch_shards(mesh)
  extra = -num_prompts % shards
  prompts = prompts + [prompts[0]] * extra
  keys = jnp.concatenate([keys, jnp.repeat(keys[:1], extra, axis=0)]) if extra else keys

  length = bucket_length(max(map(len, prompts)), gen.prompt_bucket)
  tokens, segments = pad_prompts(prompts, length, gen.pad_id)
  b = len(prompts)
  prompt_cache, sample_cache = _make_init_caches(config, mesh)(b, length, b * r, gen.max_new_tokens)
  if mesh is not None:  # global arrays from host data: the same on every process
    batch = sharding.named_sharding(mesh, ("act_batch", "act_seq"))
    tokens, segments = sharding.to_global(tokens, batch), sharding.to_global(segments, batch)
    keys = sharding.to_global(
      np.asarray(jax.random.key_data(keys)),
      sharding.named_sharding(mesh, ("act_batch", None, None)),
    )
  fn = make_decode_fn(model, gen, mesh)
  out, _, _ = fn(params, tokens, segments, keys, prompt_cache, sample_cache)
  if extra:
    out = jax.tree.map(lambda x: x[:num_prompts] if x.ndim else x, out)
  return out
