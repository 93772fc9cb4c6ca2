"""Best-of-K (rejection) sampling: K responses per prompt, scored, the best one kept.

    result = best_of_k(config, params, tokenizer, prompts, k=8, scorer=my_scorer,
                       temperature=1.0, chat=True)
    result.best[i], result.scores[i], result.candidates[i]

The K samples of a prompt share its prefilled KV cache (see `llama_jax.generation.decode`),
the throughput trick of Llama 3's rejection sampling. A scorer is any function
`(prompts, responses) -> scores` over flat, aligned lists (each prompt repeated once per
response): a reward model, or a programmatic check such as
`llama_jax.data.scoring.check_answer`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

from llama_jax.config import LlamaConfig
from llama_jax.generation.api import Generation, Prompt, generate
from llama_jax.tokenizer import Tokenizer

Scorer = Callable[[Sequence[Prompt], Sequence[str]], Sequence[float]]


@dataclasses.dataclass(frozen=True)
class BestOfK:
  """The best of K responses per prompt, with every candidate and score.

  Attributes:
    best: [B] the highest-scoring response per prompt (the first one on ties).
    best_index: int [B], which of the K candidates it is.
    candidates: [B][K] every response.
    scores: float [B, K] the scorer's values.
    generation: the underlying `Generation` (token ids, masks, log-probs [B, K, N]).
  """

  best: list[str]
  best_index: np.ndarray
  candidates: list[list[str]]
  scores: np.ndarray
  generation: Generation


def score_candidates(
  scorer: Scorer, prompts: Sequence[Prompt], candidates: Sequence[Sequence[str]]
) -> np.ndarray:
  """Scores [B, K] of candidates [B][K] with one scorer call over the flattened pairs."""
  k = len(candidates[0])
  flat_prompts = [p for p in prompts for _ in range(k)]
  flat_responses = [c for row in candidates for c in row]
  scores = np.asarray(scorer(flat_prompts, flat_responses), dtype=np.float64)
  if scores.shape != (len(flat_responses),):
    raise ValueError(
      f"best_of_k: the scorer returned shape {scores.shape} for {len(flat_responses)} "
      "(prompt, response) pairs; expected one score per pair"
    )
  if not np.isfinite(scores).all():
    bad = int(np.flatnonzero(~np.isfinite(scores))[0])
    raise ValueError(f"best_of_k: the scorer returned {scores[bad]} for pair {bad}")
  return scores.reshape(len(prompts), k)


def best_of_k(
  config: LlamaConfig,
  params,
  tokenizer: Tokenizer,
  prompts: Sequence[Prompt],
  k: int,
  scorer: Scorer,
  **generate_kwargs,
) -> BestOfK:
  """Generates `k` responses per prompt, scores them and keeps the best per prompt.

  Args:
    config, params, tokenizer, prompts: as in `generate`.
    k: samples per prompt.
    scorer: `(prompts, responses) -> scores`, flat aligned lists of B·k pairs.
    **generate_kwargs: passed to `generate` (temperature, max_new_tokens, key, chat, mesh...).
  """
  generation = generate(config, params, tokenizer, prompts, num_samples=k, **generate_kwargs)
  scores = score_candidates(scorer, prompts, generation.texts)
  best_index = np.argmax(scores, axis=1)
  return BestOfK(
    best=[row[i] for row, i in zip(generation.texts, best_index, strict=True)],
    best_index=best_index,
    candidates=generation.texts,
    scores=scores,
    generation=generation,
  )
