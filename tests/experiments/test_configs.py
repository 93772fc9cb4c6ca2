"""Experiment configs: sections derived from the library's dataclasses, and strict keys."""

import dataclasses
import importlib
import inspect

import ml_collections
import pytest

from experiments import sections
from experiments.configs import base
from llama_jax.data.pipeline import PipelineConfig
from llama_jax.generation.decode import GenerationConfig
from llama_jax.generation.sampling import SamplingConfig
from llama_jax.model.lora import LoraConfig
from llama_jax.parallel.sharding import MeshConfig
from llama_jax.rl.scorers import ScorerConfig, scorer_config
from llama_jax.steps.dpo import DPOConfig
from llama_jax.steps.grpo import GRPOConfig
from llama_jax.steps.ppo import PPOConfig
from llama_jax.steps.reward_model import RankingConfig
from llama_jax.training.train_state import OptimizerConfig
from llama_jax.training.trainer import LoopConfig

STAGES = ("pretrain", "sft", "reward_model", "dpo", "rejection_sampling", "generate",
          "llama3_recipe", "llama2_recipe", "ppo", "grpo", "findings")  # fmt: skip


def _defaults(cls, drop=()):
  return {f.name: f.default for f in dataclasses.fields(cls)
          if f.name not in drop and f.default is not dataclasses.MISSING}  # fmt: skip


def test_sections_are_derived_from_the_dataclass_defaults():
  cfg = base.lm_config()
  assert cfg.optimizer.to_dict() == _defaults(OptimizerConfig) | {"total_steps": 0}
  loop = _defaults(LoopConfig)
  assert {k: cfg.train[k] for k in loop} == loop | {"checkpoint_every": 500}
  dpo = importlib.import_module("experiments.configs.dpo").dpo_config().dpo.to_dict()
  assert {k: dpo[k] for k in _defaults(DPOConfig, drop=("loss_chunk_size",))} == (
    _defaults(DPOConfig, drop=("loss_chunk_size",)) | {"nll_coef": 0.2}
  )
  # Each section builds its dataclass as is.
  sections.optimizer_config(cfg.optimizer, 10_000)
  sections.loop_config(cfg.train)


def test_rl_sections_are_derived_from_the_dataclass_defaults():
  ppo = importlib.import_module("experiments.configs.ppo").get_config()
  assert ppo.ppo.to_dict() == _defaults(PPOConfig, drop=("loss_chunk_size",)) | {
    "kl_coef": 0.02,
    "no_eos_penalty": -1.0,
  }
  grpo = importlib.import_module("experiments.configs.grpo").get_config()
  assert grpo.grpo.to_dict() == _defaults(GRPOConfig, drop=("max_length", "loss_chunk_size"))
  generation = importlib.import_module("experiments.configs.generate").get_config().generation
  assert generation.to_dict() == (
    _defaults(GenerationConfig, drop=("sampling", "stop_ids", "pad_id"))
    | _defaults(SamplingConfig)
    | {"max_new_tokens": 48, "num_samples": 4, "seed": 0}
  )
  # The scorer section is `ScorerConfig` with the stage's kind; each builds its dataclass.
  scorer = importlib.import_module("experiments.configs.generate").get_config().scorer
  assert scorer.to_dict() == _defaults(ScorerConfig) | {"kind": "check_answer"}
  rs = importlib.import_module("experiments.configs.rejection_sampling").get_config().scorer
  assert rs.to_dict() == _defaults(ScorerConfig) | {"kind": "reward_model"}
  assert scorer_config(rs) == ScorerConfig(kind="reward_model")
  # Each section builds its dataclass as is.
  sections.from_section(PPOConfig, ppo.ppo)
  sections.from_section(GRPOConfig, grpo.grpo, max_length=32)
  sections.from_section(SamplingConfig, generation)


# (stage, section, dataclass, a field the stage's default variant leaves at its default, a
# different value of the field's type)
DERIVED = [
  ("sft", "mesh", MeshConfig, "tensor", 2),
  ("sft", "data", PipelineConfig, "worker_count", 2),
  ("sft", "optimizer", OptimizerConfig, "b2", 0.99),
  ("sft", "train", LoopConfig, "keep_checkpoints", 5),
  ("sft", "lora", LoraConfig, "alpha", 8.0),
  ("reward_model", "ranking", RankingConfig, "centering", 0.1),
  ("dpo", "dpo", DPOConfig, "beta", 0.5),
  ("ppo", "ppo", PPOConfig, "gamma", 0.99),
  ("grpo", "grpo", GRPOConfig, "clip_eps", 0.3),
  ("grpo", "optimizer", OptimizerConfig, "b1", 0.8),
  ("generate", "generation", GenerationConfig, "prompt_bucket", 32),
  ("generate", "generation", SamplingConfig, "top_p", 0.9),
  ("generate", "mesh", MeshConfig, "tensor", 2),
  ("generate", "scorer", ScorerConfig, "threshold", 0.3),
  ("rejection_sampling", "scorer", ScorerConfig, "batch_size", 16),
  ("ppo", "scorer", ScorerConfig, "whitening", "batch"),
]


@pytest.mark.parametrize("stage, section, cls, name, value", DERIVED)
def test_a_dataclass_default_flows_into_its_config_section(
  stage, section, cls, name, value, monkeypatch
):
  """Defaults live in the dataclass only: changing one changes every config that mirrors it."""
  module = importlib.import_module(f"experiments.configs.{stage}")
  (field,) = [f for f in dataclasses.fields(cls) if f.name == name]
  assert module.get_config()[section][name] == field.default != value
  monkeypatch.setattr(field, "default", value)
  assert module.get_config()[section][name] == value


def test_dataclass_section_refuses_names_that_are_not_fields():
  with pytest.raises(TypeError, match="PPOConfig has no field 'kl_coeff'"):
    base.dataclass_section(PPOConfig, drop=("kl_coeff",))
  with pytest.raises(TypeError, match="MeshConfig has no field 'fdsp'"):
    base.dataclass_section(MeshConfig, only=("fdsp",))
  with pytest.raises(TypeError, match="PipelineConfig.seq_len has no default"):
    base.dataclass_section(PipelineConfig)
  assert base.dataclass_section(MeshConfig, only=("data",), fsdp=4, extra="x") == {
    "data": 1,
    "fsdp": 4,
    "extra": "x",
  }


def test_pick_builds_the_named_variant_and_names_the_known_ones():
  def small():
    return ml_collections.ConfigDict({"n": 1})

  def large():
    return ml_collections.ConfigDict({"n": 2})

  assert base.pick("toy", "large", small, large).n == 2
  with pytest.raises(ValueError, match=r"unknown toy variant 'huge'; known: \['large', 'small'\]"):
    base.pick("toy", "huge", small, large)


@pytest.mark.parametrize("stage", STAGES)
def test_an_unknown_variant_names_the_known_ones(stage):
  """Every config file picks its variant with `base.pick`: an unknown name lists the file's
  variant functions, its default variant among them."""
  module = importlib.import_module(f"experiments.configs.{stage}")
  assert "pick(" in inspect.getsource(module.get_config)
  with pytest.raises(ValueError, match=f"unknown {stage} variant 'huge'; known: ") as e:
    module.get_config("huge")
  known = [v.strip(" '[]") for v in str(e.value).split("known: ")[1].split(",")]
  default = inspect.signature(module.get_config).parameters["variant"].default
  assert default in known
  for variant in known:
    assert inspect.isfunction(getattr(module, variant))


@pytest.mark.parametrize("stage", STAGES)
def test_every_variant_has_the_reference_keys(stage):
  """Variants change values, never keys: the default variant is a valid reference."""
  module = importlib.import_module(f"experiments.configs.{stage}")
  with pytest.raises(ValueError, match="known: ") as e:
    module.get_config("no such variant")
  variants = [v.strip(" '[]") for v in str(e.value).split("known: ")[1].split(",")]
  for variant in variants:
    sections.check_config(module.get_config(variant), sections.reference_config(stage))


def _sft(**updates):
  cfg = sections.reference_config("sft").to_dict()
  for path, value in updates.items():
    section, key = path.split(".")
    cfg[section][key] = value
  return ml_collections.ConfigDict(cfg)


def test_unknown_key_names_section_key_and_closest():
  cfg = _sft(**{"optimizer.learning_rte": 1e-4})
  with pytest.raises(sections.ConfigError, match=r"config.optimizer has no key 'learning_rte'; "
                     r"did you mean 'learning_rate'\?"):  # fmt: skip
    sections.check_config(cfg, sections.reference_config("sft"))
  with pytest.raises(sections.ConfigError, match="config.model has no key 'num_layer'"):
    sections.check_config(_sft(**{"model.num_layer": 2}), sections.reference_config("sft"))


@pytest.mark.parametrize(
  "stage, section, new", [("grpo", "grpo", "scorer"), ("findings", "ppo", "scorer"),
                          ("reward_model", "reward_model", "ranking")],
)  # fmt: skip
def test_a_config_of_before_a_rename_is_told_the_new_name(stage, section, new):
  """A `reward` section (the scorer's, or the reward model's ranking loss, before each word
  meant one thing) names the section that replaced it."""
  cfg = sections.reference_config(stage).to_dict()
  inner = cfg if section == stage else cfg[section]
  inner["reward"] = inner.pop(new)
  where = "config" if section == stage else f"config.{section}"
  message = f"{where} has no key 'reward'; did you mean '{new}'"
  with pytest.raises(sections.ConfigError, match=message):
    sections.check_config(ml_collections.ConfigDict(cfg), sections.reference_config(stage))


@pytest.mark.parametrize(
  "path, value, ok",
  [("optimizer.learning_rate", "1e-4", False), ("optimizer.learning_rate", 1, True),
   ("train.num_steps", 2.5, False), ("train.async_checkpoint", 1, False),
   ("data.eval_split", None, True), ("model.eos_token_id", [1, 2], True)],
)  # fmt: skip
def test_value_types_follow_the_reference(path, value, ok):
  cfg = _sft(**{path: value})
  if ok:
    sections.check_config(cfg, sections.reference_config("sft"))
  else:
    with pytest.raises(sections.ConfigError, match=f"config.{path}="):
      sections.check_config(cfg, sections.reference_config("sft"))


@pytest.mark.parametrize("module", ["lm", "dpo", "reward_model", "rejection_sampling", "generate"])
def test_run_and_programs_refuse_a_misspelled_key_before_compiling(module, tmp_path):
  stage = {"lm": "sft"}.get(module, module)
  cfg = sections.reference_config(stage)
  cfg.train = cfg.get("train") or ml_collections.ConfigDict()
  cfg.mesh.fsdq = 2
  experiment = importlib.import_module(f"experiments.{module}")
  with pytest.raises(
    sections.ConfigError, match="config.mesh has no key 'fsdq'; did you mean 'fsdp'"
  ):
    experiment.run(cfg, str(tmp_path))
  with pytest.raises(sections.ConfigError, match="'fsdq'"):
    experiment.programs(cfg, None, None)


@pytest.mark.parametrize("recipe", ["llama3_recipe", "llama2_recipe", "findings"])
def test_recipes_refuse_a_misspelled_stage_key(recipe, tmp_path):
  cfg = sections.reference_config(recipe)
  cfg.sft.optimizer.warmup_step = 3
  with pytest.raises(sections.ConfigError, match="config.sft.optimizer has no key 'warmup_step'"):
    importlib.import_module(f"experiments.{recipe}").run(cfg, str(tmp_path))


@pytest.mark.parametrize("recipe", ["llama3_recipe", "llama2_recipe"])
def test_recipe_sections_have_their_stage_keys(recipe):
  """Each stage a recipe runs gets its section, which its stage's `run` checks."""
  from experiments import compile_check

  for section, kind, stage in compile_check.recipe_stages(sections.reference_config(recipe)):
    if kind != "evaluation":  # the recipe's own `eval` section, checked with the recipe
      sections.check_config(stage, sections.reference_config(kind), f"config.{section}")
