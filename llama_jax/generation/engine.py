"""A rollout engine: a paged KV cache, continuous batching, token-in / token-out requests.

    engine = Engine(model, params, EngineConfig(page_size=16, num_pages=512, max_seqs=32))
    done = engine.generate([Request(prompt=ids, max_new_tokens=256, num_samples=4, seed=7,
                                    sampling=SamplingConfig(temperature=1.0), stop_ids=eos)])
    done[0][2].tokens, done[0][2].logprobs, done[0][2].finish_reason   # request 0, sample 2

How it works:

- **Memory.** Keys and values live in fixed-size pages of one pool ([L, pages, page_size, 2K,
  H], keys and values interleaved on the head axis, `model.llama.PagedKV`); a sequence holds
  a page table. Page 0 is scratch: padding
  tokens write there and nothing reads it.
- **Admission.** A request is admitted when a decode slot is free for each of its samples and
  the pool holds the pages its samples can ever need (prompt plus `max_new_tokens`); they are
  taken at once, so a running sequence never waits for memory. A finished sample's slot and
  pages go back at once, and the next waiting request takes them (continuous batching).
- **Prefill.** A prompt but its last token is prefilled in chunks of `prefill_chunk` tokens,
  up to `prefill_rows` sequences per compiled step. The samples of a prompt share its full pages
  (a reference count per page) and copy only its last, partly filled page.
- **Decode.** One compiled step feeds every decoding sequence's next token (the prompt's last
  token first), writes its keys/values into its pages and samples the token after it.
- **Compilation.** Prefill steps [rows, prefill_chunk] and decode steps [rows, 1], rows the
  step's sequences rounded up to a power of two (at most `prefill_rows` / `max_seqs`), each
  at a few page-table widths (powers of two up to a sequence's pages: attention reads only as
  many pages as the longest row needs), plus a page copy: a fixed set of at most
  (log2 prefill_rows + log2 max_seqs + 2) · (log2 pages per sequence + 1) + 1 programs,
  however requests arrive (`compilations()`).
- **Independence.** Sample r of a request draws its i-th token with
  `fold_in(fold_in(key, r), i)`, `key` the request's seed: its output depends on its own
  seed and parameters, not on the batch it shared or when it arrived.
- **Multi-turn.** `Request(keep=True)` keeps a sample's pages; `Request(continues=handle,
  prompt=new_tokens)` appends a tool's output or the next turn and generates on, prefilling
  only the new tokens.
- **Weights.** `update_weights(params)` between RL iterations recompiles nothing; with
  `mesh`, the engine reads the weights where the training mesh holds them.
- **Attention** over the pages goes through a kernel table (`EngineConfig.attention`,
  `model.attention.PAGED_KERNELS`): XLA everywhere, TPU's Pallas ragged paged attention on
  TPU (chosen by "auto" where head_dim is a multiple of 128).
"""

from __future__ import annotations

import dataclasses
import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.generation.sampling import SamplingConfig, sample_rows
from llama_jax.model import attention
from llama_jax.model.llama import PagedKV, as_model
from llama_jax.parallel import aot, sharding

SCRATCH_PAGE = 0


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """The engine's memory and compiled shapes.

  Attributes:
    page_size: tokens per page.
    num_pages: pages in the pool, the scratch page included; with `page_size` it sets the
      KV memory: L · num_pages · page_size · K · H · 2 values.
    max_seqs: sequences decoded together (the decode step's rows).
    max_seq_len: the longest sequence (prompt + new tokens); 0: the model's `max_seq_len`.
    prefill_chunk: prompt tokens per sequence per prefill step.
    prefill_rows: sequences prefilled together in one step.
    attention: the paged attention kernel (`model.attention.PAGED_KERNELS`): "xla", or
      "ragged_paged" (TPU's Pallas kernel); "auto": the devices' kernel where the model's
      head_dim suits it, else "xla".
  """

  page_size: int = 16
  num_pages: int = 256
  max_seqs: int = 16
  max_seq_len: int = 0
  prefill_chunk: int = 64
  prefill_rows: int = 4
  attention: str = "auto"

  def __post_init__(self):
    for name in ("page_size", "max_seqs", "prefill_chunk", "prefill_rows"):
      if getattr(self, name) < 1:
        raise ValueError(f"EngineConfig.{name}={getattr(self, name)}; expected >= 1")
    if self.num_pages < 2:
      raise ValueError(f"EngineConfig.num_pages={self.num_pages}; expected >= 2 (1 is scratch)")
    if self.max_seq_len < 0:
      raise ValueError(f"EngineConfig.max_seq_len={self.max_seq_len}; expected >= 0")


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt to continue, token in / token out.

  Attributes:
    prompt: token ids.
    max_new_tokens: the most tokens generated per sample (a stop id included).
    sampling: temperature / top-k / top-p of this request.
    stop_ids: a sample ends after emitting any of these.
    stop_strings: a sample ends once its decoded text contains one of these (needs the
      engine's `detokenize`); the tokens up to the one that completes it are kept.
    num_samples: samples of the prompt, sharing its prefilled pages.
    seed: the request's PRNG seed (an int, or a key's `jax.random.key_data`).
    keep: keep each sample's pages when it ends; its `Completion.handle` continues it.
    continues: the handle of a kept sample this request extends (multi-turn: a tool's
      output, the next user turn): `prompt` holds only the new tokens, appended after the
      sample's own, and only they are prefilled. One sample; the handle is used up.
  """

  prompt: Sequence[int]
  max_new_tokens: int = 64
  sampling: SamplingConfig = SamplingConfig()
  stop_ids: Sequence[int] = ()
  stop_strings: Sequence[str] = ()
  num_samples: int = 1
  seed: Any = 0
  keep: bool = False
  continues: int | None = None


@dataclasses.dataclass
class Completion:
  """One sample: its tokens (a stop id included), their log-probs under the sampling
  distribution and under the model, and why it ended: "stop" (a stop id or string) or
  "length" (`max_new_tokens`). `handle`: with `Request.keep`, what `Request.continues` takes."""

  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  model_logprobs: list[float] = dataclasses.field(default_factory=list)
  finish_reason: str = ""
  handle: int | None = None


@dataclasses.dataclass(eq=False)
class _Sequence:
  """A sample in flight (or the shared prefill of a request's samples)."""

  request: int
  sample: int  # -1: the prefill shared by the request's samples
  tokens: list[int]  # the prompt, then the generated tokens
  prefill_to: int  # tokens cached by prefill steps (the prompt but its last token)
  pages: list[int]
  key: np.ndarray | None = None  # key data [2] of this sample
  cached: int = 0
  out: Completion = dataclasses.field(default_factory=Completion)


def _pages_for(tokens: int, page_size: int) -> int:
  return -(-tokens // page_size)


class PagePool:
  """Page ids 1 … num_pages-1 with reference counts (page 0 is scratch)."""

  def __init__(self, num_pages: int):
    self.free = deque(range(1, num_pages))
    self.refs = np.zeros(num_pages, np.int32)

  def take(self, n: int) -> list[int]:
    pages = [self.free.popleft() for _ in range(n)]
    self.refs[pages] += 1
    return pages

  def share(self, pages: Sequence[int]) -> None:
    self.refs[list(pages)] += 1

  def release(self, pages: Sequence[int]) -> None:
    for page in pages:
      self.refs[page] -= 1
      if self.refs[page] == 0:
        self.free.append(page)


def _step(model, mesh, impl, params, kv, tokens, segment_ids, page_table, lengths, keys, draws,
          temperature, top_k, top_p):  # fmt: skip
  """One compiled engine step: T tokens per row into the pages, then a sample of the token
  after each row's last real one, with key `fold_in(keys[b], draws[b])`. Returns `(kv,
  tokens [B], logprobs [B], model_logprobs [B])`."""
  cache = PagedKV(kv=kv, page_table=page_table, lengths=lengths, impl=impl)
  with sharding.activation_sharding(mesh):
    logits, cache = model.apply({"params": params}, tokens, segment_ids=segment_ids, cache=cache)
  last = jnp.maximum(jnp.sum(segment_ids != 0, axis=1) - 1, 0)
  logits = jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]  # [B, V]
  keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(keys), draws)
  token, logprob, model_logprob = sample_rows(keys, logits, temperature, top_k, top_p)
  return cache.kv, token, logprob, model_logprob


def page_shardings(model, mesh: Mesh) -> NamedSharding:
  """The pool's sharding on `mesh`: its interleaved key/value head axis over `tensor` where the
  kv heads divide it (as the k / v weights are placed, `sharding.rules_for`; a shard then
  holds whole heads' keys and values), the rest replicated."""
  rules = sharding.rules_for(model, mesh)
  return sharding.named_sharding(mesh, (None, None, None, "act_kv_heads", None), rules)


def step_function(model, mesh: Mesh | None, attention_impl: str):
  """The engine's compiled step `(params, kv, tokens, segment_ids, page_table, lengths, keys,
  draws, temperature, top_k, top_p) -> (kv, tokens, logprobs, model_logprobs)`, the pool
  donated; on a mesh with the weights where `param_shardings` places them and the pool split
  over kv heads (`page_shardings`), the rows replicated. A new function object: its compiled
  shapes are its own (`Engine.compilations`)."""
  step = functools.partial(_step, model, mesh, attention_impl)
  if mesh is None:
    return jax.jit(step, donate_argnums=(1,))
  pages = page_shardings(model, mesh)
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(
    step,
    in_shardings=(sharding.param_shardings(model, mesh), pages) + (replicated,) * 9,
    out_shardings=(pages,) + (replicated,) * 3,
    donate_argnums=(1,),
  )


def _copy_pages(kv, src, dst):
  """Copies pages src [n] onto dst [n] in every layer (pairs (0, 0) pad)."""
  return kv.at[:, dst].set(kv[:, src])


class Engine:
  """Continuous-batching generation over a paged KV cache; see the module docstring.

  Args:
    model: the model (`Llama(config, lora=...)` or a `LlamaConfig`).
    params: its parameters.
    config: memory and compiled shapes (`EngineConfig`).
    detokenize: ids -> text, for requests with `stop_strings`.
    dtype: the KV pages' dtype (default: the model's activation dtype).
    mesh: the ('data', 'fsdp', 'tensor') mesh `params` are sharded on (e.g. the training
      mesh: the engine reads them where they are); the pages split over kv heads as the k / v
      weights do, the rows of a step are replicated.
  """

  def __init__(
    self,
    model: sharding.Model,
    params,
    config: EngineConfig = EngineConfig(),
    *,
    detokenize: Callable[[Sequence[int]], str] | None = None,
    dtype=None,
    mesh: Mesh | None = None,
  ):
    self.model, self.params, self.config = as_model(model), params, config
    self.detokenize = detokenize
    cfg = self.model.config
    self.max_seq_len = config.max_seq_len or cfg.max_seq_len
    if self.max_seq_len > cfg.max_seq_len:
      raise ValueError(
        f"EngineConfig.max_seq_len={self.max_seq_len} exceeds the model's max_seq_len="
        f"{cfg.max_seq_len}"
      )
    self.pages_per_seq = _pages_for(self.max_seq_len, config.page_size)
    if self.pages_per_seq > config.num_pages - 1:
      raise ValueError(
        f"EngineConfig.num_pages={config.num_pages} cannot hold one sequence of max_seq_len="
        f"{self.max_seq_len}: that takes {self.pages_per_seq} pages of {config.page_size} "
        "tokens, plus the scratch page"
      )
    self.kv = PagedKV.init_pages(cfg, config.num_pages, config.page_size, dtype)
    self.pool = PagePool(config.num_pages)
    self.kept: dict[int, _Sequence] = {}  # handle -> a finished sample holding its pages
    self._handles = 0
    self.prefilled_tokens = 0  # prompt tokens run through prefill steps, for the curious
    self.mesh = mesh
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    self.attention = attention.check_paged_kernel(config.attention, cfg.head_dim, platform)
    # On a mesh: the weights as the mesh holds them (no copy), the pool split over kv heads.
    self._step = step_function(self.model, mesh, self.attention)
    if mesh is not None:
      self.kv = jax.device_put(self.kv, page_shardings(self.model, mesh))
    # A partial per engine: its own compilation count (`compilations`).
    self._copy = jax.jit(functools.partial(_copy_pages), donate_argnums=(0,))

  def update_weights(self, params) -> None:
    """New weights (same shapes and shardings) for the next requests: no recompilation."""
    self.params = params

  def release(self, handle: int) -> None:
    """Frees the pages of a kept sample that will not be continued."""
    self.pool.release(self.kept.pop(handle).pages)

  def compilations(self) -> int:
    """Programs compiled so far (steps and page copies, all shapes)."""
    return self._step._cache_size() + self._copy._cache_size()

  # ------------------------------------------------------------------------- requests

  def check(self, index: int, request: Request) -> None:
    """Raises ValueError naming the request and the limit it breaks."""
    vocab = self.model.config.vocab_size
    name = f"Request {index}"
    if not len(request.prompt):
      raise ValueError(f"{name}: the prompt is empty")
    if request.max_new_tokens < 1:
      raise ValueError(f"{name}: max_new_tokens={request.max_new_tokens}; expected >= 1")
    if request.num_samples < 1:
      raise ValueError(f"{name}: num_samples={request.num_samples}; expected >= 1")
    before = 0  # tokens of the sample a continuation extends
    if request.continues is not None:
      if request.continues not in self.kept:
        raise ValueError(f"{name}: continues={request.continues}, not a kept sample's handle")
      if request.num_samples != 1:
        raise ValueError(f"{name}: a continuation has one sample (num_samples=1)")
      before = len(self.kept[request.continues].tokens)
    if request.num_samples > self.config.max_seqs:
      raise ValueError(
        f"{name}: num_samples={request.num_samples} exceeds EngineConfig.max_seqs="
        f"{self.config.max_seqs}, the sequences decoded together"
      )
    for what, ids in (("prompt", request.prompt), ("stop_ids", request.stop_ids)):
      bad = [int(t) for t in ids if not 0 <= int(t) < vocab]
      if bad:
        raise ValueError(f"{name}: {what} has id {bad[0]} outside the vocabulary [0, {vocab})")
    total = before + len(request.prompt) + request.max_new_tokens - 1  # the last: not cached
    if total > self.max_seq_len:
      earlier = f"{before} earlier tokens + " if before else ""
      raise ValueError(
        f"{name}: {earlier}the prompt ({len(request.prompt)} tokens) + max_new_tokens="
        f"{request.max_new_tokens} exceeds the engine's max_seq_len={self.max_seq_len}"
      )
    if request.stop_strings and self.detokenize is None:
      raise ValueError(f"{name}: stop_strings need the engine's `detokenize`")
    if self._pages_needed(request) > self.config.num_pages - 1:
      raise ValueError(
        f"{name}: its {request.num_samples} samples need {self._pages_needed(request)} pages; "
        f"the pool has {self.config.num_pages - 1}"
      )

  def _pages_needed(self, request: Request) -> int:
    ps, p = self.config.page_size, len(request.prompt)
    if request.continues is not None:  # more pages than the kept sample holds
      kept = self.kept[request.continues]
      return max(0, _pages_for(len(kept.tokens) + p + request.max_new_tokens - 1, ps)
                 - len(kept.pages))  # fmt: skip
    per_sample = _pages_for(p + request.max_new_tokens - 1, ps)
    if request.num_samples == 1:
      return per_sample
    shared = (p - 1) // ps  # the prompt's full pages
    return _pages_for(p - 1, ps) + request.num_samples * (per_sample - shared)

  def generate(self, requests: Sequence[Request]) -> list[list[Completion]]:
    """Runs `requests` to completion; returns, per request, its samples' completions."""
    for i, request in enumerate(requests):
      self.check(i, request)
    handles = [r.continues for r in requests if r.continues is not None]
    if len(set(handles)) < len(handles):
      raise ValueError(f"two requests continue the same kept sample: handles {sorted(handles)}")
    cfg = self.config
    pool = self.pool
    waiting = deque(range(len(requests)))
    prefilling: list[_Sequence] = []
    decoding: list[_Sequence] = []
    results: list[list[Completion]] = [[] for _ in requests]

    def admit() -> None:
      while waiting:
        request = requests[waiting[0]]
        busy = len(decoding) + sum(requests[s.request].num_samples for s in prefilling)
        if busy + request.num_samples > cfg.max_seqs or (
          self._pages_needed(request) > len(pool.free)
        ):
          return
        index = waiting.popleft()
        results[index] = [Completion() for _ in range(request.num_samples)]
        seq = self._start(index, request, pool)
        if seq.prefill_to > 0:
          prefilling.append(seq)
        elif seq.sample < 0:  # a one-token prompt: nothing to prefill or share
          self._fork(seq, request, pool, decoding)
        else:
          decoding.append(seq)

    try:
      admit()
      while prefilling or decoding:
        if prefilling:
          for parent in self._prefill(prefilling[: cfg.prefill_rows]):
            prefilling.remove(parent)
            if parent.sample < 0:
              self._fork(parent, requests[parent.request], pool, decoding)
            else:
              decoding.append(parent)
        else:
          for seq in self._decode(decoding, requests):
            decoding.remove(seq)
            if requests[seq.request].keep:
              self._handles += 1
              seq.out.handle = self._handles
              self.kept[self._handles] = seq
            else:
              pool.release(seq.pages)
            results[seq.request][seq.sample] = seq.out
        admit()
    finally:  # an interrupted call gives its sequences' pages back (kept samples stay)
      for seq in prefilling + decoding:
        pool.release(seq.pages)
    if waiting:  # nothing runs, and the next request still does not fit: kept pages hold it
      held = sum(len(s.pages) for s in self.kept.values())
      raise ValueError(
        f"Request {waiting[0]}: its samples need {self._pages_needed(requests[waiting[0]])} "
        f"pages; {len(pool.free)} are free, {held} held by kept samples (Engine.release)"
      )
    return results

  def _start(self, index: int, request: Request, pool: PagePool) -> _Sequence:
    """The request's sequence: its one sample, or the prefill its samples share."""
    prompt = [int(t) for t in request.prompt]
    key = np.asarray(jax.random.key_data(_as_key(request.seed)))
    if request.continues is not None:  # its tokens so far are cached but the last one
      extra = pool.take(self._pages_needed(request))
      seq = self.kept.pop(request.continues)
      seq.pages += extra
      seq.request, seq.sample, seq.key, seq.out = index, 0, _fold(key, 0), Completion()
      seq.tokens += prompt
      seq.prefill_to = len(seq.tokens) - 1
      return seq
    if request.num_samples > 1:
      pages = pool.take(_pages_for(len(prompt) - 1, self.config.page_size))
      return _Sequence(index, -1, prompt, len(prompt) - 1, pages, key)
    pages = pool.take(_pages_for(len(prompt) + request.max_new_tokens - 1, self.config.page_size))
    return _Sequence(index, 0, prompt, len(prompt) - 1, pages, _fold(key, 0))

  def _fork(self, parent: _Sequence, request: Request, pool: PagePool, decoding: list) -> None:
    """The samples of a prefilled prompt: they share its full pages and copy its last,
    partly filled one."""
    ps, cached = self.config.page_size, parent.cached
    full = parent.pages[: cached // ps]
    partial = parent.pages[cached // ps :]  # at most one page
    own = _pages_for(len(parent.tokens) + request.max_new_tokens - 1, ps) - len(full)
    copies = []
    for r in range(request.num_samples):
      pool.share(full)
      pages = pool.take(own)
      if partial:
        copies.append((partial[0], pages[0]))
      seq = _Sequence(parent.request, r, list(parent.tokens), parent.prefill_to, full + pages)
      seq.key, seq.cached = _fold(parent.key, r), cached
      decoding.append(seq)
    if copies:
      src, dst = (np.zeros(self.config.max_seqs, np.int32) for _ in range(2))
      src[: len(copies)], dst[: len(copies)] = zip(*copies, strict=True)
      self.kv = self._copy(self.kv, src, dst)
    pool.release(parent.pages)

  def _tables(self, seqs: Sequence[_Sequence], rows: int, tokens: int) -> np.ndarray:
    """Page tables [rows, W]: W pages cover every row's first `cached + tokens` positions,
    rounded up to a power of two (so attention reads no more pages than the longest row
    needs, through at most log2(pages per sequence) + 1 compiled widths)."""
    ps = self.config.page_size
    needed = max(_pages_for(s.cached + tokens, ps) for s in seqs)
    width = min(1 << (needed - 1).bit_length(), self.pages_per_seq)
    table = np.full((rows, width), SCRATCH_PAGE, np.int32)
    for i, seq in enumerate(seqs):
      pages = seq.pages[:width]
      table[i, : len(pages)] = pages
    return table

  def _run(self, seqs, rows, t, feed, requests=None):
    """One compiled step over `seqs` padded to `rows` × `t` tokens; `feed(seq)` gives a
    sequence's new tokens. Returns the sampled (tokens, logprobs, model_logprobs)."""
    tokens = np.zeros((rows, t), np.int32)
    segments = np.zeros((rows, t), np.int32)
    lengths = np.zeros(rows, np.int32)
    keys = np.zeros((rows, 2), np.uint32)
    draws = np.zeros(rows, np.int32)
    temperature = np.zeros(rows, np.float32)
    top_k = np.zeros(rows, np.int32)
    top_p = np.ones(rows, np.float32)
    for i, seq in enumerate(seqs):
      new = feed(seq)
      tokens[i, : len(new)], segments[i, : len(new)], lengths[i] = new, 1, seq.cached
      if requests is not None:
        sampling = requests[seq.request].sampling
        keys[i], draws[i] = seq.key, len(seq.out.tokens)
        temperature[i], top_k[i], top_p[i] = sampling.temperature, sampling.top_k, sampling.top_p
    self.kv, *sampled = self._step(
      self.params, self.kv, tokens, segments, self._tables(seqs, rows, t), lengths,
      keys, draws, temperature, top_k, top_p,
    )  # fmt: skip
    return jax.device_get(sampled)

  def _prefill(self, seqs: Sequence[_Sequence]) -> list[_Sequence]:
    """One prefill chunk of each of `seqs`; returns those whose prefill is done."""
    chunk = self.config.prefill_chunk
    feed = lambda s: s.tokens[s.cached : min(s.cached + chunk, s.prefill_to)]
    self.prefilled_tokens += sum(len(feed(s)) for s in seqs)
    self._run(seqs, _rows(len(seqs), self.config.prefill_rows), chunk, feed)
    for seq in seqs:
      seq.cached = min(seq.cached + chunk, seq.prefill_to)
    return [s for s in seqs if s.cached == s.prefill_to]

  def _decode(self, seqs: Sequence[_Sequence], requests) -> list[_Sequence]:
    """One token for every decoding sequence; returns the finished ones."""
    feed = lambda s: [s.tokens[s.cached]]
    rows = _rows(len(seqs), self.config.max_seqs)
    tokens, logprobs, model_logprobs = self._run(seqs, rows, 1, feed, requests)
    finished = []
    for i, seq in enumerate(seqs):
      request, token, out = requests[seq.request], int(tokens[i]), seq.out
      seq.cached += 1
      seq.tokens.append(token)
      out.tokens.append(token)
      out.logprobs.append(float(logprobs[i]))
      out.model_logprobs.append(float(model_logprobs[i]))
      if token in request.stop_ids or self._has_stop_string(request, out.tokens):
        out.finish_reason = "stop"
      elif len(out.tokens) == request.max_new_tokens:
        out.finish_reason = "length"
      if out.finish_reason:
        finished.append(seq)
    return finished

  def _has_stop_string(self, request: Request, tokens: list[int]) -> bool:
    if not request.stop_strings:
      return False
    text = self.detokenize(tokens)
    return any(s in text for s in request.stop_strings)


def _rows(live: int, most: int) -> int:
  """A step's rows: its live sequences rounded up to a power of two, at most `most`. A step
  then costs what its sequences need (the tail of a long-tailed batch, the one or two prompts
  admitted as others finish), through a few compiled shapes."""
  return min(1 << (live - 1).bit_length(), most)


def _as_key(seed) -> jax.Array:
  if isinstance(seed, (int, np.integer)):
    return jax.random.key(int(seed))
  seed = jnp.asarray(seed)
  return seed if jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(seed)


def _fold(key_data: np.ndarray, i: int) -> np.ndarray:
  """`fold_in` on key data, as numpy: a sample's key, once per sample."""
  key = jax.random.fold_in(jax.random.wrap_key_data(jnp.asarray(key_data)), i)
  return np.asarray(jax.random.key_data(key))


def engine_programs(
  model, config: EngineConfig, mesh: Mesh, dtype=None, resident=()
) -> list[aot.Program]:
  """The engine's largest steps for ahead-of-time compile-and-fit checks: a prefill step
  (`prefill_rows` × `prefill_chunk` tokens) and a decode step (`max_seqs` rows), every row
  reading a whole sequence's pages (`max_seq_len`), with the page pool (`num_pages`) as the
  donated argument whose bytes count (`resident`: what else stays on the devices). FLOPs:
  the forward of the step's tokens at that context."""
  model = as_model(model)
  cfg = model.config
  max_seq_len = config.max_seq_len or cfg.max_seq_len
  width = _pages_for(max_seq_len, config.page_size)
  platform = mesh.devices.flat[0].platform
  impl = attention.check_paged_kernel(config.attention, cfg.head_dim, platform)
  fn = step_function(model, mesh, impl)
  pool = jax.eval_shape(lambda: PagedKV.init_pages(cfg, config.num_pages, config.page_size, dtype))
  pool = jax.ShapeDtypeStruct(pool.shape, pool.dtype, sharding=page_shardings(model, mesh))
  replicated = NamedSharding(mesh, PartitionSpec())
  row = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
  params = sharding.abstract_sharded_params(model, mesh)
  per_token = cfg.flops_per_token(max_seq_len) / 3  # the forward's share of a train step's
  programs = []
  for name, rows, t in (("engine_prefill", config.prefill_rows, config.prefill_chunk),
                        ("engine_decode", config.max_seqs, 1)):  # fmt: skip
    args = (params, pool, row(rows, t), row(rows, t), row(rows, width), row(rows),
            row(rows, 2, dtype=jnp.uint32), row(rows), row(rows, dtype=jnp.float32), row(rows),
            row(rows, dtype=jnp.float32))  # fmt: skip
    note = (f"{rows} × {t} tokens, {config.num_pages} pages × {config.page_size} "
            f"({impl} attention)")  # fmt: skip
    programs.append(aot.Program(name, fn, args, per_token * rows * t, resident, note))
  return programs
