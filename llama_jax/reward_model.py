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
`LlamaConfig` (what `model_config.json` of a reward-model workdir holds); the trunk is that
config with `tie_embeddings=True`, which only removes the untied head parameter
(`Llama.hidden_states` never reads either).

The head's kernel starts as N(0, initializer_range²) like the score layer of Hugging Face's
`LlamaForSequenceClassification`, its bias at 0. Pairwise losses see only differences of
rewards, so the bias gets exactly zero gradient from them; it moves under reward centering
only, and is where a user can calibrate the level (Llama 2 thresholds σ(R_s) at 0.15).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax import sharding
from llama_jax import train_state as ts
from llama_jax.checkpoint import orbax as ckpt_lib
from llama_jax.config import MODEL_CONFIG_FILE, LlamaConfig
from llama_jax.data import ranking
from llama_jax.model import Llama
from llama_jax.train_state import TrainState


def trunk_config(config: LlamaConfig) -> LlamaConfig:
  """The LM config without an untied LM head (see the module docstring)."""
  return config.replace(tie_embeddings=True)


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

  def setup(self):
    self.lm = Llama(trunk_config(self.config))
    self.head = RewardHead(self.config)

  def __call__(self, tokens, positions=None, segment_ids=None, attention_mask=None):
    hidden, _ = self.lm.hidden_states(tokens, positions, segment_ids, attention_mask=attention_mask)
    return self.head(hidden)


# --------------------------------------------------------------------------- reading rewards


def gather_last(scores: jax.Array, last_index: jax.Array) -> jax.Array:
  """Rewards [B, K] from scores [B, T] at token indices [B, K]; 0 where the index is -1."""
  picked = jnp.take_along_axis(scores, jnp.maximum(last_index, 0), axis=1)
  return jnp.where(last_index >= 0, picked, 0.0)


def ranking_rewards(
  config: LlamaConfig,
  params: Any,
  tokens: jax.Array,  # [B, T]
  segment_ids: jax.Array,  # [B, T]
  response_ids: jax.Array,  # [B, T]
  max_responses: int = ranking.MAX_RESPONSES,
) -> tuple[jax.Array, jax.Array]:
  """`(rewards [B, K], present [B, K])` of packed ranking rows (`llama_jax.data.ranking`):
  one forward pass per row scores every response of its prompt."""
  positions, mask, last = ranking.ranking_inputs(segment_ids, response_ids, max_responses)
  scores = RewardModel(config).apply({"params": params}, tokens, positions, segment_ids, mask)
  return gather_last(scores, last), last >= 0


def sequence_rewards(
  config: LlamaConfig, params: Any, tokens: jax.Array, segment_ids: jax.Array
) -> jax.Array:
  """Rewards [B] of rows holding one prompt + response each, left-aligned, 0 = padding."""
  scores = RewardModel(config).apply({"params": params}, tokens, None, segment_ids)
  last = jnp.sum(segment_ids != 0, axis=1, keepdims=True) - 1
  return gather_last(scores, last)[:, 0]


# --------------------------------------------------------------------------- parameters


def _init_boxed(config: LlamaConfig, rng: jax.Array):
  return RewardModel(config).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]


def abstract_params(config: LlamaConfig):
  """Unboxed parameter `ShapeDtypeStruct`s (nothing allocated)."""
  return nn.meta.unbox(jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0))))


_init_jitted = jax.jit(_init_boxed, static_argnums=0)


def init_params(config: LlamaConfig, rng: jax.Array):
  """Fresh unsharded parameters (tests, small models); the head as in `from_lm_params`."""
  return nn.meta.unbox(_init_jitted(config, rng))


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


def param_partition_specs(config: LlamaConfig, rules: sharding.Rules = sharding.DEFAULT_RULES):
  """Tree of mesh `PartitionSpec`s: the trunk's as for the LM, the head replicated."""
  boxed = jax.eval_shape(lambda: _init_boxed(config, jax.random.key(0)))

  def spec(path, leaf):
    name = jax.tree_util.keystr(path)
    if not isinstance(leaf, nn.Partitioned):
      raise ValueError(f"parameter {name} has no logical axis names; annotate it in the model")
    return sharding.logical_to_mesh_spec(leaf.names, rules, what=f"parameter {name}")

  return jax.tree_util.tree_map_with_path(
    spec, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned)
  )


def param_shardings(
  config: LlamaConfig, mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES
):
  """Tree of `NamedSharding`s, after checking that the trunk fits the mesh."""
  sharding.check_fits_mesh(trunk_config(config), mesh, rules)
  return jax.tree.map(
    lambda spec: NamedSharding(mesh, spec),
    param_partition_specs(config, rules),
    is_leaf=lambda x: isinstance(x, PartitionSpec),
  )


def init_sharded_params(
  config: LlamaConfig, rng: jax.Array, mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES
):
  """Fresh parameters initialized straight into their shardings (a from-scratch run)."""
  shardings = param_shardings(config, mesh, rules)
  with sharding.activation_sharding(mesh, rules):
    return jax.jit(lambda key: nn.meta.unbox(_init_boxed(config, key)), out_shardings=shardings)(
      rng
    )


# --------------------------------------------------------------------------- train state


def state_shardings(
  config: LlamaConfig,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> TrainState:
  """`NamedSharding`s of a reward-model `TrainState` (as `train_state.state_shardings`)."""
  return ts.state_shardings_for(
    param_shardings(config, mesh, rules), abstract_params(config), optimizer, mesh
  )


def abstract_train_state(
  config: LlamaConfig,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> TrainState:
  """`ShapeDtypeStruct`s with shardings: the restore target of a checkpoint on `mesh`."""
  return ts.abstract_train_state_for(
    param_shardings(config, mesh, rules), abstract_params(config), optimizer, mesh
  )


def init_train_state(
  config: LlamaConfig,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  rng: jax.Array,
  params: Any = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> TrainState:
  """A fresh state on `mesh`: `params` (e.g. `from_lm_params`; resharded if needed) or new
  ones from `rng`; the step key comes from `rng` too, independently of the init."""
  init_rng, step_rng = jax.random.split(rng)
  if params is None:
    params = init_sharded_params(config, init_rng, mesh, rules)
  shardings = state_shardings(config, optimizer, mesh, rules)
  return ts.new_train_state(params, shardings, optimizer, step_rng)


# --------------------------------------------------------------------------- loading


def load_params(
  workdir: str, config: LlamaConfig, mesh: Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES
):
  """The parameters of a reward-model run's newest checkpoint, restored onto `mesh`."""
  abstract = jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    abstract_params(config),
    param_shardings(config, mesh, rules),
  )
  return ckpt_lib.load_params(ckpt_lib.checkpoint_dir(workdir), abstract)


def load_reward_model(
  workdir: str, mesh: Mesh | None = None, **overrides: Any
) -> tuple[LlamaConfig, Any]:
  """`(config, params)` of a reward-model workdir (`experiments.reward_model`).

  `overrides` replace config fields (compute ones such as dtype); `mesh` defaults to all
  devices along fsdp.
  """
  config_file = Path(workdir) / MODEL_CONFIG_FILE
  if not config_file.exists():
    raise FileNotFoundError(f"{workdir}: no {MODEL_CONFIG_FILE}; not a reward-model workdir")
  config = LlamaConfig.from_dict(json.loads(config_file.read_text())).replace(**overrides)
  mesh = mesh or sharding.make_mesh()
  return config, load_params(workdir, config, mesh)


def num_params(config: LlamaConfig) -> int:
  """Parameters of the reward model: the trunk's and the head's D + 1."""
  return trunk_config(config).num_params() + config.d_model + 1


def flops_per_token(config: LlamaConfig, seq_len: int) -> float:
  """Training FLOPs per token: the LM's without the LM head's matmul."""
  return config.flops_per_token(seq_len) - 6.0 * config.vocab_size * config.d_model
