"""The model stack: architecture configs, attention kernels, the Llama decoder, LoRA adapters
and the reward model (the trunk with a scalar head). Imports nothing else from llama_jax."""

from llama_jax.model.config import LlamaConfig, RopeScaling
from llama_jax.model.llama import KVCache, Llama
from llama_jax.model.lora import LoraConfig
from llama_jax.model.reward_model import RewardModel

__all__ = ["KVCache", "Llama", "LlamaConfig", "LoraConfig", "RewardModel", "RopeScaling"]
