"""The Llama module against `transformers` and against itself (packing, padding, cache)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import KVCache, LlamaConfig
from llama_jax.checkpoint import load_hf_checkpoint
from llama_jax.model.llama import llama3_scale_frequencies, rope_inv_frequencies
from llama_jax.parallel.sharding import init_params
from llama_jax.testing import HF_TINY, apply, hf_logits, save_hf_tiny

PARITY_TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(HF_TINY))
def hf_pair(request, tmp_path_factory):
  """(name, torch model, our config, our params) for each tiny HF variant."""
  path = tmp_path_factory.mktemp(request.param)
  model = save_hf_tiny(request.param, path)
  config, params = load_hf_checkpoint(path)
  return request.param, model, config, params, path


def test_logits_match_transformers(hf_pair):
  name, model, config, params, _ = hf_pair
  # 200 tokens: beyond the original context (64) of the scaled-RoPE variants.
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 200))
  ref = hf_logits(model, tokens)
  ours = np.asarray(apply(config, params, tokens))
  err = np.abs(ours - ref).max()
  print(f"\n{name}: max |Δlogit| = {err:.2e} (logit std {ref.std():.2f})")
  assert ref.std() > 0.3  # the comparison is not between near-zero numbers
  assert err <= PARITY_TOL


def test_variants_exercise_the_features(hf_pair):
  name, _, config, params, _ = hf_pair
  assert (config.num_kv_heads < config.num_heads) == (name != "llama2_mha")
  assert (config.rope_scaling is not None) == name.startswith(("llama3p1", "llama3p2"))
  assert ("lm_head" not in params) == config.tie_embeddings == (name == "llama3p2_tied")


def test_scanned_layers_and_remat_match(hf_pair):
  _, model, config, params, path = hf_pair
  tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 16))
  ref = hf_logits(model, tokens)
  for overrides in (dict(scan_layers=True), dict(scan_layers=True, remat_policy="full"),
                    dict(remat_policy="dots")):
    cfg, p = load_hf_checkpoint(path, **overrides)
    out = np.asarray(apply(cfg, p, tokens))
    assert np.abs(out - ref).max() <= PARITY_TOL, overrides


def test_llama3_rope_scaling_bands():
  """The three bands of the "llama3" rule, checked on single frequencies by hand."""
  from llama_jax.model.config import RopeScaling

  s = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                  original_max_position_embeddings=8192)
  high, low = 2 * np.pi / 100.0, 2 * np.pi / 10000.0  # λ=100 < 2048 ; λ=10000 > 8192
  mid_wavelen = 4096.0
  mid = 2 * np.pi / mid_wavelen
  blend = (8192 / mid_wavelen - 1) / (4 - 1)
  out = llama3_scale_frequencies(np.array([high, low, mid]), s)
  np.testing.assert_allclose(out, [high, low / 8, (1 - blend) * mid / 8 + blend * mid])
  assert rope_inv_frequencies(128, 5e5, s).shape == (64,)


def _tiny(**kw):
  config = LlamaConfig.preset("tiny", **kw)
  return config, init_params(config, jax.random.key(0))


def test_packed_documents_equal_separate_runs():
  config, params = _tiny()
  rng = np.random.RandomState(0)
  lengths = [5, 9, 3]
  docs = [rng.randint(0, config.vocab_size, n) for n in lengths]
  row = np.concatenate(docs + [np.zeros(3, int)])[None]  # 3 padding tokens at the end
  segments = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(3)])
  packed = np.asarray(apply(config, params, row, segment_ids=segments[None]))
  start = 0
  for doc in docs:
    alone = np.asarray(apply(config, params, doc[None]))[0]
    np.testing.assert_allclose(packed[0, start:start + len(doc)], alone, atol=1e-5)
    start += len(doc)


def test_right_padding_does_not_change_real_tokens():
  config, params = _tiny()
  tokens = np.random.RandomState(0).randint(1, config.vocab_size, (1, 7))
  padded = np.concatenate([tokens, np.zeros((1, 5), int)], 1)
  segments = (np.arange(12) < 7).astype(np.int32)[None]
  a = apply(config, params, tokens)
  b = apply(config, params, padded, segment_ids=segments)
  np.testing.assert_allclose(b[:, :7], a, atol=1e-5)
  assert np.isfinite(np.asarray(b)).all()


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_decoding_equals_full_forward(scan):
  config, params = _tiny(scan_layers=scan)
  rng = np.random.RandomState(0)
  # Row 0 has a 6-token prompt, row 1 a 4-token prompt left-padded to 6.
  tokens = rng.randint(1, config.vocab_size, (2, 10))
  segments = np.ones((2, 10), np.int32)
  segments[1, :2] = 0
  cache = KVCache.init(config, batch_size=2, max_len=16)
  logits, cache = apply(config, params, tokens[:, :6], segment_ids=segments[:, :6],
                              cache=cache)
  steps = [logits]
  for t in range(6, 10):  # one token at a time
    step, cache = apply(config, params, tokens[:, t:t + 1], cache=cache)
    steps.append(step)
  decoded = np.concatenate(steps, axis=1)
  assert int(cache.index) == 10 and cache.lengths().tolist() == [10, 8]
  full0 = apply(config, params, tokens[:1])
  full1 = apply(config, params, tokens[1:, 2:])  # row 1 without its padding
  np.testing.assert_allclose(decoded[0], full0[0], atol=1e-5)
  np.testing.assert_allclose(decoded[1, 2:], full1[0], atol=1e-5)


def test_dot_product_attention_matches_xla():
  config, params = _tiny()
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (2, 12))
  segments = np.repeat([[1] * 5 + [2] * 7], 2, axis=0)
  ref = apply(config, params, tokens, segment_ids=segments)
  out = apply(config.replace(attention_impl="dot_product"), params, tokens, segment_ids=segments)
  np.testing.assert_allclose(out, ref, atol=1e-5)


BF16_TOL = 0.1  # max |Δlogit| of a bf16 forward vs float32, logits of std ~1


def test_bfloat16_forward_close_to_float32(hf_pair):
  _, _, config, params, path = hf_pair
  tokens = np.random.RandomState(2).randint(0, config.vocab_size, (2, 64))
  ref = np.asarray(apply(config, params, tokens))
  cfg16, p16 = load_hf_checkpoint(path, dtype="bfloat16")
  assert (cfg16.dtype, cfg16.param_dtype) == ("bfloat16", "bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(p16))
  out = apply(cfg16, p16, tokens)
  assert out.dtype == jnp.float32  # logits are upcast
  err = np.abs(np.asarray(out) - ref).max()
  print(f"\nbf16 vs f32: max |Δlogit| = {err:.3f}, logit std {ref.std():.2f}")
  assert err <= BF16_TOL
  # The argmax agrees almost everywhere.
  assert (np.asarray(out).argmax(-1) == ref.argmax(-1)).mean() > 0.95
