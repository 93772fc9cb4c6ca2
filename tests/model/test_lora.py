"""LoRA through the model seam: adapters start as the base model, the merged weights give the
adapted model's forward, a LoRA DPO step changes only the adapters (sharded as on one device),
the optimizer holds no state for frozen weights, and the experiments train, resume, chain and
export LoRA runs (the export checked by `transformers`)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers

from experiments import dpo as dpo_experiment
from experiments import export, lm
from experiments.configs import dpo as dpo_configs
from experiments.configs import sft as sft_configs
from experiments.configs.base import TINY_MODEL
from llama_jax import LlamaConfig
from llama_jax.checkpoint import orbax as ckpt_lib
from llama_jax.checkpoint import workdirs
from llama_jax.data import Indexed, PipelineConfig, bundled, make_pair_pipeline
from llama_jax.model import lora
from llama_jax.model.llama import Llama
from llama_jax.model.reward_model import RewardModel
from llama_jax.parallel import sharding
from llama_jax.parallel.sharding import init_params
from llama_jax.steps import common as step_lib
from llama_jax.steps import dpo as dpo_steps
from llama_jax.tokenizer import tiny_tokenizer
from llama_jax.training import train_state as ts
from llama_jax.training.metrics import read_metrics

SMALL = dict(num_layers=2, d_model=64, head_dim=16, mlp_dim=128)
FIELDS = {k: v for k, v in TINY_MODEL.items() if k != "preset"} | SMALL
CONFIG = LlamaConfig.preset("tiny", **FIELDS)
LORA = lora.LoraConfig(rank=4, alpha=8.0)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 1000, (2, 12)), jnp.int32)


def perturbed_adapters(params, seed=1, scale=0.05):
  """Adapters set to random values (fresh ones have B = 0, an identity update)."""
  key = jax.random.key(seed)
  return jax.tree_util.tree_map_with_path(
    lambda p, x: x + scale * jax.random.normal(jax.random.fold_in(key, hash(str(p)) % 2**31),
                                               x.shape)
    if lora.is_adapter(p) else x,
    params,
  )  # fmt: skip


def changed(before, after):
  """{(is adapter, changed)} over every parameter."""
  flags = jax.tree_util.tree_map_with_path(
    lambda p, x, y: (lora.is_adapter(p), bool(np.any(np.asarray(x) != np.asarray(y)))),
    before, after,
  )  # fmt: skip
  return set(jax.tree.leaves(flags, is_leaf=lambda x: isinstance(x, tuple)))


@pytest.mark.parametrize("scan", [False, True])
def test_fresh_adapters_are_the_base_model_and_merge_gives_the_adapted_forward(scan):
  config = CONFIG.replace(scan_layers=scan)
  model = Llama(config, lora=LORA)
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  base = sharding.init_params(config, jax.random.key(0), mesh)
  params = sharding.init_missing(model, base, jax.random.key(1), mesh)
  attn = params["layers"]["attn"] if scan else params["layers_0"]["attn"]
  lead = (SMALL["num_layers"],) if scan else ()
  assert attn["q_lora_a"].shape == (*lead, 64, 4)
  assert attn["q_lora_b"].shape == (*lead, 4, CONFIG.num_heads, 16)
  assert attn["o_lora_a"].shape == (*lead, CONFIG.num_heads, 16, 4)
  assert attn["q"] is (base["layers"] if scan else base["layers_0"])["attn"]["q"]  # kept, no copy
  plain = Llama(config).apply({"params": base}, TOKENS)
  np.testing.assert_array_equal(model.apply({"params": params}, TOKENS), plain)

  adapted = perturbed_adapters(params)
  logits = model.apply({"params": adapted}, TOKENS)
  merged = Llama(config).apply({"params": lora.merge(adapted, LORA)}, TOKENS)
  assert float(jnp.abs(logits - plain).max()) > 0.1  # the adapters matter
  np.testing.assert_allclose(merged, logits, atol=2e-5)


def test_targets_select_projections_and_bad_configs_are_refused():
  only_qv = lora.LoraConfig(rank=2, targets="q,v")
  assert only_qv.targets == ("q", "v")
  params = init_params(Llama(CONFIG, lora=only_qv), jax.random.key(0))
  names = {str(p[-1].key) for p, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert {"q_lora_a", "v_lora_b"} <= names and not {"k_lora_a", "up_lora_a"} & names
  with pytest.raises(ValueError, match=r"targets=\('q', 'w'\)"):
    lora.LoraConfig(targets="q,w")
  with pytest.raises(ValueError, match="rank=0"):
    lora.LoraConfig(rank=0)
  mesh = sharding.make_mesh()
  wrong = {"embed": jnp.zeros((3, 3))}
  with pytest.raises(ValueError, match=r"parameter embed of shape \(3, 3\) does not fit"):
    sharding.init_missing(Llama(CONFIG, lora=LORA), wrong, jax.random.key(0), mesh)


def test_reward_model_on_the_seam_trains_its_head_and_adapters():
  params = init_params(RewardModel(CONFIG, lora=LORA), jax.random.key(0))
  assert "lm_head" not in params["lm"]  # a trunk: `Llama(head=False)`, no config trick
  mask = lora.trainable_mask(params)
  assert mask["head"] == {"kernel": True, "bias": True}
  assert mask["lm"]["layers_0"]["mlp"] == {
    "gate": False, "up": False, "down": False,
    **{f"{t}_lora_{s}": True for t in ("gate", "up", "down") for s in "ab"},
  }  # fmt: skip
  assert mask["lm"]["embed"] is False
  plain = init_params(RewardModel(CONFIG), jax.random.key(0))
  assert all(lora.trainable_mask(plain).values())


# --------------------------------------------------------------------------- a LoRA DPO step


@pytest.fixture(scope="module")
def dpo_setup():
  tokenizer = tiny_tokenizer("llama3")
  base = init_params(CONFIG.replace(initializer_range=0.05), jax.random.key(0))
  source = Indexed(bundled.load("preference", "test")[:16])
  pipe_cfg = PipelineConfig(seq_len=128, batch_size=8, mode="pad", num_epochs=1, seed=3)
  with make_pair_pipeline(source, tokenizer, pipe_cfg) as it:
    batch = jax.tree.map(np.asarray, next(it))
  return base, batch


def lora_dpo_steps(dpo_setup, mesh, *, masked=True, steps=2):
  base, batch = dpo_setup
  model = Llama(CONFIG, lora=LORA)
  dpo = dpo_steps.DPOConfig(beta=0.1, nll_coef=0.2)
  opt_cfg = ts.OptimizerConfig(learning_rate=1e-2, warmup_steps=0, schedule="constant")
  optimizer = ts.make_optimizer(opt_cfg, trainable=lora.trainable_mask if masked else None)
  params = sharding.init_missing(model, jax.device_put(base), jax.random.key(5), mesh)
  state = ts.init_train_state(model, optimizer, mesh, jax.random.key(0), params=params)
  before = jax.device_get(state.params)
  step = step_lib.jit_train_step(
    dpo_steps.make_train_step(model, optimizer, dpo, reference="in_step", mesh=mesh),
    ts.state_shardings(model, optimizer, mesh),
    mesh,
    frozen_shardings=(sharding.param_shardings(CONFIG, mesh),),
  )
  metrics = []
  for _ in range(steps):
    state, m = step(state, batch, base)
    metrics.append(jax.device_get(m))
  return before, state, metrics


def test_lora_dpo_step_changes_only_adapters_and_equals_the_merged_model(dpo_setup):
  before, state, metrics = lora_dpo_steps(dpo_setup, sharding.make_mesh(fsdp=4, tensor=2))
  after = jax.device_get(state.params)
  assert changed(before, after) == {(True, True), (False, False)}
  assert metrics[1]["loss"] < metrics[0]["loss"]
  # Optimizer moments for the adapters only: 2 moments × 4 adapters per layer-projection.
  num_adapters = sum(lora.is_adapter(p) for p, _ in jax.tree_util.tree_leaves_with_path(after))
  moments = [
    x for x in jax.tree.leaves(state.opt_state)
    if x.ndim and not isinstance(x, optax.MaskedNode)
  ]  # fmt: skip
  assert len(moments) == 2 * num_adapters == 2 * 2 * 2 * 7
  logits = Llama(CONFIG, lora=LORA).apply({"params": after}, TOKENS)
  merged = Llama(CONFIG).apply({"params": lora.merge(after, LORA)}, TOKENS)
  np.testing.assert_allclose(merged, logits, atol=2e-5)


def test_lora_step_sharded_equals_one_device_and_frozen_weights_never_move(dpo_setup):
  single = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1, 1), sharding.MESH_AXES)
  _, one, m_one = lora_dpo_steps(dpo_setup, single)
  _, many, m_many = lora_dpo_steps(dpo_setup, sharding.make_mesh(fsdp=4, tensor=2))
  for a, b in zip(m_one, m_many, strict=True):
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
  for x, y in zip(jax.tree.leaves(jax.device_get(one.params)),
                  jax.tree.leaves(jax.device_get(many.params)), strict=True):  # fmt: skip
    np.testing.assert_allclose(x, y, atol=2e-5)  # Adam steps of 1e-2: 0.2% of one step
  # An optimizer that was not masked (AdamW's weight decay would move every weight) still
  # leaves the frozen ones bit-identical: the step never updates them.
  before, state, _ = lora_dpo_steps(dpo_setup, single, masked=False, steps=1)
  assert changed(before, jax.device_get(state.params)) == {(True, True), (False, False)}


# --------------------------------------------------------------------------- experiments


def tiny_sft(workdir, *, rank=4, steps=6, init_from=""):
  cfg = sft_configs.get_config("tiny")
  cfg.model.update(**SMALL)
  cfg.init_from = init_from
  cfg.data.update(seq_len=128, batch_size=8)
  cfg.optimizer.update(learning_rate=1e-2, warmup_steps=1, total_steps=6)
  cfg.train.update(num_steps=steps, log_every=1, checkpoint_every=3)
  cfg.lora.update(rank=rank, alpha=2.0 * rank)
  return lm.run(cfg, str(workdir))


@pytest.mark.full_size  # 45 s; each piece (resume, DPO step, merge) is checked above
def test_lora_sft_resumes_chains_into_dpo_and_exports_merged_to_transformers(tmp_path):
  # A full SFT run, then LoRA SFT from it.
  tiny_sft(tmp_path / "base", rank=0, steps=3)
  results = tiny_sft(tmp_path / "sft", init_from=str(tmp_path / "base"))
  assert np.isfinite(results["loss"])
  assert workdirs.read_lora_config(tmp_path / "sft") == LORA.__class__(rank=4, alpha=8.0)
  losses = [r["loss"] for r in read_metrics(tmp_path / "sft") if "loss" in r]
  assert losses[-1] < losses[0]
  # Stopped after 3 steps and resumed: the same adapters as the uninterrupted run.
  tiny_sft(tmp_path / "parts", init_from=str(tmp_path / "base"), steps=3)
  tiny_sft(tmp_path / "parts", init_from=str(tmp_path / "base"))
  config, whole = workdirs.load_model(tmp_path / "sft", sharding.make_mesh())
  _, parts = workdirs.load_model(tmp_path / "parts", sharding.make_mesh())
  for x, y in zip(jax.tree.leaves(whole), jax.tree.leaves(parts), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

  # The checkpoint holds the base weights untouched beside the adapters.
  _, base = workdirs.load_model(tmp_path / "base", sharding.make_mesh())
  abstract = sharding.abstract_sharded_params(Llama(config, lora=LORA), sharding.make_mesh())
  raw = jax.device_get(ckpt_lib.load_params(ckpt_lib.checkpoint_dir(tmp_path / "sft"), abstract))
  frozen = lora.split(raw, lora.trainable_mask(raw))[1]
  for x, y in zip(jax.tree.leaves(frozen), jax.tree.leaves(jax.device_get(base)), strict=True):
    np.testing.assert_array_equal(x, y)

  # Merged export: transformers' logits equal the adapted model's.
  export.run(str(tmp_path / "sft"), str(tmp_path / "hf"))
  hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
  with torch.no_grad():
    theirs = hf(torch.tensor(np.asarray(TOKENS), dtype=torch.long)).logits.numpy()
  ours = Llama(config, lora=LORA).apply({"params": raw}, TOKENS)
  merged = Llama(config).apply({"params": whole}, TOKENS)
  np.testing.assert_allclose(merged, ours, atol=1e-4)
  np.testing.assert_allclose(theirs, ours, atol=1e-4)

  # LoRA DPO from the LoRA SFT workdir: it starts from the merged model, trains new adapters.
  cfg = dpo_configs.get_config("tiny")
  cfg.init_from = str(tmp_path / "sft")
  cfg.data.update(batch_size=8, seq_len=128, max_records=64)
  cfg.optimizer.update(learning_rate=1e-2, warmup_steps=1)
  cfg.train.update(num_steps=4, log_every=1, checkpoint_every=1000)
  cfg.lora.update(rank=2, alpha=4.0, targets="q,v")
  out = dpo_experiment.run(cfg, str(tmp_path / "dpo"))
  assert out["initial"]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy = ref
  assert np.isfinite(out["loss"])
  stored = json.loads((tmp_path / "dpo" / workdirs.LORA_CONFIG_FILE).read_text())
  assert stored["targets"] == ["q", "v"] and stored["rank"] == 2
