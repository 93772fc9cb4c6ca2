"""KL estimators, GAE, PPO's clipped policy and value losses, the adaptive KL controller,
GRPO's group advantages and loss, and the critic-free variants (Dr. GRPO's constant-length
normalization, RLOO's leave-one-out baseline, REINFORCE++'s batch-whitened returns), against
plain-Python references and hand values."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.objectives import grpo, ppo, rl
from llama_jax.objectives.kl import kl_estimate


def test_kl_estimators_by_hand_and_unbiased_in_expectation():
  logp, ref = jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])
  r = np.array([-0.5, 1.0])  # ref − logp
  np.testing.assert_allclose(kl_estimate(logp, ref, "k1"), -r)
  np.testing.assert_allclose(kl_estimate(logp, ref, "k2"), r**2 / 2)
  np.testing.assert_allclose(kl_estimate(logp, ref, "k3"), np.exp(r) - 1 - r, rtol=1e-6)
  # Samples from p: E[k1] = E[k3] = KL(p || q) exactly; k3 is never negative.
  p, q = np.array([0.7, 0.2, 0.1]), np.array([0.4, 0.4, 0.2])
  exact = float(np.sum(p * np.log(p / q)))
  for kind in ("k1", "k3"):
    est = kl_estimate(jnp.log(p), jnp.log(q), kind)
    assert float(jnp.sum(jnp.asarray(p) * est)) == pytest.approx(exact, rel=1e-5)
  assert (kl_estimate(jnp.log(p), jnp.log(q), "k3") >= 0).all()
  with pytest.raises(ValueError, match="'k4'"):
    kl_estimate(logp, ref, "k4")


def python_gae(rewards, values, mask, gamma, lam):
  b, t = rewards.shape
  adv = np.zeros((b, t))
  for i in range(b):
    last = 0.0
    for j in reversed(range(t)):
      if not mask[i, j]:
        last = 0.0
        continue
      nxt = values[i, j + 1] if j + 1 < t and mask[i, j + 1] else 0.0
      delta = rewards[i, j] + gamma * nxt - values[i, j]
      last = delta + gamma * lam * last
      adv[i, j] = last
  return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_equals_a_python_loop(gamma, lam):
  rng = np.random.default_rng(0)
  rewards, values = rng.normal(size=(4, 9)), rng.normal(size=(4, 9))
  lengths = np.array([9, 5, 1, 0])
  mask = (np.arange(9)[None] < lengths[:, None]).astype(np.float32)
  adv, ret = ppo.gae(
    jnp.asarray(rewards), jnp.asarray(values), jnp.asarray(mask), gamma=gamma, lam=lam
  )
  want_adv, want_ret = python_gae(rewards, values, mask, gamma, lam)
  np.testing.assert_allclose(adv, want_adv, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ret, want_ret, rtol=1e-5, atol=1e-5)


def test_token_rewards_put_the_score_at_the_last_token():
  mask = jnp.array([[1, 1, 1, 0], [1, 0, 0, 0]])
  kl = jnp.array([[0.1, 0.2, 0.3, 9.0], [0.5, 9.0, 9.0, 9.0]])
  r = ppo.token_rewards(jnp.array([2.0, -1.0]), kl, mask, beta=0.1)
  np.testing.assert_allclose(
    r, [[-0.01, -0.02, 2.0 - 0.03, 0.0], [-1.0 - 0.05, 0, 0, 0]], rtol=1e-6
  )


def test_clipped_policy_loss_by_hand():
  # Token 1: ρ = e^0.5 ≈ 1.65 with A = 1 → clipped at 1.2: loss −1.2 (clipped).
  # Token 2: ρ = e^−0.5 ≈ 0.61 with A = 1 → min picks the unclipped −0.61 (max of negatives).
  # Token 3: ρ = e^0.5 with A = −2 → max(2·1.65, 2·1.2) = 3.30 (unclipped).
  # Token 4 is masked out.
  logp = jnp.array([[0.5, -0.5, 0.5, 3.0]])
  old = jnp.zeros((1, 4))
  adv = jnp.array([[1.0, 1.0, -2.0, 5.0]])
  mask = jnp.array([[1, 1, 1, 0]])
  loss, m = ppo.policy_loss(logp, old, adv, mask, clip_eps=0.2)
  e = math.exp(0.5)
  assert float(loss) == pytest.approx((-1.2 - 1 / e + 2 * e) / 3, rel=1e-6)
  assert float(m["policy/clipfrac"]) == pytest.approx(1 / 3)
  assert float(m["policy/approxkl"]) == pytest.approx(0.5 * 0.25, rel=1e-6)


def test_clipped_value_loss_by_hand():
  values = jnp.array([[1.0, 0.0, 2.0]])
  old = jnp.array([[0.5, 0.0, 0.0]])
  returns = jnp.array([[0.0, 1.0, 5.0]])
  loss, m = ppo.value_loss(values, old, returns, jnp.ones((1, 3)), clip_eps=0.2)
  # Token 1: V clipped to 0.7 → max(1², 0.7²) = 1; token 2: 1; token 3: clip to 0.2 → max(9, 4.8²).
  assert float(loss) == pytest.approx(0.5 * (1 + 1 + 4.8**2) / 3, rel=1e-6)
  assert float(m["value/clipfrac"]) == pytest.approx(1 / 3)


def test_adaptive_kl_controller():
  assert ppo.adaptive_kl_beta(0.1, 0.12, 100, target=0.1, horizon=1000) == pytest.approx(
    0.1 * (1 + 0.2 * 0.1)
  )
  assert ppo.adaptive_kl_beta(0.1, 1.0, 100, target=0.1, horizon=1000) == pytest.approx(
    0.1 * 1.02
  )  # clipped
  assert ppo.adaptive_kl_beta(0.1, 0.0, 500, target=0.1, horizon=1000) == pytest.approx(0.1 * 0.9)


def test_group_advantages_by_hand():
  r = jnp.array([1.0, 0.0, 0.0, 1.0, 2.0, 2.0])
  np.testing.assert_allclose(
    grpo.group_advantages(r, 2, scale="none"), [0.5, -0.5, -0.5, 0.5, 0, 0]
  )
  adv = grpo.group_advantages(r, 2, eps=0.0 + 1e-4)
  np.testing.assert_allclose(adv[:4], np.array([1, -1, -1, 1]) * 0.5 / (0.5 + 1e-4), rtol=1e-6)
  np.testing.assert_allclose(adv[4:], [0, 0])  # equal rewards: no signal, no NaN
  with pytest.raises(ValueError, match="groups of 4"):
    grpo.group_advantages(r, 4)


def test_grpo_loss_by_hand_for_both_aggregations():
  logp = jnp.array([[0.5, 0.0, 0.0], [0.0, 0.0, 0.0]])
  old = jnp.zeros((2, 3))
  ref = jnp.array([[0.0, 0.0, 0.0], [-1.0, 0.0, 0.0]])
  adv = jnp.array([1.0, -1.0])
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  beta = 0.1
  e = math.exp(0.5)
  k3_a = math.exp(-0.5) - 1 + 0.5  # ref − logp = −0.5
  k3_b = math.exp(-1.0) - 1 + 1.0
  tok = [[-1.2 + beta * k3_a, -1.0], [1.0 + beta * k3_b]]  # row 1: ρ clipped at 1.2; row 2: ρ = 1
  seq, _ = grpo.grpo_loss(logp, old, ref, adv, mask, beta=beta, aggregation="sequence_mean")
  assert float(seq) == pytest.approx((np.mean(tok[0]) + np.mean(tok[1])) / 2, rel=1e-6)
  token, m = grpo.grpo_loss(logp, old, ref, adv, mask, beta=beta, aggregation="token_mean")
  assert float(token) == pytest.approx(sum(tok[0] + tok[1]) / 3, rel=1e-6)
  assert float(m["policy/clipfrac"]) == pytest.approx(1 / 3)
  assert float(m["policy/approxkl"]) == pytest.approx(0.5 * 0.25 / 3, rel=1e-6)
  assert e > 1.2  # the first token's ratio is indeed past the clip
  asym, _ = grpo.grpo_loss(
    logp, old, ref, adv, mask, beta=beta, clip_eps_high=0.28, aggregation="token_mean"
  )
  assert float(asym) == pytest.approx((-1.28 + beta * k3_a - 1.0 + 1.0 + beta * k3_b) / 3, rel=1e-6)
  # Dr. GRPO: each response's token sum over a constant (4), whatever its length, and the
  # same loss from per-token advantages.
  dr, _ = grpo.grpo_loss(
    logp, old, ref, adv, mask, beta=beta, aggregation="max_length", max_length=4
  )
  assert float(dr) == pytest.approx((sum(tok[0]) + sum(tok[1])) / (2 * 4), rel=1e-6)
  per_token, _ = grpo.grpo_loss(
    logp, old, ref, adv[:, None] * mask, mask, beta=beta, aggregation="max_length", max_length=4
  )
  assert float(per_token) == pytest.approx(float(dr), rel=1e-6)
  with pytest.raises(ValueError, match="max_length"):
    grpo.grpo_loss(logp, old, ref, adv, mask, aggregation="max_length")


def test_rloo_advantages_by_hand():
  # Group 1 (1, 0, 2): 1 − mean(0, 2) = 0; 0 − mean(1, 2) = −1.5; 2 − mean(1, 0) = 1.5.
  # Group 2 (3, 3, 0): 3 − mean(3, 0) = 1.5 twice; 0 − mean(3, 3) = −3.
  r = jnp.array([1.0, 0.0, 2.0, 3.0, 3.0, 0.0])
  np.testing.assert_allclose(rl.rloo_advantages(r, 3), [0, -1.5, 1.5, 1.5, 1.5, -3])
  # = K / (K − 1) · (r − group mean): the leave-one-out baseline is the scaled centered one.
  np.testing.assert_allclose(
    rl.rloo_advantages(r, 3), 1.5 * rl.group_advantages(r, 3, scale="none"), rtol=1e-6
  )
  # With the KL in the reward: β · Σ_t KL = 0.5 · (2, 0, 0) makes the rewards (0, 0, 2), so
  # (0 − 1, 0 − 1, 2 − 0), broadcast over each response's tokens.
  mask = jnp.array([[1, 1, 0], [1, 0, 0], [1, 1, 1]])
  kl = jnp.array([[1.5, 0.5, 7.0], [0.0, 9.0, 9.0], [0.0, 0.0, 0.0]])
  adv = rl.advantages("rloo", jnp.array([1.0, 0.0, 2.0]), kl, mask, group_size=3, kl_coef=0.5)
  np.testing.assert_allclose(adv, [[-1, -1, 0], [-1, 0, 0], [2, 2, 2]])
  with pytest.raises(ValueError, match="group_size ≥ 2"):
    rl.rloo_advantages(r, 1)


def test_reinforce_pp_advantages_by_hand():
  # β = 1. Row 1: r = (−0.1, −0.2, −0.3 + 1) → returns-to-go (0.4, 0.5, 0.7).
  # Row 2 (2 tokens): r = (−0.4, −0.5) → (−0.9, −0.5). The 9s are off the mask.
  mask = jnp.array([[1, 1, 1], [1, 1, 0]])
  kl = jnp.array([[0.1, 0.2, 0.3], [0.4, 0.5, 9.0]])
  scores = jnp.array([1.0, 0.0])
  returns = rl.returns_to_go(ppo.token_rewards(scores, kl, mask, beta=1.0), mask)
  np.testing.assert_allclose(returns, [[0.4, 0.5, 0.7], [-0.9, -0.5, 0]], atol=1e-6)
  # Whitened over all five response tokens of the batch (mean 0.04, var 0.3904), no group std.
  g = np.array([0.4, 0.5, 0.7, -0.9, -0.5])
  assert g.mean() == pytest.approx(0.04) and g.var() == pytest.approx(0.3904)
  want = (g - 0.04) / math.sqrt(0.3904)
  adv = rl.advantages("reinforce_pp", scores, kl, mask, group_size=2, kl_coef=1.0)
  np.testing.assert_allclose(adv, [want[:3], [*want[3:], 0.0]], rtol=1e-5, atol=1e-6)


def test_advantage_estimators_share_one_shape_and_refuse_unknown_names():
  mask = jnp.array([[1, 1, 0], [1, 0, 0]])
  scores, kl = jnp.array([1.0, 0.0]), jnp.zeros((2, 3))
  for name in rl.ESTIMATORS:
    adv = rl.advantages(name, scores, kl, mask, group_size=2)
    assert adv.shape == (2, 3) and float(jnp.abs(adv * (1 - mask)).sum()) == 0.0
  # GRPO's group z-score broadcast over tokens; Dr. GRPO's only centers.
  np.testing.assert_allclose(
    rl.advantages("group", scores, kl, mask, group_size=2, scale="none"),
    [[0.5, 0.5, 0], [-0.5, 0, 0]],
  )
  with pytest.raises(ValueError, match="'ppo'"):
    rl.advantages("ppo", scores, kl, mask, group_size=2)
