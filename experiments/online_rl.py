"""What the online-RL launchers (`experiments.grpo`, `experiments.ppo`) share: config →
library wiring only. The algorithms are built by the library (`llama_jax.rl.grpo.build`,
`llama_jax.rl.ppo.build`); each launcher hands its algorithm to `train` here, which runs
`online.train_online` with the configured policy, sampler, scorer, prompts and loop.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from jax.sharding import Mesh

from experiments import data_sources, models, runs, sections
from llama_jax.generation.decode import decode_program, model_stop_ids
from llama_jax.parallel import aot, sharding
from llama_jax.rl import online, rollouts, scorers
from llama_jax.rl import policy as policy_lib


def check_minibatches(cfg: ml_collections.ConfigDict, mesh, samples_per_prompt: int) -> None:
  """The rollout rows (`data.batch_size` × samples) must split into `train.num_minibatches`
  minibatches and `train.grad_accum_steps` micro-batches that divide the mesh."""
  try:
    online.check_minibatches(
      cfg.data.batch_size * samples_per_prompt, cfg.train.num_minibatches, mesh,
      cfg.train.grad_accum_steps,
    )  # fmt: skip
  except ValueError as e:
    raise ValueError(f"data.batch_size × {samples_per_prompt} samples, train: {e}") from None


def optimizer_config(cfg: ml_collections.ConfigDict, section: ml_collections.ConfigDict):
  """An `optimizer` section as an `OptimizerConfig` counted in updates (total_steps 0: every
  update of the run, `train.num_minibatches` per iteration)."""
  num_updates = cfg.train.num_steps * cfg.train.num_minibatches
  return sections.optimizer_config(section, num_updates)


def run_shape(cfg: ml_collections.ConfigDict) -> dict[str, int]:
  """The builders' run-shape arguments (`rl.grpo.build`, `rl.ppo.build`) from `train`."""
  return {
    "num_minibatches": cfg.train.num_minibatches,
    "grad_accum_steps": cfg.train.grad_accum_steps,
  }


def start(
  cfg: ml_collections.ConfigDict, workdir: str, stage: str, samples_per_prompt: int
) -> policy_lib.Policy:
  """The run's start (`runs.start_run`: config check, tokenizer, mesh, model, run files)
  with the online checks (the model fits the training and sampling meshes, the rollout
  splits into minibatches), and the policy with its frozen reference (random weights if
  `init_from` is empty)."""

  def check(model_cfg, cfg, tokenizer, mesh):
    models.check_tokenizer(model_cfg, tokenizer, cfg)
    sharding.check_fits_mesh(model_cfg, mesh)
    sharding.check_fits_mesh(model_cfg, sampling_mesh(cfg, mesh))
    check_minibatches(cfg, mesh, samples_per_prompt)

  run = runs.start_run(cfg, workdir, stage, check=check)
  return policy_lib.load_policy(
    run.tokenizer, run.mesh, run.model_config, run.params, seed=cfg.generation.seed,
    reference=True,
  )  # fmt: skip


def prompt_iterator(cfg: ml_collections.ConfigDict) -> rollouts.PromptIterator:
  """The configured prompts, `data.batch_size` per iteration, reshuffled every epoch."""
  records = data_sources.prompt_records(cfg.data)
  return rollouts.PromptIterator(records, cfg.data.batch_size, seed=cfg.data.seed)


def sampling_mesh(cfg: ml_collections.ConfigDict, mesh: Mesh) -> Mesh:
  """The `sampling_mesh` section over the training mesh's devices (`online.sampling_mesh`):
  `mesh` itself when all its axes are 0."""
  s = cfg.sampling_mesh
  if not (s.data or s.fsdp or s.tensor):
    return mesh
  try:
    return online.sampling_mesh(mesh, {a: s[a] for a in ("data", "fsdp", "tensor")},
                                s.num_devices)  # fmt: skip
  except ValueError as e:
    raise ValueError(f"sampling_mesh: {e}") from e


def sampler(cfg: ml_collections.ConfigDict, model_cfg, tokenizer, mesh, num_samples: int):
  """The configured rollout sampler (`online.Sampler`), `num_samples` responses per prompt,
  on the `sampling_mesh` (by default the training `mesh`)."""
  gen = sections.generation_config(cfg, tokenizer.stop_ids, tokenizer.pad_id, num_samples)
  model = models.build_model(cfg, model_cfg)  # samples with the policy's adapters, if any
  return online.Sampler(model, tokenizer, gen, chat=cfg.chat, mesh=sampling_mesh(cfg, mesh))


def train(
  cfg: ml_collections.ConfigDict,
  workdir: str,
  algorithm: online.Algorithm,
  init_state: Callable[[], Any],
  policy: policy_lib.Policy,
  *,
  num_samples: int,
  meta: Mapping[str, Any],
  no_eos_penalty: float = 0.0,
  plot_panels: Sequence[Sequence[str]] = online.PLOT_PANELS,
) -> dict[str, Any]:
  """Runs (or resumes) `algorithm` in `workdir` (`online.train_online`): `init_state()` on a
  fresh start, `num_samples` responses per prompt from the configured sampler, scored by the
  `scorer` section, over the configured prompts and loop. Returns `online.summarize`."""
  tokenizer, mesh = policy.tokenizer, policy.mesh
  iteration = online.make_iteration(
    algorithm,
    sampler(cfg, policy.config, tokenizer, mesh, num_samples),
    scorers.scorer_from_section(cfg.scorer, tokenizer, mesh=mesh),
    policy.ref_params,
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
  with the `scorer` section's models (`experiments.compile_check`); returns `(programs, rows,
  seq_len, reward-model params)`."""
  gen = sections.generation_config(cfg, model_stop_ids(model_cfg), num_samples=num_samples)
  scorer = scorers.scorer_config(cfg.scorer)
  rms = scorers.reward_model_params(scorer.kind, model_cfg, mesh)
  seq_len = rollouts.row_length([[0] * assumed.prompt_len], gen.max_new_tokens, 64)
  smesh = sampling_mesh(cfg, mesh)
  sharding.check_fits_mesh(model_cfg, smesh)
  # On a mesh of its own the sampler holds a copy of the weights beside everything else
  # (counted on every device: the devices may be shared).
  copy = () if smesh is mesh else sharding.abstract_sharded_params(model_cfg, smesh)
  generate = decode_program(
    model_cfg, gen, cfg.data.batch_size, assumed.prompt_len, smesh, resident=(resident, rms, copy)
  )
  scoring = scorers.reward_model_programs(
    scorer.kind, scorer.batch_size, model_cfg, mesh, seq_len, resident
  )
  return [generate, *scoring], cfg.data.batch_size * num_samples, seq_len, rms

