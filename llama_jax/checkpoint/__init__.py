"""Checkpoint I/O: Hugging Face safetensors, Meta `.pth` and llama.cpp GGUF imports."""

from llama_jax.checkpoint.gguf import (
  gguf_tokenizer_metadata,
  load_gguf_checkpoint,
  load_gguf_tokenizer,
)
from llama_jax.checkpoint.hf import (
  config_from_hf,
  config_to_hf,
  load_hf_checkpoint,
  save_hf_checkpoint,
)
from llama_jax.checkpoint.meta import load_meta_checkpoint
from llama_jax.checkpoint.orbax import CheckpointManager, checkpoint_dir, load_params
from llama_jax.checkpoint.params import CheckpointError

__all__ = [
  "CheckpointError",
  "CheckpointManager",
  "checkpoint_dir",
  "config_from_hf",
  "config_to_hf",
  "gguf_tokenizer_metadata",
  "load_gguf_checkpoint",
  "load_gguf_tokenizer",
  "load_hf_checkpoint",
  "load_meta_checkpoint",
  "load_params",
  "save_hf_checkpoint",
]
