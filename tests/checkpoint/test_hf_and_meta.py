"""Checkpoint I/O: HF safetensors both ways, Meta .pth import, and every bad-input error."""

import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from llama_jax.checkpoint import (
  CheckpointError,
  config_from_hf,
  load_hf_checkpoint,
  load_meta_checkpoint,
  save_hf_checkpoint,
)
from llama_jax.checkpoint.meta import ffn_hidden_dim
from llama_jax.checkpoint.torch_pickle import load_torch_file
from llama_jax.model.config import LlamaConfig, RopeScaling
from llama_jax.model.llama import KVCache
from llama_jax.parallel import sharding
from llama_jax.testing import HF_TINY, apply, hf_logits, save_hf_tiny

TOKENS = np.random.RandomState(0).randint(0, 256, (2, 40))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp("hf")
  model = save_hf_tiny("llama3p1_scaled", path)
  return path, hf_logits(model, TOKENS)


@pytest.mark.parametrize("scan", [False, True])
def test_save_hf_checkpoint_loads_in_transformers(hf_dir, tmp_path, scan):
  path, ref = hf_dir
  config, params = load_hf_checkpoint(path, scan_layers=scan)
  out = tmp_path / "out"
  save_hf_checkpoint(out, config, params, max_shard_bytes=60_000)  # force a sharded index
  assert (out / "model.safetensors.index.json").exists()
  hf_config = json.loads((out / "config.json").read_text())
  assert hf_config["rope_scaling"]["rope_type"] == "llama3"  # the published form
  model = transformers.LlamaForCausalLM.from_pretrained(out).float().eval()
  np.testing.assert_allclose(hf_logits(model, TOKENS), ref, atol=1e-5)
  config2, params2 = load_hf_checkpoint(out)  # and back through the sharded index
  np.testing.assert_allclose(np.asarray(apply(config2, params2, TOKENS)), ref, atol=1e-4)
  assert config2.replace(scan_layers=scan) == config


def test_dtypes_are_anything_jnp_dtype_takes(hf_dir):
  path, _ = hf_dir
  config, params = load_hf_checkpoint(path, dtype=jnp.bfloat16, compute_dtype=np.float32)
  assert (config.param_dtype, config.dtype) == ("bfloat16", "float32")
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype("bfloat16")}
  cache = KVCache.init(config, 1, 8, dtype=jnp.bfloat16)
  assert cache.k.dtype == jnp.bfloat16


def test_published_config_form_equals_rope_parameters_form(hf_dir, tmp_path):
  path, ref = hf_dir
  cfg = json.loads((path / "config.json").read_text())
  rope = cfg.pop("rope_parameters")
  cfg["rope_theta"] = rope.pop("rope_theta")
  cfg["rope_scaling"] = dict(rope, rope_type="llama3")
  shutil.copytree(path, tmp_path / "pub")
  (tmp_path / "pub" / "config.json").write_text(json.dumps(cfg))
  a, _ = load_hf_checkpoint(path)
  b, params = load_hf_checkpoint(tmp_path / "pub")
  assert a == b and b.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 64) and b.rope_theta == 5e5
  np.testing.assert_allclose(np.asarray(apply(b, params, TOKENS)), ref, atol=1e-4)


def _edit_config(src, dst, **changes):
  shutil.copytree(src, dst)
  cfg = json.loads((dst / "config.json").read_text())
  for key, value in changes.items():
    if value is None:
      cfg.pop(key)
    else:
      cfg[key] = value
  (dst / "config.json").write_text(json.dumps(cfg))
  return dst


@pytest.mark.parametrize("changes,match", [
  (dict(foo_bar=3), r"unsupported field\(s\) \['foo_bar'\]"),
  (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
  (dict(attention_bias=True), r"attention_bias=True is not supported"),
  (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)),
   r"rope_parameters type 'yarn' is not supported"),
  (dict(rope_parameters=dict(rope_type="llama3", rope_theta=1e4, factor=2.0)),
   r"lacks 'low_freq_factor'"),
  (dict(rope_parameters=dict(rope_type="default", rope_theta=1e4, beta=2)),
   r"unsupported rope_parameters key\(s\) \['beta'\]"),
  (dict(intermediate_size=96), r"tensor model.layers.0.mlp.gate_proj.weight: shape \(128, 64\) "
                               r"does not match the model's expected \(96, 64\)"),
  (dict(num_hidden_layers=3), r"missing tensors \['model.layers.2.input_layernorm.weight'"),
  (dict(num_hidden_layers=1), r"unexpected tensors \['model.layers.1.input_layernorm.weight'"),
  (dict(tie_word_embeddings=True), r"tie_word_embeddings=true but lm_head.weight differs"),
])
def test_bad_hf_config(hf_dir, tmp_path, changes, match):
  bad = _edit_config(hf_dir[0], tmp_path / "bad", **changes)
  with pytest.raises(CheckpointError, match=match):
    load_hf_checkpoint(bad)


def test_missing_and_extra_tensors(hf_dir, tmp_path):
  path = _edit_config(hf_dir[0], tmp_path / "edit")
  tensors = load_file(path / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  tensors["model.layers.0.self_attn.q_proj.bias"] = np.zeros(64, np.float32)
  save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
  with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.1.mlp.up_proj.weight'"
                                            r"\]; unexpected tensors \['model.layers.0.self_attn"):
    load_hf_checkpoint(path)
  with pytest.raises(CheckpointError, match="no config.json"):
    load_hf_checkpoint(tmp_path)


# config.json of HuggingFaceTB/SmolLM2-135M-Instruct, as its publishers ship it (nanotron's
# `is_llama_config` / `rope_interleaved`, transformers.js metadata, integer rope_theta).
SMOLLM2_135M_INSTRUCT_CONFIG = """{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 1,
  "eos_token_id": 2,
  "hidden_act": "silu",
  "hidden_size": 576,
  "initializer_range": 0.041666666666666664,
  "intermediate_size": 1536,
  "is_llama_config": true,
  "max_position_embeddings": 8192,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 9,
  "num_hidden_layers": 30,
  "num_key_value_heads": 3,
  "pad_token_id": 2,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_interleaved": false,
  "rope_scaling": null,
  "rope_theta": 100000,
  "tie_word_embeddings": true,
  "torch_dtype": "bfloat16",
  "transformers.js_config": {
    "kv_cache_dtype": {"q4f16": "float16", "fp16": "float16"}
  },
  "transformers_version": "4.42.3",
  "use_cache": true,
  "vocab_size": 49152
}"""
# config.json of meta-llama/Llama-3.1-8B-Instruct.
LLAMA3P1_8B_INSTRUCT_CONFIG = """{
  "architectures": ["LlamaForCausalLM"],
  "attention_bias": false,
  "attention_dropout": 0.0,
  "bos_token_id": 128000,
  "eos_token_id": [128001, 128008, 128009],
  "hidden_act": "silu",
  "hidden_size": 4096,
  "initializer_range": 0.02,
  "intermediate_size": 14336,
  "max_position_embeddings": 131072,
  "mlp_bias": false,
  "model_type": "llama",
  "num_attention_heads": 32,
  "num_hidden_layers": 32,
  "num_key_value_heads": 8,
  "pretraining_tp": 1,
  "rms_norm_eps": 1e-05,
  "rope_scaling": {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3"
  },
  "rope_theta": 500000.0,
  "tie_word_embeddings": false,
  "torch_dtype": "bfloat16",
  "transformers_version": "4.42.3",
  "use_cache": true,
  "vocab_size": 128256
}"""


def test_published_configs():
  smol = config_from_hf(json.loads(SMOLLM2_135M_INSTRUCT_CONFIG))
  assert smol == LlamaConfig(
    vocab_size=49152, num_layers=30, d_model=576, num_heads=9, num_kv_heads=3, head_dim=64,
    mlp_dim=1536, norm_eps=1e-5, rope_theta=1e5, max_seq_len=8192, tie_embeddings=True,
    bos_token_id=1, eos_token_id=2, initializer_range=0.041666666666666664)
  llama = config_from_hf(json.loads(LLAMA3P1_8B_INSTRUCT_CONFIG))
  assert llama == LlamaConfig.preset("llama3p1_8b")


@pytest.mark.parametrize("use_diff", [True, False])
def test_configs_as_transformers_writes_them(tmp_path, use_diff):
  """Every attribute `PretrainedConfig` serializes (with `use_diff=False`: id2label,
  chunk_size_feed_forward, ...) and the token ids it adds (unk/pad) are accepted."""
  kwargs = dict(HF_TINY["llama3p2_tied"], pad_token_id=0, unk_token_id=3)
  hf = transformers.LlamaConfig(**kwargs)
  written = json.loads(hf.to_json_string(use_diff=use_diff))
  assert "unk_token_id" in written
  config = config_from_hf(written)
  hf.save_pretrained(tmp_path)
  assert config_from_hf(json.loads((tmp_path / "config.json").read_text())) == config
  assert (config.num_layers, config.num_kv_heads, config.tie_embeddings) == (2, 2, True)
  assert config.rope_scaling == RopeScaling(32.0, 1.0, 4.0, 64)


@pytest.mark.parametrize("changes,match", [
  (dict(rope_interleaved=True), r"rope_interleaved=True is not supported \(need False\)"),
  (dict(mlp_bias=True), r"mlp_bias=True is not supported"),
  (dict(pretraining_tp=2), r"pretraining_tp=2 is not supported \(need 1\)"),
  (dict(attention_dropout=0.1), r"attention_dropout=0.1 is not supported"),
  (dict(model_type="mistral"), r"model_type='mistral' is not supported"),
  (dict(rope_scaling=dict(rope_type="linear", factor=2.0)),
   r"rope_scaling type 'linear' is not supported"),
  (dict(quantization_config=dict(quant_method="gptq")),
   r"unsupported field\(s\) \['quantization_config'\]"),
])
def test_published_config_with_a_value_that_changes_the_model(changes, match):
  hf = json.loads(SMOLLM2_135M_INSTRUCT_CONFIG) | changes
  with pytest.raises(CheckpointError, match=r"config.json: " + match):
    config_from_hf(hf)


# --------------------------------------------------------------------------- Meta


def _rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def meta_reference_forward(w: dict, p: dict, tokens: np.ndarray) -> np.ndarray:
  """Meta's reference `model.py`, in numpy: RoPE on *interleaved* pairs, in complex form."""
  dim, n, kv = p["dim"], p["n_heads"], p["n_kv_heads"]
  hd, t = dim // n, tokens.shape[0]
  freqs = 1.0 / p["rope_theta"] ** (np.arange(0, hd, 2)[: hd // 2] / hd)
  cis = np.exp(1j * np.outer(np.arange(t), freqs))  # [T, H/2]

  def rope(x):  # x [T, heads, H]; pairs (x0, x1), (x2, x3), …
    c = x.reshape(*x.shape[:-1], -1, 2)
    c = (c[..., 0] + 1j * c[..., 1]) * cis[:, None, :]
    return np.stack([c.real, c.imag], -1).reshape(x.shape)

  h = w["tok_embeddings.weight"][tokens]
  causal = np.triu(np.full((t, t), -np.inf), 1)
  for i in range(p["n_layers"]):
    lw = {k.split(f"layers.{i}.")[1]: v for k, v in w.items() if k.startswith(f"layers.{i}.")}
    x = _rms(h, lw["attention_norm.weight"], p["norm_eps"])
    q = rope((x @ lw["attention.wq.weight"].T).reshape(t, n, hd))
    k = rope((x @ lw["attention.wk.weight"].T).reshape(t, kv, hd))
    v = (x @ lw["attention.wv.weight"].T).reshape(t, kv, hd)
    k, v = np.repeat(k, n // kv, axis=1), np.repeat(v, n // kv, axis=1)
    s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(hd) + causal
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    h = h + np.einsum("nts,snh->tnh", s, v).reshape(t, dim) @ lw["attention.wo.weight"].T
    x = _rms(h, lw["ffn_norm.weight"], p["norm_eps"])
    gate = x @ lw["feed_forward.w1.weight"].T
    h = h + (gate / (1 + np.exp(-gate)) * (x @ lw["feed_forward.w3.weight"].T)) @ \
      lw["feed_forward.w2.weight"].T
  return _rms(h, w["norm.weight"], p["norm_eps"]) @ w["output.weight"].T


def _meta_weights(p, vocab, seed=0):
  rng = np.random.RandomState(seed)
  dim, hd = p["dim"], p["dim"] // p["n_heads"]
  f = ffn_hidden_dim(dim, p["multiple_of"], p.get("ffn_dim_multiplier"))
  shapes = {"tok_embeddings.weight": (vocab, dim), "norm.weight": (dim,),
            "output.weight": (vocab, dim)}
  for i in range(p["n_layers"]):
    shapes |= {f"layers.{i}.attention.wq.weight": (p["n_heads"] * hd, dim),
               f"layers.{i}.attention.wk.weight": (p["n_kv_heads"] * hd, dim),
               f"layers.{i}.attention.wv.weight": (p["n_kv_heads"] * hd, dim),
               f"layers.{i}.attention.wo.weight": (dim, p["n_heads"] * hd),
               f"layers.{i}.feed_forward.w1.weight": (f, dim),
               f"layers.{i}.feed_forward.w2.weight": (dim, f),
               f"layers.{i}.feed_forward.w3.weight": (f, dim),
               f"layers.{i}.attention_norm.weight": (dim,),
               f"layers.{i}.ffn_norm.weight": (dim,)}
  return {k: (1 + 0.1 * rng.randn(*s) if len(s) == 1 else 0.1 * rng.randn(*s)).astype(np.float32)
          for k, s in shapes.items()}


def _split_axis(name, embed_axis):
  if name.endswith(("wo.weight", "w2.weight")):
    return 1
  if name == "tok_embeddings.weight":
    return embed_axis
  return None if "norm" in name else 0


def _save_meta(path, weights, params, embed_axis, shards=2):
  path.mkdir()
  (path / "params.json").write_text(json.dumps(params))
  for s in range(shards):
    state = {}
    for name, w in weights.items():
      axis = _split_axis(name, embed_axis)
      piece = w if axis is None else np.split(w, shards, axis=axis)[s]
      state[name] = torch.from_numpy(np.ascontiguousarray(piece))
    torch.save(state, path / f"consolidated.{s:02d}.pth")


# Llama 2 splits the embedding over the width (ParallelEmbedding), Llama 3 over the vocab.
META_VARIANTS = {
  "llama2_mha": (dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=-1,
                      multiple_of=32, norm_eps=1e-5, rope_theta=10000.0), 1),
  "llama3_gqa": (dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256,
                      multiple_of=32, ffn_dim_multiplier=1.3, norm_eps=1e-5,
                      rope_theta=500000.0), 0),
}


@pytest.mark.parametrize("variant", sorted(META_VARIANTS))
def test_meta_checkpoint_matches_meta_reference(tmp_path, variant):
  params, embed_axis = META_VARIANTS[variant]
  weights = _meta_weights(params, vocab=256)
  _save_meta(tmp_path / "meta", weights, params, embed_axis)
  config, ours = load_meta_checkpoint(tmp_path / "meta")
  assert (config.vocab_size, config.num_kv_heads) == (256, params["n_kv_heads"])
  tokens = np.random.RandomState(1).randint(0, 256, (2, 24))
  logits = np.asarray(apply(config, ours, tokens))
  ref = np.stack([meta_reference_forward(weights, params, row) for row in tokens])
  err = np.abs(logits - ref).max()
  print(f"\nMeta {variant}: max |Δlogit| = {err:.2e} (logit std {ref.std():.2f})")
  assert ref.std() > 0.3 and err <= 1e-4


def test_meta_scaled_rope_needs_a_factor(tmp_path):
  params, embed_axis = META_VARIANTS["llama3_gqa"]
  params = dict(params, use_scaled_rope=True)
  _save_meta(tmp_path / "meta", _meta_weights(params, 256), params, embed_axis)
  with pytest.raises(CheckpointError, match="does not give the scaling factor"):
    load_meta_checkpoint(tmp_path / "meta")
  config, _ = load_meta_checkpoint(tmp_path / "meta", rope_scaling=RopeScaling(factor=8.0))
  assert config.rope_scaling.factor == 8.0


def test_meta_bad_inputs(tmp_path):
  params, embed_axis = META_VARIANTS["llama3_gqa"]
  weights = _meta_weights(params, 256)
  _save_meta(tmp_path / "ok", weights, params, embed_axis)
  bad = dict(params, n_layers=3)
  _save_meta(tmp_path / "layers", weights, bad, embed_axis)
  with pytest.raises(CheckpointError, match=r"missing tensors \['model.layers.2"):
    load_meta_checkpoint(tmp_path / "layers")
  _save_meta(tmp_path / "field", weights, dict(params, moe_experts=8), embed_axis)
  with pytest.raises(CheckpointError, match=r"unsupported field\(s\) \['moe_experts'\]"):
    load_meta_checkpoint(tmp_path / "field")
  with pytest.raises(CheckpointError, match="expected params.json and consolidated"):
    load_meta_checkpoint(tmp_path)


def test_torch_free_reader_matches_torch(tmp_path):
  state = {"f32": torch.randn(3, 4), "bf16": torch.randn(5, 2).to(torch.bfloat16),
           "f16_t": torch.randn(4, 6).half().t(), "i64": torch.arange(7)}
  state["view"] = state["f32"][1:, 2:]  # shares storage with an offset
  torch.save(state, tmp_path / "x.pth")
  lazy = load_torch_file(tmp_path / "x.pth")
  for name, tensor in state.items():
    np.testing.assert_array_equal(lazy[name].numpy().astype(np.float32),
                                  tensor.float().numpy(), err_msg=name)


def test_torch_free_reader_refuses_other_objects(tmp_path):
  torch.save({"w": torch.zeros(2), "hook": print}, tmp_path / "x.pth")
  with pytest.raises(Exception, match="refusing to load pickled object .*print"):
    load_torch_file(tmp_path / "x.pth")


# --------------------------------------------------------------------------- bad inputs at the door


def _edit_tensors(src, dst, changes):
  """A copy of the HF directory `src` with tensors replaced: `{name: fn(array) -> array}`."""
  shutil.copytree(src, dst)
  tensors = load_file(dst / "model.safetensors")
  for name, change in changes.items():
    tensors[name] = change(tensors[name])
  save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


def _poison(count, value=np.nan):
  def change(a):
    a = a.copy()
    a.reshape(-1)[:count] = value
    return a

  return change


@pytest.mark.parametrize("scan", [False, True])
def test_non_finite_hf_weights_name_the_tensor_file_and_count(hf_dir, tmp_path, scan):
  bad = _edit_tensors(hf_dir[0], tmp_path / "nan", {
    "model.layers.1.mlp.up_proj.weight": _poison(3),
    "model.layers.0.self_attn.k_proj.weight": _poison(2, np.inf)})
  mesh = sharding.make_mesh(fsdp=4, tensor=2)  # checked where the shards are
  layer0 = r"layers/attn/k\[0\]" if scan else "layers_0/attn/k"
  with pytest.raises(CheckpointError, match=(
      rf"nan/model.safetensors: tensor model.layers.0.self_attn.k_proj.weight \(parameter "
      rf"{layer0}\) has 2 non-finite \(NaN or Inf\) value\(s\) of 2048 as float32; 2 tensor\(s\) "
      r"are not finite; also model.layers.1.mlp.up_proj.weight$")):
    load_hf_checkpoint(bad, mesh=mesh, scan_layers=scan)


def test_finite_weights_overflowing_the_param_dtype_are_refused(hf_dir, tmp_path):
  bad = _edit_tensors(hf_dir[0], tmp_path / "big", {"model.norm.weight": _poison(1, 1e6)})
  load_hf_checkpoint(bad)  # finite as float32
  with pytest.raises(CheckpointError, match=r"big/model.safetensors: tensor model.norm.weight "
                                            r"\(parameter final_norm/scale\) has 1 non-finite "
                                            r"\(NaN or Inf\) value\(s\) of 64 as float16"):
    load_hf_checkpoint(bad, dtype="float16")


def test_integer_tensor_is_refused_not_cast(hf_dir, tmp_path):
  bad = _edit_tensors(hf_dir[0], tmp_path / "int", {
    "model.layers.0.input_layernorm.weight": lambda a: a.astype(np.int32)})
  with pytest.raises(CheckpointError, match=r"int/model.safetensors: tensor model.layers.0."
                                            r"input_layernorm.weight has dtype int32; model "
                                            r"weights must be floating point"):
    load_hf_checkpoint(bad)


@pytest.mark.parametrize("sharded", [False, True])
def test_truncated_safetensors_names_the_file(hf_dir, tmp_path, sharded):
  path = tmp_path / "cut"
  if sharded:  # the index case: the shard is opened before any tensor is read
    config, params = load_hf_checkpoint(hf_dir[0])
    save_hf_checkpoint(path, config, params, max_shard_bytes=60_000)
    file = path / sorted(p.name for p in path.glob("model-*.safetensors"))[-1]
  else:
    shutil.copytree(hf_dir[0], path)
    file = path / "model.safetensors"
  data = file.read_bytes()
  file.write_bytes(data[: len(data) // 2])
  with pytest.raises(CheckpointError, match=(
      rf"cut/{file.name}: not a readable safetensors file \(truncated or damaged\? "
      rf"{len(data) // 2} bytes\): .*incomplete metadata")):
    load_hf_checkpoint(path)


@pytest.mark.parametrize("text,match", [
  ('{"vocab_size": 256,\n "hidden_size": 64\n "num_hidden_layers": 2}',
   r"config.json: not valid JSON: Expecting ',' delimiter at line 3, column 2"),
  ("", r"config.json: not valid JSON: Expecting value at line 1, column 1"),
  ("[1, 2]", r"config.json: expected a JSON object, got list: \[1, 2\]"),
  ('{"vocab_size": 256, "hidden_size": 64}',
   r"config.json: required field\(s\) \['num_hidden_layers', 'num_attention_heads', "
   r"'intermediate_size'\] missing"),
])
def test_malformed_config_json_names_file_line_and_column(hf_dir, tmp_path, text, match):
  shutil.copytree(hf_dir[0], tmp_path / "hf")
  (tmp_path / "hf" / "config.json").write_text(text)
  with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "hf")) + "/" + match):
    load_hf_checkpoint(tmp_path / "hf")


def test_meta_bad_tensors_name_the_shards_and_tensor(tmp_path):
  params, embed_axis = META_VARIANTS["llama3_gqa"]
  weights = _meta_weights(params, 256)
  nan = dict(weights, **{"layers.1.feed_forward.w2.weight": _poison(4)(
    weights["layers.1.feed_forward.w2.weight"])})
  _save_meta(tmp_path / "nan", nan, params, embed_axis)
  with pytest.raises(CheckpointError, match=(
      r"nan \(layers.1.feed_forward.w2.weight in consolidated.00.pth, consolidated.01.pth\): "
      r"tensor model.layers.1.mlp.down_proj.weight \(parameter layers_1/mlp/down\) has 4 "
      r"non-finite \(NaN or Inf\) value\(s\) of 14336 as float32")):
    load_meta_checkpoint(tmp_path / "nan")
  ints = dict(weights, **{"norm.weight": weights["norm.weight"].astype(np.int64)})
  _save_meta(tmp_path / "int", ints, params, embed_axis)
  with pytest.raises(CheckpointError, match=r"int \(norm.weight in consolidated.00.pth, "
                                            r"consolidated.01.pth\): tensor model.norm.weight "
                                            r"has dtype int64; model weights must be floating"):
    load_meta_checkpoint(tmp_path / "int")


def test_meta_truncated_shard_names_the_file(tmp_path):
  params, embed_axis = META_VARIANTS["llama3_gqa"]
  _save_meta(tmp_path / "cut", _meta_weights(params, 256), params, embed_axis)
  shard = tmp_path / "cut" / "consolidated.01.pth"
  data = shard.read_bytes()
  shard.write_bytes(data[: len(data) - 100])
  with pytest.raises(CheckpointError, match=(
      rf"cut/consolidated.01.pth: not a readable torch checkpoint \(truncated or damaged\? "
      rf"{len(data) - 100} bytes\): BadZipFile: File is not a zip file")):
    load_meta_checkpoint(tmp_path / "cut")
  (tmp_path / "cut" / "params.json").write_text('{"dim": 64,}')
  with pytest.raises(CheckpointError, match=r"cut/params.json: not valid JSON: Expecting property "
                                            r"name enclosed in double quotes at line 1, column 12"):
    load_meta_checkpoint(tmp_path / "cut")
