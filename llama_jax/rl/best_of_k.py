"""Best-of-K (rejection) sampling: K responses per prompt, scored, the best one kept.

    result = best_of_k(config, params, tokenizer, prompts, k=8, scorer=my_scorer,
                       temperature=1.0, chat=True)
    result.best[i], result.scores[i], result.candidates[i]

The K samples of a prompt share its prefilled KV cache (see `llama_jax.generation.decode`),
the throughput trick of Llama 3's rejection sampling. The scorer is a `llama_jax.rl.scorers.Scorer`,
`(records, prompts, responses) -> scores` over flat, aligned lists (each record repeated once
per response): a reward model, or a programmatic check such as `llama_jax.rl.scorers.check_answer`.
`select_best` is the scoring half alone, for samples generated elsewhere (rejection sampling,
`experiments.generate`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from llama_jax.generation.api import Generation, Prompt, generate
from llama_jax.model.config import LlamaConfig
from llama_jax.rl import scorers
from llama_jax.rl.scorers import Scorer
from llama_jax.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class BestOfK:
  """The best of K responses per prompt, with every candidate and score.

  Attributes:
    best: [B] the highest-scoring response per prompt (the first one on ties).
    best_index: int [B], which of the K candidates it is.
    candidates: [B][K] every response.
    scores: float [B, K] the scorer's values.
    generation: the underlying `Generation` (token ids, masks, log-probs [B, K, N]), if any.
  """

  best: list[str]
  best_index: np.ndarray
  candidates: list[list[str]]
  scores: np.ndarray
  generation: Generation | None = None


def score_candidates(
  scorer: Scorer, records: Sequence[dict[str, Any]], candidates: Sequence[Sequence[str]]
) -> np.ndarray:
  """Scores [B, K] of candidates [B][K] to `records` [B] (each with a "prompt"), with one
  scorer call over the flattened pairs (`llama_jax.rl.scorers.score`'s checks)."""
  k = len(candidates[0])
  if any(len(row) != k for row in candidates):
    raise ValueError(f"best_of_k: every prompt needs the same number of candidates ({k})")
  flat_records = [r for r in records for _ in range(k)]
  flat_responses = [c for row in candidates for c in row]
  try:
    scores = scorers.score(scorer, flat_records, flat_responses)
  except ValueError as e:
    raise ValueError(f"best_of_k: {e}") from None
  return scores.reshape(len(records), k)


def select_best(
  scorer: Scorer,
  records: Sequence[dict[str, Any]],
  candidates: Sequence[Sequence[str]],
  generation: Generation | None = None,
) -> BestOfK:
  """Scores candidates [B][K] to `records` [B] and keeps the best per record (the first of
  tied maxima)."""
  scores = score_candidates(scorer, records, candidates)
  best_index = np.argmax(scores, axis=1)
  return BestOfK(
    best=[row[i] for row, i in zip(candidates, best_index, strict=True)],
    best_index=best_index,
    candidates=[list(row) for row in candidates],
    scores=scores,
    generation=generation,
  )


def best_of_k(
  config: LlamaConfig,
  params,
  tokenizer: Tokenizer,
  prompts: Sequence[Prompt],
  k: int,
  scorer: Scorer,
  *,
  records: Sequence[dict[str, Any]] | None = None,
  **generate_kwargs,
) -> BestOfK:
  """Generates `k` responses per prompt, scores them and keeps the best per prompt.

  Args:
    config, params, tokenizer, prompts: as in `generate`.
    k: samples per prompt.
    scorer: `(records, prompts, responses) -> scores`, flat aligned lists of B·k pairs.
    records: [B] what the scorer sees of each prompt (references, labels); default
      `{"prompt": prompt}`.
    **generate_kwargs: passed to `generate` (temperature, max_new_tokens, key, chat, mesh...).
  """
  if records is None:
    records = [{"prompt": p} for p in prompts]
  elif len(records) != len(prompts):
    raise ValueError(f"best_of_k: {len(records)} records for {len(prompts)} prompts")
  generation = generate(config, params, tokenizer, prompts, num_samples=k, **generate_kwargs)
  return select_best(scorer, records, generation.texts, generation)
