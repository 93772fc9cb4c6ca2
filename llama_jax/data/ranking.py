"""Preference records as packed ranking rows: the prompt once, then each of its responses.

Llama 3 trains its reward model on a prompt with 2–3 responses packed into one row, each
response attending to the prompt and to itself but not to the others, so one forward pass
scores every response of a prompt and the prompt is encoded once. A Llama 2 pair is the
2-response case, so every reward-model recipe of the project uses this one layout.

Row (one record per row, pad mode; T = seq_len):

  tokens        [T]  the generation prompt (ending with the assistant header), then
                     response 1, response 2[, response 3], each closed by its end-of-turn token
  response_ids  [T]  0 on the prompt (and on padding), k on the tokens of response k
  rating        []   the record's rating code (3 significantly_better … 0 negligibly_better,
                     -1 absent), as `llama_jax.data.tokenize` encodes it
  concern       []   0 helpfulness, 1 safety
  num_responses []   2 or 3

plus what the pipeline adds (`segment_ids` 1 on tokens and 0 on padding, `valid`, ...).
Responses come in rank order, best first: edited > chosen > rejected when the record has an
edited response and `use_edited` is set, else chosen > rejected. Meta shuffles them; here
every response starts at the same position (just after the prompt) and sees nothing of the
others, so its reward cannot depend on where in the row it sits, and rank order is kept.

On device, `ranking_inputs` turns a batch of rows into model inputs: positions (the prompt
0 … P-1, every response P, P+1, … as if it followed the prompt alone), the attention mask
[B, T, T] (a query sees a key iff the key is a prompt token or both are in the same
response; `Llama` ANDs in causality and padding) and the index of each response's last
token [B, K], where the reward model reads its score.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from llama_jax.data import pipeline as pipeline_lib
from llama_jax.data import records
from llama_jax.tokenizer import Tokenizer, render_prompt_response

MAX_RESPONSES = 3  # edited, chosen, rejected


def chosen_rejected(rewards: np.ndarray, present: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Scores `[N, MAX_RESPONSES]` of ranking rows -> each row's chosen and rejected scores:
  its last two present responses (`pack_ranking_row` puts the edited one first)."""
  num = present.sum(axis=1)
  rows = np.arange(len(rewards))
  return rewards[rows, num - 2], rewards[rows, num - 1]


def ranked_responses(record: Mapping[str, Any], *, use_edited: bool = True) -> list[str]:
  """The record's responses best first: [edited,] chosen, rejected."""
  edited = record.get("edited") if use_edited else None
  return ([edited] if edited is not None else []) + [record["chosen"], record["rejected"]]


def pack_ranking_row(
  prompt_tokens: np.ndarray, responses: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
  """`tokens` and `response_ids` of one row: the prompt, then each response's tokens."""
  tokens = np.concatenate([prompt_tokens, *responses]).astype(np.int32)
  ids = [np.zeros(len(prompt_tokens), np.int32)]
  ids += [np.full(len(r), k, np.int32) for k, r in enumerate(responses, 1)]
  return {"tokens": tokens, "response_ids": np.concatenate(ids)}


def tokenize_ranking(
  record: Mapping[str, Any], *, tokenizer: Tokenizer, use_edited: bool = True, fmt=None
) -> dict[str, np.ndarray]:
  """One preference record as a packed ranking row (see the module docstring)."""
  prompt = records.prompt_messages(record["prompt"])
  responses, prompt_tokens = [], None
  for text in ranked_responses(record, use_edited=use_edited):
    rendered = render_prompt_response(tokenizer, prompt, text, fmt=fmt)
    prompt_tokens = rendered.tokens[: rendered.prompt_len]
    responses.append(rendered.tokens[rendered.prompt_len :])
  row = pack_ranking_row(prompt_tokens, responses)
  scalar = lambda v: np.asarray(v, np.int32)
  return row | {
    "rating": scalar(records.RATING_CODES.get(record.get("rating"), -1)),
    "concern": scalar(records.CONCERNS.index(record["concern"])),
    "num_responses": scalar(len(responses)),
  }


def make_ranking_tokenize_fn(tokenizer: Tokenizer, *, use_edited: bool = True, fmt=None):
  """A picklable `record -> row` for `make_pipeline` (grain workers can run it)."""
  return functools.partial(tokenize_ranking, tokenizer=tokenizer, use_edited=use_edited, fmt=fmt)


def filter_records(
  source: Iterable[Mapping[str, Any]],
  *,
  concerns: Sequence[str] = (),
  ratings: Sequence[str] = (),
) -> list[Mapping[str, Any]]:
  """The records whose concern is in `concerns` and rating in `ratings` (empty: any)."""
  for name, values, known in (
    ("concerns", concerns, records.CONCERNS),
    ("ratings", ratings, records.RATINGS),
  ):
    if unknown := sorted(set(values) - set(known)):
      raise ValueError(f"{name}: unknown {unknown}; expected names from {known}")
  return [
    r
    for r in source
    if (not concerns or r["concern"] in concerns) and (not ratings or r.get("rating") in ratings)
  ]


def make_ranking_pipeline(
  source: Sequence[Any],
  tokenizer: Tokenizer,
  config: pipeline_lib.PipelineConfig,
  *,
  use_edited: bool = True,
  fmt=None,
  evaluation: bool = False,
  **pipeline_kwargs: Any,
) -> pipeline_lib.PipelineIterator:
  """Batches of packed ranking rows (pad mode) over normalized preference records.

  `config` needs mode="pad" (one record per row) and on_too_long "raise" or "skip":
  truncation would cut the last responses off, or score one at a cut-off token.
  `evaluation` gives one unshuffled pass (`make_eval_pipeline`); `pipeline_kwargs` are
  `make_pipeline`'s (`mesh`, `batch_axes`, ...).
  """
  if config.mode != "pad":
    raise ValueError(f"ranking rows need mode='pad' (one record per row), got {config.mode!r}")
  if config.on_too_long == "truncate":
    raise ValueError(
      "ranking rows need on_too_long='raise' or 'skip': truncating a row drops or cuts its "
      "last responses"
    )
  tokenize = make_ranking_tokenize_fn(tokenizer, use_edited=use_edited, fmt=fmt)
  make = pipeline_lib.make_eval_pipeline if evaluation else pipeline_lib.make_pipeline
  return make(source, tokenize, config, **pipeline_kwargs)


# ---------------------------------------------------------------------------------------------
# On device: a batch of rows -> positions, attention mask, last-token indices.


def _run_offsets(ids: jax.Array) -> jax.Array:
  """[B, T] index of each token within its run of equal ids (0 where a run starts)."""
  t = jnp.arange(ids.shape[1])
  starts = jnp.concatenate([jnp.ones_like(ids[:, :1], bool), ids[:, 1:] != ids[:, :-1]], axis=1)
  return t - jax.lax.cummax(jnp.where(starts, t, 0), axis=1)


def ranking_inputs(
  segment_ids: jax.Array,  # [B, T] int; 0 on padding
  response_ids: jax.Array,  # [B, T] int; 0 prompt, k response k
  max_responses: int = MAX_RESPONSES,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`(positions [B, T], attention_mask [B, T, T], last_index [B, K])` of ranking rows.

  `last_index[b, k]` is the index of the last token of response k + 1, or -1 if row b has
  fewer responses (or is padding).
  """
  real = segment_ids != 0
  prompt_len = jnp.sum(real & (response_ids == 0), axis=1, keepdims=True)  # [B, 1]
  offsets = _run_offsets(jnp.where(real, response_ids + 1, 0))
  positions = jnp.where(real, jnp.where(response_ids > 0, prompt_len + offsets, offsets), 0)
  same_response = response_ids[:, :, None] == response_ids[:, None, :]
  attention_mask = (response_ids[:, None, :] == 0) | same_response
  k = jnp.arange(1, max_responses + 1)
  in_k = real[:, None, :] & (response_ids[:, None, :] == k[None, :, None])  # [B, K, T]
  last_index = jnp.max(jnp.where(in_k, jnp.arange(real.shape[1]), -1), axis=-1)
  return positions.astype(jnp.int32), attention_mask, last_index.astype(jnp.int32)
