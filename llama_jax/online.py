"""Online RL iterations: sample from the policy, score, update (PPO with a value model; GRPO).

Each iteration is a host function `iteration(state, batch) -> (state, metrics)` over a batch
`{"records": [rl_prompt records]}` from `rollouts.PromptIterator`, so `llama_jax.trainer.fit`
runs it like any train step (logging, checkpoints, resume). Inside, every heavy piece is its
own compiled function: generation (`generation.generate_tokens`), scoring
(`steps.ppo.make_score_fn` / `steps.grpo.make_logps_fn`), and one jitted, state-donating
update per minibatch (Llama 2: 512 prompts per iteration, minibatches of 64, one gradient
step each). The reward is any `(records, texts) -> scores` function: a reward model
(`rewards.RewardScorer`, Llama 2's combination) or a program (`rollouts.check_answer_reward`).

Rollouts are assembled on the host, so this runs on one host (any number of its devices);
multi-host RL would need the rows built as global arrays per process.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from llama_jax.config import LlamaConfig
from llama_jax.generation import GenerationConfig, encode_prompt, generate_tokens, response_text
from llama_jax.objectives import grpo as grpo_obj
from llama_jax.objectives import ppo as ppo_obj
from llama_jax.rollouts import RewardFn, ended_with_stop, rollout_rows, row_length
from llama_jax.tokenizer import Tokenizer
from llama_jax.train_state import TrainState


@flax.struct.dataclass
class PPOState:
  """The policy's and the value model's train states, the current KL coefficient β and the
  iteration count (`step`, what the trainer counts; each iteration takes several updates)."""

  policy: TrainState
  value: TrainState
  kl_coef: jax.Array
  step: jax.Array


@flax.struct.dataclass
class GRPOState:
  """The policy's train state and the iteration count (`step`)."""

  policy: TrainState
  step: jax.Array


@dataclasses.dataclass(frozen=True)
class Rollout:
  """One batch of sampled responses: rows [B·R, T] (`rollouts.rollout_rows`), texts, the
  records each row answers, response lengths and whether each ended with a stop token."""

  rows: dict[str, np.ndarray]
  texts: list[str]
  records: list[dict[str, Any]]
  lengths: np.ndarray
  stopped: np.ndarray
  seconds: float


def sample_rollout(
  config: LlamaConfig,
  params: Any,
  tokenizer: Tokenizer,
  records: Sequence[dict[str, Any]],
  key: jax.Array,
  gen: GenerationConfig,
  *,
  chat: bool = True,
  mesh: Mesh | None = None,
  row_multiple: int = 64,
) -> Rollout:
  """`gen.num_samples` responses to each record's prompt, as training rows."""
  t0 = time.perf_counter()
  prompt_ids = [encode_prompt(tokenizer, r["prompt"], chat=chat) for r in records]
  out = jax.device_get(generate_tokens(config, params, prompt_ids, key, gen, mesh=mesh))
  tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
  r = gen.num_samples
  texts = [
    response_text(tokenizer, tokens[i, j], mask[i, j], gen.stop_ids)
    for i in range(len(records))
    for j in range(r)
  ]
  seq_len = row_length(prompt_ids, gen.max_new_tokens, row_multiple)
  return Rollout(
    rows=rollout_rows(prompt_ids, tokens, mask, seq_len=seq_len),
    texts=texts,
    records=[rec for rec in records for _ in range(r)],
    lengths=mask.sum(-1).reshape(-1),
    stopped=ended_with_stop(tokens, mask, gen.stop_ids).reshape(-1),
    seconds=time.perf_counter() - t0,
  )


def minibatch_indices(num_rows: int, num_minibatches: int, rng: np.random.Generator):
  """A shuffled split of the rows into `num_minibatches` equal parts."""
  if num_rows % num_minibatches:
    raise ValueError(f"{num_rows} rollout rows do not split into {num_minibatches} minibatches")
  return np.split(rng.permutation(num_rows), num_minibatches)


def _take(arrays: dict[str, Any], index: np.ndarray) -> dict[str, np.ndarray]:
  return {k: np.asarray(v)[index] for k, v in arrays.items()}


def rollout_metrics(rollout: Rollout, scores: np.ndarray) -> dict[str, float]:
  return {
    "reward/mean": float(np.mean(scores)),
    "reward/std": float(np.std(scores)),
    "response/length": float(rollout.lengths.mean()),
    "response/eos_rate": float(rollout.stopped.mean()),
    "time/generation": rollout.seconds,
  }


def _mean_metrics(per_step: list[dict[str, Any]]) -> dict[str, float]:
  fetched = jax.device_get(per_step)
  out = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0] if k != "finite"}
  out["finite"] = float(all(bool(m["finite"]) for m in fetched))
  return out


def ppo_iteration(
  *,
  policy_config: LlamaConfig,
  tokenizer: Tokenizer,
  gen: GenerationConfig,
  reward_fn: RewardFn,
  ref_params: Any,
  score_fn: Callable,
  policy_step: Callable,
  value_step: Callable,
  num_minibatches: int,
  no_eos_penalty: float = 0.0,
  kl_target: float = 0.0,
  kl_horizon: int = 10000,
  chat: bool = True,
  mesh: Mesh | None = None,
  seed: int = 0,
):
  """`iteration(state: PPOState, batch) -> (state, metrics)`; the step functions are the
  jitted `steps.ppo` ones (`policy_step` and `value_step` donate their states)."""

  def iteration(state: PPOState, batch):
    step = int(state.step)
    key = jax.random.fold_in(jax.random.key(seed), step)
    rollout = sample_rollout(
      policy_config, state.policy.params, tokenizer, batch["records"], key, gen,
      chat=chat, mesh=mesh,
    )  # fmt: skip
    t0 = time.perf_counter()
    raw = np.asarray(reward_fn(rollout.records, rollout.texts), np.float32)
    scores = raw + no_eos_penalty * (~rollout.stopped)
    out, score_metrics = score_fn(
      state.policy.params, ref_params, state.value.params, rollout.rows, scores, state.kl_coef
    )
    out = jax.device_get(out)
    t1 = time.perf_counter()
    policy, value, policy_metrics, value_metrics = state.policy, state.value, [], []
    arrays = rollout.rows | out
    for index in minibatch_indices(len(scores), num_minibatches, np.random.default_rng(step)):
      mb = _take(arrays, index)
      policy, m = policy_step(policy, mb)
      policy_metrics.append(m)
      value, m = value_step(value, mb)
      value_metrics.append(m)
    metrics = {k: float(v) for k, v in jax.device_get(score_metrics).items()}
    pm, vm = _mean_metrics(policy_metrics), _mean_metrics(value_metrics)
    metrics |= {k: v for k, v in pm.items() if k not in ("finite", "skipped")}
    metrics |= {k: v for k, v in vm.items() if k.startswith(("loss/", "value/"))}
    metrics |= {"value/grad_norm": vm["grad_norm"], "finite": pm["finite"] * vm["finite"]}
    metrics |= rollout_metrics(rollout, raw) | {"time/training": time.perf_counter() - t1}
    metrics |= {"time/scoring": t1 - t0, "kl_coef": float(state.kl_coef), "loss": pm["loss/policy"]}
    kl_coef = state.kl_coef
    if kl_target > 0:
      kl_coef = jnp.float32(
        ppo_obj.adaptive_kl_beta(
          float(kl_coef), metrics["objective/kl"], len(scores), target=kl_target,
          horizon=kl_horizon,
        )
      )  # fmt: skip
    return PPOState(policy=policy, value=value, kl_coef=kl_coef, step=state.step + 1), metrics

  return iteration


def grpo_iteration(
  *,
  policy_config: LlamaConfig,
  tokenizer: Tokenizer,
  gen: GenerationConfig,
  reward_fn: RewardFn,
  ref_params: Any,
  logps_fn: Callable,
  train_step: Callable,
  num_minibatches: int,
  scale: str = "std",
  use_reference: bool = True,
  chat: bool = True,
  mesh: Mesh | None = None,
  seed: int = 0,
):
  """`iteration(state: GRPOState, batch) -> (state, metrics)`; `gen.num_samples` is the
  group size K, `train_step` the jitted `steps.grpo` step (donates the policy's state)."""

  def iteration(state: GRPOState, batch):
    step = int(state.step)
    key = jax.random.fold_in(jax.random.key(seed), step)
    policy = state.policy
    rollout = sample_rollout(
      policy_config, policy.params, tokenizer, batch["records"], key, gen, chat=chat, mesh=mesh
    )
    t0 = time.perf_counter()
    scores = np.asarray(reward_fn(rollout.records, rollout.texts), np.float32)
    advantages = np.asarray(grpo_obj.group_advantages(scores, gen.num_samples, scale=scale))
    old_logp, entropy = logps_fn(policy.params, rollout.rows)
    ref_logp = logps_fn(ref_params, rollout.rows)[0] if use_reference else old_logp
    arrays = rollout.rows | jax.device_get(
      {"old_logp": old_logp, "ref_logp": ref_logp}
    ) | {"advantages": advantages}  # fmt: skip
    entropy = float(ppo_obj.masked_mean(entropy, rollout.rows["response_mask"]))
    t1 = time.perf_counter()
    step_metrics = []
    # Whole groups per minibatch would also do; shuffled rows keep minibatches alike.
    for index in minibatch_indices(len(scores), num_minibatches, np.random.default_rng(step)):
      policy, m = train_step(policy, _take(arrays, index))
      step_metrics.append(m)
    metrics = _mean_metrics(step_metrics) | rollout_metrics(rollout, scores)
    groups = scores.reshape(-1, gen.num_samples)
    metrics |= {
      "objective/entropy": entropy,
      "reward/group_std": float(groups.std(axis=1).mean()),
      "reward/groups_with_signal": float((groups.max(axis=1) > groups.min(axis=1)).mean()),
      "time/scoring": t1 - t0,
      "time/training": time.perf_counter() - t1,
    }
    return GRPOState(policy=policy, step=state.step + 1), metrics

  return iteration
