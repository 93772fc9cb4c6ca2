"""Rollouts: prompt batches, sampled responses as training rows, their log-probs, rewards.

    records = select_prompts(records, tasks=("arithmetic",), num_prompts=64)
    prompts = PromptIterator(records, batch_size=64, seed=0)     # resumable, endless
    rollout = sample_rollout(model, params, tokenizer, records, key, gen)   # rows [B·R, T]
    logp, entropy = jit(make_logps_fn(model))(params, rollout.rows)        # [B·R, T] each
    scores = scorers.score(scorer, rollout.records, rollout.texts)        # [B·R]

`sample_rollout` + `make_logps_fn` are the one path from prompts to per-token log-probs:
online RL's advantage pass takes its log-probs from them, and
`llama_jax.evaluation.policy.sampled_kl` its KL.

A rollout row is one prompt followed by one sampled response, right-padded, in the layout
of a pad-mode data batch (`tokens`, `positions`, `segment_ids`, `targets`) plus
`response_mask`, 1 where the *target* is a generated token (stop token included): per-token
quantities (log-probs, values, advantages) live on the same [B·R, T] grid as the targets,
and token t's value is read from the hidden state at t, which has seen everything before the
token it predicts.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from llama_jax.generation import (
  Generation,
  GenerationConfig,
  encode_prompt,
  generate,
  generate_tokens,
  response_text,
)
from llama_jax.parallel import sharding
from llama_jax.steps.common import ROW_FIELDS
from llama_jax.tokenizer import Tokenizer


def select_prompts(
  records: Sequence[dict[str, Any]],
  *,
  tasks: Sequence[str] = (),
  start: int = 0,
  num_prompts: int = 0,
) -> list[dict[str, Any]]:
  """The records whose `task` is in `tasks` (empty: all), from index `start` of those,
  `num_prompts` of them (0: all). Refuses `tasks` no record has."""
  records = list(records)
  if tasks:
    records = [r for r in records if r.get("task") in tasks]
    if not records:
      raise ValueError(f"tasks={','.join(tasks)!r}: no prompt has one of these tasks")
  records = records[start:]
  return records[:num_prompts] if num_prompts else records


def sample_batches(
  model: sharding.Model,
  params: Any,
  tokenizer: Tokenizer,
  records: Sequence[dict[str, Any]],
  gen: GenerationConfig,
  *,
  batch_size: int,
  seed: int = 0,
  chat: bool = True,
  mesh: Mesh | None = None,
) -> Iterator[tuple[list[dict[str, Any]], Generation, float]]:
  """`(records, generation, seconds)` per batch of `batch_size` of the records' prompts, each
  answered `gen.num_samples` times (`generation.generate`; the stop ids are the tokenizer's).
  A batch's key folds its start index into `seed`, so its samples do not depend on the
  batches before it."""
  key = jax.random.key(seed)
  s = gen.sampling
  for start in range(0, len(records), batch_size):
    batch = list(records[start : start + batch_size])
    t0 = time.perf_counter()
    out = generate(
      model, params, tokenizer, [r["prompt"] for r in batch],
      max_new_tokens=gen.max_new_tokens, num_samples=gen.num_samples,
      temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
      prompt_bucket=gen.prompt_bucket, chat=chat, key=jax.random.fold_in(key, start), mesh=mesh,
    )  # fmt: skip
    yield batch, out, time.perf_counter() - t0


class PromptIterator:
  """Endless batches `{"records": [...]}` of `batch_size` records, reshuffled every epoch
  from `seed`; `get_state` / `set_state` make it resumable (the trainer saves the state,
  one file per process). Every process gets the same global batch: generation takes the
  global prompt list, and each process keeps the responses its own devices sample
  (`sample_rollout`)."""

  def __init__(self, records: Sequence[dict[str, Any]], batch_size: int, seed: int = 0):
    if len(records) < batch_size:
      raise ValueError(f"{len(records)} prompts are fewer than one batch of {batch_size}")
    self.records, self.batch_size, self.seed = list(records), batch_size, seed
    self.epoch, self.index = 0, 0

  def _order(self) -> list[int]:
    order = list(range(len(self.records)))
    random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
    return order

  def __iter__(self) -> Iterator[dict[str, Any]]:
    return self

  def __next__(self) -> dict[str, Any]:
    if self.index + self.batch_size > len(self.records):  # drop the remainder of an epoch
      self.epoch, self.index = self.epoch + 1, 0
    order = self._order()[self.index : self.index + self.batch_size]
    self.index += self.batch_size
    return {"records": [self.records[i] for i in order]}

  def get_state(self) -> dict[str, int]:
    return {"epoch": self.epoch, "index": self.index}

  def set_state(self, state: dict[str, int]) -> None:
    self.epoch, self.index = int(state["epoch"]), int(state["index"])


def row_length(prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, multiple: int) -> int:
  """T: the longest prompt plus the response budget, rounded up to `multiple` (one compiled
  shape per bucket)."""
  longest = max(len(p) for p in prompt_ids) + max_new_tokens
  return -(-longest // multiple) * multiple


def rollout_rows(
  prompt_ids: Sequence[Sequence[int]],  # [B] token ids
  tokens: np.ndarray,  # [B, R, N] generated ids
  mask: np.ndarray,  # [B, R, N] 1 on generated tokens
  *,
  seq_len: int,
) -> dict[str, np.ndarray]:
  """Rows [B·R, seq_len] of prompt + response (rows of one prompt adjacent); see the module
  docstring for the fields."""
  b, r, n = tokens.shape
  out = {k: np.zeros((b * r, seq_len), np.int32) for k in ROW_FIELDS}
  for i, prompt in enumerate(prompt_ids):
    p = len(prompt)
    for j in range(r):
      row = i * r + j
      length = int(mask[i, j].sum())
      ids = list(prompt) + tokens[i, j, :length].tolist()
      if len(ids) > seq_len:
        raise ValueError(f"prompt {i}: {len(ids)} tokens do not fit seq_len={seq_len}")
      out["tokens"][row, : len(ids)] = ids
      out["segment_ids"][row, : len(ids)] = 1
      out["positions"][row, : len(ids)] = np.arange(len(ids))
      out["targets"][row, : len(ids) - 1] = ids[1:]
      out["response_mask"][row, p - 1 : p - 1 + length] = 1  # targets p … p + length − 1
  return out


def response_values(
  prompt_ids: Sequence[Sequence[int]],  # [B] token ids
  values: np.ndarray,  # [B, R, N] one value per generated token
  mask: np.ndarray,  # [B, R, N] 1 on generated tokens
  *,
  seq_len: int,
) -> np.ndarray:
  """float32 [B·R, seq_len]: each generated token's value where `rollout_rows` puts its target
  (the row of prompt b's sample r, from position len(prompt) − 1), 0 elsewhere."""
  b, r, _ = values.shape
  out = np.zeros((b * r, seq_len), np.float32)
  for i, prompt in enumerate(prompt_ids):
    start = len(prompt) - 1
    for j in range(r):
      length = int(mask[i, j].sum())
      out[i * r + j, start : start + length] = values[i, j, :length]
  return out


def ended_with_stop(tokens: np.ndarray, mask: np.ndarray, stop_ids: Sequence[int]) -> np.ndarray:
  """bool [B, R]: whether each response's last generated token is a stop id."""
  lengths = mask.sum(-1)
  last = np.take_along_axis(tokens, np.maximum(lengths - 1, 0)[..., None], -1)[..., 0]
  return (lengths > 0) & np.isin(last, np.asarray(stop_ids))


@dataclasses.dataclass(frozen=True)
class Rollout:
  """One batch of sampled responses, as this process holds them: its rows of the global
  [N = B·R, T] (`rollout_rows`), their texts, the records they answer, response lengths and
  whether each ended with a stop token. On one process that is all of them; on several, the
  block `rows_slice` of the global rows (whole prompts, their R responses adjacent), so
  rewards are computed where the texts are and `global_rows` assembles the global arrays."""

  rows: dict[str, np.ndarray]
  texts: list[str]
  records: list[dict[str, Any]]
  lengths: np.ndarray
  stopped: np.ndarray
  num_rows: int = -1  # N, all processes' rows; -1: this process's rows are all of them
  rows_slice: slice | None = None  # this process's block of the N rows
  # float32 [rows, T]: the sampler's log-prob of each response token under the unmodified
  # model, where `rows` has its target (`response_values`); None if not recorded
  sample_logp: np.ndarray | None = None

  def global_rows(self, batch: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """The rows as global arrays [N, T] under `batch` (rows over the batch axes), built from
    every process's block (`sharding.from_process_rows`)."""
    n = len(self.lengths) if self.num_rows < 0 else self.num_rows
    mine = sharding.process_rows(batch, n)
    if self.rows_slice is not None and mine != self.rows_slice:
      raise ValueError(
        f"this process sampled rows {self.rows_slice} but holds rows {mine} of the training "
        "mesh: the sampling and training meshes must split the batch over processes alike"
      )
    return {k: sharding.from_process_rows(v, batch, n) for k, v in self.rows.items()}


def sample_rollout(
  model: sharding.Model,
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
  """`gen.num_samples` responses to each record's prompt, as training rows.

  `records` is the global batch, the same on every process (the decoder's inputs are global
  arrays); each process turns the responses its devices sampled into texts and rows (see
  `Rollout`). On one process that is every response."""
  prompt_ids = [encode_prompt(tokenizer, r["prompt"], chat=chat) for r in records]
  out = generate_tokens(model, params, prompt_ids, key, gen, mesh=mesh)
  mine = sharding.process_block(out.tokens)  # this process's prompts
  tokens, mask = sharding.to_process_rows(out.tokens), sharding.to_process_rows(out.mask)
  r = gen.num_samples
  texts = [
    response_text(tokenizer, tokens[i, j], mask[i, j], gen.stop_ids)
    for i in range(len(tokens))
    for j in range(r)
  ]
  seq_len = row_length(prompt_ids, gen.max_new_tokens, row_multiple)  # the same everywhere
  model_logprobs = sharding.to_process_rows(out.model_logprobs)
  return Rollout(
    rows=rollout_rows(prompt_ids[mine], tokens, mask, seq_len=seq_len),
    sample_logp=response_values(prompt_ids[mine], model_logprobs, mask, seq_len=seq_len),
    texts=texts,
    records=[rec for rec in records[mine] for _ in range(r)],
    lengths=mask.sum(-1).reshape(-1),
    stopped=ended_with_stop(tokens, mask, gen.stop_ids).reshape(-1),
    num_rows=len(records) * r,
    rows_slice=slice(mine.start * r, mine.stop * r),
  )
