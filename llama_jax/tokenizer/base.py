"""The one interface every tokenizer in llama_jax implements."""

from __future__ import annotations

import abc
import functools
import re
from collections.abc import Iterable, Mapping, Sequence


class Tokenizer(abc.ABC):
  """Text <-> token ids, with the special tokens a chat model needs.

  Three implementations exist: `SentencePieceTokenizer` (Llama 2), `TiktokenTokenizer`
  (Llama 3) and `HFTokenizer` (any Hugging Face `tokenizer.json`). Code that renders chats,
  pads batches or stops generation only uses this interface, so it works with each.

  `encode` never turns text into special tokens: a user who types "<|eot_id|>" or "</s>" gets
  the ordinary tokens of that text, so data cannot forge turn boundaries. `encode_special`
  is the opt-in path that recognises special-token strings.
  """

  #: Name of the chat format this tokenizer's models were trained with ("llama2"/"llama3");
  #: `render_chat` uses it when no format is given.
  chat_format: str = ""

  #: The checkpoint's own Jinja chat template, if it ships one (Hugging Face tokenizers);
  #: when set, `render_chat` uses it instead of `chat_format`.
  chat_template: str | None = None

  #: Whether the model expects BOS before plain text. True for Meta's Llama 2 / Llama 3
  #: tokenizers; Hugging Face checkpoints say so in tokenizer_config.json (`add_bos_token`) or
  #: their post-processor (SmolLM2 and other ChatML models add none). Callers encoding
  #: documents or raw prompts pass `bos=tokenizer.add_bos` rather than `bos=True`.
  add_bos: bool = True

  @abc.abstractmethod
  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Token ids of `text`, special-token strings treated as plain text.

    Args:
      text: the string to encode.
      bos: prepend `bos_id`.
      eos: append `eos_id`.
    """

  @abc.abstractmethod
  def encode_special(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Like `encode`, but special-token strings in `text` become their single ids."""

  @abc.abstractmethod
  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """`encode(text)` and, for each token, the index in `text` of its first character.

    Chat rendering uses the offsets to tell which part of a jointly encoded string (marker,
    prompt, answer) each token came from.
    """

  def encode_special_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """`encode_special(text)` and, for each token, the index in `text` of its first character.

    This default cuts `text` at special-token strings and encodes the runs between them with
    `encode_with_offsets`, which is exactly `encode_special` for tokenizers that encode those
    runs independently (SentencePiece, tiktoken). `HFTokenizer` overrides it.
    """
    return encode_runs(self, text, find_specials(text, self.special_tokens))

  @abc.abstractmethod
  def decode(self, ids: Iterable[int]) -> str:
    """The text of `ids` (invalid UTF-8 from partial byte tokens is replaced by U+FFFD)."""

  @property
  @abc.abstractmethod
  def bos_id(self) -> int:
    """Id of the beginning-of-sequence token."""

  @property
  @abc.abstractmethod
  def eos_id(self) -> int:
    """Id of the end-of-sequence (end of text) token."""

  @property
  @abc.abstractmethod
  def pad_id(self) -> int:
    """Id used to fill padded positions (always a valid embedding row).

    Never a stop id, except where a checkpoint's own pad token is one (SmolLM2 pads with
    `<|im_end|>`): code must find where a sequence ends from its masks, not from `pad_id`.
    """

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """Number of token ids, special tokens included (the model's embedding rows)."""

  @property
  @abc.abstractmethod
  def special_tokens(self) -> Mapping[str, int]:
    """Special token text -> id."""

  @property
  @abc.abstractmethod
  def stop_ids(self) -> frozenset[int]:
    """Ids that end an assistant turn; generation stops at any of them."""

  def special_id(self, name: str) -> int:
    """Id of the special token `name`, e.g. "<|eot_id|>" (Llama 3) or "</s>" (Llama 2).

    For tiktoken-format tokenizers the bare name ("eot_id") is accepted too.

    Raises:
      KeyError: `name` is not a special token of this tokenizer.
    """
    specials = self.special_tokens
    for candidate in (name, f"<|{name}|>"):
      if candidate in specials:
        return specials[candidate]
    known = ", ".join(_preview(list(specials), 12))
    raise KeyError(
      f"special_id: {name!r} is not a special token of {type(self).__name__}; known: {known}"
    )

  def __repr__(self) -> str:
    return (
      f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
      f"eos_id={self.eos_id}, pad_id={self.pad_id})"
    )


def _preview(items: Sequence[str], n: int) -> list[str]:
  """The first `n` items, with a count of the rest (keeps error messages short)."""
  if len(items) <= n:
    return list(items)
  return [*items[:n], f"... ({len(items) - n} more)"]


def check_text(text: object, what: str = "text") -> str:
  """Return `text` if it is a str, else raise a TypeError naming its type."""
  if not isinstance(text, str):
    raise TypeError(f"{what} must be a str, got {type(text).__name__}: {text!r:.80}")
  return text


def check_ids(ids: Iterable[int], vocab_size: int) -> list[int]:
  """`ids` as a list of Python ints, each checked to lie in [0, vocab_size)."""
  out = [int(i) for i in ids]
  for position, i in enumerate(out):
    if not 0 <= i < vocab_size:
      raise ValueError(f"ids[{position}] = {i} is outside the vocabulary [0, {vocab_size})")
  return out


def find_specials(text: str, specials: Mapping[str, int]) -> list[tuple[int, int, int]]:
  """Every special-token string in `text` as (start, end, id), leftmost-longest, in order."""
  if not specials:
    return []
  pattern = _special_pattern(tuple(sorted(specials, key=len, reverse=True)))
  return [(m.start(), m.end(), specials[m.group()]) for m in pattern.finditer(text)]


@functools.lru_cache(maxsize=16)
def _special_pattern(names_longest_first: tuple[str, ...]) -> re.Pattern[str]:
  # Longest first, so that a special whose text contains another's wins.
  return re.compile("|".join(re.escape(n) for n in names_longest_first))


def encode_runs(
  tokenizer: Tokenizer, text: str, specials: Sequence[tuple[int, int, int]]
) -> tuple[list[int], list[int]]:
  """Ids and start offsets of `text` with only the given (start, end, id) specials parsed.

  The text between two of them is encoded as plain text by `encode_with_offsets`, so a
  special-token string that is not in `specials` stays ordinary text.
  """
  ids: list[int] = []
  starts: list[int] = []
  position = 0
  for start, end, special_id in [*specials, (len(text), len(text), -1)]:
    if start > position:
      run_ids, run_starts = tokenizer.encode_with_offsets(text[position:start])
      ids += run_ids
      starts += [position + s for s in run_starts]
    if special_id >= 0:
      ids.append(special_id)
      starts.append(start)
    position = end
  return ids, starts
