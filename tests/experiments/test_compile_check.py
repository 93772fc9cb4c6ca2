"""The compile-and-fit check: every stage's compiled functions from its config alone.

On the 8 emulated CPU devices (`cpu-8`) for the tiny config of every stage; on TPU v5p and
H100 descriptions for a small model when libtpu / the CUDA plugin are installed (the `aot`
extras). The real-size targets are `tests/experiments/test_real_sizes.py` (opt-in).
"""

import importlib
import importlib.util
import subprocess
import sys

import jax
import numpy as np
import pytest

from experiments import compile_check as cc
from experiments import data_sources, models, sections
from llama_jax.data import Indexed, make_pair_pipeline, ranking
from llama_jax.parallel import aot, sharding
from llama_jax.parallel.topologies import get_topology
from llama_jax.training import train_state as ts

ASSUMED = aot.Assumed(prompt_len=40, num_pairs=640)
# The LM stages' programs (pretrain, sft) and the decoder alone (generate) are also compiled
# by the stages below and by the small-preset check: make test leaves them to -m full_size.
_ALSO_ELSEWHERE = pytest.mark.full_size
ENGINE = ("engine_prefill", "engine_decode")  # the rollout engine's largest steps, with its pool
STAGES = (
  pytest.param("pretrain", "tiny", {"train_step", "eval_step"}, marks=_ALSO_ELSEWHERE),
  pytest.param("sft", "tiny", {"train_step", "eval_step"}, marks=_ALSO_ELSEWHERE),
  ("reward_model", "tiny_llama3", {"train_step", "eval_step"}),
  ("dpo", "tiny", {"reference_logps", "train_step[precomputed]", "eval_step[precomputed]",
                   "train_step[in_step]", "eval_step[in_step]"}),
  pytest.param("generate", "tiny", {"generate", *ENGINE}, marks=_ALSO_ELSEWHERE),
  ("rejection_sampling", "tiny", {"generate", *ENGINE, "score[reward_model]"}),
  ("grpo", "tiny", {"generate", "logps", "train_step"}),
  ("ppo", "tiny", {"generate", "logps", "policy_step", "value_step"}),
)  # fmt: skip
STAGE_IDS = [s.values[0] if hasattr(s, "values") else s[0] for s in STAGES]


def config(name, variant, **overrides):
  cfg = importlib.import_module(f"experiments.configs.{name}").get_config(variant)
  cfg.update_from_flattened_dict(overrides)
  return cfg


@pytest.fixture(scope="module")
def cpu8():
  return get_topology("cpu-8")


@pytest.mark.parametrize("name,variant,functions", STAGES, ids=STAGE_IDS)
def test_every_stage_compiles_on_cpu8(cpu8, name, variant, functions):
  rows = cc.check_config(name, config(name, variant), cpu8, ASSUMED)
  assert {r.report.name for r in rows} == functions
  for row in rows:
    r = row.report
    assert row.fits and not r.error, r
    assert r.argument_bytes > 0 and r.flops > 0 and r.compile_seconds > 0
    assert r.total_bytes <= r.hbm_bytes == cpu8.chip.usable_bytes
    assert math_prod(row.mesh.values()) == 8


def test_a_sampling_mesh_of_its_own_is_checked_with_the_weights_copy(cpu8):
  """GRPO sampling data-parallel on half the devices: the generate program is compiled on
  that mesh (its rows say so) and carries the resharded weights as resident bytes."""
  shared, own = (
    {r.report.name: r for r in cc.check_config("grpo", config("grpo", "tiny", **o), cpu8, ASSUMED)}
    for o in ({}, {"sampling_mesh.data": 4, "sampling_mesh.num_devices": 4})
  )  # fmt: skip
  assert own["generate"].fits and own["generate"].report.argument_bytes > 0
  assert math_prod(own["generate"].mesh.values()) == 4
  assert own["generate"].report.resident_bytes > shared["generate"].report.resident_bytes
  assert own["train_step"].report.resident_bytes == shared["train_step"].report.resident_bytes


def math_prod(xs):
  return int(np.prod(list(xs)))


def test_the_small_preset_compiles_on_cpu8_with_micro_batches(cpu8):
  """small_50m (the CPU benchmark size) with 2 micro-batches and remat: micro-batching
  halves the activations the train step keeps, which the report shows."""
  temps = {}
  for accum in (1, 2):
    cfg = config("sft", "tiny", **{"train.grad_accum_steps": accum, "data.seq_len": 512})
    cfg.model = {"preset": "small_50m", "scan_layers": True, "remat_policy": "dots"}
    rows = cc.check_config("sft", cfg, cpu8, ASSUMED)
    assert all(r.fits for r in rows)
    temps[accum] = next(r.report.temp_bytes for r in rows if r.report.name == "train_step")
  assert temps[2] < 0.75 * temps[1], temps


def test_state_bytes_match_a_real_sharded_state(cpu8):
  """The bytes the report charges a device for an abstract state are what a real state of
  that config holds on a device (fsdp-sharded parameters and moments)."""
  cfg = config("sft", "tiny")
  mesh = sections.build_mesh(cfg.mesh, cpu8.devices())
  model_cfg = sections.model_config(cfg)
  optimizer = ts.make_optimizer(sections.optimizer_config(cfg.optimizer, 100))
  real = ts.init_train_state(model_cfg, optimizer, mesh, jax.random.key(0))
  held = sharding.bytes_per_device(real)
  assert aot.shard_bytes(ts.abstract_train_state(model_cfg, optimizer, mesh)) == max(held.values())


def _batch_arg(name, variant):
  cfg = config(name, variant)
  mesh = sections.build_mesh(cfg.mesh)
  programs = cc.stage_programs(name, cfg, mesh, ASSUMED)
  return cfg, mesh, next(p for p in programs if p.name.startswith("train_step")).args[1]


def _assert_spec_matches(spec, real):
  """Every field the compiled step is given exists in the pipeline's batch, same shape and
  dtype (the pipeline may carry more)."""
  flat_spec = dict(jax.tree_util.tree_flatten_with_path(spec)[0])
  flat_real = dict(jax.tree_util.tree_flatten_with_path(real)[0])
  for path, s in flat_spec.items():
    assert path in flat_real, f"{jax.tree_util.keystr(path)} is not in the pipeline's batch"
    r = flat_real[path]
    assert (s.shape, np.dtype(s.dtype)) == (r.shape, np.dtype(r.dtype)), path


def test_abstract_batches_match_the_pipelines():
  """What the check compiles against is what the data pipelines feed the real run."""
  cfg, mesh, spec = _batch_arg("sft", "tiny")
  tokenizer = models.build_tokenizer(cfg.tokenizer)
  with data_sources.make_train_pipeline(cfg.data, tokenizer, mesh) as it:
    _assert_spec_matches(spec, next(iter(it)))

  cfg, mesh, spec = _batch_arg("dpo", "tiny")
  records = Indexed(data_sources.load_preference_records(cfg.data, "train", ""))
  pipeline = data_sources.pipeline_config(cfg.data)
  with make_pair_pipeline(records, tokenizer, pipeline, mesh=mesh) as it:
    _assert_spec_matches(spec, next(iter(it)))

  cfg, mesh, spec = _batch_arg("reward_model", "tiny_llama3")
  records = data_sources.load_preference_records(cfg.data, "train", "")
  with ranking.make_ranking_pipeline(records, tokenizer, data_sources.pipeline_config(cfg.data),
                                     use_edited=cfg.data.use_edited, mesh=mesh) as it:  # fmt: skip
    _assert_spec_matches(spec, next(iter(it)))


def test_a_config_that_does_not_divide_the_mesh_is_a_row(cpu8):
  rows = cc.check_config("dpo", config("dpo", "tiny", **{"data.batch_size": 12}), cpu8, ASSUMED)
  assert len(rows) == 1 and rows[0].report is None and not rows[0].fits
  assert "data.batch_size=12" in rows[0].error
  assert "config refused" in cc.table_row(rows[0], cpu8)[9]


def test_recipe_stages_follow_the_recipe():
  cfg = config("llama3_recipe", "llama3p1_8b")
  stages = [(s, k) for s, k, _ in cc.recipe_stages(cfg)]
  # init_from is set: pretraining does not run
  assert stages == [("sft", "sft"), ("reward_model", "reward_model"),
                    ("rejection_sampling", "rejection_sampling"), ("round_sft", "sft"),
                    ("dpo", "dpo"), ("eval", "evaluation")]  # fmt: skip
  assert all(c.tokenizer == cfg.tokenizer for _, k, c in cc.recipe_stages(cfg) if k != "evaluation")


def test_command_prints_the_table_and_exits_nonzero_when_something_does_not_fit(tmp_path):
  base = [sys.executable, "-m", "experiments.compile_check", "--topology=cpu-8",
          "--config=experiments/configs/generate.py:tiny"]  # fmt: skip
  ok = subprocess.run(base + [f"--json={tmp_path / 'rows.json'}"], capture_output=True,
                      text=True, timeout=300)  # fmt: skip
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "| generate | generate |" in ok.stdout and "| yes |" in ok.stdout
  assert (tmp_path / "rows.json").exists()
  # An MLP width of 100 cannot be split over tensor=8 (attention heads that do not divide
  # are replicated instead, `sharding.rules_for`): refused before compiling, named, exit 1
  bad = subprocess.run(base + ["--config.mesh.data=1", "--config.mesh.fsdp=1",
                               "--config.mesh.tensor=8", "--config.model.mlp_dim=100"],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
  assert bad.returncode == 1 and "config refused" in bad.stdout, bad.stdout[-2000:]
  assert "mlp/down of shape (100, 128)" in bad.stdout


CHIP_KERNELS = (
  ("v5p-8", "libtpu", "splash", "tpu_custom_call"),
  ("h100-8", "jax_plugins.xla_cuda12", "cudnn", "cudnn$fmha"),
)


def compile_for_chip(topology: str, plugin: str, kernel: str):
  """The SFT train step of a bf16 model with 128-wide heads and `kernel` attention, compiled
  for `topology`'s chips (the `aot` / `aot-gpu` extras)."""
  pytest.importorskip(plugin)
  if kernel in ("cudnn", "auto") and plugin.endswith("cuda12"):
    if importlib.util.find_spec("nvidia.cudnn") is None:
      pytest.skip("lowering cuDNN attention needs nvidia-cudnn-cu12")
  cfg = config("sft", "tiny", **{"model.attention_impl": kernel, "model.head_dim": 128,
                                 "model.num_layers": 2, "model.dtype": "bfloat16"})  # fmt: skip
  mesh = sections.build_mesh(cfg.mesh, get_topology(topology).devices())
  program = next(p for p in cc.stage_programs("sft", cfg, mesh, ASSUMED)
                 if p.name == "train_step")  # fmt: skip
  with aot.no_compilation_cache():
    return program.fn.lower(*program.args).compile()


@pytest.mark.parametrize("topology,plugin,flash,marker", CHIP_KERNELS,
                         ids=[c[0] for c in CHIP_KERNELS])  # fmt: skip
def test_auto_attention_compiles_to_the_chips_flash_kernel(topology, plugin, flash, marker):
  """"auto" attention picks the chip's flash kernel (splash on TPU v5p, cuDNN on H100): it
  really is in the program compiled for 8 of those chips."""
  assert marker in compile_for_chip(topology, plugin, "auto").as_text()


@pytest.mark.real_size
@pytest.mark.parametrize("topology,plugin,flash,marker", CHIP_KERNELS,
                         ids=[c[0] for c in CHIP_KERNELS])  # fmt: skip
def test_each_kernel_compiles_for_real_chips_and_flash_needs_less_memory(
  topology, plugin, flash, marker
):
  """Every attention kernel the chip supports compiles (opt-in: ~3 minutes): only the flash
  kernel's program has the flash call, and it needs less memory than XLA's materialized
  scores."""
  temps = {}
  for kernel in ("xla", "dot_product", flash):
    compiled = compile_for_chip(topology, plugin, kernel)
    temps[kernel] = compiled.memory_analysis().temp_size_in_bytes
    assert (marker in compiled.as_text()) == (kernel == flash), (kernel, marker)
  assert temps[flash] < temps["xla"], temps


def test_recipe_evaluation_compiles_on_cpu8(cpu8):
  """The policy evaluation a recipe runs after each stage: answers and the KL pass."""
  (_, kind, evaluation), = [s for s in cc.recipe_stages(config("llama3_recipe", "smoke"))
                            if s[0] == "eval"]  # fmt: skip
  rows = cc.check(kind, evaluation, cpu8, ASSUMED, stage="eval")
  assert [r.report.name for r in rows] == ["generate", "kl_logps"]
  assert all(r.fits for r in rows)
  # the reference is resident while the policy answers, and is an argument of the KL pass
  assert rows[0].report.resident_bytes == rows[1].report.resident_bytes > 0


def test_a_program_the_tpu_compiler_refuses_is_a_row_with_its_size():
  """Llama 3.1 8B SFT with XLA attention (float32 [T, T] scores) and no micro-batching on
  v5p-8: XLA:TPU refuses it for HBM within seconds; the report keeps what it would need."""
  pytest.importorskip("libtpu")
  cfg = config("sft", "llama3p1_8b", **{"model.attention_impl": "xla",
                                        "train.grad_accum_steps": 1})  # fmt: skip
  chips = get_topology("v5p-8")
  mesh = sections.build_mesh(cfg.mesh, chips.devices())
  train = next(p for p in cc.stage_programs("sft", cfg, mesh, ASSUMED) if p.name == "train_step")
  report = aot.compile_program(train, chips.chip.usable_bytes)
  assert not report.fits and "RESOURCE_EXHAUSTED" in report.error
  assert report.temp_bytes > 1000 * aot.GiB  # the message's figure (TiBs of scores)
  assert report.argument_bytes == aot.shard_bytes(train.args)
