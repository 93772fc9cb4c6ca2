"""Generation: KV-cache prefill and decode, sampling with log-probs, K samples per prompt on a
shared prefix. (Best-of-K selection is `llama_jax.rl.best_of_k`.)

Layers, from arrays to text:

- `sampling`: `SamplingConfig` and `sample(keys, logits, config)` (greedy, temperature,
  top-k, top-p; log-probs under the sampling and the unmodified model distributions).
- `decode`: `GenerationConfig`, `generate_tokens(config, params, prompt_ids, key, gen,
  mesh=None)`: one compiled prefill + `while_loop` decode per prompt-length bucket.
- `api`: `generate(config, params, tokenizer, prompts, ...)` for texts and chats.
- `engine`: `Engine(model, params, EngineConfig(...)).generate([Request(...)])`: a paged KV
  cache and continuous batching over token-in / token-out requests, each with its own
  sampling rule, stop ids / strings, samples and seed (the static decoder's tokens, batch
  independent).
"""

from llama_jax.generation.api import Generation, Prompt, encode_prompt, generate, response_text
from llama_jax.generation.decode import (
  GenerationConfig,
  GenerationOutput,
  bucket_length,
  generate_tokens,
  make_decode_fn,
  pad_prompts,
  sample_keys,
)
from llama_jax.generation.engine import Completion, Engine, EngineConfig, Request
from llama_jax.generation.sampling import SamplingConfig, sample, sample_rows, sampling_logits

__all__ = [
  "Completion",
  "Engine",
  "EngineConfig",
  "Generation",
  "GenerationConfig",
  "GenerationOutput",
  "Prompt",
  "Request",
  "SamplingConfig",
  "bucket_length",
  "encode_prompt",
  "generate",
  "generate_tokens",
  "make_decode_fn",
  "pad_prompts",
  "response_text",
  "sample",
  "sample_keys",
  "sample_rows",
  "sampling_logits",
]
