"""Host-side pieces of online RL (PPO, GRPO): prompt batches, rollout rows, reward functions.

    prompts = PromptIterator(records, batch_size=64, seed=0)     # resumable, endless
    rows = rollout_rows(prompt_ids, generation_output, pad_id)    # [B·R, T] numpy
    scores = reward_fn(records, texts)                           # `make_reward_fn`

A rollout row is one prompt followed by one sampled response, right-padded, in the layout
of a pad-mode data batch (`tokens`, `positions`, `segment_ids`, `targets`) plus
`response_mask`, 1 where the *target* is a generated token (stop token included): per-token
quantities (log-probs, values, advantages) live on the same [B·R, T] grid as the targets,
and token t's value is read from the hidden state at t, which has seen everything before the
token it predicts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from llama_jax.data import scoring

ROW_FIELDS = ("tokens", "positions", "segment_ids", "targets", "response_mask")
RewardFn = Callable[[Sequence[dict[str, Any]], Sequence[str]], Sequence[float]]


class PromptIterator:
  """Endless batches `{"records": [...]}` of `batch_size` records, reshuffled every epoch
  from `seed`; `get_state` / `set_state` make it resumable (the trainer saves the state).
  Every host gets the same batches: generation takes the global prompt list."""

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


def ended_with_stop(tokens: np.ndarray, mask: np.ndarray, stop_ids: Sequence[int]) -> np.ndarray:
  """bool [B, R]: whether each response's last generated token is a stop id."""
  lengths = mask.sum(-1)
  last = np.take_along_axis(tokens, np.maximum(lengths - 1, 0)[..., None], -1)[..., 0]
  return (lengths > 0) & np.isin(last, np.asarray(stop_ids))


def check_answer_reward(records: Sequence[dict[str, Any]], texts: Sequence[str]) -> list[float]:
  """1 for a right answer, 0 otherwise (`llama_jax.data.scoring.check_answer`)."""
  return [scoring.check_answer(r, y) for r, y in zip(records, texts, strict=True)]


REWARD_FUNCTIONS: dict[str, RewardFn] = {"check_answer": check_answer_reward}
