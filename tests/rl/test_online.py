"""Online RL pieces: rollout rows line up with the sampler's log-probs, the prompt iterator
resumes, and on a fixed rollout one PPO policy / value step and one GRPO step lower their
losses; the advantage passes' rewards and advantages match the objectives; the iteration
driver runs any algorithm object through sample → score → advantages → minibatch updates →
metrics; the builders (`rl.grpo.build`, `rl.ppo.build`) make states whose layout is their
restore target's, and one iteration through a builder equals one through the launcher."""

import dataclasses
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax import LlamaConfig
from llama_jax.generation import GenerationConfig, SamplingConfig
from llama_jax.model import lora, reward_model
from llama_jax.model.llama import Llama
from llama_jax.objectives import grpo as grpo_obj
from llama_jax.objectives import ppo as ppo_obj
from llama_jax.objectives.kl import kl_estimate
from llama_jax.parallel import sharding
from llama_jax.parallel.sharding import init_params
from llama_jax.rl import grpo as grpo_lib
from llama_jax.rl import online, rollouts
from llama_jax.rl import ppo as ppo_lib
from llama_jax.rl.rollouts import sample_rollout
from llama_jax.steps import common as step_lib
from llama_jax.steps import grpo as grpo_steps
from llama_jax.steps import ppo as ppo_steps
from llama_jax.tokenizer import tiny_tokenizer
from llama_jax.training import train_state as ts

PROMPTS = [
  {"prompt": "What is 2 + 3?", "reference": "5", "concern": "helpfulness"},
  {"prompt": "Name the capital of France.", "reference": "Paris", "concern": "helpfulness"},
  {"prompt": "How do I bake bread?", "concern": "safety", "is_unsafe": False, "task": "comply"},
  {"prompt": "What is 7 - 4?", "reference": "3", "concern": "helpfulness"},
]


@pytest.fixture(scope="module")
def setup():
  tokenizer = tiny_tokenizer("llama3")
  config = LlamaConfig.preset("tiny", vocab_size=tokenizer.vocab_size, initializer_range=0.1)
  params = init_params(config, jax.random.PRNGKey(0))
  gen = GenerationConfig(
    max_new_tokens=12,
    num_samples=2,
    sampling=SamplingConfig(temperature=1.0),
    stop_ids=tokenizer.stop_ids,
    pad_id=tokenizer.pad_id,
    prompt_bucket=64,
  )
  rollout = sample_rollout(config, params, tokenizer, PROMPTS, jax.random.key(3), gen)
  return config, params, tokenizer, gen, rollout


def test_rollout_rows_line_up_with_the_sampled_log_probs(setup):
  config, params, tokenizer, gen, rollout = setup
  rows = rollout.rows
  assert rows["tokens"].shape == (8, 64) and len(rollout.texts) == 8
  assert (rows["response_mask"].sum(1) == rollout.lengths).all()
  # The training forward pass scores each response token as the sampler did.
  from llama_jax.generation import encode_prompt, generate_tokens

  prompt_ids = [encode_prompt(tokenizer, r["prompt"], chat=True) for r in PROMPTS]
  out = jax.device_get(generate_tokens(config, params, prompt_ids, jax.random.key(3), gen))
  logp = np.asarray(step_lib.row_logprobs(config, params, rows))
  for i in range(8):
    mask = rows["response_mask"][i] == 1
    sampled = np.asarray(out.model_logprobs).reshape(8, -1)[i][: mask.sum()]
    np.testing.assert_allclose(logp[i][mask], sampled, atol=2e-4)
    assert (
      rows["targets"][i][mask].tolist()
      == np.asarray(out.tokens).reshape(8, -1)[i][: mask.sum()].tolist()
    )
    np.testing.assert_array_equal(rollout.sample_logp[i][mask], sampled)  # kept beside the row
  # rollout/logp_mismatch: the largest of those differences, from global arrays on the mesh.
  mask = rows["response_mask"] == 1
  assert not rollout.sample_logp[~mask].any()
  batch = step_lib.batch_sharding(sharding.make_mesh())
  mismatch = online.logp_mismatch(
    rollout, jax.device_put(logp, batch), rollout.global_rows(batch), batch
  )
  assert mismatch == pytest.approx(float(np.abs(logp - rollout.sample_logp)[mask].max()), rel=1e-6)
  assert mismatch < 2e-4


def test_prompt_iterator_resumes_and_reshuffles():
  records = [{"id": str(i)} for i in range(10)]
  it = rollouts.PromptIterator(records, batch_size=4, seed=1)
  first = [[r["id"] for r in next(it)["records"]] for _ in range(3)]
  state = it.get_state()
  rest = [[r["id"] for r in next(it)["records"]] for _ in range(2)]
  again = rollouts.PromptIterator(records, batch_size=4, seed=1)
  again.set_state(state)
  assert [[r["id"] for r in next(again)["records"]] for _ in range(2)] == rest
  assert sorted(first[0] + first[1]) != sorted(first[2])  # epoch 2 reshuffled (2 per epoch)
  assert state == {"epoch": 1, "index": 4}


def fixed_minibatch(setup, extra):
  _, _, _, _, rollout = setup
  return {k: jnp.asarray(v) for k, v in rollout.rows.items()} | extra


def improves(step, state, batch, loss_fn):
  before = float(loss_fn(state.params, batch))
  state, metrics = step(state, batch)
  after = float(loss_fn(state.params, batch))
  assert bool(metrics["finite"])
  return before, after


def test_one_ppo_policy_and_value_step_lower_their_losses(setup):
  config, params, _, _, rollout = setup
  mask = jnp.asarray(rollout.rows["response_mask"])
  ppo = ppo_steps.PPOConfig(kl_coef=0.05)
  vparams = reward_model.from_lm_params(config, params, jax.random.PRNGKey(1))
  advantages = jax.jit(ppo_steps.make_advantage_fn(config, config, ppo))
  scores = jnp.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0])  # the rewards: no penalties
  ref = jax.tree.map(lambda x: x * 1.01, params)
  out, metrics = advantages(params, ref, vparams, rollout.rows, scores, 0.05)
  # The pieces agree with the objectives computed directly.
  logp = step_lib.row_logprobs(config, params, rollout.rows)
  ref_logp = step_lib.row_logprobs(config, ref, rollout.rows)
  kl = kl_estimate(logp, ref_logp, "k1") * mask
  rewards = ppo_obj.token_rewards(scores, kl, mask, beta=0.05)
  np.testing.assert_allclose(rewards.sum(1), scores - 0.05 * kl.sum(1), rtol=1e-5, atol=1e-6)
  adv, ret = ppo_obj.gae(rewards, out["old_values"], mask, gamma=1.0, lam=0.95)
  np.testing.assert_allclose(out["returns"], ret, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
    out["advantages"], ppo_obj.masked_whiten(adv, mask), rtol=1e-4, atol=1e-4
  )
  assert float(metrics["objective/kl"]) == pytest.approx(float(kl.sum(1).mean()), abs=1e-5)

  mesh = sharding.make_mesh()
  opt = ts.make_optimizer(ts.OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10))
  batch = fixed_minibatch(setup, out)

  def policy_loss(p, b):
    lp = step_lib.row_logprobs(config, p, b)
    return ppo_obj.policy_loss(lp, b["old_logp"], b["advantages"], b["response_mask"])[0]

  def value_loss(p, b):
    v = ppo_steps.token_values(config, p, b)
    return ppo_obj.value_loss(v, b["old_values"], b["returns"], b["response_mask"])[0]

  pstate = ts.init_train_state(
    config, opt, mesh, jax.random.PRNGKey(0), params=jax.tree.map(jnp.copy, params)
  )
  pstep = step_lib.jit_train_step(
    ppo_steps.make_policy_step(config, opt, ppo, mesh=mesh),
    ts.state_shardings(config, opt, mesh),
    mesh,
  )
  before, after = improves(pstep, pstate, batch, policy_loss)
  assert after < before - 1e-3
  opt = ts.make_optimizer(ts.OptimizerConfig(learning_rate=1e-4, warmup_steps=0, total_steps=10))
  value = reward_model.RewardModel(config)
  vparams = jax.tree.map(jnp.copy, vparams)
  vstate = ts.init_train_state(value, opt, mesh, jax.random.PRNGKey(0), params=vparams)
  vstep = step_lib.jit_train_step(
    ppo_steps.make_value_step(value, opt, ppo, mesh=mesh),
    ts.state_shardings(value, opt, mesh),
    mesh,
  )
  before, after = improves(vstep, vstate, batch, value_loss)
  assert after < before - 1e-3


def test_one_grpo_step_lowers_the_loss(setup):
  config, params, _, gen, rollout = setup
  grpo = grpo_steps.GRPOConfig(group_size=gen.num_samples, beta=0.04)
  scores = jnp.asarray([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0])
  advantages = jax.jit(grpo_steps.make_advantage_fn(config, grpo, micro_batches=2))
  ref_params = jax.tree.map(lambda x: x * 1.01, params)
  out, metrics = advantages(params, ref_params, rollout.rows, scores)
  # One advantage pass: the shared log-prob function's values and per-token group advantages.
  logps = jax.jit(step_lib.make_logps_fn(config))
  old, entropy = logps(params, rollout.rows)
  ref, _ = logps(ref_params, rollout.rows)
  mask = rollout.rows["response_mask"]
  np.testing.assert_allclose(out["old_logp"], old, atol=1e-5)
  np.testing.assert_allclose(out["ref_logp"], ref, atol=1e-5)
  adv = grpo_obj.group_advantages(scores, grpo.group_size)
  np.testing.assert_allclose(out["advantages"], adv[:, None] * mask, atol=1e-6)
  kl = (np.asarray(old) - np.asarray(ref)) * mask
  assert float(metrics["objective/kl"]) == pytest.approx(float(kl.sum(1).mean()), abs=1e-4)
  assert float(metrics["policy/entropy"]) == pytest.approx(
    float((np.asarray(entropy) * mask).sum() / mask.sum()), rel=1e-5
  )
  batch = fixed_minibatch(setup, out)
  mesh = sharding.make_mesh()
  opt = ts.make_optimizer(ts.OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10))
  state = ts.init_train_state(
    config, opt, mesh, jax.random.PRNGKey(0), params=jax.tree.map(jnp.copy, params)
  )
  step = step_lib.jit_train_step(
    grpo_steps.make_train_step(config, opt, grpo, mesh=mesh),
    ts.state_shardings(config, opt, mesh),
    mesh,
  )

  def loss(p, b):
    lp = step_lib.row_logprobs(config, p, b)
    return grpo_obj.grpo_loss(
      lp, b["old_logp"], b["ref_logp"], b["advantages"], b["response_mask"], beta=0.04
    )[0]

  before, after = improves(step, state, batch, loss)
  assert after < before - 1e-3


def one_device_mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


@dataclasses.dataclass
class Recorder:
  """A fake algorithm: records what the driver hands it."""

  calls: list = dataclasses.field(default_factory=list)
  mesh: Any = dataclasses.field(default_factory=one_device_mesh)

  def advantages(self, state, ref_params, rows, rewards):
    self.calls.append(("advantages", np.asarray(rewards).tolist()))
    n, t = rows["tokens"].shape
    return {"advantages": np.arange(n, dtype=np.float32)[:, None] * np.ones((n, t))}, {
      "objective/kl": 0.5
    }

  def update(self, state, minibatch):
    self.calls.append(("update", sorted(minibatch["advantages"][:, 0].astype(int).tolist())))
    return state, {"loss/policy": jnp.float32(len(self.calls)), "finite": jnp.bool_(True)}

  def finish(self, state, metrics):
    self.calls.append(("finish", metrics["objective/kl"]))
    return state, metrics | {"extra": 1.0}


def test_the_driver_samples_scores_and_updates_in_shuffled_minibatches(setup):
  config, params, tokenizer, gen, _ = setup
  seen = []

  def scorer(records, prompts, responses):  # the project's scorer signature
    seen.append((list(prompts), list(responses)))
    return [float(r.get("reference") == "5") for r in records]

  algo = Recorder()
  sampler = online.Sampler(config, tokenizer, gen)
  iteration = online.make_iteration(
    algo, sampler, scorer, None, num_minibatches=2, no_eos_penalty=-1.0
  )
  state = grpo_lib.GRPOState(policy=types.SimpleNamespace(params=params), step=jnp.int32(0))
  state, metrics = iteration(state, {"records": PROMPTS})
  assert int(state.step) == 1
  assert seen[0][0] == [r["prompt"] for r in PROMPTS for _ in range(2)]
  rollout = sample_rollout(config, params, tokenizer, PROMPTS, jax.random.fold_in(
    jax.random.key(0), 0), gen)  # fmt: skip
  assert seen[0][1] == rollout.texts  # the key is folded from seed and iteration
  raw = np.array([1.0, 1.0] + [0.0] * 6)
  assert algo.calls[0] == ("advantages", (raw - 1.0 * ~rollout.stopped).tolist())
  halves = [c[1] for c in algo.calls[1:3]]
  assert sorted(halves[0] + halves[1]) == list(range(8)) and len(halves[0]) == 4
  assert algo.calls[3] == ("finish", 0.5)
  assert metrics["score/mean"] == pytest.approx(0.25)  # before the EOS penalty
  assert metrics["loss"] == metrics["loss/policy"] == pytest.approx(2.5)  # mean of 2, 3
  assert metrics["score/groups_with_signal"] == 0.0 and metrics["extra"] == 1.0
  assert metrics["finite"] == 1.0 and metrics["response/length"] > 0


def same_layout(state, abstract):
  """`state`'s leaves have the shapes, dtypes and shardings of the abstract restore target."""
  leaves, abstract_leaves = jax.tree.leaves(state), jax.tree.leaves(abstract)
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
  for x, a in zip(leaves, abstract_leaves, strict=True):
    assert (x.shape, x.dtype) == (a.shape, a.dtype)
    if isinstance(x.sharding, jax.sharding.NamedSharding):  # fresh scalars are uncommitted
      assert x.sharding.is_equivalent_to(a.sharding, x.ndim)


def test_builders_make_fresh_states_laid_out_as_their_restore_targets(setup):
  config, params, *_ = setup
  mesh = sharding.make_mesh()
  opt = ts.OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10)
  key = jax.random.PRNGKey(0)

  grpo = grpo_lib.build(config, mesh, grpo_lib.GRPOConfig(group_size=2), opt, num_minibatches=2)
  assert grpo.num_minibatches == 2 and grpo.mesh is mesh
  state = grpo.init_state(jax.tree.map(jnp.copy, params), key)
  assert isinstance(state, grpo_lib.GRPOState) and int(state.step) == 0
  same_layout(state, grpo.abstract_state())
  np.testing.assert_array_equal(state.policy.params["embed"], params["embed"])

  ppo = ppo_lib.build(config, mesh, ppo_lib.PPOConfig(kl_coef=0.05), opt)
  state = ppo.init_state(jax.tree.map(jnp.copy, params), key)  # value: the policy's trunk
  assert float(state.kl_coef) == pytest.approx(0.05) and int(state.step) == 0
  same_layout(state, ppo.abstract_state())
  np.testing.assert_array_equal(state.value.params["lm"]["embed"], params["embed"])
  vparams = reward_model.from_lm_params(config, params, jax.random.PRNGKey(5))
  given = ppo.init_state(jax.tree.map(jnp.copy, params), key, vparams)
  np.testing.assert_array_equal(given.value.params["head"]["kernel"], vparams["head"]["kernel"])
  other = dataclasses.replace(config, num_layers=1)
  with pytest.raises(ValueError, match="needs the policy's config"):
    dataclasses.replace(ppo, value_config=other).init_state(params, key)
  # A value model of another architecture (a reward model's) gets its own layout.
  ppo_other = ppo_lib.build(config, mesh, ppo_lib.PPOConfig(), opt, value_config=other)
  value = ppo_other.abstract_state().value
  assert len(jax.tree.leaves(value.params)) < len(jax.tree.leaves(ppo.abstract_state().value))


def test_builders_train_only_the_adapters_of_a_lora_policy(setup):
  config, params, *_ = setup
  mesh = sharding.make_mesh()
  opt = ts.OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10)
  model = Llama(config, lora=lora.LoraConfig(rank=2))
  grpo = grpo_lib.build(model, mesh, grpo_lib.GRPOConfig(group_size=2), opt)
  state = grpo.init_state(jax.tree.map(jnp.copy, params), jax.random.PRNGKey(0))
  same_layout(state, grpo.abstract_state())
  assert lora.has_adapters(state.policy.params)  # fresh adapters beside the plain weights
  moments = jax.tree.leaves(state.policy.opt_state)
  trained = [x for x in jax.tree.leaves(state.policy.params) if x.ndim]
  assert sum(x.size for x in moments) < sum(x.size for x in trained)  # no moments: frozen
