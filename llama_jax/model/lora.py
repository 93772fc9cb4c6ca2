"""Low-rank adapters (LoRA, Hu et al. 2021) on the attention and MLP projections.

    model = Llama(config, lora=LoraConfig(rank=16, alpha=32))
    params = sharding.init_missing(model, base_params, rng, mesh)  # fresh adapters, B = 0
    tx = train_state.make_optimizer(opt_cfg, trainable=lora.trainable_mask)
    ...                                                            # any SFT / DPO / GRPO step
    merged = lora.merge(params, model.lora)                        # plain Llama params, HF export

(`sharding` is `llama_jax.parallel.sharding`; `llama_jax.steps.common.new_state(model,
optimizer, mesh, key, params=base_params)` makes the whole train state, adapters included.)

A projection W (e.g. q: [D, N, H]) gets A [D, r] and B [r, N, H] beside it, named
`q_lora_a` / `q_lora_b`, and computes x·W + (alpha / r)·(x·A)·B. The adapter path is two thin
matmuls on the activations, never the full-size product A·B, so the weight gradients of the
frozen W are never formed. B starts at 0 (the adapted model starts as the base one), A as
N(0, 1/fan_in).

What trains is decided by the parameter tree alone (`trainable_mask`): with adapters present
only they train (and any parameter outside the adapted trunk, such as a reward head); the
optimizer holds moments for them only (optax masking), and the train step takes gradients
with respect to them only (`steps.common.accumulate_gradients`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ATTENTION_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
ADAPTER_SUFFIXES = ("_lora_a", "_lora_b")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """Adapter settings.

  Attributes:
    rank: r, the inner dimension of A and B.
    alpha: the update is scaled by alpha / rank (as in PEFT), so a rank sweep at a fixed
      alpha keeps the learning rate meaningful.
    targets: which projections get adapters: any of q, k, v, o, gate, up, down.
  """

  rank: int = 8
  alpha: float = 16.0
  targets: tuple[str, ...] = ATTENTION_TARGETS + MLP_TARGETS

  def __post_init__(self):
    if isinstance(self.targets, str):  # "q,v" from a command line
      object.__setattr__(self, "targets", tuple(t for t in self.targets.split(",") if t))
    object.__setattr__(self, "targets", tuple(self.targets))  # lists from JSON: hashable
    known = ATTENTION_TARGETS + MLP_TARGETS
    unknown = [t for t in self.targets if t not in known]
    if unknown or not self.targets:
      raise ValueError(f"LoraConfig.targets={self.targets!r}; expected a subset of {known}")
    if self.rank < 1:
      raise ValueError(f"LoraConfig.rank={self.rank}; expected >= 1")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def project(
  module,
  name: str,
  x: jax.Array,
  w: jax.Array,
  spec: str,
  axes: Sequence[str],
  lora: LoraConfig | None,
  dtype,
) -> jax.Array:
  """`einsum(spec, x, w)` plus, if `lora` targets `name`, the adapter path.

  `spec` reads like "BTD,DNH->BTNH"; the weight's letters shared with `x` are its input
  dimensions, the rest its output ones. The adapters are declared on `module` with the
  weight's logical axes for their outer dimensions and "lora_rank" for r.
  """
  out = jnp.einsum(spec, x, w)
  if lora is None or name not in lora.targets:
    return out
  lhs, out_letters = spec.split("->")
  x_letters, w_letters = lhs.split(",")
  n_in = sum(c in x_letters for c in w_letters)
  in_axes, out_axes = tuple(axes[:n_in]), tuple(axes[n_in:])
  in_shape, out_shape = w.shape[:n_in], w.shape[n_in:]
  fan_in = math.prod(in_shape)
  a = module.param(
    f"{name}_lora_a",
    nn.with_logical_partitioning(
      nn.initializers.normal(1 / math.sqrt(fan_in)), (*in_axes, "lora_rank")
    ),
    (*in_shape, lora.rank),
    jnp.float32,
  )
  b = module.param(
    f"{name}_lora_b",
    nn.with_logical_partitioning(nn.initializers.zeros, ("lora_rank", *out_axes)),
    (lora.rank, *out_shape),
    jnp.float32,
  )
  w_in, w_out = w_letters[:n_in], w_letters[n_in:]
  batch = x_letters.replace(w_in, "")
  low = jnp.einsum(f"{x_letters},{w_in}r->{batch}r", x, a.astype(dtype))
  delta = jnp.einsum(f"{batch}r,r{w_out}->{out_letters}", low, b.astype(dtype))
  return out + (lora.scale * delta).astype(out.dtype)


def without_adapters(model):
  """The model a LoRA model adapts (its reference: what the frozen weights alone compute),
  or `model` itself if it has no adapters."""
  return model.clone(lora=None) if getattr(model, "lora", None) is not None else model


# --------------------------------------------------------------------------- parameter trees


def is_adapter(path) -> bool:
  """Whether a tree path (from `jax.tree_util.tree_*_with_path`) ends at an adapter."""
  last = path[-1]
  return str(getattr(last, "key", last)).endswith(ADAPTER_SUFFIXES)


def has_adapters(params: Any) -> bool:
  return any(is_adapter(p) for p, _ in jax.tree_util.tree_leaves_with_path(params))


def trainable_mask(params: Any) -> Any:
  """Bool tree: with adapters in `params`, True for the adapters and for parameters outside
  the adapted trunk (a reward or value head, `{"lm": trunk, "head": ...}`); without, all True."""
  if not has_adapters(params):
    return jax.tree.map(lambda _: True, params)

  def trains(path, _):
    top = str(getattr(path[0], "key", path[0]))
    return is_adapter(path) or top == "head"

  return jax.tree_util.tree_map_with_path(trains, params)


def split(params: Any, mask: Any) -> tuple[Any, Any]:
  """`(trainable, frozen)`: two trees shaped like `params`, with None where the other holds
  the leaf (`merge` puts them back together)."""
  trainable = jax.tree.map(lambda p, m: p if m else None, params, mask)
  frozen = jax.tree.map(lambda p, m: None if m else p, params, mask)
  return trainable, frozen


def merge_trees(trainable: Any, frozen: Any) -> Any:
  """Inverse of `split`."""
  return jax.tree.map(
    lambda t, f: f if t is None else t, trainable, frozen, is_leaf=lambda x: x is None
  )


def merge(params: Any, lora: LoraConfig) -> Any:
  """Plain parameters with every adapter folded in: W + (alpha / r)·A·B, in W's dtype. The
  result loads into `Llama(config)` without adapters and exports to Hugging Face as is."""

  def fold(tree):
    if not isinstance(tree, dict):
      return tree
    out = {k: fold(v) for k, v in tree.items() if not k.endswith(ADAPTER_SUFFIXES)}
    for name in [k for k in tree if k.endswith("_lora_a")]:
      base = name.removesuffix("_lora_a")
      a, b, w = tree[name], tree[f"{base}_lora_b"], tree[base]
      lead = a.ndim + b.ndim - 2 - w.ndim  # stacked layers (scan_layers) come first
      a2 = a.reshape(*a.shape[:lead], -1, a.shape[-1])  # [..., in, r]
      b2 = b.reshape(*b.shape[:lead], b.shape[lead], -1)  # [..., r, out]
      delta = jnp.einsum("...ir,...ro->...io", a2.astype(jnp.float32), b2.astype(jnp.float32))
      out[base] = (w.astype(jnp.float32) + lora.scale * delta.reshape(w.shape)).astype(w.dtype)
    return out

  return fold(params)
