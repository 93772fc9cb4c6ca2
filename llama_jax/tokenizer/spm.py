"""Llama 2 tokenizer: a SentencePiece BPE model (`tokenizer.model`, a protobuf)."""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Mapping

import sentencepiece as spm

from llama_jax.tokenizer.base import Tokenizer, check_ids, check_text

# Trainer options of Meta's Llama 2 tokenizer.model (read from its trainer_spec), minus the
# corpus-specific ones. `train_sentencepiece_bpe` uses them so tiny test models tokenize the way
# the real one does: digits one by one, unknown characters as <0xNN> byte tokens, spaces kept
# verbatim (identity normalisation, no whitespace collapsing), a "▁" dummy prefix.
LLAMA2_TRAINER_OPTIONS: dict[str, object] = {
  "model_type": "bpe",
  "character_coverage": 0.99995,
  "split_digits": True,
  "byte_fallback": True,
  "allow_whitespace_only_pieces": True,
  "remove_extra_whitespaces": False,
  "normalization_rule_name": "identity",
  "add_dummy_prefix": True,
  "split_by_unicode_script": True,
  "split_by_number": True,
  "split_by_whitespace": True,
  "max_sentencepiece_length": 16,
  "unk_id": 0,
  "bos_id": 1,
  "eos_id": 2,
  "pad_id": -1,
}


class SentencePieceTokenizer(Tokenizer):
  """Llama 2's tokenizer: BOS `<s>` = 1, EOS `</s>` = 2, `<unk>` = 0.

  Padding: Llama 2's model has no pad piece (pad_id -1). We pad with `<unk>` (id 0) rather
  than EOS: it is a valid embedding row, a byte-fallback model never emits it for real text,
  and it keeps padding distinguishable from the EOS that ends a turn (stop detection and
  "where does the response end" never confuse the two). A model file that does define a pad
  piece keeps its own.
  """

  chat_format = "llama2"

  def __init__(self, path: str | os.PathLike[str]) -> None:
    """Load a SentencePiece `tokenizer.model` from `path`."""
    self.path = os.fspath(path)
    try:
      self._sp = spm.SentencePieceProcessor(model_file=self.path)
    except (OSError, RuntimeError) as e:
      raise ValueError(f"SentencePieceTokenizer: cannot load {self.path!r}: {e}") from e
    self._init_specials()

  @classmethod
  def from_bytes(cls, model_proto: bytes) -> SentencePieceTokenizer:
    """A tokenizer from the serialised model (the bytes of a `tokenizer.model`)."""
    self = cls.__new__(cls)
    self.path = None
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self._init_specials()
    return self

  def _init_specials(self) -> None:
    sp = self._sp
    if sp.bos_id() < 0 or sp.eos_id() < 0:
      raise ValueError(
        f"SentencePieceTokenizer: model {self.path!r} lacks a BOS or EOS piece "
        f"(bos_id={sp.bos_id()}, eos_id={sp.eos_id()})"
      )
    self._specials = {
      sp.id_to_piece(i): i
      for i in range(sp.get_piece_size())
      if sp.is_control(i) or sp.is_unknown(i)
    }
    # Longest first, so that a special whose text contains another's wins.
    names = sorted(self._specials, key=len, reverse=True)
    self._special_re = re.compile("|".join(re.escape(n) for n in names))
    if sp.pad_id() >= 0:
      self._pad_id = sp.pad_id()
    elif sp.unk_id() >= 0:
      self._pad_id = sp.unk_id()
    else:
      self._pad_id = sp.eos_id()

  @property
  def processor(self) -> spm.SentencePieceProcessor:
    """The underlying `sentencepiece.SentencePieceProcessor`."""
    return self._sp

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Token ids of `text` (SentencePiece never maps text to control ids like `</s>`)."""
    check_text(text)
    return self._sp.encode(text, add_bos=bos, add_eos=eos)

  def encode_special(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Encode `text`, turning the strings "<s>", "</s>", "<unk>" into their ids.

    The text between special tokens is encoded piece by piece, each piece getting
    SentencePiece's "▁" dummy prefix, exactly as if it were a separate `encode` call. That is
    how Meta's `chat_completion` builds Llama 2 prompts (`[BOS] + encode("[INST] ...")`) and
    how Hugging Face's legacy Llama tokenizer reads "<s>[INST] ...".
    """
    check_text(text)
    ids = [self.bos_id] if bos else []
    start = 0
    for match in self._special_re.finditer(text):
      if match.start() > start:
        ids += self._sp.encode(text[start : match.start()])
      ids.append(self._specials[match.group()])
      start = match.end()
    if start < len(text):
      ids += self._sp.encode(text[start:])
    return ids + ([self.eos_id] if eos else [])

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """`encode(text)` and each token's first character index in `text`."""
    check_text(text)
    proto = self._sp.encode(text, return_type="proto")
    # SentencePiece reports UTF-8 byte offsets; map them back to str indices.
    char_at_byte = _char_index_of_bytes(text)
    ids = [p.id for p in proto.pieces]
    starts = [char_at_byte[p.begin] for p in proto.pieces]
    return ids, starts

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; control tokens (`<s>`, `</s>`) decode to nothing, as in SentencePiece."""
    return self._sp.decode(check_ids(ids, self.vocab_size))

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def special_tokens(self) -> Mapping[str, int]:
    return dict(self._specials)

  @property
  def stop_ids(self) -> frozenset[int]:
    return frozenset({self.eos_id})


def _char_index_of_bytes(text: str) -> list[int]:
  """For each UTF-8 byte offset of `text` (and the end), the index of the char holding it."""
  out: list[int] = []
  for i, ch in enumerate(text):
    out.extend([i] * len(ch.encode("utf-8")))
  out.append(len(text))
  return out


def train_sentencepiece_bpe(texts: Iterable[str], vocab_size: int, **overrides: object) -> bytes:
  """Train a Llama-2-style SentencePiece BPE model and return its serialised bytes.

  Uses `LLAMA2_TRAINER_OPTIONS` (byte fallback, split digits, BOS 1, EOS 2, UNK 0), one thread
  and no input shuffling or sampling, so the same texts always give the same model.

  Args:
    texts: training sentences; each string is one sentence (keep them newline-free).
    vocab_size: number of pieces, including 3 specials and 256 byte pieces.
    **overrides: any other `sentencepiece` trainer option.
  """
  if vocab_size <= 259:
    raise ValueError(f"vocab_size={vocab_size} must exceed 259 (3 specials + 256 byte pieces)")
  sentences = [check_text(t, "texts[i]") for t in texts]
  options = {
    **LLAMA2_TRAINER_OPTIONS,
    "vocab_size": vocab_size,
    "num_threads": 1,
    "input_sentence_size": 0,
    "shuffle_input_sentence": False,
    "minloglevel": 2,
    **overrides,
  }
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=model, **options)
  return model.getvalue()
