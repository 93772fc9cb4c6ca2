"""One process of the 2-process localhost tests (tests/rl/test_multihost.py); not a test itself.

    multihost_worker.py forward PROCESS_ID PORT OUT_DIR HF_CHECKPOINT_DIR
    multihost_worker.py train   PROCESS_ID PORT OUT_DIR
    multihost_worker.py rl      PROCESS_ID PORT OUT_DIR REWARD_MODEL_WORKDIR grpo|ppo

`train_run` and `rl_run` are also imported by the test to compute the single-process
references.
"""

import os
import sys

if __name__ == "__main__":  # before JAX starts: 4 CPU devices per process
  # The test's XLA flags for tiny programs (tests/conftest.py), with 4 devices instead of 8.
  flags = os.environ.get("XLA_FLAGS", "").replace("--xla_force_host_platform_device_count=8", "")
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count=4"
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from experiments import grpo, ppo  # noqa: E402
from experiments.configs import grpo as grpo_configs  # noqa: E402
from experiments.configs import ppo as ppo_configs  # noqa: E402
from llama_jax import LlamaConfig  # noqa: E402
from llama_jax.checkpoint import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402
from llama_jax.checkpoint import orbax as ckpt_lib  # noqa: E402
from llama_jax.parallel import sharding
from llama_jax.steps import common, lm  # noqa: E402
from llama_jax.training import train_state as ts  # noqa: E402

TRAIN_CONFIG = LlamaConfig.preset("tiny")
TRAIN_STEPS = 3


def train_batch(step: int, rows: int = 16, t: int = 16) -> dict[str, np.ndarray]:
  """The global batch of `step`, identical on every process."""
  rng = np.random.default_rng(step)
  tokens = rng.integers(0, TRAIN_CONFIG.vocab_size, (rows, t)).astype(np.int32)
  mask = np.ones((rows, t), np.int32)
  mask[:, -1] = 0
  return {
    "tokens": tokens,
    "positions": np.tile(np.arange(t, dtype=np.int32), (rows, 1)),
    "segment_ids": np.ones((rows, t), np.int32),
    "targets": np.roll(tokens, -1, axis=1),
    "target_mask": mask,
  }


def train_run(mesh, steps=range(1, TRAIN_STEPS + 1), state=None):
  """Steps of the LM train step (2 accumulated micro-batches) on `mesh`; returns the state
  and the losses. Every process passes the same global batch; each device gets its rows."""
  optimizer = ts.make_optimizer(
    ts.OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10)
  )
  shardings = ts.state_shardings(TRAIN_CONFIG, optimizer, mesh)
  if state is None:
    state = ts.init_train_state(TRAIN_CONFIG, optimizer, mesh, jax.random.PRNGKey(0))
  step_fn = common.jit_train_step(
    lm.make_train_step(TRAIN_CONFIG, optimizer, mesh=mesh, grad_accum_steps=2), shardings, mesh
  )
  rows = common.batch_sharding(mesh)
  losses = []
  for i in steps:
    batch = {k: sharding.to_global(v, rows) for k, v in train_batch(i).items()}
    state, metrics = step_fn(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses, (optimizer, shardings)


def gathered_params(state) -> dict[str, np.ndarray]:
  flat = jax.tree_util.tree_leaves_with_path(state.params)
  return {
    jax.tree_util.keystr(p): np.asarray(multihost_utils.process_allgather(x, tiled=True))
    for p, x in flat
  }


def train(process_id: int, out: str) -> None:
  """Train 3 steps on fsdp=4 × tensor=2 spanning both processes, checkpointing after step 2;
  then restore step 2 and redo step 3: both must equal the uninterrupted run."""
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  with ckpt_lib.CheckpointManager(os.path.join(out, "ckpt"), async_save=True) as manager:
    state, losses, _ = train_run(mesh, steps=range(1, 3))
    manager.save(2, state, data_state={"batches": 2}, force=True)
    manager.wait_until_finished()
    state, more, (optimizer, _) = train_run(mesh, steps=[3], state=state)
    abstract = ts.abstract_train_state(TRAIN_CONFIG, optimizer, mesh)
    restored, data_state, _ = manager.restore(2, abstract_state=abstract)
  assert data_state == {"batches": 2}, data_state
  resumed, resumed_losses, _ = train_run(mesh, steps=[3], state=restored)
  params, resumed_params = gathered_params(state), gathered_params(resumed)
  if process_id == 0:
    np.savez(os.path.join(out, "params.npz"), **params)
    np.save(os.path.join(out, "losses.npy"), np.array(losses + more))
    np.savez(os.path.join(out, "resumed.npz"), **resumed_params)
    np.save(os.path.join(out, "resumed_losses.npy"), np.array(resumed_losses))


RL_MODEL = dict(num_layers=1, d_model=64, head_dim=16, mlp_dim=128)


def rl_run(algorithm: str, workdir: str, reward_model: str, steps: int) -> dict:
  """`experiments.grpo` / `experiments.ppo` for `steps` iterations (resuming what `workdir`
  holds) on fsdp=4 × tensor=2: 4 prompts × 2 samples from a random tiny policy, rewarded by
  the random reward model in `reward_model` (GRPO: the RM's score; PPO: Llama 2's combined,
  batch-whitened score of it as both helpfulness and safety model)."""
  configs, launcher = (grpo_configs, grpo) if algorithm == "grpo" else (ppo_configs, ppo)
  cfg = configs.get_config("tiny")
  cfg.model.update(**RL_MODEL)
  cfg.mesh.update(data=1, fsdp=4, tensor=2)
  cfg.data.update(tasks="arithmetic", num_prompts=8, batch_size=4)
  cfg.generation.max_new_tokens = 8
  cfg.train.update(num_steps=steps, num_minibatches=2, log_every=1, checkpoint_every=1)
  if algorithm == "grpo":
    cfg.grpo.group_size = 2
    cfg.scorer.update(kind="reward_model", reward_model=reward_model, batch_size=8)
  else:
    cfg.generation.num_samples = 2
    cfg.scorer.update(
      kind="llama2", helpful=reward_model, safety=reward_model, whitening="batch", batch_size=8
    )
  return launcher.run(cfg, workdir)


def rl(process_id: int, out: str, reward_model: str, algorithm: str) -> None:
  """GRPO or PPO: 1 iteration, then a fresh launch to 2 that resumes from the checkpoint."""
  del process_id
  workdir = os.path.join(out, algorithm)
  rl_run(algorithm, workdir, reward_model, steps=1)
  rl_run(algorithm, workdir, reward_model, steps=2)


def forward(process_id: int, out: str, checkpoint: str) -> None:
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  config, params = load_hf_checkpoint(checkpoint, mesh=mesh)
  assert not params["layers_0"]["attn"]["q"].is_fully_addressable  # spans both processes
  local = sum(
    s.data.nbytes for x in jax.tree_util.tree_leaves(params) for s in x.addressable_shards
  )
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (8, 16))
  logits = sharding.make_forward(config, mesh)(params, tokens)
  full = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
  save_hf_checkpoint(os.path.join(out, "saved"), config, params)  # every process calls it
  if process_id == 0:
    np.save(os.path.join(out, "logits.npy"), full)
  print(f"process {process_id}: local parameter bytes {local}")


def main():
  mode, process_id, port, out, *rest = sys.argv[1:]
  process_id = int(process_id)
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process
  sharding.initialize_distributed(f"localhost:{port}", num_processes=2, process_id=process_id)
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
  {"train": train, "forward": forward, "rl": rl}[mode](process_id, out, *rest)


if __name__ == "__main__":
  main()
