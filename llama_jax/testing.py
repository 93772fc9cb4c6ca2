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

  from llama_jax.model import Llama

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
