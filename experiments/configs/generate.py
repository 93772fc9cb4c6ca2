"""Sampling configs.

    python -m experiments.generate --config=experiments/configs/generate.py:<variant> \
      --workdir=DIR --config.init_from=<experiment workdir or Hugging Face dir>

Writes DIR/samples.jsonl (one line per prompt: its id and prompt, the responses, their token
counts and summed model log-probs, and with scorer.kind set their scores and the best index)
and DIR/generate_config.json.

Fields
  model, tokenizer, init_from, resume, mesh  as in `experiments/configs/base.py`; with init_from
              empty the model is the preset with random weights (a smoke test, not text).
  data        source ("bundled" | "tfds"), name, data_dir, split, tasks (comma-separated
              record tasks to keep, "" = all), start (index of the first prompt),
              num_prompts (0 = all from start), batch_size (prompts per generate call).
              Records need a "prompt": a string or a list of chat messages (the rl_prompt
              kind).
  generation  max_new_tokens, num_samples (per prompt, sharing its prefilled KV cache),
              temperature (0 = greedy), top_k (0 = off), top_p (1 = off), prompt_bucket
              (0 = powers of two), seed.
  engine      the rollout engine's `EngineConfig` (`llama_jax.generation.engine`): page_size,
              num_pages (the KV page pool, scratch page included), max_seqs (sequences
              decoded together), max_seq_len (0 = the model's), prefill_chunk, prefill_rows,
              attention ("auto" | "xla" | "ragged_paged"); the compile check compiles its
              largest prefill and decode steps with the pool.
  chat        wrap string prompts as a user message of the tokenizer's chat format.
  scorer      `llama_jax.rl.scorers.ScorerConfig` (`base.scorer_section`), as in the
              rejection-sampling, GRPO and PPO configs: kind "" (no scores), "check_answer"
              (`llama_jax.data.scoring.check_answer` on rl_prompt records: reference
              answers, refusals of unsafe prompts), "reward_model" (the RM workdir in
              reward_model) or "llama2" (the helpful and safety RM workdirs); threshold,
              whitening, batch_size (rows per RM pass).

Variants
  tiny         the tiny Llama 3-style model of the pretrain/SFT configs on 16 bundled
               rl_prompt test prompts, 4 samples each; CPU, seconds. With init_from an SFT
               workdir of the tiny recipe the answers are mostly right (see `scorer`).
  llama3p1_8b  Llama 3.1 8B Instruct from a Hugging Face directory, bf16, 512 prompts × 8
               samples at temperature 1.0 (rejection sampling); one host of 8 × H100,
               each GPU holding the weights (data=8).
"""

from __future__ import annotations

import ml_collections

from experiments.configs.base import TINY_MODEL, dataclass_section, pick, scorer_section
from llama_jax.generation.decode import GenerationConfig
from llama_jax.generation.engine import EngineConfig
from llama_jax.generation.sampling import SamplingConfig
from llama_jax.parallel.sharding import MeshConfig


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  return pick("generate", variant, tiny, llama3p1_8b)


def _base(**model_fields) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    {
      "model": {"preset": "tiny", **model_fields},
      "tokenizer": "tiny:llama3",
      "init_from": "",
      "resume": "auto",
      "mesh": dataclass_section(MeshConfig, data=-1, fsdp=1),  # each device a replica
      "data": {
        "source": "bundled",
        "name": "rl_prompt",
        "data_dir": "",
        "split": "test",
        "tasks": "",
        "start": 0,
        "num_prompts": 16,
        "batch_size": 8,
      },
      # `GenerationConfig`'s fields (stop and pad ids are the tokenizer's) and
      # `SamplingConfig`'s, and the sampling seed.
      "generation": dataclass_section(
        GenerationConfig,
        drop=("sampling", "stop_ids", "pad_id"),
        max_new_tokens=48,
        num_samples=4,
        seed=0,
      )
      | dataclass_section(SamplingConfig),
      "engine": dataclass_section(EngineConfig, num_pages=64, max_seqs=32, prefill_rows=8),
      "chat": True,
      "scorer": scorer_section("check_answer"),
    }
  )


def tiny():
  return _base(**TINY_MODEL)


def llama3p1_8b():
  config = _base(
    preset="llama3p1_8b",
    dtype="bfloat16",
    param_dtype="bfloat16",
    scan_layers=True,
    attention_impl="auto",
  )
  config.tokenizer = "/path/to/llama3.1-8b-instruct/original/tokenizer.model"
  config.init_from = "/path/to/llama3.1-8b-instruct"
  config.data.update(num_prompts=512, batch_size=64)
  config.generation.update(max_new_tokens=1024, num_samples=8, prompt_bucket=128)
  # 256 sequences of up to 2048 tokens decoded together; the pool of 16384 pages of 16
  # tokens (2 MiB each: 32 layers × 8 kv heads × 128 × keys and values in bf16, 32 GiB) holds
  # them all at their longest, beside the 15 GiB of weights on each device.
  config.engine.update(num_pages=16384, max_seqs=256, max_seq_len=2048, prefill_chunk=512)
  return config
