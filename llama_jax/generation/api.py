"""`generate`: text prompts (or chats) in, texts and token arrays out.

    from llama_jax.generation import generate
    out = generate(model, params, tokenizer, ["What is 2 + 3?"], max_new_tokens=32,
                   temperature=0.7, chat=True)
    out.texts[0][0], out.tokens[0, 0], out.model_logprobs[0, 0]

Notebooks and experiments call this; RL loops that stay on token ids call
`generate_tokens` directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from llama_jax.generation.decode import GenerationConfig, generate_tokens
from llama_jax.generation.sampling import SamplingConfig
from llama_jax.parallel import sharding
from llama_jax.tokenizer import Tokenizer, render_chat

Message = Mapping[str, str]
# A prompt: raw text, or a chat (a list of messages ending with a user message).
Prompt = str | Sequence[Message]


@dataclasses.dataclass(frozen=True)
class Generation:
  """Responses to B prompts, R samples each (host numpy arrays [B, R, N]).

  Attributes:
    texts: [B][R] decoded responses, without the stop token.
    prompt_tokens: [B] the prompts' token ids as the model saw them.
    tokens: int32 generated ids, stop id included, pad id after it.
    mask: int32 response mask (1 on generated tokens, stop id included).
    logprobs: float32 log-probs under the sampling distribution.
    model_logprobs: float32 log-probs under the unmodified model distribution.
  """

  texts: list[list[str]]
  prompt_tokens: list[list[int]]
  tokens: np.ndarray
  mask: np.ndarray
  logprobs: np.ndarray
  model_logprobs: np.ndarray


def encode_prompt(tokenizer: Tokenizer, prompt: Prompt, *, chat: bool = False) -> list[int]:
  """Token ids of a prompt, ending where the model's answer starts.

  A list of messages is rendered with the tokenizer's chat format and its generation prompt
  (the assistant header); a string is wrapped as one user message if `chat`, else encoded
  as plain text (after BOS where the tokenizer adds one).
  """
  if isinstance(prompt, str):
    if not chat:
      return tokenizer.encode(prompt, bos=tokenizer.add_bos)
    prompt = [{"role": "user", "content": prompt}]
  return render_chat(tokenizer, prompt, add_generation_prompt=True).tokens.tolist()


def response_text(tokenizer: Tokenizer, tokens, mask, stop_ids) -> str:
  """The text of one response: its masked tokens without a final stop id."""
  ids = [int(t) for t, m in zip(tokens, mask, strict=True) if m]
  if ids and ids[-1] in stop_ids:
    ids = ids[:-1]
  return tokenizer.decode(ids)


def _to_host(tree):
  """numpy copies of (possibly multi-host, sharded) arrays, whole on every process."""
  if all(x.is_fully_addressable for x in jax.tree.leaves(tree)):
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)


def generate(
  model: sharding.Model,
  params,
  tokenizer: Tokenizer,
  prompts: Sequence[Prompt],
  *,
  max_new_tokens: int = 64,
  num_samples: int = 1,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  key=0,
  chat: bool = False,
  stop_ids: Sequence[int] | None = None,
  prompt_bucket: int = 0,
  mesh: Mesh | None = None,
) -> Generation:
  """Samples `num_samples` responses to each prompt.

  Args:
    model, params: the model (params sharded for `mesh` when one is given).
    tokenizer: encodes prompts and decodes responses.
    prompts: B texts or chats (lists of {"role", "content"} messages); see `encode_prompt`.
    max_new_tokens: the most tokens per response, stop token included.
    num_samples: R responses per prompt, sharing the prompt's prefilled KV cache.
    temperature, top_k, top_p: the sampling rule (temperature 0: greedy); see
      `SamplingConfig`.
    key: an int seed or a PRNG key; the same key gives the same responses.
    chat: wrap text prompts as a user message of the tokenizer's chat format.
    stop_ids: ids that end a response; default `tokenizer.stop_ids`.
    prompt_bucket: see `GenerationConfig.prompt_bucket`.
    mesh: optional mesh to shard the generation over.

  Returns:
    A `Generation` with texts [B][R] and arrays [B, R, max_new_tokens].
  """
  if isinstance(prompts, str):
    raise TypeError("generate: prompts must be a list of prompts, not one string")
  prompt_tokens = [encode_prompt(tokenizer, p, chat=chat) for p in prompts]
  gen = GenerationConfig(
    max_new_tokens=max_new_tokens,
    num_samples=num_samples,
    sampling=SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p),
    stop_ids=tokenizer.stop_ids if stop_ids is None else tuple(stop_ids),
    pad_id=tokenizer.pad_id,
    prompt_bucket=prompt_bucket,
  )
  out = _to_host(generate_tokens(model, params, prompt_tokens, key, gen, mesh=mesh))
  texts = [
    [response_text(tokenizer, t, m, gen.stop_ids) for t, m in zip(ts, ms, strict=True)]
    for ts, ms in zip(out.tokens, out.mask, strict=True)
  ]
  return Generation(
    texts=texts,
    prompt_tokens=prompt_tokens,
    tokens=np.asarray(out.tokens),
    mask=np.asarray(out.mask),
    logprobs=np.asarray(out.logprobs),
    model_logprobs=np.asarray(out.model_logprobs),
  )
