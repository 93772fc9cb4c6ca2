"""DPO: loss values by hand for every loss type, β applied once, formatting-token masking,
the NLL term as the LM loss of the chosen response, and the step with precomputed vs in-step
reference log-probabilities, sharded and accumulated."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.base import TINY_MODEL
from llama_jax import LlamaConfig
from llama_jax.data import Indexed, PipelineConfig, bundled, make_pair_pipeline
from llama_jax.model.llama import Llama
from llama_jax.objectives import dpo as dpo_obj
from llama_jax.objectives import logprobs as lp
from llama_jax.parallel import sharding
from llama_jax.parallel.sharding import init_params
from llama_jax.steps import common as step_lib
from llama_jax.steps import dpo as dpo_steps
from llama_jax.steps import lm as lm_steps
from llama_jax.tokenizer import tiny_tokenizer
from llama_jax.training import train_state as ts

PC, PR = np.array([-10.0, -20.0, -5.0]), np.array([-12.0, -15.0, -9.0])  # policy
RC, RR = np.array([-11.0, -19.0, -6.0]), np.array([-11.0, -16.0, -8.0])  # reference


def log_sigmoid(x):
  return -math.log1p(math.exp(-x))


def deltas():
  return [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(PC, PR, RC, RR, strict=True)]


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_sigmoid_loss_and_conservative_dpo_by_hand(smoothing):
  beta = 0.1
  loss, m = dpo_obj.dpo_loss(PC, PR, RC, RR, beta=beta, label_smoothing=smoothing)
  hand = [
    -(1 - smoothing) * log_sigmoid(beta * d) - smoothing * log_sigmoid(-beta * d) for d in deltas()
  ]
  assert float(loss) == pytest.approx(np.mean(hand), rel=1e-6)
  assert float(m["rewards/chosen"]) == pytest.approx(beta * np.mean(PC - RC), rel=1e-6)
  assert float(m["rewards/rejected"]) == pytest.approx(beta * np.mean(PR - RR), rel=1e-6)
  assert float(m["rewards/margins"]) == pytest.approx(beta * np.mean(deltas()), rel=1e-6)
  # Pair 1: δ = 1 - (-1) = 2 > 0; pair 2: δ = -1 - 1 = -2; pair 3: δ = 1 - (-1) = 2.
  assert deltas() == [2.0, -2.0, 2.0]
  assert float(m["rewards/accuracies"]) == pytest.approx(2 / 3)
  assert float(m["logps/chosen"]) == pytest.approx(PC.mean())
  assert float(m["logps/rejected"]) == pytest.approx(PR.mean())


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_ipo_and_hinge_by_hand(beta):
  ipo, _ = dpo_obj.dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="ipo")
  hinge, _ = dpo_obj.dpo_loss(PC, PR, RC, RR, beta=beta, loss_type="hinge")
  assert float(ipo) == pytest.approx(np.mean([(d - 1 / (2 * beta)) ** 2 for d in deltas()]))
  assert float(hinge) == pytest.approx(np.mean([max(0.0, 1 - beta * d) for d in deltas()]))


def test_beta_enters_exactly_once():
  # One pair with δ = 2: the loss is −log σ(β·2), not −log σ(β²·2); the implicit rewards are
  # β·(log-ratio), so rewards/margins is β·δ.
  for beta in (0.05, 0.1, 1.0):
    loss, m = dpo_obj.dpo_loss(
      jnp.array([-1.0]), jnp.array([-3.0]), jnp.array([-2.0]), jnp.array([-2.0]), beta=beta
    )
    assert float(loss) == pytest.approx(-log_sigmoid(2 * beta), rel=1e-6)
    assert float(m["rewards/margins"]) == pytest.approx(2 * beta, rel=1e-6)
  # Scaling the log-ratios by c and β by 1/c leaves the sigmoid loss unchanged.
  a, _ = dpo_obj.dpo_loss(PC, PR, RC, RR, beta=0.2)
  b, _ = dpo_obj.dpo_loss(2 * PC, 2 * PR, 2 * RC, 2 * RR, beta=0.1)
  assert float(a) == pytest.approx(float(b), rel=1e-6)


def test_bad_loss_settings_are_named():
  with pytest.raises(ValueError, match="loss_type='kto'"):
    dpo_obj.dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="kto")
  with pytest.raises(ValueError, match="label_smoothing applies to loss_type 'sigmoid' only"):
    dpo_obj.dpo_loss(PC, PR, RC, RR, beta=0.1, loss_type="ipo", label_smoothing=0.1)
  with pytest.raises(ValueError, match="beta=0"):
    dpo_steps.DPOConfig(beta=0.0)


def test_chunked_token_logprobs_equal_unchunked_in_value_and_gradient():
  rng = np.random.default_rng(0)
  hidden = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(8, 11)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, size=(2, 16)))

  def total(w, chunk):
    return jnp.sum(lp.chunked_token_logprobs(hidden, lambda h: h @ w, targets, chunk_size=chunk))

  full = lp.token_logprobs(hidden @ w, targets)
  np.testing.assert_allclose(
    lp.chunked_token_logprobs(hidden, lambda h: h @ w, targets, chunk_size=4), full, rtol=1e-6
  )
  np.testing.assert_allclose(jax.grad(total)(w, 4), jax.grad(total)(w, 0), rtol=1e-5, atol=1e-6)
  manual = jax.nn.log_softmax(hidden @ w)[0, 3, targets[0, 3]]
  assert float(full[0, 3]) == pytest.approx(float(manual), rel=1e-6)


# --------------------------------------------------------------------------- the step

SMALL = dict(num_layers=2, d_model=64, head_dim=16, mlp_dim=128)
T, B = 128, 8


@pytest.fixture(scope="module")
def setup():
  tokenizer = tiny_tokenizer("llama3")
  fields = {k: v for k, v in TINY_MODEL.items() if k != "preset"} | SMALL
  config = LlamaConfig.preset("tiny", **fields, initializer_range=0.05)
  policy = init_params(config, jax.random.PRNGKey(0))
  reference = init_params(config, jax.random.PRNGKey(1))
  source = Indexed(bundled.load("preference", "test")[:32])
  pipe_cfg = PipelineConfig(seq_len=T, batch_size=B, mode="pad", num_epochs=1, seed=3)
  with make_pair_pipeline(source, tokenizer, pipe_cfg) as it:
    batch = jax.tree.map(jnp.asarray, next(it))
  return config, policy, reference, source, tokenizer, batch


def direct_logps(config, params, rows):
  """log p of every target from the model's full logits (no chunking, no interleaving)."""
  logits = Llama(config).apply(
    {"params": params}, rows["tokens"], rows["positions"], rows["segment_ids"]
  )
  return lp.token_logprobs(logits, rows["targets"])


def test_formatting_mask_removes_exactly_the_formatting_tokens(setup):
  config, policy, _, _, _, batch = setup
  on = dpo_steps.pair_logps(config, policy, batch, dpo_steps.DPOConfig(mask_formatting=True))
  off = dpo_steps.pair_logps(config, policy, batch, dpo_steps.DPOConfig(mask_formatting=False))
  for col, side in enumerate(dpo_steps.SIDES):
    rows = batch[side]
    token = direct_logps(config, policy, rows)
    fmt_targets = rows["target_mask"] * lp.shift_left(rows["format_mask"])
    assert int(fmt_targets.sum()) >= B  # at least the end-of-turn token of every response
    np.testing.assert_allclose(
      off[:, col] - on[:, col], (token * fmt_targets).sum(1), rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(
      off[:, col], (token * rows["target_mask"]).sum(1), rtol=1e-5, atol=1e-4
    )


def test_nll_term_is_the_lm_loss_of_the_chosen_response(setup):
  config, policy, reference, _, _, batch = setup
  dpo = dpo_steps.DPOConfig(nll_coef=0.2)
  ref = dpo_steps.pair_logps(config, reference, batch, dpo)
  sums = dpo_steps.loss_sums(config, policy, batch, ref, dpo)
  lm_sums = lm_steps.loss_sums(config, policy, batch["chosen"], z_loss=0.0, chunk_size=0)
  _, lm_metrics = lm_steps.lm_obj.token_mean(lm_sums)
  _, metrics = dpo_obj.dpo_mean(sums, nll_coef=0.2)
  assert float(metrics["nll"]) == pytest.approx(float(lm_metrics["nll"]), rel=1e-5)
  assert float(metrics["loss"]) == pytest.approx(
    float(metrics["dpo_loss"]) + 0.2 * float(lm_metrics["nll"]), rel=1e-5
  )


def test_policy_equal_to_reference_gives_log_2(setup):
  config, policy, _, _, _, batch = setup
  dpo = dpo_steps.DPOConfig()
  sums = dpo_steps.loss_sums(
    config, policy, batch, dpo_steps.pair_logps(config, policy, batch, dpo), dpo
  )
  _, metrics = dpo_obj.dpo_mean(sums)
  assert float(metrics["dpo_loss"]) == pytest.approx(math.log(2), rel=1e-6)
  assert float(metrics["rewards/margins"]) == pytest.approx(0.0, abs=1e-6)
  assert float(metrics["pairs"]) == B


def run_steps(setup, reference, mesh, accum=1, steps=2):
  config, policy, ref_params, source, tokenizer, batch = setup
  dpo = dpo_steps.DPOConfig(beta=0.1, nll_coef=0.2, loss_chunk_size=32)
  optimizer = ts.make_optimizer(
    ts.OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10)
  )
  shardings = ts.state_shardings(config, optimizer, mesh)
  state = ts.init_train_state(config, optimizer, mesh, jax.random.PRNGKey(0), params=policy)
  if reference == "precomputed":
    ref_step = step_lib.jit_eval_step(
      dpo_steps.make_reference_step(config, dpo, mesh=mesh),
      sharding.param_shardings(config, mesh),
      mesh,
    )
    pipe_cfg = PipelineConfig(seq_len=T, batch_size=B, mode="pad")
    with make_pair_pipeline(source, tokenizer, pipe_cfg, evaluation=True, mesh=mesh) as it:
      frozen = dpo_steps.reference_logps_table(ref_step, ref_params, it, len(source))
    frozen_sharding = sharding.named_sharding(mesh, ())
  else:
    frozen, frozen_sharding = ref_params, sharding.param_shardings(config, mesh)
  step = step_lib.jit_train_step(
    dpo_steps.make_train_step(
      config, optimizer, dpo, reference=reference, mesh=mesh, grad_accum_steps=accum
    ),
    shardings,
    mesh,
    frozen_shardings=(frozen_sharding,),
  )
  metrics = []
  for _ in range(steps):
    state, m = step(state, batch, frozen)
    metrics.append(jax.device_get(m))
  return jax.device_get(state.params), metrics


def test_precomputed_and_in_step_reference_give_the_same_step(setup):
  mesh = sharding.make_mesh()  # fsdp over 8 devices
  p1, m1 = run_steps(setup, "precomputed", mesh)
  p2, m2 = run_steps(setup, "in_step", mesh)
  for a, b in zip(m1, m2, strict=True):
    for k in ("loss", "dpo_loss", "nll", "rewards/margins", "logps/chosen", "grad_norm"):
      assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-5, abs=1e-6), k
  for x, y in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_sharded_and_accumulated_steps_equal_one_device(setup):
  single = jax.sharding.Mesh(
    np.array(jax.devices()[:1]).reshape(1, 1, 1), ("data", "fsdp", "tensor")
  )
  p_ref, m_ref = run_steps(setup, "in_step", single)
  p_acc, m_acc = run_steps(setup, "in_step", sharding.make_mesh(fsdp=4, tensor=2), accum=2)
  for a, b in zip(m_ref, m_acc, strict=True):
    assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-5)
    assert float(a["nll"]) == pytest.approx(float(b["nll"]), rel=1e-5)
  for x, y in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_acc), strict=True):
    np.testing.assert_allclose(x, y, atol=2e-6)


# --------------------------------------------------------------------------- the builder


def test_built_dpo_is_the_step_wiring_and_both_reference_modes_agree(setup):
  config, policy, ref_params, source, tokenizer, batch = setup
  mesh = sharding.make_mesh()
  dpo_cfg = dpo_steps.DPOConfig(beta=0.1, nll_coef=0.2, loss_chunk_size=32)
  opt = ts.OptimizerConfig(learning_rate=1e-3, warmup_steps=0, total_steps=10)
  pipe_cfg = PipelineConfig(seq_len=T, batch_size=B, mode="pad")
  runs, evals = {}, {}
  for reference in dpo_steps.REFERENCES:
    dpo = dpo_steps.build(config, mesh, dpo_cfg, opt, reference=reference)
    if reference == "precomputed":
      with make_pair_pipeline(source, tokenizer, pipe_cfg, evaluation=True, mesh=mesh) as it:
        frozen = dpo.reference_table(ref_params, it, len(source))
    else:
      frozen = ref_params
    state = dpo.init_state(policy, jax.random.PRNGKey(0))
    evals[reference] = dpo.evaluate(state.params, [batch], frozen)
    metrics = []
    for _ in range(2):
      state, m = dpo.train_step(state, batch, frozen)
      metrics.append(jax.device_get(m))
    runs[reference] = jax.device_get(state.params), metrics
  # The builder's steps are `run_steps`' wiring of the same pieces.
  wired = run_steps(setup, "precomputed", mesh)
  # Two programs (the builder's also reports the schedule) may round differently: the rewards
  # are β·(logp - reference logp), differences of sums of order |logps|.
  logps = max(abs(float(m[k])) for m in wired[1] for k in m if k.startswith("logps/"))
  for a, b in zip(runs["precomputed"][1], wired[1], strict=True):
    assert a.keys() == b.keys() | {"learning_rate"}
    for k in b:
      np.testing.assert_allclose(a[k], b[k], rtol=1e-6, atol=1e-6 * logps, err_msg=k)
  for x, y in zip(jax.tree.leaves(runs["precomputed"][0]), jax.tree.leaves(wired[0]), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  # Table lookup and in-step reference: the same loss, to float32 rounding of log-probs of
  # order |logps/chosen| (sums over a response's tokens).
  scale = max(abs(float(m["logps/chosen"])) for m in runs["in_step"][1])
  for a, b in zip(runs["precomputed"][1], runs["in_step"][1], strict=True):
    for k in ("loss", "dpo_loss", "nll", "rewards/margins", "grad_norm"):
      assert float(a[k]) == pytest.approx(float(b[k]), rel=1e-5, abs=1e-6 * scale), k
  for k in evals["in_step"]:
    assert evals["precomputed"][k] == pytest.approx(
      evals["in_step"][k], rel=1e-5, abs=1e-6 * scale
    ), k
