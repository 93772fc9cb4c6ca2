"""Model averaging: the weighted mean of parameter trees (Llama 3 averages the models of runs
with different data or hyperparameters at the RM, SFT and DPO stages).

    params = average_params([params_a, params_b], weights=[0.5, 0.5])
    config, params = average_checkpoints(["runs/dpo_a", "runs/dpo_b"], mesh=mesh)

The mean is taken in float32 and cast back to each parameter's dtype. Weights must be
non-negative and are normalized to sum to 1 (None: equal).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax.checkpoint import workdirs
from llama_jax.model.config import LlamaConfig
from llama_jax.parallel import sharding

_ARCHITECTURE_IGNORED = ("dtype", "param_dtype", "attention_impl", "scan_layers", "remat_policy")


def normalized_weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
  """float64 [n] weights summing to 1; equal if None."""
  if n == 0:
    raise ValueError("nothing to average: no models given")
  if weights is None:
    return np.full(n, 1.0 / n)
  w = np.asarray(weights, np.float64)
  if w.shape != (n,):
    raise ValueError(f"{len(w)} weights for {n} models")
  if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
    raise ValueError(f"weights {w.tolist()} must be finite, non-negative, with a positive sum")
  return w / w.sum()


def check_same_tree(reference: Any, other: Any, what: str) -> None:
  """Raises naming the first parameter whose path or shape differs."""
  ref = {
    jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(reference)
  }
  oth = {jax.tree_util.keystr(p): x.shape for p, x in jax.tree_util.tree_leaves_with_path(other)}
  if missing := sorted(ref.keys() ^ oth.keys()):
    raise ValueError(f"{what}: parameter {missing[0]} is in one model but not the other")
  for name, shape in ref.items():
    if oth[name] != shape:
      raise ValueError(f"{what}: parameter {name} has shape {oth[name]}, expected {shape}")


@jax.jit
def _accumulate(total, params, weight):
  return jax.tree.map(lambda t, x: t + weight * x.astype(jnp.float32), total, params)


def _cast_like(total, like):
  return jax.jit(lambda t: jax.tree.map(lambda x, y: x.astype(y.dtype), t, like))(total)


def average_params(trees: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
  """Σ_i w_i · tree_i, leaf by leaf (float32 sums, cast back to the first tree's dtypes)."""
  w = normalized_weights(weights, len(trees))
  for i, tree in enumerate(trees[1:], 1):
    check_same_tree(trees[0], tree, f"model {i}")
  total = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trees[0])
  for tree, wi in zip(trees, w, strict=True):
    total = _accumulate(total, tree, jnp.float32(wi))
  return _cast_like(total, trees[0])


def _architecture(config: LlamaConfig) -> dict[str, Any]:
  return {k: v for k, v in config.to_dict().items() if k not in _ARCHITECTURE_IGNORED}


def average_checkpoints(
  paths: Sequence[str], weights: Sequence[float] | None = None, *, mesh: Mesh | None = None
) -> tuple[LlamaConfig, Any]:
  """`(config, averaged params)` of experiment workdirs or Hugging Face directories.

  Models are loaded one at a time onto `mesh` (default: all devices along fsdp) and added
  into a float32 running sum, so memory holds two models, not all of them. All must be the
  same kind (LM or reward model) and architecture; the config returned is the first's.
  """
  w = normalized_weights(weights, len(paths))
  mesh = mesh or sharding.make_mesh()
  kinds = {p: workdirs.model_kind(p) for p in paths}
  if len(set(kinds.values())) > 1:
    raise ValueError(f"cannot average different kinds of model: {kinds}")
  config, total, first = None, None, None
  for path, wi in zip(paths, w, strict=True):
    cfg, params = workdirs.load_model(path, mesh)
    if config is None:
      config, first = cfg, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
      total = jax.tree.map(lambda x: jnp.zeros_like(x, jnp.float32), params)
    elif _architecture(cfg) != _architecture(config):
      diff = {
        k: (v, _architecture(cfg)[k])
        for k, v in _architecture(config).items()
        if _architecture(cfg)[k] != v
      }
      raise ValueError(f"{path}: architecture differs from {paths[0]}: {diff}")
    else:
      check_same_tree(first, params, path)
    total = _accumulate(total, params, jnp.float32(wi))
    del params
  return config, _cast_like(total, first)
