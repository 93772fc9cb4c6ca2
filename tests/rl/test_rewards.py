"""Llama 2's reward combination, logit and whitening, and the scorer objects PPO calls."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import LlamaConfig
from llama_jax.data import bundled
from llama_jax.data.records import prompt_messages
from llama_jax.model import reward_model
from llama_jax.parallel import sharding
from llama_jax.rl import rewards
from llama_jax.tokenizer import render_prompt_response, tiny_tokenizer

LOGIT_015 = float(np.log(0.15 / 0.85))


def test_combination_rule_on_every_branch():
  #            tagged, safe σ     untagged, unsafe   untagged, safe     at threshold
  helpful = jnp.asarray([3.0, 3.0, 3.0, 3.0, -2.0])
  safety = jnp.asarray([2.0, LOGIT_015 - 0.01, LOGIT_015 + 0.01, 0.5, -4.0])
  tagged = jnp.asarray([True, False, False, False, True])
  out = rewards.combine_llama2_rewards(helpful, safety, tagged)
  # tagged -> safety; σ(R_s) < 0.15 -> safety; σ(R_s) >= 0.15 -> helpful.
  np.testing.assert_allclose(out, [2.0, LOGIT_015 - 0.01, 3.0, 3.0, -4.0], rtol=1e-6)

  # σ-score inputs: the same choice, then the logit of the chosen score.
  probs = lambda x: jax.nn.sigmoid(jnp.asarray(x))
  out_p = rewards.combine_llama2_rewards(
    probs(helpful), probs(safety), tagged, inputs="probabilities"
  )
  np.testing.assert_allclose(out_p, out, atol=1e-4)
  # Exactly at the threshold is not below it: the helpfulness score is used.
  at = rewards.combine_llama2_rewards(
    jnp.asarray([0.9]), jnp.asarray([0.15]), jnp.asarray([False]), inputs="probabilities"
  )
  np.testing.assert_allclose(at, rewards.logit(0.9), rtol=1e-6)
  # A different threshold moves the switch.
  strict = rewards.combine_llama2_rewards(helpful, safety, tagged, threshold=0.7)
  assert float(strict[3]) == 0.5
  with pytest.raises(ValueError, match="inputs="):
    rewards.combine_llama2_rewards(helpful, safety, tagged, inputs="scores")


def test_logit_undoes_the_sigmoid_and_stays_finite():
  x = jnp.linspace(-8, 8, 17)
  np.testing.assert_allclose(rewards.logit(jax.nn.sigmoid(x)), x, atol=1e-4)
  assert np.isfinite(rewards.logit(jnp.asarray([0.0, 1.0]))).all()


def test_batch_whitening():
  x = jnp.asarray([1.0, 2.0, 3.0, 10.0])
  w = rewards.whiten(x)
  assert float(w.mean()) == pytest.approx(0.0, abs=1e-6)
  assert float(w.std()) == pytest.approx(1.0, abs=1e-5)
  masked = rewards.whiten(x, mask=jnp.asarray([1, 1, 1, 0]))
  np.testing.assert_allclose(masked, [-1.2247449, 0.0, 1.2247449, 0.0], atol=1e-5)  # masked: 0
  kept = rewards.whiten(x, shift_mean=False)
  np.testing.assert_allclose(kept, w + x.mean(), atol=1e-6)


def test_running_whitening_equals_statistics_of_everything_seen():
  rng = np.random.default_rng(0)
  chunks = [rng.normal(3.0, 2.0, size=n).astype(np.float32) for n in (5, 1, 17, 8)]
  moments = rewards.RunningMoments.init()
  update = jax.jit(rewards.RunningMoments.update)
  for c in chunks:
    moments = update(moments, c)
  seen = np.concatenate(chunks)
  assert float(moments.count) == len(seen)
  assert float(moments.mean) == pytest.approx(seen.mean(), rel=1e-5)
  assert float(moments.variance) == pytest.approx(seen.var(), rel=1e-4)
  np.testing.assert_allclose(
    moments.whiten(chunks[0]), (chunks[0] - seen.mean()) / seen.std(), rtol=1e-4
  )
  masked = rewards.RunningMoments.init().update(
    jnp.asarray([1.0, 5.0, 100.0]), jnp.asarray([1, 1, 0])
  )
  assert float(masked.mean) == 3.0 and float(masked.variance) == 4.0


def test_llama2_scorer_combines_then_whitens():
  helpful = lambda prompts, responses: np.asarray([1.0, 2.0, 3.0, 4.0], np.float32)
  safety = lambda prompts, responses: np.asarray([-5.0, 1.0, 1.0, 2.0], np.float32)
  prompts, responses, tagged = ["p"] * 4, ["r"] * 4, [False, False, True, False]
  combined = np.asarray([-5.0, 2.0, 1.0, 4.0])  # unsafe, helpful, tagged, helpful

  none = rewards.Llama2Scorer(helpful, safety, whitening="none")
  np.testing.assert_allclose(none(prompts, responses, is_safety=tagged), combined)
  batch = rewards.Llama2Scorer(helpful, safety, whitening="batch")
  expected = (combined - combined.mean()) / combined.std()
  np.testing.assert_allclose(batch(prompts, responses, is_safety=tagged), expected, atol=1e-5)
  running = rewards.Llama2Scorer(helpful, safety, whitening="running")
  running(prompts, responses, is_safety=tagged)
  second = running(prompts, responses)  # no tags: [-5, 2, 3, 4]
  seen = np.concatenate([combined, [-5.0, 2.0, 3.0, 4.0]])
  np.testing.assert_allclose(
    second, (np.asarray([-5.0, 2.0, 3.0, 4.0]) - seen.mean()) / seen.std(), atol=1e-5
  )
  np.testing.assert_array_equal(running.last["safety"], safety(None, None))
  with pytest.raises(ValueError, match="whitening="):
    rewards.Llama2Scorer(helpful, safety, whitening="ema")


def test_reward_scorer_scores_text_and_token_responses_like_the_model():
  cfg = LlamaConfig.preset("tiny", vocab_size=1280, initializer_range=0.1)
  tok = tiny_tokenizer("llama3")
  params = sharding.init_params(reward_model.RewardModel(cfg), jax.random.PRNGKey(3))
  records = bundled.load("preference", "test")[:5]
  prompts = [r["prompt"] for r in records]
  responses = [r["chosen"] for r in records]
  mesh = sharding.make_mesh(data=2, fsdp=4)
  scorer = rewards.RewardScorer(cfg, params, tok, mesh=mesh, batch_size=8, pad_to=32)
  scores = scorer(prompts, responses)
  assert scores.shape == (5,) and scores.dtype == np.float32

  # Other padding, batching and placement give the same scores; so does the model run on
  # one row alone, unpadded.
  other = rewards.RewardScorer(cfg, params, tok, batch_size=2, pad_to=64)
  np.testing.assert_allclose(other(prompts, responses), scores, atol=1e-5)
  tokens = render_prompt_response(tok, prompt_messages(prompts[0]), responses[0]).tokens[None]
  alone = jax.jit(reward_model.sequence_rewards, static_argnums=0)(
    cfg, params, tokens, np.ones_like(tokens)
  )
  assert float(alone[0]) == pytest.approx(float(scores[0]), abs=1e-5)

  # Sampled token ids (the answer and its end-of-turn token) score like the text.
  ids = [
    render_prompt_response(tok, prompt_messages(p), r).tokens[
      render_prompt_response(tok, prompt_messages(p), r).prompt_len :
    ]
    for p, r in zip(prompts, responses, strict=True)
  ]
  np.testing.assert_allclose(scorer(prompts, ids), scores, atol=1e-6)
  assert scorer([], []).shape == (0,)
  with pytest.raises(ValueError, match="2 prompts but 1 responses"):
    scorer(prompts[:2], responses[:1])
