"""The training state, the optimizer factory with Llama's settings, and sharded state init.

    opt = OptimizerConfig(learning_rate=3e-4, warmup_steps=2000, total_steps=100_000)
    tx = make_optimizer(opt)
    state = init_train_state(model_config, tx, mesh, jax.random.PRNGKey(0))
    shardings = state_shardings(model_config, tx, mesh)   # for jit in/out_shardings

The state holds data only (no functions), so it checkpoints as a plain pytree and every step
function gets the optimizer and model config from its closure.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llama_jax.parallel import sharding


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue bit-identically (besides the data position).

  Attributes:
    step: int32 scalar, optimizer steps taken (skipped non-finite steps included, so the
      learning-rate schedule and the data stay aligned).
    params: the trained parameters (float32 master copy when compute is bfloat16).
    opt_state: the optax state.
    rng: uint32[2] key; each step folds in `step` and never advances it, so a resumed run
      draws the same randomness.
    skipped: int32 scalar, steps whose loss or gradient was non-finite and were not applied.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped: jax.Array


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """AdamW with warmup and a decay schedule; defaults are the Llama 2 pretraining settings.

  Attributes:
    learning_rate: the peak learning rate.
    schedule: "cosine" (warmup, then cosine to `final_lr_fraction` · peak at `total_steps`),
      "linear" (same, straight line) or "constant" (warmup, then flat).
    warmup_steps: linear warmup from 0 to the peak.
    total_steps: where the decay ends (the run length); unused by "constant".
    final_lr_fraction: floor of the decay as a fraction of the peak (Llama 2: 0.1).
    b1, b2, eps: Adam moments; Llama uses 0.9, 0.95, 1e-5.
    weight_decay: decoupled (AdamW) decay, multiplied by the learning rate as in optax.
    decay_norms: also decay the RMSNorm scales; off by default (they are gains around 1, and
      decaying them toward 0 only fights the data).
    grad_clip: clip by global norm (Llama: 1.0); 0 disables.
  """

  learning_rate: float = 3e-4
  schedule: Literal["cosine", "linear", "constant"] = "cosine"
  warmup_steps: int = 2000
  total_steps: int = 100_000
  final_lr_fraction: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-5
  weight_decay: float = 0.1
  decay_norms: bool = False
  grad_clip: float = 1.0

  def __post_init__(self):
    if self.schedule not in ("cosine", "linear", "constant"):
      raise ValueError(
        f"optimizer schedule={self.schedule!r}; expected 'cosine', 'linear' or 'constant'"
      )
    if self.schedule != "constant" and self.total_steps <= self.warmup_steps:
      raise ValueError(
        f"optimizer total_steps={self.total_steps} must exceed warmup_steps="
        f"{self.warmup_steps} for a {self.schedule} schedule"
      )


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
  """Linear warmup to the peak, then cosine / linear decay to the floor, or constant."""
  warmup = optax.linear_schedule(0.0, cfg.learning_rate, max(cfg.warmup_steps, 1))
  floor = cfg.learning_rate * cfg.final_lr_fraction
  decay_steps = cfg.total_steps - cfg.warmup_steps
  if cfg.schedule == "constant":
    decay = optax.constant_schedule(cfg.learning_rate)
  elif cfg.schedule == "cosine":
    decay = optax.cosine_decay_schedule(cfg.learning_rate, decay_steps, cfg.final_lr_fraction)
  else:
    decay = optax.linear_schedule(cfg.learning_rate, floor, decay_steps)
  if cfg.warmup_steps == 0:
    return decay
  return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def weight_decay_mask(params: Any) -> Any:
  """True for every parameter except the RMSNorm scales (any path containing 'norm')."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: "norm" not in jax.tree_util.keystr(path), params
  )


def make_optimizer(
  cfg: OptimizerConfig, trainable: Callable[[Any], Any] | None = None
) -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW on the schedule of `cfg`.

  `trainable(params) -> bool tree` (e.g. `llama_jax.model.lora.trainable_mask`) restricts the
  optimizer to a subset through `optax.masked`: clipping, moments and weight decay see only
  those parameters, and the others hold no optimizer state.
  """
  adamw = optax.adamw(
    learning_rate_schedule(cfg),
    b1=cfg.b1,
    b2=cfg.b2,
    eps=cfg.eps,
    weight_decay=cfg.weight_decay,
    mask=None if cfg.decay_norms else weight_decay_mask,
  )
  tx = adamw if cfg.grad_clip <= 0 else optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)
  return tx if trainable is None else optax.masked(tx, trainable)


def _replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _new_state(params, optimizer, rng) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=optimizer.init(params),
    rng=rng,
    skipped=jnp.zeros((), jnp.int32),
  )


# Any parameter tree, placed as `param_shardings`.


def state_shardings_for(
  param_shardings: Any, abstract_params: Any, optimizer: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
  """A `TrainState` of `NamedSharding`s for parameters placed as `param_shardings`
  (`abstract_params`: their unboxed shapes): optimizer moments follow their parameters,
  counters and the key are replicated."""
  masked = lambda x: isinstance(x, optax.MaskedNode)  # a frozen parameter: no state at all
  opt = optax.tree_utils.tree_map_params(
    optimizer,
    lambda x, s: x if masked(x) else s,
    jax.eval_shape(optimizer.init, abstract_params),
    param_shardings,
    transform_non_params=lambda _: _replicated(mesh),
    is_leaf=masked,
  )
  rep = _replicated(mesh)
  return TrainState(step=rep, params=param_shardings, opt_state=opt, rng=rep, skipped=rep)


def abstract_train_state_for(
  param_shardings: Any, abstract_params: Any, optimizer: optax.GradientTransformation, mesh: Mesh
) -> TrainState:
  """`jax.ShapeDtypeStruct`s with shardings: the restore target of a checkpoint on `mesh`."""
  shapes = jax.eval_shape(
    lambda p: _new_state(p, optimizer, jax.random.PRNGKey(0)), abstract_params
  )
  return jax.tree.map(
    lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    shapes,
    state_shardings_for(param_shardings, abstract_params, optimizer, mesh),
  )


def new_train_state(
  params: Any, shardings: TrainState, optimizer: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
  """A fresh state around `params` (resharded if needed) with the step key `rng`, placed as
  `shardings` (`state_shardings_for`)."""
  make = jax.jit(
    lambda p, key: _new_state(p, optimizer, key),
    in_shardings=(shardings.params, shardings.rng),
    out_shardings=shardings,
  )
  return make(params, rng)


# Any model (`sharding.Model`: a linen module, or a `LlamaConfig` for `Llama(config)`).


def state_shardings(
  model: sharding.Model,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> TrainState:
  """A `TrainState` of `NamedSharding`s: optimizer moments follow their parameters (fsdp /
  tensor sharded), counters and the key are replicated."""
  return state_shardings_for(
    sharding.param_shardings(model, mesh, rules), _abstract_params(model), optimizer, mesh
  )


def abstract_train_state(
  model: sharding.Model,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> TrainState:
  """`jax.ShapeDtypeStruct`s with shardings: the restore target of a checkpoint on `mesh`."""
  return abstract_train_state_for(
    sharding.param_shardings(model, mesh, rules), _abstract_params(model), optimizer, mesh
  )


def init_train_state(
  model: sharding.Model,
  optimizer: optax.GradientTransformation,
  mesh: Mesh,
  rng: jax.Array,
  params: Any = None,
  rules: sharding.Rules = sharding.DEFAULT_RULES,
) -> TrainState:
  """A fresh state placed on `mesh`: new parameters from `rng` unless `params` are given
  (e.g. loaded from a checkpoint; they are resharded if needed). The step key is derived
  from `rng` too, independently of the parameter init."""
  init_rng, step_rng = jax.random.split(rng)
  if params is None:
    params = sharding.init_params(model, init_rng, mesh, rules)
  return new_train_state(
    params, state_shardings(model, optimizer, mesh, rules), optimizer, step_rng
  )


def _abstract_params(model: sharding.Model):
  return nn.meta.unbox(sharding.abstract_params(model))
