"""`experiments.grpo` and `experiments.ppo` end to end at tiny size: from a short SFT run, on
the bundled unsafe prompts with their verifiable reward (a refusal scores 1), a short run of
each algorithm (GRPO, PPO, RLOO, REINFORCE++) raises the mean reward well above its start
while the KL to the reference stays bounded (`-m full_size`: about 2 minutes); at smoke size
(`make test`) the runs write their metrics (under the names all algorithms share) and plots,
resume, and sample on a mesh of their own as on the training mesh."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from experiments import grpo, lm, models, online_rl, ppo, sections
from experiments.configs import grpo as grpo_configs
from experiments.configs import ppo as ppo_configs
from experiments.configs import sft as sft_configs
from llama_jax.checkpoint import orbax as ckpt_lib
from llama_jax.checkpoint import workdirs
from llama_jax.generation import GenerationConfig
from llama_jax.model import lora
from llama_jax.model.llama import Llama
from llama_jax.parallel import sharding
from llama_jax.rl import grpo as grpo_lib
from llama_jax.rl import online, scorers
from llama_jax.rl import ppo as ppo_lib
from llama_jax.training.metrics import read_metrics
from llama_jax.training.train_state import OptimizerConfig

SMALL = dict(num_layers=2, d_model=64, head_dim=16, mlp_dim=128)


def sft_run(workdir, steps):
  cfg = sft_configs.get_config("tiny")
  cfg.model.update(**SMALL)
  cfg.data.update(seq_len=128, batch_size=16, eval_split="")
  cfg.optimizer.update(learning_rate=3e-3, warmup_steps=5)
  cfg.train.update(num_steps=steps, log_every=40, checkpoint_every=1000, plot=False)
  lm.run(cfg, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
  """A policy that answers the tasks' format: what the learning checks start from (24 s)."""
  return sft_run(tmp_path_factory.mktemp("sft"), steps=120)


@pytest.fixture(scope="module")
def short_sft_workdir(tmp_path_factory):
  """A few SFT steps: enough for the checks that compare runs or read their files."""
  return sft_run(tmp_path_factory.mktemp("short_sft"), steps=8)


def rl_config(configs, sft_workdir, batch_size, steps=15):
  cfg = configs.get_config("tiny")
  cfg.init_from = sft_workdir
  cfg.data.update(tasks="refusal", num_prompts=16, batch_size=batch_size)
  cfg.generation.max_new_tokens = 16
  cfg.optimizer.learning_rate = 1e-3
  cfg.train.update(num_steps=steps, checkpoint_every=1000)
  return cfg


SHARED = {"objective/kl", "policy/entropy", "policy/clipfrac", "policy/approxkl", "loss/policy"}


def report(name, out, kl_key="objective/kl"):
  keys = ("score/mean", kl_key, "response/length", "response/eos_rate")
  print(name, json.dumps({p: {k: round(out[p][k], 3) for k in keys} for p in ("start", "end")}))


@pytest.mark.full_size  # 45 s with its SFT start; the short runs below check the files
def test_grpo_raises_the_reward_with_bounded_kl(sft_workdir, tmp_path):
  cfg = rl_config(grpo_configs, sft_workdir, batch_size=8)
  cfg.grpo.group_size = 4
  out = grpo.run(cfg, str(tmp_path))
  report("grpo", out)
  assert out["end"]["score/mean"] > out["start"]["score/mean"] + 0.15
  assert out["end"]["objective/kl"] < 10.0  # nats per response of ≤ 16 tokens
  rows = read_metrics(tmp_path)
  assert len(rows) == 15 and {"time/generation", "response/eos_rate", "loss/kl"} | SHARED <= set(
    rows[-1]
  )
  assert (tmp_path / "metrics.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.full_size  # 20 s
def test_ppo_raises_the_reward_with_bounded_kl_and_resumes(sft_workdir, tmp_path):
  cfg = rl_config(ppo_configs, sft_workdir, batch_size=16)
  out = ppo.run(cfg, str(tmp_path))
  report("ppo", out)
  assert out["end"]["score/mean"] > out["start"]["score/mean"] + 0.15
  assert out["end"]["objective/kl"] < 10.0  # nats per response of ≤ 16 tokens
  rows = read_metrics(tmp_path)
  assert {"loss/value", "value/explained_variance", "kl_coef"} | SHARED <= set(rows[-1])
  # The checkpoint holds both models and β; a longer rerun continues from it.
  more = rl_config(ppo_configs, sft_workdir, batch_size=16, steps=16)
  resumed = ppo.run(more, str(tmp_path))
  assert resumed["iterations"] == 1 and len(read_metrics(tmp_path)) == 16


@pytest.mark.full_size  # 21 s; the driver and checkpoints are GRPO's too (sampling-mesh test)
def test_ppo_checkpoint_holds_both_models_and_resumes(short_sft_workdir, tmp_path):
  """The learning check's files and resume at smoke size (2 iterations, then a third)."""
  cfg = rl_config(ppo_configs, short_sft_workdir, batch_size=16, steps=2)
  cfg.generation.max_new_tokens = 8
  out = ppo.run(cfg, str(tmp_path))
  assert out["iterations"] == 2
  assert {"loss/value", "value/explained_variance", "kl_coef"} | SHARED <= set(
    read_metrics(tmp_path)[-1]
  )
  cfg.train.num_steps = 3
  resumed = ppo.run(cfg, str(tmp_path))
  assert resumed["iterations"] == 1 and len(read_metrics(tmp_path)) == 3


@pytest.mark.full_size  # 30 s; the variants' advantages are checked by hand in tests/objectives
@pytest.mark.parametrize("variant", ["tiny_rloo", "tiny_reinforce_pp", "tiny_dr_grpo"])
def test_critic_free_variants_raise_the_reward(sft_workdir, tmp_path, variant):
  """RLOO, REINFORCE++ and Dr. GRPO through the same driver as GRPO (one config option)."""
  cfg = rl_config(grpo_configs, sft_workdir, batch_size=8, steps=10)
  cfg_variant = grpo_configs.get_config(variant)
  cfg.grpo = cfg_variant.grpo
  cfg.grpo.group_size = 4
  out = grpo.run(cfg, str(tmp_path))
  report(variant, out)
  assert out["end"]["score/mean"] > out["start"]["score/mean"] + 0.15
  assert out["end"]["objective/kl"] < 10.0
  assert SHARED <= set(read_metrics(tmp_path)[-1])


@pytest.mark.full_size  # 22 s; LoRA's steps are checked against the merged model in tests/model
def test_grpo_with_lora_raises_the_reward_and_trains_only_adapters(sft_workdir, tmp_path):
  cfg = rl_config(grpo_configs, sft_workdir, batch_size=8, steps=24)
  cfg.grpo.group_size = 4
  cfg.optimizer.learning_rate = 3e-3  # adapters start at zero: LoRA takes larger steps
  cfg.lora.update(rank=8, alpha=16.0)
  out = grpo.run(cfg, str(tmp_path))
  report("grpo_lora", out)
  assert out["end"]["score/mean"] > out["start"]["score/mean"] + 0.15
  # The saved policy: the SFT weights untouched beside trained adapters.
  mesh = sharding.make_mesh()
  config, sft = workdirs.load_model(sft_workdir, mesh)
  model = Llama(config, lora=workdirs.read_lora_config(tmp_path))
  abstract = sharding.abstract_sharded_params(model, mesh)
  saved = ckpt_lib.load_params(ckpt_lib.checkpoint_dir(tmp_path), abstract, within="policy")
  trainable, frozen = lora.split(saved, lora.trainable_mask(saved))
  for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(sft), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert any(float(abs(np.asarray(b)).max()) > 0 for b in jax.tree.leaves(trainable))


@pytest.mark.parametrize(
  "name, sampling",
  [("half", dict(data=2, tensor=2, num_devices=4)),
   pytest.param("data8", dict(data=8), marks=pytest.mark.full_size)],  # 7 s more
)  # fmt: skip
def test_sampling_on_its_own_mesh_gives_the_shared_mesh_results(
  short_sft_workdir, tmp_path, name, sampling
):
  """`sampling_mesh`: sampling on half the devices with tensor = 2, or data-parallel on all 8,
  beside fsdp = 8 training: the weights are resharded every iteration (timed) and the
  iterations equal sampling on the training mesh. The GRPO runs write the metrics all
  algorithms share and their plot."""
  sft_workdir = short_sft_workdir

  def run(name, **sampling):
    cfg = rl_config(grpo_configs, sft_workdir, batch_size=8, steps=2)
    cfg.grpo.group_size = 2
    cfg.mesh.update(data=1, fsdp=8, tensor=1)
    cfg.sampling_mesh.update(**sampling)
    grpo.run(cfg, str(tmp_path / name))
    return read_metrics(tmp_path / name)

  shared = run("shared")
  assert all(r["time/weight_sync"] < 1e-3 for r in shared)  # nothing is copied
  assert len(shared) == 2 and {"time/generation", "response/eos_rate", "loss/kl"} | SHARED <= set(
    shared[-1]
  )
  assert (tmp_path / "shared" / "metrics.png").read_bytes()[:4] == b"\x89PNG"
  # The sampler's log-probs are the training forward's (float32: round-off).
  assert all(r["rollout/logp_mismatch"] < 1e-4 for r in shared)
  cfg = rl_config(grpo_configs, sft_workdir, batch_size=8)
  cfg.mesh.update(data=1, fsdp=8, tensor=1)
  mesh = sections.build_mesh(cfg.mesh)
  assert online_rl.sampling_mesh(cfg, mesh) is mesh
  cfg.sampling_mesh.update(**sampling)
  sampling_mesh = online_rl.sampling_mesh(cfg, mesh)
  assert sampling_mesh.devices.size == sampling.get("num_devices", 8)
  assert dict(sampling_mesh.shape) != dict(mesh.shape)
  own = run(name, **sampling)
  assert all(r["time/weight_sync"] > 0 for r in own)
  for key in ("loss/policy", "objective/kl", "policy/entropy", "score/mean"):
    np.testing.assert_allclose(
      [r[key] for r in own], [r[key] for r in shared], rtol=1e-5, atol=1e-6, err_msg=key
    )


@pytest.mark.parametrize("stage", ["grpo", "ppo"])
def test_an_iteration_through_the_library_builder_equals_the_launchers(stage):
  """`rl.grpo.build` / `rl.ppo.build` called with library dataclasses alone take the same
  iteration as the launcher's algorithm, sampler and scorer built from its config."""
  configs, launcher = {"grpo": (grpo_configs, grpo), "ppo": (ppo_configs, ppo)}[stage]
  cfg = configs.get_config("tiny")
  cfg.model.update(**SMALL)
  cfg.data.update(tasks="arithmetic", num_prompts=8, batch_size=8)  # 16 rows: 2 × 8 devices
  cfg.generation.max_new_tokens = 8
  cfg.train.update(num_steps=3, num_minibatches=2)
  samples = 2
  if stage == "grpo":
    cfg.grpo.group_size = samples
  else:
    cfg.generation.num_samples = samples
  model_cfg, mesh = sections.model_config(cfg), sections.build_mesh(cfg.mesh)
  tokenizer = models.build_tokenizer(cfg.tokenizer)
  opt = OptimizerConfig(**cfg.optimizer.to_dict() | {"total_steps": 3 * 2})  # updates
  if stage == "grpo":
    ours = grpo_lib.build(
      model_cfg, mesh, grpo_lib.GRPOConfig(group_size=samples, max_length=8), opt,
      num_minibatches=2,
    )  # fmt: skip
    theirs = launcher.build(cfg, model_cfg, mesh)
  else:
    ours = ppo_lib.build(
      model_cfg, mesh, ppo_lib.PPOConfig(kl_coef=0.02, no_eos_penalty=-1.0), opt,
      value_optimizer=dataclasses.replace(opt, learning_rate=1e-3), num_minibatches=2,
    )  # fmt: skip
    theirs = launcher.build(cfg, model_cfg, model_cfg, mesh)
  assert ours.config == theirs.config and ours.num_minibatches == theirs.num_minibatches
  params = sharding.init_params(model_cfg, jax.random.PRNGKey(0), mesh)
  ref = jax.tree.map(lambda x: x.copy(), params)
  gen = GenerationConfig(8, samples, stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id)
  prompts = online_rl.prompt_iterator(cfg)
  batch = next(prompts)
  results = []
  for algorithm, sampler, scorer in (
    (ours, online.Sampler(model_cfg, tokenizer, gen), scorers.check_answer),
    (theirs, online_rl.sampler(cfg, model_cfg, tokenizer, mesh, samples),
     scorers.scorer_from_section(cfg.scorer, tokenizer, mesh=mesh)),
  ):  # fmt: skip
    penalty = getattr(algorithm.config, "no_eos_penalty", 0.0)  # PPO's (-1 in its tiny config)
    iteration = online.make_iteration(algorithm, sampler, scorer, ref, no_eos_penalty=penalty)
    state = algorithm.init_state(jax.tree.map(lambda x: x.copy(), params), jax.random.PRNGKey(1))
    state, metrics = iteration(state, batch)
    results.append((jax.device_get(state.policy.params), metrics))
  (ours_params, ours_metrics), (their_params, their_metrics) = results
  assert ours_metrics.keys() == their_metrics.keys()
  for key in ours_metrics:
    if key == "rollout/logp_mismatch":  # round-off of each side's own decoder: both tiny
      assert max(ours_metrics[key], their_metrics[key]) < 1e-5
    elif not key.startswith("time/"):
      assert ours_metrics[key] == pytest.approx(their_metrics[key], rel=1e-6, abs=1e-7), key
  for x, y in zip(jax.tree.leaves(ours_params), jax.tree.leaves(their_params), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
