"""Tokenize functions: normalized records (see `records`) -> the arrays `pipeline` takes.

`make_tokenize_fn(kind, tokenizer, **options)` returns `record -> dict[str, np.ndarray]`
with `tokens` plus per-token fields (token-aligned, as `packing` defines them) and 0-d
per-example scalars:

  kind        tokens                          per-token fields          scalars
  text        BOS text EOS                    loss_mask (all ones)      -
  sft         render_chat(messages)           loss_mask, format_mask    -
  preference  prompt + one response (`side`)  loss_mask, format_mask    rating, concern,
                                                                        has_edited
  rl_prompt   the generation prompt           -                         concern, is_unsafe

`loss_mask` is what the pipeline ANDs into `target_mask`: the assistant answers for sft,
the response (end-of-turn token included) for preference sides, so the pipeline's
`sum(log p(targets) * target_mask)` per document is the response log-probability DPO uses.
`format_mask` marks formatting tokens (`loss_mask * (1 - format_mask)` is the answer text
alone; see `llama_jax.tokenizer.chat`). Scalars are int32 codes because batches hold
numbers only: `rating` 3 significantly_better, 2 better, 1 slightly_better,
0 negligibly_better, -1 absent; `concern` 0 helpfulness, 1 safety (`records.CONCERNS`);
`has_edited` and `is_unsafe` 0/1; preference examples of an `Indexed` source also carry
`index`, the record's position in the source.

Preference pairs. The pipeline lays out one example per row (pad mode) or one document
per segment (pack mode), and chosen and rejected are two sequences of different lengths,
so a pair is two examples. `make_pair_pipeline` runs one pad-mode pipeline per side over
the same source with the same config and zips them: `next(it)` is
`{"chosen": batch, "rejected": batch}`, two ordinary batches of [B, T] (same T) whose row
i is the same pair, each with the scalars. A DPO or reward step concatenates the two to
[2B, T] for one forward pass and splits the per-row results again. Rows stay paired
because both pipelines shuffle, shard and batch the same record indices in the same way;
that holds as long as no side drops a record the other keeps, which is why the pair
pipeline refuses pack mode (packing reorders by length) and the "skip" policies. With
`sides=("chosen", "rejected", "edited")` a third batch holds the annotator-edited
response (edited > chosen > rejected); pairs without one repeat `chosen` there, with
`has_edited == 0`.
"""

from __future__ import annotations

import collections.abc
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from llama_jax.data import pipeline as pipeline_lib
from llama_jax.data import records
from llama_jax.tokenizer import Tokenizer, render_chat, render_prompt_response

Example = dict[str, np.ndarray]
PAIR_SIDES = ("chosen", "rejected", "edited")


def _scalar(value: int) -> np.ndarray:
  return np.asarray(value, np.int32)


def tokenize_text(
  record: Mapping[str, Any], *, tokenizer: Tokenizer, bos: bool | None = None, eos: bool = True
) -> Example:
  """A corpus document: BOS text EOS, every token trained on (BOS by default only where the
  tokenizer adds one: Llama does, SmolLM2 does not)."""
  records.check_fields("text", record)
  bos = tokenizer.add_bos if bos is None else bos
  tokens = np.asarray(tokenizer.encode(record["text"], bos=bos, eos=eos), np.int32)
  return {"tokens": tokens, "loss_mask": np.ones_like(tokens)}


def tokenize_sft(
  record: Mapping[str, Any], *, tokenizer: Tokenizer, fmt=None, loss_on: str = "all_assistant"
) -> Example:
  """A conversation rendered in the chat format, loss on the assistant answers."""
  records.check_fields("sft", record)
  chat = render_chat(tokenizer, record["messages"], fmt=fmt, loss_on=loss_on)
  return {"tokens": chat.tokens, "loss_mask": chat.loss_mask, "format_mask": chat.format_mask}


def tokenize_preference(
  record: Mapping[str, Any], *, tokenizer: Tokenizer, side: str, fmt=None
) -> Example:
  """One side of a preference pair: the prompt then that response, loss on the response."""
  records.check_fields("preference", record)
  edited = record.get("edited")
  response = record["chosen"] if side == "edited" and edited is None else record[side]
  rendered = render_prompt_response(
    tokenizer, records.prompt_messages(record["prompt"]), response, fmt=fmt
  )
  example = {
    "tokens": rendered.tokens,
    "loss_mask": rendered.response_mask,
    "format_mask": rendered.format_mask,
    "rating": _scalar(records.RATING_CODES.get(record.get("rating"), -1)),
    "concern": _scalar(records.CONCERNS.index(record["concern"])),
    "has_edited": _scalar(edited is not None),
  }
  if "index" in record:  # from `Indexed`
    example["index"] = _scalar(record["index"])
  return example


class Indexed(collections.abc.Sequence):
  """`source[i]` as `dict(record, index=i)`: batches then carry each record's position in
  `source` (the `index` scalar of preference examples), so per-record tables computed once
  (DPO's reference log-probabilities) can be looked up by row."""

  def __init__(self, source: Sequence[Mapping[str, Any]]):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i):
    return dict(self.source[i], index=i)


def tokenize_rl_prompt(record: Mapping[str, Any], *, tokenizer: Tokenizer, fmt=None) -> Example:
  """The prompt up to where the assistant's answer begins, for sampling."""
  records.check_fields("rl_prompt", record)
  prompt = render_chat(
    tokenizer, records.prompt_messages(record["prompt"]), fmt=fmt, add_generation_prompt=True
  )
  return {
    "tokens": prompt.tokens,
    "concern": _scalar(records.CONCERNS.index(record["concern"])),
    "is_unsafe": _scalar(bool(record.get("is_unsafe"))),
  }


_TOKENIZERS = {
  "text": tokenize_text,
  "sft": tokenize_sft,
  "preference": tokenize_preference,
  "rl_prompt": tokenize_rl_prompt,
}
_OPTIONS = {
  "text": ("bos", "eos"),
  "sft": ("fmt", "loss_on"),
  "preference": ("side", "fmt"),
  "rl_prompt": ("fmt",),
}


def make_tokenize_fn(
  kind: str, tokenizer: Tokenizer, **options: Any
) -> Callable[[Mapping[str, Any]], Example]:
  """The tokenize function of a record kind, for `make_pipeline` (see the module docstring).

  Args:
    kind: "text", "sft", "preference" or "rl_prompt".
    tokenizer: any `llama_jax.tokenizer.Tokenizer`.
    **options: text: `bos` (default: the tokenizer's `add_bos`), `eos` (default True); sft:
      `fmt`, `loss_on`; preference: `side` (required: "chosen", "rejected" or "edited") and
      `fmt`; rl_prompt: `fmt`. `fmt` is the chat format ("llama2", "llama3"; default the
      tokenizer's own: its checkpoint's chat template if it has one).

  Returns:
    A picklable `record -> dict[str, np.ndarray]` (grain worker processes can run it).
  """
  records.check_kind(kind)
  unknown = sorted(set(options) - set(_OPTIONS[kind]))
  if unknown:
    raise TypeError(f"unknown options {unknown} for kind {kind!r}; known: {_OPTIONS[kind]}")
  if kind == "preference" and options.get("side") not in PAIR_SIDES:
    raise ValueError(f"preference needs side= one of {PAIR_SIDES}, got {options.get('side')!r}")
  # A partial of a module-level function pickles; a closure would not.
  return functools.partial(_TOKENIZERS[kind], tokenizer=tokenizer, **options)


# ---------------------------------------------------------------------------------------------
# Preference pairs: one pad-mode pipeline per side, zipped.


class PairIterator:
  """Batches `{side: batch}` from pipelines that yield the same records in the same rows.

  Resume state, counters and `len` combine those of the per-side `PipelineIterator`s.
  """

  def __init__(self, pipelines: Mapping[str, pipeline_lib.PipelineIterator]):
    self.pipelines = dict(pipelines)

  def __iter__(self) -> Iterator[dict[str, dict[str, Any]]]:
    return self

  def __next__(self) -> dict[str, dict[str, Any]]:
    # All sides end together (same records, same batches), so the first side decides.
    return {side: next(it) for side, it in self.pipelines.items()}

  def __len__(self) -> int:
    return len(next(iter(self.pipelines.values())))

  def get_state(self) -> dict[str, Any]:
    """JSON-serializable position of every side."""
    return {side: it.get_state() for side, it in self.pipelines.items()}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a `get_state()` of a pair pipeline built with the same arguments."""
    for side, it in self.pipelines.items():
      it.set_state(state[side])

  def stats(self) -> dict[str, dict[str, int]]:
    """Each side's counters (equal across sides unless a side truncated more)."""
    return {side: it.stats() for side, it in self.pipelines.items()}

  def close(self) -> None:
    """Stops every side's worker processes and threads."""
    for it in self.pipelines.values():
      it.close()

  def __enter__(self) -> PairIterator:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


def make_pair_pipeline(
  source: Sequence[Any],
  tokenizer: Tokenizer,
  config: pipeline_lib.PipelineConfig,
  *,
  sides: Sequence[str] = ("chosen", "rejected"),
  fmt=None,
  evaluation: bool = False,
  **pipeline_kwargs: Any,
) -> PairIterator:
  """Preference pairs as `{"chosen": batch, "rejected": batch}` of aligned pad-mode rows.

  Args:
    source: normalized preference records (random access).
    tokenizer: the tokenizer; `fmt` as in `make_tokenize_fn`.
    config: pipeline settings; needs mode="pad" and no "skip" policy (a record skipped on
      one side only would shift every later row). Too-long sides are truncated or raise.
    sides: which responses to emit, from "chosen", "rejected", "edited".
    evaluation: one unshuffled padded pass per side (`make_eval_pipeline`).
    **pipeline_kwargs: `mesh`, `batch_axes`, `shard_index`, `shard_count`.
  """
  bad = [s for s in sides if s not in PAIR_SIDES]
  if bad or len(set(sides)) != len(sides) or not sides:
    raise ValueError(f"sides must be distinct names from {PAIR_SIDES}, got {tuple(sides)}")
  if config.mode != "pad" and not evaluation:
    raise ValueError(
      f"pair pipelines need mode='pad', got {config.mode!r}: packing places documents by "
      "length, so chosen and rejected would land in different rows"
    )
  if "skip" in (config.on_too_long, config.on_error):
    raise ValueError(
      "pair pipelines need on_too_long and on_error other than 'skip' (got "
      f"{config.on_too_long!r}, {config.on_error!r}): a record skipped on one side only "
      "would shift every later row"
    )
  make = pipeline_lib.make_eval_pipeline if evaluation else pipeline_lib.make_pipeline
  return PairIterator(
    {
      side: make(
        source,
        make_tokenize_fn("preference", tokenizer, side=side, fmt=fmt),
        config,
        **pipeline_kwargs,
      )
      for side in sides
    }
  )
