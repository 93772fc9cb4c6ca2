"""`experiments.reward_model` end to end at tiny size: a short run from scratch learns the
bundled helpfulness pairs (`-m full_size`), its checkpoint scores like its evaluation, and runs
start from an LM workdir or a Hugging Face directory."""

import json

import jax
import numpy as np
import pytest

from experiments import models
from experiments import reward_model as rm_experiment
from experiments.configs import reward_model as configs
from experiments.configs.base import TINY_MODEL
from llama_jax import LlamaConfig
from llama_jax.checkpoint import save_hf_checkpoint, workdirs
from llama_jax.data import bundled, ranking
from llama_jax.model import attention, reward_model
from llama_jax.objectives.reward_model import RATING_NAMES
from llama_jax.parallel import sharding
from llama_jax.parallel.sharding import init_params
from llama_jax.rl import rewards
from llama_jax.testing import save_workdir
from llama_jax.tokenizer import tiny_tokenizer
from llama_jax.training import train_state as ts
from llama_jax.training.metrics import read_metrics

SMALL_MODEL = dict(num_layers=2, d_model=64, head_dim=16, mlp_dim=128)


def small(cfg, steps, **train):
  """A tiny variant shrunk further for the test suite."""
  cfg.model.update(**SMALL_MODEL)
  cfg.data.update(seq_len=128, batch_size=16)
  cfg.optimizer.update(learning_rate=3e-3, warmup_steps=5)
  cfg.train.update(num_steps=steps, log_every=10, checkpoint_every=1000, **train)
  return cfg


def helpful(tmp_path_factory, steps):
  workdir = tmp_path_factory.mktemp("rm_helpful")
  results = rm_experiment.run(small(configs.get_config("tiny_helpful"), steps=steps), str(workdir))
  return workdir, results


@pytest.fixture(scope="module")
def helpful_run(tmp_path_factory):
  # 160 steps: with annotator noise in the labels, 80 steps left the training loss flat.
  return helpful(tmp_path_factory, steps=160)


@pytest.fixture(scope="module")
def short_helpful_run(tmp_path_factory):
  return helpful(tmp_path_factory, steps=8)


@pytest.mark.full_size  # 30 s: the training behind it
def test_tiny_helpfulness_rm_beats_chance_held_out(helpful_run):
  workdir, results = helpful_run
  print(json.dumps({k: round(v, 3) for k, v in results.items()}))
  # Labels follow the better response only as often as annotators agree at each rating
  # (bundled.AGREEMENT): a perfect model gets about 0.86 of these 184 held-out pairs, and
  # the weak ratings carry little signal. A short run learns the clear pairs (label always
  # the better response; 40 pairs, chance 0.5) and the whole set beats chance.
  assert results["accuracy/significantly_better"] >= 0.75
  assert results["accuracy"] >= 0.58
  pairs = {"significantly_better": 40, "better": 65, "slightly_better": 49, "negligibly_better": 30}
  for rating, count in pairs.items():
    assert 0.0 <= results[f"accuracy/{rating}"] <= 1.0 and results[f"pairs/{rating}"] == count
  assert sum(results[f"pairs/{r}"] for r in RATING_NAMES) == 184
  rows = read_metrics(workdir)
  assert rows[-1]["eval/accuracy"] == results["accuracy"]
  assert {"rewards/q05", "rewards/q95", "rewards/std", "accuracy/helpfulness"} <= set(results)
  assert (workdir / "reward_scores.png").read_bytes()[:4] == b"\x89PNG"
  assert rows[0]["loss"] > rows[-2]["loss"]


def test_checkpoint_scores_like_its_evaluation(short_helpful_run):
  workdir, results = short_helpful_run
  assert (workdir / "reward_scores.png").read_bytes()[:4] == b"\x89PNG"
  scorer = rewards.RewardScorer.from_workdir(str(workdir), tiny_tokenizer("llama3"))
  test = ranking.filter_records(bundled.load("preference", "test"), concerns=["helpfulness"])
  prompts = [r["prompt"] for r in test]
  chosen = scorer(prompts, [r["chosen"] for r in test])
  rejected = scorer(prompts, [r["rejected"] for r in test])
  assert np.mean(chosen > rejected) == pytest.approx(results["accuracy/chosen_rejected"])


def test_starts_from_an_lm_workdir_or_a_hf_directory(tmp_path):
  fields = {k: v for k, v in TINY_MODEL.items() if k != "preset"} | SMALL_MODEL
  lm_cfg = LlamaConfig.preset("tiny", **fields)
  lm_params = init_params(lm_cfg, jax.random.PRNGKey(7))
  trunk = {k: v for k, v in lm_params.items() if k != "lm_head"}
  # An LM experiment workdir: model_config.json and an Orbax TrainState checkpoint.
  mesh = sharding.make_mesh()
  opt = ts.make_optimizer(ts.OptimizerConfig(warmup_steps=1, total_steps=2))
  state = ts.init_train_state(lm_cfg, opt, mesh, jax.random.PRNGKey(0), params=lm_params)
  lm_dir = save_workdir(tmp_path / "lm", lm_cfg, state)

  # One step at learning rate 0: the saved reward model is the LM's trunk and a fresh head.
  cfg = small(configs.get_config("tiny_llama3"), steps=1)
  cfg.init_from = str(lm_dir)
  cfg.data.eval_split = ""
  cfg.optimizer.update(learning_rate=0.0, warmup_steps=0, schedule="constant")
  rm_experiment.run(cfg, str(tmp_path / "rm"))
  config, params = workdirs.load_reward_model(str(tmp_path / "rm"))
  assert config == lm_cfg and set(params) == {"lm", "head"}
  assert_trees_equal(params["lm"], trunk)
  assert float(np.abs(params["head"]["kernel"]).max()) > 0

  # A Hugging Face directory gives the same trunk.
  save_hf_checkpoint(tmp_path / "hf", lm_cfg, lm_params)
  cfg.init_from = str(tmp_path / "hf")
  hf_cfg, hf_params = models.load_model(cfg, mesh)
  hf_rm = reward_model.from_lm_params(hf_cfg, hf_params, jax.random.PRNGKey(0), mesh)
  assert_trees_equal(hf_rm["lm"], trunk)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


@pytest.mark.parametrize("variant", ["llama2_7b_helpful", "llama2_7b_safety", "llama3p1_8b"])
def test_real_configs_are_consistent(variant):
  cfg = configs.get_config(variant)
  model = LlamaConfig.preset(cfg.model.preset, scan_layers=True)
  assert cfg.data.batch_size == 512 and cfg.train.warmup_fraction == 0.03
  assert cfg.optimizer.learning_rate == 1e-5 and cfg.optimizer.final_lr_fraction == 0.1
  assert cfg.data.batch_size % cfg.train.grad_accum_steps == 0
  # "auto" takes XLA attention for the ranking rows' extra mask, whatever the platform
  assert cfg.model.attention_impl == "auto"
  assert attention.resolve("auto", extra_mask=True, platform="tpu") == "xla"
  shapes = reward_model.abstract_params(model)
  count = sum(np.prod(x.shape) for x in jax.tree.leaves(shapes))
  assert count == reward_model.num_params(model)
  assert count == model.num_params() - model.vocab_size * model.d_model + model.d_model + 1
  assert cfg.ranking.margins == ("none" if variant == "llama3p1_8b" else "small")
