"""What the online-RL launchers (`experiments.grpo`, `experiments.ppo`) share: config →
library wiring only. The algorithms are `llama_jax.rl.online`'s; each launcher builds its
algorithm object and hands it to `train` here, which runs `online.train_online` with the
configured policy, sampler, scorer, prompts and loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
from jax.sharding import Mesh

from experiments import generate as generate_experiment
from experiments import models, rejection_sampling, sections
from llama_jax.model.config import LlamaConfig
from llama_jax.parallel import aot, sharding
from llama_jax.rl import online, rollouts
from llama_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class Policy:
  """The policy an online-RL run starts from (`init_from`), its frozen reference and what
  both run on."""

  tokenizer: Tokenizer
  mesh: Mesh
  config: LlamaConfig
  params: Any
  ref_params: Any  # a copy: the policy's arrays are donated to its first update


def check_minibatches(cfg: ml_collections.ConfigDict, mesh, samples_per_prompt: int) -> None:
  """The rollout rows must split into minibatches and micro-batches that divide the mesh."""
  rows = cfg.data.batch_size * samples_per_prompt
  if rows % cfg.train.num_minibatches:
    raise ValueError(
      f"data.batch_size × samples = {rows} rows do not split into "
      f"train.num_minibatches={cfg.train.num_minibatches}"
    )
  minibatch = rows // cfg.train.num_minibatches
  sharding.check_batch_fits_mesh(minibatch, mesh, "minibatch rows")
  sharding.check_batch_fits_mesh(
    minibatch // cfg.train.grad_accum_steps, mesh, "micro-batch rows (train.grad_accum_steps)"
  )


def load_policy(cfg: ml_collections.ConfigDict, samples_per_prompt: int) -> Policy:
  """The policy of `init_from` and a copy as the reference. Checks that the model and the
  minibatches fit the mesh before anything compiles."""
  tokenizer, mesh, model_cfg, params = generate_experiment.load_policy(cfg)
  sharding.check_fits_mesh(model_cfg, mesh)
  sharding.check_fits_mesh(model_cfg, sampling_mesh(cfg, mesh))
  check_minibatches(cfg, mesh, samples_per_prompt)
  ref_params = jax.tree.map(lambda x: x.copy(), params)
  return Policy(tokenizer, mesh, model_cfg, params, ref_params)


def prompt_iterator(cfg: ml_collections.ConfigDict) -> rollouts.PromptIterator:
  """The configured prompts, `data.batch_size` per iteration, reshuffled every epoch."""
  records = generate_experiment.prompt_records(cfg.data)
  return rollouts.PromptIterator(records, cfg.data.batch_size, seed=cfg.data.seed)


def sampling_mesh(cfg: ml_collections.ConfigDict, mesh: Mesh) -> Mesh:
  """The `sampling_mesh` section over the training mesh's devices: `mesh` itself when all its
  axes are 0, else a mesh of that shape (an axis left 0 is 1; one may be -1) over
  `num_devices` of them (0 = all), an equal share of each process's so that every process
  samples."""
  s = cfg.sampling_mesh
  if not (s.data or s.fsdp or s.tensor):
    return mesh
  by_process: dict[int, list[jax.Device]] = {}
  for d in sorted(mesh.devices.flat, key=lambda d: (d.process_index, d.id)):
    by_process.setdefault(d.process_index, []).append(d)
  n = s.num_devices or mesh.devices.size
  if n % len(by_process) or not 0 < n <= mesh.devices.size:
    raise ValueError(
      f"sampling_mesh.num_devices={s.num_devices}: expected 0 or a multiple of the "
      f"{len(by_process)} processes up to the mesh's {mesh.devices.size} devices"
    )
  devices = [d for ds in by_process.values() for d in ds[: n // len(by_process)]]
  shape = {a: s[a] or 1 for a in ("data", "fsdp", "tensor")}  # an axis left 0 is 1 wide
  try:
    return sections.build_mesh(ml_collections.ConfigDict(shape), devices)
  except ValueError as e:
    raise ValueError(f"sampling_mesh: {e}") from e


def sampler(cfg: ml_collections.ConfigDict, model_cfg, tokenizer, mesh, num_samples: int):
  """The configured rollout sampler (`online.Sampler`), `num_samples` responses per prompt,
  on the `sampling_mesh` (by default the training `mesh`)."""
  gen = generate_experiment.generation_config(
    cfg, tokenizer.stop_ids, tokenizer.pad_id, num_samples
  )
  model = models.build_model(cfg, model_cfg)  # samples with the policy's adapters, if any
  return online.Sampler(model, tokenizer, gen, chat=cfg.chat, mesh=sampling_mesh(cfg, mesh))


def train(
  cfg: ml_collections.ConfigDict,
  workdir: str,
  algorithm: online.Algorithm,
  init_state: Callable[[], Any],
  policy: Policy,
  *,
  num_samples: int,
  meta: Mapping[str, Any],
  no_eos_penalty: float = 0.0,
  plot_panels: Sequence[Sequence[str]] = online.PLOT_PANELS,
) -> dict[str, Any]:
  """Runs (or resumes) `algorithm` in `workdir` (`online.train_online`): `init_state()` on a
  fresh start, `num_samples` responses per prompt from the configured sampler, scored by the
  `reward` section, over the configured prompts and loop. Returns `online.summarize`."""
  tokenizer, mesh = policy.tokenizer, policy.mesh
  iteration = online.make_iteration(
    algorithm,
    sampler(cfg, policy.config, tokenizer, mesh, num_samples),
    generate_experiment.build_scorer(cfg.reward, tokenizer, mesh),
    policy.ref_params,
    num_minibatches=cfg.train.num_minibatches,
    no_eos_penalty=no_eos_penalty,
    seed=cfg.train.seed,
  )
  return online.train_online(
    iteration, init_state=init_state, abstract_state=algorithm.abstract_state(),
    prompts=prompt_iterator(cfg), workdir=workdir, loop=sections.loop_config(cfg.train),
    meta=meta, plot_panels=plot_panels,
  )  # fmt: skip


def rollout_programs(cfg, model_cfg, mesh, assumed: aot.Assumed, num_samples: int, resident):
  """Sampling `num_samples` responses to each of `data.batch_size` prompts and scoring them
  with the `reward` section's models (`experiments.compile_check`); returns `(programs, rows,
  seq_len, reward-model params)`."""
  gen = generate_experiment.check_generation_config(cfg, model_cfg, num_samples)
  rms = rejection_sampling.reward_model_params(cfg.reward, model_cfg, mesh)
  seq_len = rollouts.row_length([[0] * assumed.prompt_len], gen.max_new_tokens, 64)
  smesh = sampling_mesh(cfg, mesh)
  sharding.check_fits_mesh(model_cfg, smesh)
  # On a mesh of its own the sampler holds a copy of the weights beside everything else
  # (counted on every device: the devices may be shared).
  copy = () if smesh is mesh else sharding.abstract_sharded_params(model_cfg, smesh)
  generate = generate_experiment.generation_program(
    model_cfg, gen, cfg.data.batch_size, assumed.prompt_len, smesh, resident=(resident, rms, copy)
  )
  scoring = rejection_sampling.scorer_programs(cfg.reward, model_cfg, mesh, seq_len, resident)
  return [generate, *scoring], cfg.data.batch_size * num_samples, seq_len, rms
