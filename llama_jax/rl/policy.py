"""The policy a sampling or online-RL stage starts from: its tokenizer, mesh, model config and
weights, and for online RL a frozen reference copy.

    policy = load_policy(tokenizer, mesh, config, params, reference=True)   # params: loaded
    policy = load_policy(tokenizer, mesh, config)      # random weights (warned), for smoke runs
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
from jax.sharding import Mesh

from llama_jax.model.config import LlamaConfig
from llama_jax.parallel import sharding
from llama_jax.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Policy:
  """A model to sample from (and train): what encodes its prompts, where it runs, its
  architecture and parameters, and `ref_params`, the frozen reference of online RL (None
  when not asked for)."""

  tokenizer: Tokenizer
  mesh: Mesh
  config: LlamaConfig
  params: Any
  ref_params: Any = None


def load_policy(
  tokenizer: Tokenizer,
  mesh: Mesh,
  config: LlamaConfig,
  params: Any = None,
  *,
  seed: int = 0,
  reference: bool = False,
) -> Policy:
  """The policy of `config` with `params` (e.g. `checkpoint.workdirs.load_model`'s, on
  `mesh`), or with random weights from `seed` if None (a warning: nothing was loaded).
  Refuses a model that does not divide the mesh. `reference`: also keep a copy of the
  parameters as the frozen reference (its own buffers: the policy's arrays are donated to
  its first update)."""
  sharding.check_fits_mesh(config, mesh)
  if params is None:
    log.warning("no weights given (init_from is empty): the policy starts from random weights")
    params = sharding.init_params(config, jax.random.key(seed), mesh)
  ref_params = jax.tree.map(lambda x: x.copy(), params) if reference else None
  return Policy(tokenizer, mesh, config, params, ref_params)
