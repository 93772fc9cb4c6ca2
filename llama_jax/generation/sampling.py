"""Next-token logits -> samples: greedy, temperature, top-k, top-p, with their log-probs.

Every sampled token comes with two log-probabilities:

- `logprobs`: under the distribution it was drawn from (logits / temperature, then top-k,
  then top-p, renormalized; the order of Hugging Face's logits warpers). Greedy decoding
  (temperature 0) draws from a point mass, so its log-prob is 0.
- `model_logprobs`: under the unmodified model distribution (temperature 1, no truncation),
  the number a teacher-forced forward pass gives and that PPO/GRPO ratios and KL terms use.

Shapes: logits [B, V] float32, one PRNG key per row [B], tokens [B] int32.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """How a token is drawn from next-token logits (static: one compilation per config).

  Attributes:
    temperature: divides the logits; 0 means greedy (argmax).
    top_k: keep the k most likely tokens (ties with the k-th are kept too); 0 keeps all.
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p
      (nucleus sampling, applied after top-k); 1.0 keeps all.
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"SamplingConfig.temperature={self.temperature}; expected >= 0")
    if self.top_k < 0:
      raise ValueError(f"SamplingConfig.top_k={self.top_k}; expected >= 0 (0 = no top-k)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"SamplingConfig.top_p={self.top_p}; expected 0 < top_p <= 1")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


def sampling_logits(logits: jax.Array, config: SamplingConfig) -> jax.Array:
  """Logits [B, V] of the sampling distribution: tempered, -inf outside top-k / top-p.

  `jax.nn.log_softmax` of the result is the renormalized distribution samples come from.
  """
  logits = logits.astype(jnp.float32) / config.temperature
  vocab = logits.shape[-1]
  kept = None  # the kept logits sorted in descending order, when known
  if 0 < config.top_k < vocab:
    kept = jax.lax.top_k(logits, config.top_k)[0]
    logits = _keep_at_least(logits, kept[:, -1:])
  if config.top_p < 1:
    if kept is None:  # no top-k: rank the whole vocabulary
      kept = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(kept, axis=-1)
    # A token is kept while the tokens ranked above it hold less than top_p; the first
    # token always is, so the set is never empty.
    inside = jnp.cumsum(probs, axis=-1) - probs < config.top_p
    threshold = jnp.min(jnp.where(inside, kept, jnp.inf), axis=-1, keepdims=True)
    logits = _keep_at_least(logits, threshold)
  return logits


def _keep_at_least(logits: jax.Array, threshold: jax.Array) -> jax.Array:
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def sample(
  keys: jax.Array, logits: jax.Array, config: SamplingConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Draws one token per row.

  Args:
    keys: [B] PRNG keys, one per row (rows are independent of the batch they sit in).
    logits: [B, V] next-token logits of the model.
    config: the sampling rule.

  Returns:
    `(tokens [B] int32, logprobs [B], model_logprobs [B])`: the log-probs of the tokens
    under the sampling distribution and under the unmodified model distribution.
  """
  logits = logits.astype(jnp.float32)
  model_logprobs = jax.nn.log_softmax(logits, axis=-1)
  if config.greedy:
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logprobs = jnp.zeros(tokens.shape, jnp.float32)
  else:
    warped = sampling_logits(logits, config)
    tokens = jax.vmap(jax.random.categorical)(keys, warped).astype(jnp.int32)
    logprobs = _take(jax.nn.log_softmax(warped, axis=-1), tokens)
  return tokens, logprobs, _take(model_logprobs, tokens)


def sample_rows(
  keys: jax.Array, logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`sample` with a sampling rule per row: temperature, top_k, top_p [B] (traced, so rows
  with different rules share one compiled program; temperature 0 is greedy). Each row draws
  what `sample` draws with its rule and key, the top-k / top-p thresholds taken from one sort
  of the row's logits."""
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  model_logprobs = jax.nn.log_softmax(logits, axis=-1)
  greedy = temperature == 0
  tempered = logits / jnp.where(greedy, 1.0, temperature)[:, None]
  use_k = (top_k > 0) & (top_k < vocab)
  use_p = top_p < 1

  def truncate(tempered):  # top-k, then top-p: one sort of the vocabulary per row
    ranked = -jnp.sort(-tempered, axis=-1)  # [B, V] descending
    kth = jnp.take_along_axis(ranked, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    ranked = jnp.where(use_k[:, None] & (ranked < kth), -jnp.inf, ranked)
    warped = jnp.where(use_k[:, None], _keep_at_least(tempered, kth), tempered)
    probs = jax.nn.softmax(ranked, axis=-1)
    inside = jnp.cumsum(probs, axis=-1) - probs < top_p[:, None]
    threshold = jnp.min(jnp.where(inside, ranked, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(use_p[:, None], _keep_at_least(warped, threshold), warped)

  # The sort is most of a decode step's sampling on a CPU: skipped when no row truncates.
  warped = jax.lax.cond(jnp.any(use_k | use_p), truncate, lambda t: t, tempered)
  argmax = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  def draw(warped):
    drawn = jax.vmap(jax.random.categorical)(keys, warped).astype(jnp.int32)
    tokens = jnp.where(greedy, argmax, drawn)
    return tokens, jnp.where(greedy, 0.0, _take(jax.nn.log_softmax(warped, axis=-1), tokens))

  # All rows greedy (evaluations): no random draw over the vocabulary.
  greedy_only = lambda _: (argmax, jnp.zeros(argmax.shape, jnp.float32))
  tokens, logprobs = jax.lax.cond(jnp.all(greedy), greedy_only, draw, warped)
  return tokens, logprobs, _take(model_logprobs, tokens)


def _take(logprobs: jax.Array, tokens: jax.Array) -> jax.Array:
  return jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
