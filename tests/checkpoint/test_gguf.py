"""GGUF import: tiny synthetic files in every tensor type, the real SmolLM2-135M-Instruct
(Q4_1) against transformers' own GGUF loading, hand-decoded quant blocks, and refusals."""

import importlib.util
import math
import time

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from llama_jax.checkpoint import (
  CheckpointError,
  gguf_tokenizer_metadata,
  load_gguf_checkpoint,
  load_gguf_tokenizer,
)
from llama_jax.checkpoint.params import iter_hf_tensors
from llama_jax.model.config import RopeScaling
from llama_jax.parallel import sharding
from llama_jax.testing import HF_TINY, apply, hf_logits, smollm2_gguf_path, write_gguf

TOKENS = np.random.RandomState(0).randint(0, 256, (2, 24))
# Q4_K and Q6_K blocks hold 256 values, so the synthetic model's down_proj rows are 256 wide.
TINY = dict(HF_TINY["llama3_gqa"], intermediate_size=256)


def _tiny_model(seed=0, **overrides):
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**(TINY | overrides), initializer_range=0.1)
  model = transformers.LlamaForCausalLM(config).float().eval()
  with torch.no_grad():  # norms start at 1; perturb them so they are tested too
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.fixture(scope="module")
def tiny():
  return _tiny_model()


def _transformers_gguf(path):
  """transformers' own reading of the file (its dequantization and q/k un-permutation)."""
  pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate")
  return transformers.AutoModelForCausalLM.from_pretrained(
    str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _random_k_blocks(kind: str, rows: int, cols: int, seed=0) -> np.ndarray:
  """Random bytes laid out as Q4_K / Q6_K blocks, with the f16 scales set to small values so
  that the weights are O(0.1) (random scale bytes could be inf or NaN)."""
  block_bytes = {"Q4_K": 144, "Q6_K": 210}[kind]
  blocks = np.random.RandomState(seed).randint(0, 256, (rows, cols // 256, block_bytes))
  blocks = blocks.astype(np.uint8)
  if kind == "Q4_K":  # d, dmin (f16) lead the block
    blocks[..., 0:4] = np.array([2e-4, 2e-4], np.float16).view(np.uint8)
  else:  # ql[128], qh[64], scales[16] (int8), then d (f16)
    blocks[..., 208:210] = np.array([1e-4], np.float16).view(np.uint8)
  return blocks.reshape(rows, -1)


# --------------------------------------------------------------------------- synthetic files


@pytest.mark.parametrize("kind", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"])
def test_tiny_gguf_matches_transformers(tiny, tmp_path, kind):
  raw = None
  if kind in ("Q4_K", "Q6_K"):  # gguf cannot quantize these: write encoded bytes as given
    raw = {f"blk.{i}.ffn_down.weight": (_random_k_blocks(kind, 64, 256, i), kind)
           for i in range(2)}
  path = write_gguf(tmp_path / f"tiny-{kind}.gguf", tiny, "F32" if raw else kind,
                    raw_tensors=raw)
  config, params = load_gguf_checkpoint(path)
  ref = hf_logits(_transformers_gguf(path), TOKENS)
  np.testing.assert_allclose(np.asarray(apply(config, params, TOKENS)), ref, atol=1e-4)
  assert (config.num_layers, config.d_model, config.num_heads, config.num_kv_heads,
          config.head_dim, config.mlp_dim, config.vocab_size) == (2, 64, 4, 2, 16, 256, 256)
  assert (config.rope_theta, config.norm_eps, config.max_seq_len) == (5e5, 1e-5, 512)
  assert (config.bos_token_id, config.eos_token_id, config.tie_embeddings) == (1, 2, False)


def test_f32_gguf_gives_back_the_hf_weights(tiny, tmp_path):
  """Independent of transformers: writing as llama.cpp does (q/k rows interleaved) and
  loading must give back every HF tensor bit for bit, on a mesh."""
  path = write_gguf(tmp_path / "tiny.gguf", tiny)
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  config, params = load_gguf_checkpoint(path, mesh=mesh, scan_layers=True)
  assert params["layers"]["attn"]["q"].sharding.mesh == mesh
  state = tiny.state_dict()
  for name, array in iter_hf_tensors(config, params):
    np.testing.assert_array_equal(array, state[name].numpy(), err_msg=name)
  np.testing.assert_allclose(np.asarray(apply(config, params, TOKENS)), hf_logits(tiny, TOKENS),
                             atol=1e-4)


def test_dtype_is_anything_jnp_dtype_takes(tiny, tmp_path):
  path = write_gguf(tmp_path / "tiny.gguf", tiny, "Q8_0")
  config, params = load_gguf_checkpoint(path, dtype=jnp.bfloat16, compute_dtype=np.float32)
  assert (config.param_dtype, config.dtype) == ("bfloat16", "float32")
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}


def _f16(raw: np.ndarray) -> np.ndarray:
  return raw.copy().view(np.float16).astype(np.float32)


def _hand_dequantize(raw: np.ndarray, kind: str) -> np.ndarray:
  """ggml's block formats, decoded by hand (rows of uint8 -> rows of float32)."""
  rows = raw.shape[0]
  if kind == "Q8_0":  # 34 bytes: d (f16), 32 × int8; x = d·q
    b = raw.reshape(rows, -1, 34)
    return (_f16(b[..., :2]) * b[..., 2:].view(np.int8)).reshape(rows, -1)
  nibbles = lambda q: np.concatenate([q & 0xF, q >> 4], -1).astype(np.float32)  # lo: 0-15
  if kind == "Q4_0":  # 18 bytes: d, 16 bytes of nibbles; x = d·(q − 8)
    b = raw.reshape(rows, -1, 18)
    return (_f16(b[..., :2]) * (nibbles(b[..., 2:]) - 8)).reshape(rows, -1)
  if kind == "Q4_1":  # 20 bytes: d, m, 16 bytes of nibbles; x = d·q + m
    b = raw.reshape(rows, -1, 20)
    return (_f16(b[..., :2]) * nibbles(b[..., 4:]) + _f16(b[..., 2:4])).reshape(rows, -1)
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
def test_quant_blocks_decoded_by_hand(tiny, tmp_path, kind):
  path = write_gguf(tmp_path / f"tiny-{kind}.gguf", tiny, kind)
  raw = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
  assert raw["blk.0.ffn_up.weight"].tensor_type.name == kind
  config, params = load_gguf_checkpoint(path)
  up = _hand_dequantize(np.asarray(raw["blk.0.ffn_up.weight"].data), kind)  # [F, D]
  np.testing.assert_array_equal(np.asarray(params["layers_0"]["mlp"]["up"]), up.T)
  # Round-to-nearest on a grid of step absmax/127 (Q8_0), absmax/8 (Q4_0), range/15 (Q4_1).
  w = tiny.state_dict()["model.layers.0.mlp.up_proj.weight"].numpy()
  bound = np.abs(w).max() * {"Q8_0": 1 / 200, "Q4_0": 1 / 12, "Q4_1": 1 / 12}[kind]
  assert 0 < np.abs(up - w).max() <= bound


def _llama_cpp_rope_factors(theta, dim, factor=8.0, low=1.0, high=4.0, old_context_len=8192):
  """llama.cpp's `LlamaModel.generate_extra_tensors` (convert_hf_to_gguf.py), verbatim."""
  freqs = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
  low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
  rope_factors = []
  for freq in freqs:
    wavelen = 2 * math.pi / freq
    if wavelen < high_freq_wavelen:
      rope_factors.append(1)
    elif wavelen > low_freq_wavelen:
      rope_factors.append(factor)
    else:
      smooth = (old_context_len / wavelen - low) / (high - low)
      rope_factors.append(1 / ((1 - smooth) / factor + smooth))
  return np.array(rope_factors, np.float32)


def test_llama31_rope_freqs_tensor_is_llama3_scaling(tmp_path):
  """llama.cpp writes Llama 3.1's RoPE scaling only as the tensor `rope_freqs.weight`."""
  rope = dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
              high_freq_factor=4.0, original_max_position_embeddings=8192)
  model = _tiny_model(1, rope_parameters=rope, max_position_embeddings=131072)
  factors = _llama_cpp_rope_factors(5e5, 16)
  assert 1 < len(set(factors.tolist())) < len(factors)  # all three frequency bands occur
  path = write_gguf(tmp_path / "l31.gguf", model,
                    raw_tensors={"rope_freqs.weight": (factors, "F32")})
  config, params = load_gguf_checkpoint(path)
  assert config.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
  assert config.max_seq_len == 131072
  np.testing.assert_allclose(np.asarray(apply(config, params, TOKENS)),
                             hf_logits(model, TOKENS), atol=1e-4)

  bad = write_gguf(tmp_path / "bad.gguf", model,
                   raw_tensors={"rope_freqs.weight": (factors[::-1].copy(), "F32")})
  with pytest.raises(CheckpointError, match=r"bad.gguf: tensor rope_freqs.weight .* is not the "
                                            r"'llama3' RoPE scaling"):
    load_gguf_checkpoint(bad)


def test_vocab_size_from_the_token_list(tiny, tmp_path):
  path = write_gguf(tmp_path / "old.gguf", tiny, metadata={"llama.vocab_size": None})
  assert "llama.vocab_size" not in gguf.GGUFReader(str(path)).fields
  config, _ = load_gguf_checkpoint(path)
  assert config.vocab_size == 256


@pytest.mark.parametrize("kwargs,match", [
  (dict(architecture="qwen2"),
   r"x.gguf: general.architecture='qwen2' is not supported \(need 'llama'\)"),
  (dict(drop=("blk.1.ffn_up.weight",)), r"x.gguf: .*missing tensors \['blk.1.ffn_up.weight'\]"),
  (dict(metadata={"llama.block_count": 1}),
   r"x.gguf: .*block_count=1.*unexpected tensors \['blk.1.attn_k.weight'"),
  (dict(metadata={"llama.attention.sliding_window": 64}),
   r"x.gguf: unsupported metadata llama.attention.sliding_window=64"),
  (dict(metadata={"llama.rope.scaling.type": "linear"}),
   r"x.gguf: llama.rope.scaling.type='linear' is not supported \(need 'none'\)"),
  (dict(metadata={"llama.rope.scaling.factor": 4.0}),
   r"x.gguf: llama.rope.scaling.factor=4.0 \(linear RoPE scaling\) is not supported"),
  (dict(metadata={"llama.expert_count": 8}), r"x.gguf: llama.expert_count=8 is not supported"),
  (dict(metadata={"llama.rope.dimension_count": 8}),
   r"x.gguf: llama.rope.dimension_count=8 is not supported \(need head_dim=16\)"),
  (dict(raw_tensors={"blk.0.ffn_down.weight": (np.zeros((64, 8 * 18), np.uint8), "IQ4_NL")}),
   r"x.gguf: tensor blk.0.ffn_down.weight has type IQ4_NL, which llama_jax does not read"),
])
def test_refusals_name_the_file_and_field(tiny, tmp_path, kwargs, match):
  path = write_gguf(tmp_path / "x.gguf", tiny, **kwargs)
  with pytest.raises(CheckpointError, match=match):
    load_gguf_checkpoint(path)


def test_not_a_gguf_file(tmp_path):
  (tmp_path / "junk.gguf").write_bytes(b"not gguf at all")
  with pytest.raises(CheckpointError, match="junk.gguf: not a readable GGUF file"):
    load_gguf_checkpoint(tmp_path / "junk.gguf")


# --------------------------------------------------------------------------- SmolLM2-135M

PROMPTS = [  # "<|im_start|>user\nWhat is the capital of France?<|im_end|>", "...Hello!...",
  # "The year 2024 had 366 days." in SmolLM2's tokens
  [1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2],
  [1, 4093, 198, 19556, 17, 2],
  [504, 713, 216, 34, 32, 34, 36, 761, 216, 35, 38, 38, 2009, 30],
]


@pytest.fixture(scope="module")
def smollm2():
  path = smollm2_gguf_path()
  start = time.perf_counter()
  config, params = load_gguf_checkpoint(path)
  return path, config, params, time.perf_counter() - start


def test_smollm2_config(smollm2):
  _, config, _, _ = smollm2
  assert (config.num_layers, config.d_model, config.num_heads, config.num_kv_heads,
          config.head_dim, config.mlp_dim, config.vocab_size) == (30, 576, 9, 3, 64, 1536, 49152)
  assert (config.rope_theta, config.rope_scaling, config.norm_eps) == (1e5, None, 1e-5)
  assert (config.max_seq_len, config.tie_embeddings) == (8192, True)
  assert (config.bos_token_id, config.eos_token_id) == (1, 2)


@pytest.mark.full_size  # 27 s (float64 forward); the tiny GGUF files match transformers above
def test_smollm2_matches_transformers(smollm2):
  """Right-padded batch of three prompts: logits at every real token against transformers'
  own GGUF loading (the same dequantized weights: checked exactly) in float32, and both
  against transformers in float64 (30 layers of float32 round-off: ~5e-4 on logits of ~35)."""
  path, config, params, load_s = smollm2
  t = max(map(len, PROMPTS))
  tokens = np.array([p + [2] * (t - len(p)) for p in PROMPTS])
  real = np.array([[1] * len(p) + [0] * (t - len(p)) for p in PROMPTS])
  ours = np.asarray(apply(config, params, tokens, segment_ids=real))

  model = _transformers_gguf(path)
  state = model.state_dict()
  for name, array in iter_hf_tensors(config, params):
    np.testing.assert_array_equal(array, state[name].numpy(), err_msg=name)
  with torch.no_grad():
    mask = torch.as_tensor(real)
    ref = model(torch.as_tensor(tokens), attention_mask=mask).logits.numpy()
    ref64 = model.double()(torch.as_tensor(tokens), attention_mask=mask).logits.numpy()
  keep = real.astype(bool)
  diff = np.abs(ours - ref)[keep].max()
  ours_err, theirs_err = np.abs(ours - ref64)[keep].max(), np.abs(ref - ref64)[keep].max()
  print(f"SmolLM2 GGUF: load {load_s:.1f} s; max |Δlogit| vs transformers fp32 {diff:.2e}, "
        f"vs fp64: ours {ours_err:.2e}, transformers fp32 {theirs_err:.2e}")
  assert np.abs(ref64[keep]).max() > 10  # logits of real size, so the tolerances mean something
  assert diff < 5e-4 and ours_err < 3 * theirs_err  # measured: 1.1e-4; 1.2e-4 vs 0.9e-4
  np.testing.assert_array_equal(ours.argmax(-1)[keep], ref.argmax(-1)[keep])


def test_smollm2_quant_blocks_decoded_by_hand(smollm2):
  """The real file: token_embd in Q8_0, the MLP in Q4_1, decoded from the bytes by hand."""
  path, _, params, _ = smollm2
  raw = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
  embd, up = raw["token_embd.weight"], raw["blk.0.ffn_up.weight"]
  assert (embd.tensor_type.name, up.tensor_type.name) == ("Q8_0", "Q4_1")
  np.testing.assert_array_equal(np.asarray(params["embed"]),
                                _hand_dequantize(np.asarray(embd.data), "Q8_0"))
  np.testing.assert_array_equal(np.asarray(params["layers_0"]["mlp"]["up"]),
                                _hand_dequantize(np.asarray(up.data), "Q4_1").T)


def test_smollm2_tokenizer_metadata(smollm2):
  meta = gguf_tokenizer_metadata(smollm2[0])
  assert (meta["model"], meta["pre"]) == ("gpt2", "smollm")
  assert len(meta["tokens"]) == len(meta["token_types"]) == 49152 and len(meta["merges"]) == 48900
  assert meta["tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  assert meta["merges"][0] == "Ġ t" and meta["token_types"][1] == 3
  assert (meta["bos_token_id"], meta["eos_token_id"], meta["pad_token_id"],
          meta["unk_token_id"], meta["add_bos_token"]) == (1, 2, 2, 0, False)
  assert "<|im_start|>" in meta["chat_template"]


def test_smollm2_tokenizer_matches_transformers(smollm2):
  if importlib.util.find_spec("llama_jax.tokenizer.hf") is None:
    pytest.skip("llama_jax.tokenizer.hf (HFTokenizer) is not there yet")
  path = smollm2[0]
  tok = load_gguf_tokenizer(path)
  ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
  texts = ["What is the capital of France?", "The year 2024 had 366 days.",
           "  indented\n\tcode();  ", "naïve café — 日本語 🙂",
           "<|im_start|>user\nHello!<|im_end|>"]
  for text in texts:
    ids = tok.encode_special(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"], text
    assert tok.decode(ids) == text
  assert tok.encode("<|im_end|>") != [2]  # plain text stays text
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.add_bos) == (1, 2, 2, False)
  assert tok.encode_special(texts[-1]) == PROMPTS[1]


def test_non_finite_gguf_tensor_names_the_file_and_tensor(tiny, tmp_path):
  up = tiny.state_dict()["model.layers.1.mlp.up_proj.weight"].numpy().copy()
  up[0, :5] = [np.nan, np.inf, -np.inf, np.nan, np.nan]
  path = write_gguf(tmp_path / "nan.gguf", tiny, raw_tensors={"blk.1.ffn_up.weight": (up, "F32")})
  with pytest.raises(CheckpointError, match=(
      r"nan.gguf \(blk.1.ffn_up.weight, F32\): tensor model.layers.1.mlp.up_proj.weight "
      r"\(parameter layers_1/mlp/up\) has 5 non-finite \(NaN or Inf\) value\(s\) of 16384 as "
      r"float32; 1 tensor\(s\) are not finite$")):
    load_gguf_checkpoint(path)


def test_truncated_gguf_names_the_file(tiny, tmp_path):
  path = write_gguf(tmp_path / "cut.gguf", tiny)
  data = path.read_bytes()
  path.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match=rf"cut.gguf: not a readable GGUF file \(truncated or "
                                            rf"damaged\? {len(data) // 2} bytes\): ValueError"):
    load_gguf_checkpoint(path)


@pytest.mark.full_size  # 30-layer prefill and decode programs of the engine (about a minute)
def test_smollm2_greedy_through_the_engine_is_transformers_generate(smollm2):
  """The real SmolLM2's greedy answers to the three prompts, 16 tokens each, through the rollout
  engine (paged KV, the prompts batched together): token for token what `transformers`
  `generate` gives on its own reading of the file."""
  from llama_jax.generation.engine import Engine, EngineConfig, Request
  from llama_jax.generation.sampling import SamplingConfig

  path, config, params, _ = smollm2
  engine = Engine(config, params, EngineConfig(page_size=16, num_pages=16, max_seqs=4,
                                               max_seq_len=64, prefill_chunk=16))  # fmt: skip
  greedy, eos = SamplingConfig(temperature=0.0), config.eos_token_id
  done = engine.generate([Request(prompt=p, max_new_tokens=16, sampling=greedy, stop_ids=(eos,))
                          for p in PROMPTS])  # fmt: skip
  model = _transformers_gguf(path)
  for prompt, (sample,) in zip(PROMPTS, done, strict=True):
    with torch.no_grad():
      out = model.generate(torch.as_tensor([prompt]), max_new_tokens=16, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos)  # fmt: skip
    theirs = out[0, len(prompt) :].tolist()
    theirs = theirs[: theirs.index(eos) + 1] if eos in theirs else theirs
    assert sample.tokens == theirs, prompt
