"""The one interface every tokenizer in llama_jax implements."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence


class Tokenizer(abc.ABC):
  """Text <-> token ids, with the special tokens a chat model needs.

  Two implementations exist: `SentencePieceTokenizer` (Llama 2) and `TiktokenTokenizer`
  (Llama 3). Code that renders chats, pads batches or stops generation only uses this
  interface, so it works with either.

  `encode` never turns text into special tokens: a user who types "<|eot_id|>" or "</s>" gets
  the ordinary tokens of that text, so data cannot forge turn boundaries. `encode_special`
  is the opt-in path that recognises special-token strings.
  """

  #: Name of the chat format this tokenizer's models were trained with ("llama2"/"llama3");
  #: `render_chat` uses it when no format is given.
  chat_format: str = ""

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
    """Id used to fill padded positions (always a valid embedding row, never a stop id)."""

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
