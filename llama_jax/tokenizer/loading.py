"""Open a tokenizer file whatever its format, and the tiny tokenizers bundled with the package."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

from llama_jax.tokenizer.base import Tokenizer
from llama_jax.tokenizer.spm import SentencePieceTokenizer
from llama_jax.tokenizer.tiktoken_bpe import TiktokenTokenizer, looks_like_tiktoken_model

# Where a tokenizer file sits inside a model directory: Hugging Face repos keep Meta's file at
# the top (Llama 2) or under original/ (Llama 3).
_CANDIDATES = ("tokenizer.model", "original/tokenizer.model")

TINY_TOKENIZERS = {"llama2": "tiny_llama2.model", "llama3": "tiny_llama3.model"}


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
  """Open a Llama tokenizer, detecting its format from the file's contents.

  Args:
    path: a `tokenizer.model` file, either a SentencePiece model (Llama 2; a protobuf) or a
      tiktoken rank file (Llama 3; `base64(token) rank` lines), or a directory holding one
      as `tokenizer.model` or `original/tokenizer.model`.

  Returns:
    A `SentencePieceTokenizer` or a `TiktokenTokenizer`.

  Raises:
    FileNotFoundError: nothing at `path` (or no tokenizer.model in the directory).
    ValueError: the file is neither format.
  """
  path = Path(path)
  if path.is_dir():
    found = [path / c for c in _CANDIDATES if (path / c).is_file()]
    if not found:
      raise FileNotFoundError(f"load_tokenizer: no {' or '.join(_CANDIDATES)} in {path}")
    path = found[0]
  if not path.is_file():
    raise FileNotFoundError(f"load_tokenizer: no file at {path}")
  with open(path, "rb") as f:
    head = f.read(4096)
  if not head:
    raise ValueError(f"load_tokenizer: {path} is empty")
  if looks_like_tiktoken_model(head):
    return TiktokenTokenizer(path)
  try:
    return SentencePieceTokenizer(path)
  except ValueError as e:
    raise ValueError(
      f"load_tokenizer: {path} is neither a SentencePiece model (Llama 2) nor a tiktoken rank "
      f"file of 'base64(token) rank' lines (Llama 3); first bytes: {head[:32]!r}"
    ) from e


def tiny_tokenizer(kind: str = "llama3") -> Tokenizer:
  """One of the tiny tokenizers shipped for the bundled experiments.

  Args:
    kind: "llama2" (SentencePiece BPE, 512 pieces) or "llama3" (tiktoken format, 1024 base
      tokens + 256 specials). Built by `llama_jax/assets/tokenizers/build.py`.
  """
  if kind not in TINY_TOKENIZERS:
    raise ValueError(f"tiny_tokenizer: kind={kind!r}; expected one of {list(TINY_TOKENIZERS)}")
  # One component per joinpath call: several at once needs Python 3.11's Traversable.
  resource = (
    importlib.resources.files("llama_jax")
    .joinpath("assets")
    .joinpath("tokenizers")
    .joinpath(TINY_TOKENIZERS[kind])
  )
  with importlib.resources.as_file(resource) as path:
    if kind == "llama2":
      return SentencePieceTokenizer(path)
    return TiktokenTokenizer(path)
