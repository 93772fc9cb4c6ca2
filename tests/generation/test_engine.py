"""The rollout engine (`llama_jax.generation.engine`): paged KV, continuous batching, token-in /
token-out requests. Its outputs are the static decoder's, token for token, whatever the batch;
its log-probs are the training forward's; its compiled shapes stay fixed; bad requests are
named."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import LlamaConfig
from llama_jax.generation import decode
from llama_jax.generation.engine import Engine, EngineConfig, Request
from llama_jax.generation.sampling import SamplingConfig
from llama_jax.model.llama import Llama
from llama_jax.parallel import sharding

CFG = LlamaConfig.preset(
  "tiny", vocab_size=256, num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16,
  mlp_dim=128, max_seq_len=128,
)  # fmt: skip
SMALL = EngineConfig(page_size=8, num_pages=32, max_seqs=4, prefill_chunk=8, prefill_rows=2)
# Prompt lengths around the 8-token pages: shared prompts end inside a page and are copied.
PROMPTS = [list(np.random.default_rng(0).integers(1, 256, n)) for n in (6, 17, 1, 11, 33, 2)]
STOP = (7,)


@pytest.fixture(scope="module")
def params():
  return Llama(CFG).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]


def requests(sampling, num_samples, key, max_new_tokens=12):
  """One request per prompt, with the keys of the static decoder's prompts."""
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(len(PROMPTS)))
  return [
    Request(prompt=p, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=STOP,
            num_samples=num_samples, seed=np.asarray(jax.random.key_data(k)))
    for p, k in zip(PROMPTS, keys, strict=True)
  ]  # fmt: skip


@pytest.mark.parametrize(
  "sampling, num_samples",
  [(SamplingConfig(temperature=0), 1), (SamplingConfig(temperature=1.0), 3),
   (SamplingConfig(temperature=0.8, top_k=20, top_p=0.9), 2)],
  ids=["greedy", "temperature", "top_k_top_p"],
)  # fmt: skip
def test_the_static_decoders_samples_token_for_token(params, sampling, num_samples):
  key = jax.random.key(42)
  gen = decode.GenerationConfig(max_new_tokens=12, num_samples=num_samples, sampling=sampling,
                                stop_ids=STOP)  # fmt: skip
  static = jax.device_get(decode.generate_tokens(CFG, params, PROMPTS, key, gen))
  engine = Engine(CFG, params, SMALL)
  out = engine.generate(requests(sampling, num_samples, key))
  for b, samples in enumerate(out):
    assert len(samples) == num_samples
    for r, done in enumerate(samples):
      n = int(static.mask[b, r].sum())
      assert done.tokens == static.tokens[b, r, :n].tolist(), (b, r)
      assert done.finish_reason == ("stop" if done.tokens[-1] in STOP else "length")
      np.testing.assert_allclose(done.model_logprobs, static.model_logprobs[b, r, :n], atol=2e-6)
      np.testing.assert_allclose(done.logprobs, static.logprobs[b, r, :n], atol=2e-6)
  # Every page went back to the pool; nothing is still referenced.
  assert len(engine.pool.free) == SMALL.num_pages - 1 and not engine.pool.refs.any()


def test_a_request_does_not_depend_on_its_batch_or_arrival(params):
  sampling = SamplingConfig(temperature=1.0, top_k=50)
  batch = requests(sampling, 2, jax.random.key(3))
  engine = Engine(CFG, params, SMALL)
  together = engine.generate(batch)
  reordered = engine.generate(batch[::-1])[::-1]
  alone = [engine.generate([r])[0] for r in batch[:3]]
  other = dict(temperature=0.0, top_k=0)  # neighbours with other rules and seeds
  mixed = engine.generate([Request(prompt=[5, 6], sampling=SamplingConfig(**other), seed=9),
                           batch[1], Request(prompt=[9] * 30, max_new_tokens=3)])  # fmt: skip
  tokens = lambda samples: [s.tokens for s in samples]
  for i in range(len(batch)):
    assert tokens(together[i]) == tokens(reordered[i]), i
  for i in range(3):
    assert tokens(together[i]) == tokens(alone[i]), i
  assert tokens(mixed[1]) == tokens(together[1])


def test_log_probs_are_the_training_forwards(params):
  """The engine's model log-probs of its tokens equal a teacher-forced forward's."""
  out = Engine(CFG, params, SMALL).generate(requests(SamplingConfig(1.0), 1, jax.random.key(5)))
  rows = [prompt + done.tokens for prompt, (done,) in zip(PROMPTS, out, strict=True)]
  ids = np.zeros((len(rows), max(map(len, rows))), np.int32)  # right-padded: causal, harmless
  for i, row in enumerate(rows):
    ids[i, : len(row)] = row
  logprobs = jax.nn.log_softmax(Llama(CFG).apply({"params": params}, ids), axis=-1)
  for i, (prompt, (done,)) in enumerate(zip(PROMPTS, out, strict=True)):
    at = np.arange(len(prompt), len(rows[i]))
    np.testing.assert_allclose(done.model_logprobs, logprobs[i, at - 1, ids[i, at]], atol=1e-6)


def test_compiled_shapes_stay_fixed_over_a_long_mixed_run(params):
  """Continuous batching through 40 requests of mixed lengths, rules and sample counts in a
  pool that holds a few at a time: the prefill steps of 1 and 2 rows and the decode steps of
  1, 2 and 4 rows compile at most once per page-table width (powers of two up to 16 pages: 5),
  the page copy once: never more than that bound, whatever comes, and the same traffic again
  or new weights compile nothing."""
  rng = np.random.default_rng(1)
  mixed = [
    Request(prompt=list(rng.integers(1, 256, rng.integers(1, 40))),
            max_new_tokens=int(rng.integers(1, 20)), num_samples=int(rng.integers(1, 4)),
            sampling=SamplingConfig(temperature=float(rng.choice([0, 0.7, 1.0]))), seed=i)
    for i in range(40)
  ]  # fmt: skip
  engine = Engine(CFG, params, EngineConfig(page_size=8, num_pages=24, max_seqs=4,
                                            prefill_chunk=8, prefill_rows=2))  # fmt: skip
  first = engine.generate(mixed)
  compiled, bound = engine.compilations(), 5 * 5 + 1
  assert compiled <= bound
  assert [[s.tokens for s in r] for r in engine.generate(mixed)] == [
    [s.tokens for s in r] for r in first
  ]
  assert engine.compilations() == compiled
  assert all(len(s.tokens) == r.max_new_tokens or s.finish_reason == "stop"
             for r, samples in zip(mixed, first, strict=True) for s in samples)  # fmt: skip
  # New weights: the next requests sample from them, through the same programs.
  new = jax.tree.map(lambda x: x * 1.5, params)
  engine.update_weights(new)
  engine.generate(mixed)
  assert engine.compilations() == compiled
  greedy = [Request(prompt=p, max_new_tokens=8, sampling=SamplingConfig(0.0)) for p in PROMPTS]
  second = engine.generate(greedy)
  engine.generate(mixed[::-1][:12])
  assert engine.compilations() <= bound
  gen = decode.GenerationConfig(max_new_tokens=8, sampling=SamplingConfig(0.0))
  static = decode.generate_tokens(CFG, new, PROMPTS, 0, gen).tokens[:, 0]
  assert [s.tokens for (s,) in second] == np.asarray(static).tolist()


def test_stop_strings_end_a_sample_where_the_text_has_them(params):
  detokenize = lambda ids: " ".join(map(str, ids))
  engine = Engine(CFG, params, SMALL, detokenize=detokenize)
  greedy = Request(prompt=PROMPTS[1], max_new_tokens=10, sampling=SamplingConfig(0.0))
  ((free,),) = engine.generate([greedy])
  stop = str(free.tokens[3])
  ((done,),) = engine.generate([dataclasses.replace(greedy, stop_strings=(stop,))])
  first = next(i for i in range(len(free.tokens)) if stop in detokenize(free.tokens[: i + 1]))
  assert done.tokens == free.tokens[: first + 1] and done.finish_reason == "stop"


@pytest.mark.parametrize(
  "request_, match",
  [(Request(prompt=[1] * 120, max_new_tokens=10), r"Request 0: the prompt \(120 tokens\) \+ "
                                                   r"max_new_tokens=10 exceeds .* max_seq_len=128"),
   (Request(prompt=[1, 2], max_new_tokens=0), "Request 0: max_new_tokens=0; expected >= 1"),
   (Request(prompt=[1, 2], stop_ids=(300,)), r"Request 0: stop_ids has id 300 outside .*256"),
   (Request(prompt=[], max_new_tokens=3), "Request 0: the prompt is empty"),
   (Request(prompt=[1, 2], stop_strings=("x",)), "stop_strings need the engine's `detokenize`"),
   (Request(prompt=[1] * 60, max_new_tokens=60, num_samples=4),
    "Request 0: its 4 samples need 40 pages; the pool has 31")],
)  # fmt: skip
def test_bad_requests_are_named_with_their_limit(params, request_, match):
  with pytest.raises(ValueError, match=match):
    Engine(CFG, params, SMALL).generate([request_])


def test_a_pool_too_small_for_one_sequence_is_refused(params):
  with pytest.raises(ValueError, match=r"num_pages=8 cannot hold one sequence of max_seq_len=128"):
    Engine(CFG, params, EngineConfig(page_size=16, num_pages=8))


def test_a_kept_sample_continues_without_prefilling_it_again(params):
  """Multi-turn: a kept sample extended with new tokens (a tool's output, the next turn)
  generates what one request of the whole conversation generates, and only the new tokens
  (and the last generated one) are prefilled."""
  engine = Engine(CFG, params, SMALL)
  greedy = SamplingConfig(0.0)
  ((first,),) = engine.generate([Request(prompt=PROMPTS[3], max_new_tokens=6, sampling=greedy,
                                         keep=True)])  # fmt: skip
  turn = [11, 12, 13, 14, 15]
  before = engine.prefilled_tokens
  ((second,),) = engine.generate([Request(prompt=turn, max_new_tokens=6, sampling=greedy,
                                          continues=first.handle)])  # fmt: skip
  assert engine.prefilled_tokens - before == len(turn)  # the last generated token + turn[:-1]
  whole = PROMPTS[3] + first.tokens + turn
  ((fresh,),) = engine.generate([Request(prompt=whole, max_new_tokens=6, sampling=greedy)])
  assert second.tokens == fresh.tokens
  np.testing.assert_allclose(second.model_logprobs, fresh.model_logprobs, atol=1e-6)
  assert not engine.kept and len(engine.pool.free) == SMALL.num_pages - 1  # the handle is used
  with pytest.raises(ValueError, match=f"continues={first.handle}, not a kept sample's handle"):
    engine.generate([Request(prompt=turn, continues=first.handle)])
  # A kept sample nobody continues gives its pages back on release.
  ((kept,),) = engine.generate([Request(prompt=PROMPTS[0], max_new_tokens=3, keep=True)])
  assert len(engine.pool.free) < SMALL.num_pages - 1
  whole_pool = Request(prompt=[1] * 9, max_new_tokens=120, num_samples=2)  # all 31 pages
  with pytest.raises(ValueError, match=r"Request 0: its samples need 31 pages; 30 are free, 1 "):
    engine.generate([whole_pool])
  twice = [Request(prompt=turn, continues=kept.handle)] * 2
  with pytest.raises(ValueError, match=rf"two requests continue the same kept .*{kept.handle}"):
    engine.generate(twice)
  engine.release(kept.handle)
  assert len(engine.pool.free) == SMALL.num_pages - 1


def test_on_a_mesh_it_reads_the_sharded_weights_and_samples_the_same(params):
  """fsdp = 4 × tensor = 2: the engine reads the training mesh's weights where they are and
  samples what one device samples."""
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  sharded = jax.device_put(params, sharding.param_shardings(CFG, mesh))
  batch = requests(SamplingConfig(temperature=1.0, top_p=0.9), 2, jax.random.key(8))[:3]
  one = Engine(CFG, params, SMALL).generate(batch)
  engine = Engine(CFG, sharded, SMALL, mesh=mesh)
  many = engine.generate(batch)
  assert engine.kv.sharding.spec[3] == "tensor"  # the pool split over the 2 kv heads
  for a, b in zip(one, many, strict=True):
    for x, y in zip(a, b, strict=True):
      assert x.tokens == y.tokens
      np.testing.assert_allclose(x.model_logprobs, y.model_logprobs, atol=1e-5)


# --------------------------------------------------------------------------- paged kernels


def paged_step_inputs(t=4, h=128, page_size=8, width=4):
  """A [3, t] step over a random pool: a row prefilling t tokens after 5 cached, one with 2
  real tokens then padding after 11, one decoding its first token; masks as
  `Llama.paged_hidden_states` builds them."""
  rng = np.random.default_rng(0)
  n, k = 4, 2
  pages = jnp.asarray(rng.normal(size=(12, page_size, 2 * k, h)), jnp.float32)
  q = jnp.asarray(rng.normal(size=(3, t, n, h)), jnp.float32)
  table = jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 0], [8, 9, 0, 0]], jnp.int32)[:, :width]
  lengths = jnp.asarray([5, 11, 0], jnp.int32)
  real = np.asarray([t, 2, 1])
  valid = np.arange(t)[None, :] < real[:, None]
  positions = np.asarray(lengths)[:, None] + np.arange(t)[None, :]
  keys = np.arange(width * page_size)
  mask = (keys[None, None, :] <= positions[:, :, None]) & valid[:, :, None]
  return q, pages, table, lengths, jnp.asarray(mask), valid


def test_the_ragged_kernels_arguments_give_the_xla_paged_attention():
  """TPU's ragged paged attention, fed what `attention._paged_ragged` feeds it, computes the
  XLA path's attention at every real query. Checked through the kernel's own reference
  (`ref_ragged_paged_attention`): in jax 0.10's TPU interpreter the kernel itself stops at a
  reshaped DMA buffer (`ReshapeTransform ... has no attribute 'indices'`), so it cannot run
  on a CPU; `test_the_engine_compiles_ragged_paged_attention_for_a_tpu` compiles it."""
  from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as ragged

  from llama_jax.model import attention

  q, pages, table, lengths, mask, valid = paged_step_inputs()
  ours = attention.paged_attention("xla", q, pages, table, lengths, mask)
  flat, kv_lens, cu_q_lens, num_seqs = attention.ragged_arguments(q, table, lengths)
  theirs = ragged.ref_ragged_paged_attention(
    flat, pages, kv_lens, table, cu_q_lens, num_seqs, sm_scale=q.shape[-1] ** -0.5
  ).reshape(q.shape)
  scale = float(jnp.abs(ours).max())
  np.testing.assert_allclose(np.asarray(theirs)[valid], np.asarray(ours)[valid],
                             atol=1e-6 * scale, rtol=1e-5)  # fmt: skip


def test_the_engine_compiles_ragged_paged_attention_for_a_tpu():
  """Ahead of time, for a v5p-8 this host does not have: a prefill and a decode step of the
  engine with the Mosaic kernel (bfloat16 pages, head_dim 128, tensor-parallel kv heads)."""
  pytest.importorskip("libtpu", reason="TPU descriptions need libtpu: pip install 'jax[tpu]'")
  import functools

  from llama_jax.generation import engine as engine_lib
  from llama_jax.parallel.topologies import get_topology

  mesh = sharding.make_mesh(devices=get_topology("v5p-8").devices(), fsdp=2, tensor=2)
  config = dataclasses.replace(CFG, head_dim=128, dtype="bfloat16")
  model = Llama(config)
  params = sharding.abstract_sharded_params(model, mesh)
  pool = engine_lib.page_shardings(model, mesh)
  kv = jax.ShapeDtypeStruct((2, 64, 16, 4, 128), jnp.bfloat16, sharding=pool)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  step = jax.jit(
    functools.partial(engine_lib._step, model, mesh, "ragged_paged"),
    in_shardings=(sharding.param_shardings(model, mesh), pool) + (replicated,) * 9,
    out_shardings=(pool,) + (replicated,) * 3,
  )
  for rows, t in ((4, 32), (8, 1)):  # a prefill chunk, a decode step
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
    args = (params, kv, i32(rows, t), i32(rows, t), i32(rows, 4), i32(rows),
            jax.ShapeDtypeStruct((rows, 2), jnp.uint32), i32(rows),
            jax.ShapeDtypeStruct((rows,), jnp.float32), i32(rows),
            jax.ShapeDtypeStruct((rows,), jnp.float32))  # fmt: skip
    lowered = step.lower(*args)
    assert "tpu_custom_call" in lowered.as_text()  # the Mosaic kernel, not XLA attention
    lowered.compile()


def test_paged_kernels_are_checked_against_the_model_and_the_devices():
  from llama_jax.model.attention import check_paged_kernel

  assert check_paged_kernel("auto", 128, "tpu") == "ragged_paged"
  assert check_paged_kernel("auto", 64, "tpu") == "xla"  # the kernel's lanes want 128
  assert check_paged_kernel("auto", 128, "gpu") == check_paged_kernel("auto", 128, "cpu") == "xla"
  with pytest.raises(ValueError, match="'ragged_paged'.*runs on \\('tpu',\\), not on 'cpu'"):
    Engine(dataclasses.replace(CFG, head_dim=128), None, EngineConfig(attention="ragged_paged"))
  with pytest.raises(ValueError, match="needs head_dim a multiple of 128; the model has 16"):
    check_paged_kernel("ragged_paged", 16, "tpu")
  with pytest.raises(ValueError, match="'flash': unknown"):
    check_paged_kernel("flash", 16, "cpu")
