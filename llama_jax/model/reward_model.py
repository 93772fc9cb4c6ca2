"""The reward model: the Llama trunk with a scalar head, read at the last token of a response.

    config, lm_params = load_hf_checkpoint(path)            # or an LM experiment workdir
    params = reward_model.from_lm_params(config, lm_params, jax.random.PRNGKey(0))
    scores = RewardModel(config).apply({"params": params}, tokens, positions, segment_ids)
    rewards = reward_model.gather_last(scores, last_index)  # [B, K]

Parameter tree (`TrainState.params` of a reward-model run, and what its checkpoints hold):

    {"lm":   the LM's parameters without its LM head (embed, layers…, final_norm),
     "head": {"kernel": [D], "bias": []}}

The LM head is dropped rather than carried along: it plays no part in a reward, and for
Llama 3 8B it would be 0.5B parameters plus their optimizer moments. `config` is the LM's own
`LlamaConfig` (what `model_config.json` of a reward-model workdir holds); the trunk is
`Llama(config, head=False)`. `RewardModel(config, lora=...)` puts LoRA adapters on the trunk
(the head trains in full, see `llama_jax.model.lora.trainable_mask`). PPO's value model is the same
module.

Sharding, initialization and train states are the LM's: `sharding.param_shardings(
RewardModel(config), mesh)`, `train_state.init_train_state(RewardModel(config), ...)`, ….

The head's kernel starts as N(0, initializer_range²) like the score layer of Hugging Face's
`LlamaForSequenceClassification`, its bias at 0. Pairwise losses see only differences of
rewards, so the bias gets exactly zero gradient from them; it moves under reward centering
only, and is where a user can calibrate the level (Llama 2 thresholds σ(R_s) at 0.15).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.model.config import LlamaConfig
from llama_jax.model.llama import Llama, init_boxed
from llama_jax.model.lora import LoraConfig


class RewardHead(nn.Module):
  """A scalar per token: hidden [B, T, D] · kernel [D] + bias, in float32."""

  config: LlamaConfig

  @nn.compact
  def __call__(self, hidden: jax.Array) -> jax.Array:
    cfg = self.config
    # Replicated like the norm scales: a [D] vector, read against replicated activations.
    init = nn.initializers.normal(cfg.initializer_range)
    kernel = self.param(
      "kernel", nn.with_logical_partitioning(init, ("norm",)), (cfg.d_model,), cfg.param_dtype
    )
    bias = self.param(
      "bias", nn.with_logical_partitioning(nn.initializers.zeros, ()), (), cfg.param_dtype
    )
    scores = jnp.einsum(
      "BTD,D->BT", hidden.astype(jnp.float32), kernel.astype(jnp.float32)
    ) + bias.astype(jnp.float32)
    return nn.with_logical_constraint(scores, ("act_batch", "act_seq"))


class RewardModel(nn.Module):
  """`apply({"params": p}, tokens, positions=None, segment_ids=None, attention_mask=None)`
  returns float32 scores [B, T]: the head applied to every final-normed hidden state. A
  response's reward is the score at its last token (`gather_last`). Arguments are those of
  `Llama.hidden_states`."""

  config: LlamaConfig
  lora: LoraConfig | None = None

  def setup(self):
    self.lm = Llama(self.config, head=False, lora=self.lora)
    self.head = RewardHead(self.config)

  def __call__(self, tokens, positions=None, segment_ids=None, attention_mask=None):
    hidden, _ = self.lm.hidden_states(tokens, positions, segment_ids, attention_mask=attention_mask)
    return self.head(hidden)


def as_reward_model(model: RewardModel | LlamaConfig) -> RewardModel:
  """`model`, or `RewardModel(model)` if given a `LlamaConfig`."""
  return RewardModel(model) if isinstance(model, LlamaConfig) else model


# --------------------------------------------------------------------------- reading rewards


def gather_last(scores: jax.Array, last_index: jax.Array) -> jax.Array:
  """Rewards [B, K] from scores [B, T] at token indices [B, K]; 0 where the index is -1."""
  picked = jnp.take_along_axis(scores, jnp.maximum(last_index, 0), axis=1)
  return jnp.where(last_index >= 0, picked, 0.0)


def sequence_rewards(
  model: RewardModel | LlamaConfig, params: Any, tokens: jax.Array, segment_ids: jax.Array
) -> jax.Array:
  """Rewards [B] of rows holding one prompt + response each, left-aligned, 0 = padding."""
  scores = as_reward_model(model).apply({"params": params}, tokens, None, segment_ids)
  last = jnp.sum(segment_ids != 0, axis=1, keepdims=True) - 1
  return gather_last(scores, last)[:, 0]


# --------------------------------------------------------------------------- parameters


def init_head(config: LlamaConfig, rng: jax.Array) -> dict[str, jax.Array]:
  """A fresh head `{"kernel": [D], "bias": []}`."""
  boxed = jax.jit(lambda key: RewardHead(config).init(key, jnp.zeros((1, 1, config.d_model))))
  return nn.meta.unbox(boxed(rng)["params"])


def from_lm_params(
  config: LlamaConfig, lm_params: Any, rng: jax.Array, mesh: Mesh | None = None
) -> dict[str, Any]:
  """Reward-model parameters from an LM's (any placement): its trunk and a fresh head.

  The LM's arrays are reused as they are (no copy); the head is placed replicated on
  `mesh` if one is given.
  """
  lm = {k: v for k, v in lm_params.items() if k != "lm_head"}
  head = init_head(config, rng)
  if mesh is not None:
    head = jax.device_put(head, NamedSharding(mesh, PartitionSpec()))
  return {"lm": lm, "head": head}


def abstract_params(config: LlamaConfig):
  """Unboxed parameter `ShapeDtypeStruct`s (nothing allocated)."""
  return nn.meta.unbox(jax.eval_shape(lambda: init_boxed(RewardModel(config), jax.random.key(0))))


def num_params(config: LlamaConfig) -> int:
  """Parameters of the reward model: the trunk's (no untied LM head) and the head's D + 1."""
  untied_head = 0 if config.tie_embeddings else config.vocab_size * config.d_model
  return config.num_params() - untied_head + config.d_model + 1


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
  """Training FLOPs per token: the LM's without the LM head's matmul."""
  return config.flops_per_token(seq_len) - 6.0 * config.vocab_size * config.d_model
