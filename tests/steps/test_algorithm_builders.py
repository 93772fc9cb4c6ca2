"""The offline builders (`steps.lm.build`, `steps.reward_model.build`, `steps.dpo.build`): the
built train step is the step wiring's, `abstract_state()` is `init_state`'s shapes, dtypes and
shardings, LoRA trains only the adapters, and bad settings are named."""

import jax
import numpy as np
import pytest

from llama_jax import LlamaConfig
from llama_jax.data import PipelineConfig, bundled, ranking
from llama_jax.model import lora, reward_model
from llama_jax.model.llama import Llama
from llama_jax.objectives import lm as lm_obj
from llama_jax.parallel import sharding
from llama_jax.steps import common
from llama_jax.steps import dpo as dpo_steps
from llama_jax.steps import lm as lm_steps
from llama_jax.steps import reward_model as rm_steps
from llama_jax.tokenizer import tiny_tokenizer
from llama_jax.training import train_state as ts

CFG = LlamaConfig.preset(
  "tiny", vocab_size=1280, num_layers=2, d_model=64, head_dim=16, mlp_dim=128, max_seq_len=128
)
OPT = ts.OptimizerConfig(learning_rate=1e-3, warmup_steps=1, total_steps=10)
B, T = 8, 32


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(fsdp=4, tensor=2)


@pytest.fixture(scope="module")
def lm_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, CFG.vocab_size, size=(B, T + 1))
  mask = np.ones((B, T), np.int32)
  mask[:, : T // 4] = 0  # a prompt without loss
  return {
    "tokens": tokens[:, :-1],
    "positions": np.broadcast_to(np.arange(T), (B, T)),
    "segment_ids": np.ones((B, T), np.int32),
    "targets": tokens[:, 1:],
    "target_mask": mask,
  }


def assert_matches_abstract(state, abstract):
  """The same tree, and every array the shape, dtype and sharding its abstract twin says."""
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
  for x, a in zip(jax.tree.leaves(state), jax.tree.leaves(abstract), strict=True):
    assert (x.shape, x.dtype) == (a.shape, a.dtype)
    assert x.sharding.is_equivalent_to(a.sharding, x.ndim), (x.sharding, a.sharding)


def run(step, state, batches, *frozen):
  history = []
  for batch in batches:
    state, metrics = step(state, batch, *frozen)
    history.append(jax.device_get(metrics))
  return jax.device_get(state.params), history


def assert_same_run(a, b):
  (params_a, hist_a), (params_b, hist_b) = a, b
  for m_a, m_b in zip(hist_a, hist_b, strict=True):
    assert m_a.keys() == m_b.keys()
    for k in m_a:
      np.testing.assert_allclose(m_a[k], m_b[k], rtol=1e-6, err_msg=k)
  for x, y in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- LM


def test_lm_build_is_the_step_wiring(mesh, lm_batch):
  objective = lm_steps.LMConfig(z_loss=1e-3, loss_chunk_size=16)
  lm = lm_steps.build(CFG, mesh, objective, OPT, grad_accum_steps=2)
  params = sharding.init_params(CFG, jax.random.PRNGKey(1), mesh)
  key = jax.random.PRNGKey(0)
  built = run(lm.train_step, lm.init_state(params, key), [lm_batch] * 2)

  tx = ts.make_optimizer(OPT)
  step = lm_steps.make_train_step(
    CFG, tx, mesh=mesh, z_loss=1e-3, loss_chunk_size=16, grad_accum_steps=2,
    learning_rate_fn=ts.learning_rate_schedule(OPT),
  )  # fmt: skip
  step = common.jit_train_step(step, ts.state_shardings(CFG, tx, mesh), mesh)
  wired = run(step, ts.init_train_state(CFG, tx, mesh, key, params=params), [lm_batch] * 2)
  assert_same_run(built, wired)
  assert built[1][0]["learning_rate"] == 0.0 and built[1][1]["learning_rate"] > 0

  # The eval pass: the objective's sums of the whole batch, divided once.
  sums = lm_steps.loss_sums(CFG, built[0], lm_batch, z_loss=0.0, chunk_size=0)
  _, expected = lm_obj.token_mean(sums)
  metrics = lm.evaluate(built[0], [lm_batch])
  assert metrics.keys() == {k for k in expected if k != "z_loss"}
  for k, v in metrics.items():
    assert v == pytest.approx(float(expected[k]), rel=1e-5), k


def test_lm_abstract_state_is_the_real_one_and_lora_trains_only_adapters(mesh, lm_batch):
  lm = lm_steps.build(CFG, mesh, lm_steps.LMConfig(), OPT)
  assert_matches_abstract(lm.init_state(None, jax.random.PRNGKey(0)), lm.abstract_state())

  model = Llama(CFG, lora=lora.LoraConfig(rank=4, targets=("q", "v")))
  adapted = lm_steps.build(model, mesh, lm_steps.LMConfig(), OPT)
  base = sharding.init_params(CFG, jax.random.PRNGKey(1), mesh)
  state = adapted.init_state(base, jax.random.PRNGKey(0))  # fresh adapters beside the base
  assert lora.has_adapters(state.params) and not lora.has_adapters(base)
  assert_matches_abstract(state, adapted.abstract_state())
  frozen = jax.device_get(lora.split(state.params, lora.trainable_mask(state.params))[1])
  params, _ = run(adapted.train_step, state, [lm_batch])
  trained = lora.split(params, lora.trainable_mask(params))
  for x, y in zip(jax.tree.leaves(trained[1]), jax.tree.leaves(frozen), strict=True):
    np.testing.assert_array_equal(x, y)  # the base weights never move


def test_lm_config_names_bad_values():
  with pytest.raises(ValueError, match="z_loss=-1"):
    lm_steps.LMConfig(z_loss=-1.0)
  with pytest.raises(ValueError, match="loss_chunk_size=-4"):
    lm_steps.LMConfig(loss_chunk_size=-4)


# --------------------------------------------------------------------------- reward model


@pytest.fixture(scope="module")
def ranking_batches():
  config = PipelineConfig(seq_len=128, batch_size=B, mode="pad", seed=1, on_too_long="skip")
  records = bundled.load("preference", "test")[:40]
  with ranking.make_ranking_pipeline(records, tiny_tokenizer("llama3"), config) as it:
    return [next(it) for _ in range(2)]


def test_reward_model_build_is_the_step_wiring(mesh, ranking_batches):
  model = reward_model.RewardModel(CFG)
  objective = rm_steps.RankingConfig(margins="small", centering=0.01)
  trainer = rm_steps.build(model, mesh, objective, OPT, grad_accum_steps=2)
  params = sharding.init_params(model, jax.random.PRNGKey(1), mesh)
  key = jax.random.PRNGKey(0)
  state = trainer.init_state(params, key)
  assert_matches_abstract(state, trainer.abstract_state())
  built = run(trainer.train_step, state, ranking_batches)

  tx = ts.make_optimizer(OPT)
  step = rm_steps.make_train_step(
    model, tx, mesh=mesh, margins="small", centering=0.01, grad_accum_steps=2,
    learning_rate_fn=ts.learning_rate_schedule(OPT),
  )  # fmt: skip
  step = common.jit_train_step(step, ts.state_shardings(model, tx, mesh), mesh)
  wired = run(step, ts.init_train_state(model, tx, mesh, key, params=params), ranking_batches)
  assert_same_run(built, wired)

  rows = trainer.evaluate(built[0], ranking_batches[:1])
  metrics = trainer.eval_metrics(rows)
  expected = rm_steps.eval_metrics(rows, margins="small", centering=0.01)
  assert metrics == expected and 0 <= metrics["accuracy"] <= 1


def test_ranking_config_names_bad_values():
  with pytest.raises(ValueError, match="margins='medium'"):
    rm_steps.RankingConfig(margins="medium")
  with pytest.raises(ValueError, match="centering=-0.1"):
    rm_steps.RankingConfig(centering=-0.1)


# --------------------------------------------------------------------------- DPO


def test_dpo_abstract_state_and_reference_are_the_real_ones(mesh):
  model = Llama(CFG, lora=lora.LoraConfig(rank=4))
  table, in_step = (
    dpo_steps.build(model, mesh, dpo_steps.DPOConfig(), OPT, reference=r)
    for r in dpo_steps.REFERENCES
  )
  base = sharding.init_params(CFG, jax.random.PRNGKey(1), mesh)
  assert_matches_abstract(in_step.init_state(base, jax.random.PRNGKey(0)), table.abstract_state())
  # The reference is the plain model (a LoRA policy's base), whatever the mode.
  assert_matches_abstract(base, table.abstract_reference_params())
  assert_matches_abstract(base, in_step.abstract_reference(5))
  placed = table.place_table(np.zeros((5, 2), np.float32))
  assert_matches_abstract(placed, table.abstract_reference(5))


def test_dpo_reference_mode_is_named():
  with pytest.raises(ValueError, match="reference='cached'"):
    dpo_steps.build(CFG, sharding.make_mesh(), dpo_steps.DPOConfig(), OPT, reference="cached")
