"""Policy evaluation that does not use a reward model: what the recipes' reports measure.

`evaluate_policy` answers held-out `rl_prompt` records greedily and checks the answers with
`llama_jax.data.scoring` (task accuracy, refusal rate on unsafe prompts, false-refusal rate
on safe ones, per-task accuracy). Given a reference model it also estimates
KL(π ‖ π_ref) per response: one sample per prompt at temperature 1 from the policy, then

    KL ≈ mean over prompts of Σ_t [log π(y_t | ·) − log π_ref(y_t | ·)],

the k1 estimator, unbiased since y ~ π. Both log-probs come from the same training-mode
forward pass, so a policy equal to its reference scores exactly 0.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from llama_jax.data import scoring
from llama_jax.generation import GenerationConfig, SamplingConfig, generate
from llama_jax.parallel import sharding
from llama_jax.rl import scorers
from llama_jax.rl.rollouts import sample_rollout
from llama_jax.steps import common as step_lib
from llama_jax.steps.common import make_logps_fn
from llama_jax.tokenizer import Tokenizer


def answer_prompts(
  model: sharding.Model,
  params: Any,
  tokenizer: Tokenizer,
  prompts: Sequence[Any],
  *,
  max_new_tokens: int,
  batch_size: int,
  temperature: float = 0.0,
  seed: int = 0,
  mesh: Mesh | None = None,
) -> list[str]:
  """One answer per prompt (text or chat messages; greedy at temperature 0), `batch_size`
  prompts at a time."""
  answers: list[str] = []
  for start in range(0, len(prompts), batch_size):
    out = generate(
      model, params, tokenizer, list(prompts[start : start + batch_size]),
      max_new_tokens=max_new_tokens, temperature=temperature, chat=True, mesh=mesh,
      key=jax.random.fold_in(jax.random.key(seed), start),
    )  # fmt: skip
    answers += [texts[0] for texts in out.texts]
  return answers


def check_metrics(records: Sequence[dict[str, Any]], answers: Sequence[str]) -> dict[str, float]:
  """`scoring.evaluate`'s rates plus `accuracy/<task>` for each task label."""
  metrics = scoring.evaluate(records, answers)
  by_task: dict[str, list[float]] = collections.defaultdict(list)
  correct = scorers.score(scorers.check_answer, records, answers)
  for record, c in zip(records, correct, strict=True):
    by_task[record.get("task") or "other"].append(float(c))
  return metrics | {f"accuracy/{t}": float(np.mean(s)) for t, s in sorted(by_task.items())}


def _pad_rows(rows: dict[str, np.ndarray], multiple: int) -> dict[str, np.ndarray]:
  """Rows padded with empty ones (segment id 0, no response) to a multiple of `multiple`."""
  extra = -len(rows["tokens"]) % multiple
  return {k: np.concatenate([v, np.zeros((extra, *v.shape[1:]), v.dtype)]) for k, v in rows.items()}


@functools.lru_cache(maxsize=16)
def logps_fn(model: sharding.Model, mesh: Mesh):
  """The jitted log-prob pass, one per model and mesh: evaluating many checkpoints of one
  model (a recipe's stages) compiles it once."""
  return step_lib.jit_eval_step(
    make_logps_fn(model, mesh=mesh), sharding.param_shardings(model, mesh), mesh
  )


def sampled_kl(
  model: sharding.Model,
  params: Any,
  ref_params: Any,
  tokenizer: Tokenizer,
  prompts: Sequence[Any],
  *,
  max_new_tokens: int,
  batch_size: int,
  mesh: Mesh,
  seed: int = 0,
) -> dict[str, float]:
  """KL(π ‖ π_ref) per response (k1 over one temperature-1 sample per prompt), its
  standard error, and the mean sampled response length. Rows and log-probs come from the
  same functions online RL scores its rollouts with (`rollouts.sample_rollout`,
  `steps.common.make_logps_fn`)."""
  gen = GenerationConfig(
    max_new_tokens=max_new_tokens, num_samples=1, sampling=SamplingConfig(temperature=1.0),
    stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
  )  # fmt: skip
  logps = logps_fn(model, mesh)
  shards = sharding.batch_shards(mesh)
  kls, lengths = [], []
  for start in range(0, len(prompts), batch_size):
    records = [{"prompt": p} for p in prompts[start : start + batch_size]]
    key = jax.random.fold_in(jax.random.key(seed), start)
    rows = sample_rollout(model, params, tokenizer, records, key, gen, chat=True, mesh=mesh).rows
    padded = _pad_rows(rows, shards)
    batch = {k: v for k, v in padded.items() if k != "response_mask"}
    (policy, _), (ref, _) = logps(params, batch), logps(ref_params, batch)
    diff = (np.asarray(policy) - np.asarray(ref)) * padded["response_mask"]
    kls += diff.sum(-1)[: len(records)].tolist()
    lengths += rows["response_mask"].sum(-1).tolist()
  kls = np.asarray(kls)
  return {
    "kl": float(kls.mean()),
    "kl_stderr": float(kls.std(ddof=1) / np.sqrt(len(kls))) if len(kls) > 1 else 0.0,
    "sampled_length": float(np.mean(lengths)),
  }


def evaluate_policy(
  model: sharding.Model,
  params: Any,
  tokenizer: Tokenizer,
  records: Sequence[dict[str, Any]],
  *,
  ref_params: Any = None,
  max_new_tokens: int = 48,
  batch_size: int = 32,
  mesh: Mesh | None = None,
  seed: int = 0,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """`(metrics, samples)` of a policy on `rl_prompt` records (see the module docstring).

  metrics: accuracy, task_accuracy, refusal_rate, false_refusal_rate, accuracy/<task>,
  response_length (greedy, in characters), and with `ref_params` kl, kl_stderr and
  sampled_length (tokens). samples: per record its prompt, greedy answer and check score.
  """
  mesh = mesh or sharding.make_mesh()
  prompts = [r["prompt"] for r in records]
  answers = answer_prompts(
    model, params, tokenizer, prompts,
    max_new_tokens=max_new_tokens, batch_size=batch_size, mesh=mesh,
  )  # fmt: skip
  metrics = check_metrics(records, answers)
  metrics["response_length"] = float(np.mean([len(a) for a in answers]))
  if ref_params is not None:
    metrics |= sampled_kl(
      model, params, ref_params, tokenizer, prompts,
      max_new_tokens=max_new_tokens, batch_size=batch_size, mesh=mesh, seed=seed,
    )  # fmt: skip
  correct = scorers.check_answer(records, prompts, answers)
  samples = [
    {"prompt": r["prompt"], "response": a, "correct": c}
    for r, a, c in zip(records, answers, correct, strict=True)
  ]
  return metrics, samples
