"""llama_jax: the Llama 2 / Llama 3 model family and its post-training recipes in JAX."""

from llama_jax.model.config import LlamaConfig, RopeScaling
from llama_jax.model.llama import KVCache, Llama

__all__ = ["KVCache", "Llama", "LlamaConfig", "RopeScaling"]
