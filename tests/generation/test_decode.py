"""Generation against transformers, against teacher forcing, and against itself.

Compiled decoders are the expensive part on CPU, so module-scoped fixtures generate once per
(model, GenerationConfig) and several tests read the same outputs.
"""

import dataclasses

import jax
import numpy as np
import pytest

from llama_jax import KVCache
from llama_jax.checkpoint import load_hf_checkpoint
from llama_jax.generation import (
  GenerationConfig,
  SamplingConfig,
  bucket_length,
  generate_tokens,
  make_decode_fn,
  pad_prompts,
  sample,
  sample_keys,
  sampling_logits,
)
from llama_jax.parallel import sharding
from llama_jax.testing import apply, save_hf_tiny

PARITY_TOL = 1e-4
NEW_TOKENS = 32
PROMPT_LENGTHS = (5, 11, 3, 8)
PAD = 0


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """name -> (torch model, our config, our params, HF dir) for Llama 2- and 3-style models."""
  out = {}
  for name in ("llama2_mha", "llama3_gqa"):
    path = tmp_path_factory.mktemp(name)
    hf = save_hf_tiny(name, path)
    out[name] = (hf, *load_hf_checkpoint(path), path)
  return out


def make_prompts(lengths, vocab, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(3, vocab, n).tolist() for n in lengths]


def hf_greedy(model, prompts, new_tokens, stop_ids):
  """transformers greedy `generate` with a KV cache on left-padded prompts: [B, new_tokens]
  ids (pad after a stop id) and the log-softmax of each step's logits [B, new_tokens, V]."""
  import torch

  tokens, segments = pad_prompts(prompts, max(map(len, prompts)), PAD)
  model.generation_config.eos_token_id = list(stop_ids) or None
  model.generation_config.pad_token_id = PAD
  threads = torch.get_num_threads()
  # One thread: torch's spinning OpenMP workers and XLA's CPU threads slow each other down
  # ~100× on a 2-core machine, and a tiny model gains nothing from a second thread.
  torch.set_num_threads(1)
  try:
    with torch.no_grad():
      out = model.generate(
        torch.as_tensor(tokens, dtype=torch.long),
        attention_mask=torch.as_tensor(segments, dtype=torch.long),
        max_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
        return_dict_in_generate=True,
        output_logits=True,
      )
  finally:
    torch.set_num_threads(threads)
  ids = out.sequences[:, tokens.shape[1] :].numpy()
  logprobs = torch.log_softmax(torch.stack(out.logits, 1).float(), -1).numpy()
  pad = new_tokens - ids.shape[1]  # transformers stops early once every row is done
  return np.pad(ids, ((0, 0), (0, pad)), constant_values=PAD), logprobs


def rarest_stop_id(ref):
  """A token of row 0 (positions 8–20, first occurrence) found in the fewest other rows, so
  that row 0 stops mid-way while most other rows decode all their tokens."""
  candidates = [t for i, t in enumerate(ref[0, 8:20], 8) if t not in ref[0, :i]]
  return int(min(candidates, key=lambda t: sum(t in row for row in ref[1:])))


@pytest.fixture(scope="module", params=["llama2_mha", "llama3_gqa"])
def greedy_run(request, models):
  """Our greedy decoding vs transformers' on the same left-padded prompts, with a stop id."""
  hf, config, params, path = models[request.param]
  prompts = make_prompts(PROMPT_LENGTHS, config.vocab_size)
  free, _ = hf_greedy(hf, prompts, NEW_TOKENS, ())
  stop = rarest_stop_id(free)
  ref, ref_logprobs = hf_greedy(hf, prompts, NEW_TOKENS, (stop,))
  gen = GenerationConfig(
    max_new_tokens=NEW_TOKENS, sampling=SamplingConfig(temperature=0.0), stop_ids=(stop,)
  )
  out = jax.device_get(generate_tokens(config, params, prompts, 0, gen))
  return dict(
    name=request.param, config=config, params=params, prompts=prompts, gen=gen, out=out,
    free=free, ref=ref, ref_logprobs=ref_logprobs, stop=stop, path=path,
  )  # fmt: skip


def test_greedy_matches_transformers(greedy_run):
  r = greedy_run
  tokens = r["out"].tokens[:, 0]
  np.testing.assert_array_equal(tokens, r["ref"])
  # Rows that never met the stop id decoded all 32 tokens, equal to an unstopped run.
  full = [b for b in range(len(tokens)) if r["stop"] not in r["free"][b]]
  assert full, "every row stopped; pick prompts that leave some row running"
  np.testing.assert_array_equal(tokens[full], r["free"][full])
  # The unmodified model's log-probs of the chosen tokens equal transformers' logits.
  mask = r["out"].mask[:, 0].astype(bool)
  ref_lp = np.take_along_axis(r["ref_logprobs"], r["ref"][..., None], -1)[..., 0]
  ours_lp = r["out"].model_logprobs[:, 0]
  np.testing.assert_allclose(ours_lp[mask], ref_lp[:, : mask.shape[1]][mask], atol=PARITY_TOL)
  assert (r["out"].logprobs == 0).all()  # greedy samples from a point mass


def test_stop_id_ends_the_sequence_and_sets_the_mask(greedy_run):
  r = greedy_run
  tokens, mask = r["out"].tokens[:, 0], r["out"].mask[:, 0]
  for b in range(len(tokens)):
    hits = np.flatnonzero(tokens[b] == r["stop"])
    length = hits[0] + 1 if len(hits) else NEW_TOKENS
    np.testing.assert_array_equal(mask[b], np.arange(NEW_TOKENS) < length)
    assert (tokens[b, length:] == PAD).all()
    assert (r["out"].model_logprobs[b, 0, length:] == 0).all()
    assert (r["out"].model_logprobs[b, 0, :length] < 0).all()
  assert 0 < mask[0].sum() < NEW_TOKENS  # row 0 stopped mid-way
  assert int(r["out"].steps) == NEW_TOKENS  # other rows kept the loop running


def test_scanned_layers_decode_the_same(greedy_run):
  """`scan_layers=True` (the large presets) carries both cache parts through `nn.scan`."""
  r = greedy_run
  config, params = load_hf_checkpoint(r["path"], scan_layers=True)
  out = generate_tokens(config, params, r["prompts"], 0, r["gen"])
  np.testing.assert_array_equal(out.tokens, r["out"].tokens)
  np.testing.assert_allclose(out.model_logprobs, r["out"].model_logprobs, atol=1e-5, rtol=1e-5)


def test_prompt_lengths_in_one_bucket_reuse_the_compiled_function(greedy_run):
  r = greedy_run
  fn = make_decode_fn(r["config"], r["gen"])
  assert fn._cache_size() == 1  # the fixture's call: longest prompt 11 -> bucket 16
  for lengths in [(14, 2, 9, 16), (1, 1, 1, 1)]:
    out = generate_tokens(r["config"], r["params"], make_prompts(lengths, 256), 0, r["gen"])
    assert out.tokens.shape == (4, 1, NEW_TOKENS)
    assert fn._cache_size() == 1


def test_bucket_length():
  assert [bucket_length(n) for n in (1, 5, 16, 17, 100)] == [16, 16, 16, 32, 128]
  assert [bucket_length(n, 64) for n in (1, 64, 65)] == [64, 64, 128]


# --------------------------------------------------------------------------- sampling

SAMPLES = 4
SAMPLE_TOKENS = 24
SAMPLING = {
  # Half the vocabulary stops: every row ends early, so the loop must exit before N.
  "top_k": (SamplingConfig(temperature=1.0, top_k=5), tuple(range(0, 256, 2))),
  "top_k_top_p": (SamplingConfig(temperature=1.3, top_k=40, top_p=0.8), tuple(range(0, 256, 16))),
}
_SAMPLED = {}


def run_sampling(models, name):
  """K=4 samples of 4 prompts with one sampling rule (memoized), and teacher-forced logits
  [B, K, N, V] of each (prompt + response) from a plain forward pass."""
  if name in _SAMPLED:
    return _SAMPLED[name]
  _, config, params, _ = models["llama3_gqa"]
  sampling, stop_ids = SAMPLING[name]
  gen = GenerationConfig(
    max_new_tokens=SAMPLE_TOKENS, num_samples=SAMPLES, sampling=sampling, stop_ids=stop_ids
  )
  prompts = make_prompts(PROMPT_LENGTHS, config.vocab_size, seed=1)
  out = jax.device_get(generate_tokens(config, params, prompts, jax.random.key(3), gen))
  seqs = [
    p + out.tokens[b, r][out.mask[b, r] == 1].tolist()
    for b, p in enumerate(prompts)
    for r in range(SAMPLES)
  ]
  width = max(map(len, seqs))
  tokens = np.zeros((len(seqs), width), np.int32)
  segments = np.zeros_like(tokens)
  for i, s in enumerate(seqs):
    tokens[i, : len(s)], segments[i, : len(s)] = s, 1
  logits = np.asarray(apply(config, params, tokens, segment_ids=segments))
  # The logits predicting response token j of sample (b, r) sit at len(prompt) - 1 + j.
  forced = np.zeros((len(prompts), SAMPLES, SAMPLE_TOKENS, config.vocab_size), np.float32)
  for b, p in enumerate(prompts):
    for r in range(SAMPLES):
      n = int(out.mask[b, r].sum())
      forced[b, r, :n] = logits[b * SAMPLES + r, len(p) - 1 : len(p) - 1 + n]
  _SAMPLED[name] = dict(
    name=name, config=config, params=params, gen=gen, prompts=prompts, out=out, forced=forced
  )
  return _SAMPLED[name]


@pytest.fixture(scope="module", params=sorted(SAMPLING))
def sampled(request, models):
  return run_sampling(models, request.param)


@pytest.fixture(scope="module")
def sampled_both(models):
  return run_sampling(models, "top_k_top_p")


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sampled_logprobs_equal_teacher_forcing(sampled):
  out, forced, mask = sampled["out"], sampled["forced"], sampled["out"].mask.astype(bool)
  assert mask.sum() > 20
  take = lambda lp: np.take_along_axis(lp, out.tokens[..., None], -1)[..., 0]
  model_lp = take(_log_softmax(forced.astype(np.float64)))
  np.testing.assert_allclose(out.model_logprobs[mask], model_lp[mask], atol=PARITY_TOL)
  warped = np.asarray(
    sampling_logits(forced.reshape(-1, forced.shape[-1]), sampled["gen"].sampling)
  ).reshape(forced.shape)
  sample_lp = take(jax.nn.log_softmax(warped, axis=-1))
  np.testing.assert_allclose(out.logprobs[mask], sample_lp[mask], atol=PARITY_TOL)
  # Truncation renormalizes: the sampling distribution gives its tokens more mass.
  assert (out.logprobs[mask] > out.model_logprobs[mask]).mean() > 0.9


def allowed_tokens(logits, sampling):
  """Reference in numpy: bool [V], the tokens top-k then top-p may emit (float64)."""
  x = logits.astype(np.float64) / sampling.temperature
  keep = np.ones(x.shape, bool)
  if sampling.top_k:
    keep &= x >= np.sort(x)[-sampling.top_k] - 1e-6
  if sampling.top_p < 1:
    masked = np.where(keep, x, -np.inf)
    order = np.argsort(-masked)
    probs = np.exp(_log_softmax(masked))[order]
    inside = order[np.cumsum(probs) - probs < sampling.top_p + 1e-6]
    keep &= np.isin(np.arange(len(x)), inside)
  return keep


def test_top_k_top_p_emit_only_allowed_tokens(sampled):
  out, forced, sampling = sampled["out"], sampled["forced"], sampled["gen"].sampling
  sizes = []
  for b, r, j in zip(*np.nonzero(out.mask), strict=True):
    keep = allowed_tokens(forced[b, r, j], sampling)
    assert keep[out.tokens[b, r, j]], (b, r, j)
    sizes.append(keep.sum())
  assert np.mean(sizes) < 0.5 * sampled["config"].vocab_size  # truncation did something


def test_early_exit_and_stop_ids(sampled):
  out, stop_ids = sampled["out"], sampled["gen"].stop_ids
  lengths = out.mask.sum(-1)
  assert int(out.steps) == lengths.max()
  ended = np.isin(out.tokens[..., -1:], stop_ids)[..., 0] | (lengths < SAMPLE_TOKENS)
  for b, r in zip(*np.nonzero(ended), strict=True):  # ended rows end with their first stop id
    n = lengths[b, r]
    assert out.tokens[b, r, n - 1] in stop_ids
    assert not np.isin(out.tokens[b, r, : n - 1], stop_ids).any()
    assert (out.tokens[b, r, n:] == PAD).all() and (out.logprobs[b, r, n:] == 0).all()
  if sampled["name"] == "top_k":
    assert int(out.steps) < SAMPLE_TOKENS  # every row stopped, so the loop exited early


def test_fixed_seed_reproduces(sampled_both):
  sampled = sampled_both
  args = sampled["config"], sampled["params"], sampled["prompts"]
  again = generate_tokens(*args, jax.random.key(3), sampled["gen"])
  np.testing.assert_array_equal(again.tokens, sampled["out"].tokens)
  np.testing.assert_array_equal(again.logprobs, sampled["out"].logprobs)
  other = generate_tokens(*args, jax.random.key(4), sampled["gen"])
  assert (np.asarray(other.tokens) != sampled["out"].tokens).mean() > 0.3
  # The K samples of a prompt differ from each other.
  assert (sampled["out"].tokens[:, 0] != sampled["out"].tokens[:, 1]).any()


def test_shared_prefix_equals_independent_runs(sampled_both):
  """K samples on one prefilled prompt == K separate single-sample runs with the same keys."""
  sampled = sampled_both
  config, params, prompts, gen = (sampled[k] for k in ("config", "params", "prompts", "gen"))
  keys = sample_keys(jax.random.key(3), len(prompts), SAMPLES)
  single = dataclasses.replace(gen, num_samples=1)
  for r in range(SAMPLES):
    alone = generate_tokens(config, params, prompts, keys[:, r : r + 1], single)
    np.testing.assert_array_equal(alone.tokens[:, 0], sampled["out"].tokens[:, r])
    np.testing.assert_allclose(
      alone.logprobs[:, 0], sampled["out"].logprobs[:, r], atol=1e-5, rtol=1e-5
    )
    np.testing.assert_allclose(
      alone.model_logprobs[:, 0], sampled["out"].model_logprobs[:, r], atol=1e-5, rtol=1e-5
    )


def test_prompt_cache_is_not_repeated_per_sample(sampled_both):
  """The compiled decoder holds one prompt cache row per prompt, not one per sample."""
  sampled = sampled_both
  config, gen = sampled["config"], sampled["gen"]
  fn = make_decode_fn(config, gen)
  b, p = len(sampled["prompts"]), bucket_length(max(PROMPT_LENGTHS))
  shapes = jax.eval_shape(
    fn,
    sampled["params"],
    jax.ShapeDtypeStruct((b, p), np.int32),
    jax.ShapeDtypeStruct((b, p), np.int32),
    sample_keys(jax.random.key(0), b, SAMPLES),
    KVCache.init(config, b, p),
    KVCache.init(config, b * SAMPLES, gen.max_new_tokens),
  )
  _, prompt_cache, sample_cache = shapes
  assert prompt_cache.k.shape[1:3] == (b, p)
  assert sample_cache.k.shape[1:3] == (b * SAMPLES, gen.max_new_tokens)


def test_decode_loop_updates_the_cache_in_place(sampled_both):
  """No copy of the sample cache in the compiled program: layers write their new keys and
  values before reading the cache (the other order makes XLA copy it every step)."""
  config, gen = sampled_both["config"], sampled_both["gen"]
  b, p = len(sampled_both["prompts"]), bucket_length(max(PROMPT_LENGTHS))
  args = (
    sampled_both["params"],
    np.zeros((b, p), np.int32),
    np.ones((b, p), np.int32),
    sample_keys(jax.random.key(0), b, SAMPLES),
    KVCache.init(config, b, p),
    KVCache.init(config, b * SAMPLES, gen.max_new_tokens),
  )
  hlo = make_decode_fn(config, gen).lower(*args).compile().as_text()
  cache = args[-1].k
  shape = f"f32[{','.join(map(str, cache.shape))}]"
  assert f"{shape}" in hlo
  copies = [line for line in hlo.splitlines() if " copy(" in line and shape in line]
  assert not copies, copies


def test_sharded_generation_equals_single_device(sampled_both):
  """tensor=2 × data=4 over 8 devices == one device; 3 prompts also exercise batch padding."""
  sampled = sampled_both
  config, params, gen = sampled["config"], sampled["params"], sampled["gen"]
  mesh = sharding.make_mesh(data=4, fsdp=1, tensor=2)
  sharded_params = jax.device_put(params, sharding.param_shardings(config, mesh))
  out = generate_tokens(
    config, sharded_params, sampled["prompts"][:3], jax.random.key(3), gen, mesh=mesh
  )
  ref = sampled["out"]
  assert out.tokens.shape == (3, SAMPLES, SAMPLE_TOKENS)
  np.testing.assert_array_equal(out.tokens, ref.tokens[:3])
  np.testing.assert_array_equal(out.mask, ref.mask[:3])
  np.testing.assert_allclose(out.logprobs, ref.logprobs[:3], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out.model_logprobs, ref.model_logprobs[:3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
  "sampling",
  [
    SamplingConfig(temperature=0.7, top_k=3),
    SamplingConfig(temperature=1.0, top_p=0.5),  # (temperature 1: see the last assert)
    SamplingConfig(temperature=2.0, top_k=50, top_p=0.7),
  ],
  ids=["top_k", "top_p", "top_k_top_p"],
)
def test_sample_stays_in_the_allowed_set(sampling):
  """Each truncation path of `sampling_logits`, many rows of random logits at once."""
  rng = np.random.RandomState(0)
  logits = (rng.randn(512, 200) * rng.uniform(0.3, 3, (512, 1))).astype(np.float32)
  keys = jax.random.split(jax.random.key(1), 512)
  tokens, logprobs, model_logprobs = map(np.asarray, sample(keys, logits, sampling))
  sizes = []
  for row, token in zip(logits, tokens, strict=True):
    keep = allowed_tokens(row, sampling)
    assert keep[token]
    sizes.append(keep.sum())
  assert 1 < np.mean(sizes) < 100
  np.testing.assert_allclose(
    model_logprobs, np.take_along_axis(_log_softmax(logits), tokens[:, None], 1)[:, 0],
    atol=1e-5, rtol=1e-5,
  )
  if sampling.temperature == 1:  # truncation alone only moves mass onto the kept tokens
    assert (logprobs >= model_logprobs - 1e-6).all()


def test_temperature_to_zero_equals_greedy():
  rng = np.random.RandomState(0)
  logits = rng.randn(256, 300).astype(np.float32)
  keys = jax.random.split(jax.random.key(0), 256)
  cold, _, cold_model = sample(keys, logits, SamplingConfig(temperature=1e-5))
  greedy, greedy_lp, greedy_model = sample(keys, logits, SamplingConfig(temperature=0.0))
  np.testing.assert_array_equal(cold, logits.argmax(-1))
  np.testing.assert_array_equal(greedy, logits.argmax(-1))
  np.testing.assert_array_equal(cold_model, greedy_model)
  assert (np.asarray(greedy_lp) == 0).all()
  # Near 0 but not 0 it still samples: a flat distribution spreads over many tokens.
  hot, _, _ = sample(keys, np.zeros_like(logits), SamplingConfig(temperature=1e-5))
  assert len(np.unique(hot)) > 100


# --------------------------------------------------------------------------- model support


def test_shared_prefix_attention_equals_a_repeated_cache(models):
  """`Llama(prefix=...)`: R rows attending to one prefix row == each row holding a copy."""
  _, config, params, _ = models["llama3_gqa"]
  r, b, p = 3, 2, 7
  rng = np.random.RandomState(0)
  prompt = rng.randint(1, config.vocab_size, (b, p))
  segments = np.ones((b, p), np.int32)
  segments[1, :3] = 0  # a left-padded shorter prompt
  new = rng.randint(1, config.vocab_size, (b * r, 2))
  _, prefix = apply(config, params, prompt, segment_ids=segments, cache=KVCache.init(config, b, p))
  shared, _ = apply(config, params, new, cache=KVCache.init(config, b * r, 4), prefix=prefix)
  copies = jax.tree.map(lambda x: np.repeat(x, r, axis=0) if x.ndim else x, prefix)
  copies = copies.replace(
    k=np.repeat(prefix.k, r, axis=1), v=np.repeat(prefix.v, r, axis=1)
  )  # k, v are [L, B, S, K, H]: rows on axis 1
  big = KVCache.init(config, b * r, p + 4)
  big = big.write(copies.k, copies.v, copies.segment_ids)
  repeated, _ = apply(config, params, new, cache=big)
  # Logit rounding scales with the largest logit: the tolerance does too.
  np.testing.assert_allclose(shared, repeated, atol=1e-5 * np.abs(repeated).max(), rtol=0)
  # ... and both equal a plain forward pass over prompt + new tokens.
  for row in range(b * r):
    real = prompt[row // r][segments[row // r] == 1]
    full = apply(config, params, np.concatenate([real, new[row]])[None])
    np.testing.assert_allclose(shared[row], full[0, -2:], atol=1e-5 * np.abs(full).max(), rtol=0)


def test_prefill_into_a_fresh_cache_equals_a_larger_cache(models):
  """A cache exactly as long as the prompt (a prefill) is attended as without a cache."""
  _, config, params, _ = models["llama2_mha"]
  tokens = np.random.RandomState(1).randint(1, config.vocab_size, (2, 6))
  segments = np.array([[1] * 6, [0, 0, 1, 1, 1, 1]], np.int32)
  exact_logits, exact = apply(
    config, params, tokens, segment_ids=segments, cache=KVCache.init(config, 2, 6)
  )
  roomy_logits, roomy = apply(
    config, params, tokens, segment_ids=segments, cache=KVCache.init(config, 2, 9)
  )
  real = segments == 1  # padding rows see other padding differently, and are never read
  np.testing.assert_allclose(exact_logits[real], roomy_logits[real], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(exact.k[:, real], roomy.k[:, :, :6][:, real], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(exact.v[:, real], roomy.v[:, :, :6][:, real], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(exact.segment_ids, roomy.segment_ids[:, :6])
  assert int(exact.index) == 6
  # The prefill takes the cache-free attention path, cuDNN's on GPU ("dot_product" here).
  flash = config.replace(attention_impl="dot_product")
  flash_logits, flash_cache = apply(
    flash, params, tokens, segment_ids=segments, cache=KVCache.init(config, 2, 6)
  )
  np.testing.assert_allclose(flash_logits[real], exact_logits[real], atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(flash_cache.k[:, real], exact.k[:, real], atol=1e-5, rtol=1e-5)


def test_prefix_misuse_fails_loudly(models):
  _, config, params, _ = models["llama3_gqa"]
  prefix = KVCache.init(config, 2, 4)
  with pytest.raises(ValueError, match="needs a `cache`"):
    apply(config, params, np.ones((4, 1), np.int32), prefix=prefix)
  with pytest.raises(ValueError, match="3 rows of tokens cannot share a prefix of 2 rows"):
    apply(config, params, np.ones((3, 1), np.int32), cache=KVCache.init(config, 3, 2),
          prefix=prefix)  # fmt: skip


# --------------------------------------------------------------------------- validation


def test_bad_inputs_fail_loudly(models):
  _, config, params, _ = models["llama3_gqa"]
  gen = GenerationConfig(max_new_tokens=4)
  with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
    generate_tokens(config, params, [[1, 2], []], 0, gen)
  with pytest.raises(ValueError, match=r"id 256 outside the vocabulary \[0, 256\)"):
    generate_tokens(config, params, [[1, 256]], 0, gen)
  with pytest.raises(ValueError, match="exceeds the model's max_seq_len=512"):
    generate_tokens(config, params, [[1] * 510], 0, gen)
  with pytest.raises(ValueError, match=r"keys of shape \(2, 1\); expected \(1, 1\)"):
    generate_tokens(config, params, [[1]], jax.random.split(jax.random.key(0), (2, 1)), gen)
  with pytest.raises(ValueError, match="top_p=0"):
    SamplingConfig(top_p=0.0)
  with pytest.raises(ValueError, match="num_samples=0"):
    GenerationConfig(num_samples=0)
  assert GenerationConfig(stop_ids=frozenset({9, 2})).stop_ids == (2, 9)
