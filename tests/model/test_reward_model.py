"""The reward model: packed ranking rows equal separate sequences, init from an LM, the
sharded train step equals one device."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import LlamaConfig
from llama_jax.data import PipelineConfig, bundled, ranking
from llama_jax.data.records import prompt_messages
from llama_jax.model import reward_model
from llama_jax.model.llama import Llama
from llama_jax.objectives import reward_model as obj
from llama_jax.parallel import sharding
from llama_jax.parallel.sharding import init_params
from llama_jax.steps import common
from llama_jax.steps import reward_model as rm_steps
from llama_jax.tokenizer import render_prompt_response, tiny_tokenizer
from llama_jax.training import train_state as ts

# initializer_range 0.1: rewards of order 1, so a 1e-5 tolerance tests something.
CFG = LlamaConfig.preset("tiny", vocab_size=1280, initializer_range=0.1)
TOK = tiny_tokenizer("llama3")
T = 160


@pytest.fixture(scope="module")
def params():
  return sharding.init_params(reward_model.RewardModel(CFG), jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def prefs():
  test = bundled.load("preference", "test")
  with_edit = [r for r in test if r["edited"] is not None][:3]
  return with_edit + [r for r in test if r["edited"] is None][:3]


def pad(x, t=T):
  return np.pad(np.asarray(x), (0, t - len(x)))


def packed_batch(rows):
  return {
    "tokens": np.stack([pad(r["tokens"]) for r in rows]),
    "segment_ids": np.stack([pad(np.ones_like(r["tokens"])) for r in rows]),
    "response_ids": np.stack([pad(r["response_ids"]) for r in rows]),
  }


@pytest.fixture(scope="module")
def packed_fn():
  return jax.jit(
    lambda p, b: rm_steps.ranking_rewards(
      CFG, p, b["tokens"], b["segment_ids"], b["response_ids"]
    )
  )


def test_ranking_inputs_by_hand():
  # prompt of 3 tokens, response 1 of 2, response 2 of 3, then 2 padding slots.
  response_ids = jnp.asarray([[0, 0, 0, 1, 1, 2, 2, 2, 0, 0]])
  segment_ids = jnp.asarray([[1] * 8 + [0, 0]])
  positions, mask, last = ranking.ranking_inputs(segment_ids, response_ids)
  np.testing.assert_array_equal(positions, [[0, 1, 2, 3, 4, 3, 4, 5, 0, 0]])
  np.testing.assert_array_equal(last, [[4, 7, -1]])
  allowed = np.asarray(mask[0] & (np.arange(10)[:, None] >= np.arange(10)))[:8, :8]
  np.testing.assert_array_equal(allowed[6], [1, 1, 1, 0, 0, 1, 1, 0])  # prompt + itself
  np.testing.assert_array_equal(allowed[4], [1, 1, 1, 1, 1, 0, 0, 0])


def test_packed_row_equals_separate_sequences(params, prefs, packed_fn):
  rows = [ranking.tokenize_ranking(r, tokenizer=TOK) for r in prefs]
  rewards, present = jax.device_get(packed_fn(params, packed_batch(rows)))
  np.testing.assert_array_equal(present.sum(1), [3, 3, 3, 2, 2, 2])

  # The same responses, each after its own copy of the prompt, one sequence per row.
  singles = [
    render_prompt_response(TOK, prompt_messages(r["prompt"]), text).tokens
    for r in prefs
    for text in ranking.ranked_responses(r)
  ]
  tokens = np.stack([pad(s) for s in singles])
  segments = np.stack([pad(np.ones_like(s)) for s in singles])
  forward = jax.jit(reward_model.sequence_rewards, static_argnums=0)
  separate = np.asarray(forward(CFG, params, tokens, segments))
  np.testing.assert_allclose(rewards[present], separate, atol=1e-5, rtol=0)
  assert np.abs(separate).max() > 0.1  # rewards of order 1, not a vacuous match

  # The ranking loss of the packed rows equals the pairwise loss of the separate rewards.
  per_row = np.split(separate, np.cumsum(present.sum(1))[:-1])
  pairs = [(r[i], r[j]) for r in per_row for i, j in obj.RANK_PAIRS if j < len(r)]
  chosen, rejected = (jnp.asarray(x) for x in zip(*pairs, strict=True))
  expected, _ = obj.pairwise_loss(chosen, rejected)
  packed_loss, metrics = obj.ranking_loss(jnp.asarray(rewards), jnp.asarray(present))
  assert float(metrics["pairs"]) == 3 * 3 + 3
  assert float(packed_loss) == pytest.approx(float(expected), abs=1e-5)


def test_response_order_in_the_row_does_not_matter(params, prefs, packed_fn):
  rows = [ranking.tokenize_ranking(r, tokenizer=TOK) for r in prefs[:3]]
  rewards, _ = jax.device_get(packed_fn(params, packed_batch(rows)))
  flipped = []
  for r in rows:  # the same responses laid out worst first
    ids, tokens = r["response_ids"], r["tokens"]
    parts = [tokens[ids == k] for k in (3, 2, 1)]
    flipped.append(ranking.pack_ranking_row(tokens[ids == 0], parts))
  reversed_rewards, _ = jax.device_get(packed_fn(params, packed_batch(flipped)))
  np.testing.assert_allclose(reversed_rewards[:, ::-1], rewards, atol=1e-5, rtol=0)


def test_from_lm_params_keeps_the_trunk_and_adds_a_fresh_head():
  lm = init_params(CFG, jax.random.PRNGKey(1))
  rm = reward_model.from_lm_params(CFG, lm, jax.random.PRNGKey(2))
  assert set(rm) == {"lm", "head"} and "lm_head" not in rm["lm"]
  assert set(rm["lm"]) == set(lm) - {"lm_head"}
  assert rm["lm"]["embed"] is lm["embed"]  # reused, not copied
  assert {k: v.shape for k, v in rm["head"].items()} == {"kernel": (64,), "bias": ()}
  shapes = jax.tree.map(lambda x: x.shape, reward_model.abstract_params(CFG))
  assert jax.tree.map(lambda x: x.shape, rm) == shapes
  tokens = jnp.asarray([[5, 6, 7, 8]])
  hidden, _ = jax.jit(partial(Llama(CFG).apply, method=Llama.hidden_states))({"params": lm}, tokens)
  scores = jax.jit(reward_model.RewardModel(CFG).apply)({"params": rm}, tokens)
  expected = hidden @ rm["head"]["kernel"] + rm["head"]["bias"]
  np.testing.assert_allclose(scores, expected, atol=1e-6)


def test_attention_mask_needs_xla_attention():
  cfg = CFG.replace(attention_impl="dot_product")
  tokens = jnp.zeros((1, 4), jnp.int32)
  with pytest.raises(ValueError, match="attention_mask needs attention_impl='xla'"):
    Llama(cfg).init(
      jax.random.PRNGKey(0),
      tokens,
      method=Llama.hidden_states,
      attention_mask=jnp.ones((1, 4, 4), bool),
    )


def test_head_bias_moves_only_under_reward_centering(params, prefs):
  rows = [ranking.tokenize_ranking(r, tokenizer=TOK) for r in prefs]
  batch = packed_batch(rows) | {
    "rating": np.asarray([r["rating"] for r in rows]),
    "valid": np.ones(len(rows), np.int32),
  }

  @jax.jit
  def bias_grads(p):
    grad = lambda c: jax.grad(
      lambda q: rm_steps.loss_sums(CFG, q, batch, margins="small", centering=c)["loss_sum"]
    )(p)["head"]["bias"]
    return grad(0.0), grad(0.1)

  plain, centered = bias_grads(params)
  # Without centering the bias cancels in every pair's reward difference: its gradient is
  # zero up to float32 rounding of the sum over pairs.
  assert abs(float(plain)) < 1e-5 and abs(float(centered)) > 1e-3


# --------------------------------------------------------------------------- the train step

OPT = ts.OptimizerConfig(learning_rate=1e-2, warmup_steps=1, total_steps=10)
STEP_CFG = CFG.replace(num_layers=1)  # compiles faster; sharding is the same per layer


@pytest.fixture(scope="module")
def batches():
  config = PipelineConfig(seq_len=T, batch_size=8, mode="pad", seed=1, on_too_long="raise")
  records = bundled.load("preference", "test")[:40]
  with ranking.make_ranking_pipeline(records, TOK, config) as it:
    return [next(it) for _ in range(2)]


def run_steps(mesh, batches, accum=1):
  optimizer = ts.make_optimizer(OPT)
  shardings = ts.state_shardings(reward_model.RewardModel(STEP_CFG), optimizer, mesh)
  params = sharding.init_params(reward_model.RewardModel(STEP_CFG), jax.random.PRNGKey(0))
  rm = reward_model.RewardModel(STEP_CFG)
  state = ts.init_train_state(rm, optimizer, mesh, jax.random.PRNGKey(0), params)
  step = rm_steps.make_train_step(
    STEP_CFG, optimizer, mesh=mesh, margins="large", centering=0.01, grad_accum_steps=accum
  )
  step = common.jit_train_step(step, shardings, mesh)
  history = []
  for batch in batches:
    state, metrics = step(state, batch)
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def test_sharded_accumulated_step_equals_one_device(batches):
  assert batches[0]["response_ids"].max() == 3  # rows with an edited response too
  one = sharding.make_mesh(devices=jax.devices()[:1])
  state_a, hist_a = run_steps(one, batches)
  state_b, hist_b = run_steps(sharding.make_mesh(fsdp=4, tensor=2), batches, accum=2)
  for a, b in zip(hist_a, hist_b, strict=True):
    assert float(a["pairs"]) == float(b["pairs"]) >= 8
    for key in ("loss", "accuracy", "rewards/margins", "grad_norm"):
      assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-4, abs=1e-5), key
  for x, y in zip(jax.tree.leaves(state_a.params), jax.tree.leaves(state_b.params), strict=True):
    np.testing.assert_allclose(x, y, atol=2e-5, rtol=0)
