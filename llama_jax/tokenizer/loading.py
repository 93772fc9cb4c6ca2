"""Open a tokenizer file whatever its format, and the tiny tokenizers bundled with the package."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import tokenizers

from llama_jax.tokenizer.base import Tokenizer
from llama_jax.tokenizer.hf import TOKENIZER_FILE as HF_TOKENIZER_FILE
from llama_jax.tokenizer.hf import HFTokenizer
from llama_jax.tokenizer.spm import SentencePieceTokenizer
from llama_jax.tokenizer.tiktoken_bpe import TiktokenTokenizer, looks_like_tiktoken_model

# Where a tokenizer sits inside a model directory, most preferred first: Hugging Face's
# tokenizer.json (every current checkpoint), then Meta's file at the top (Llama 2) or under
# original/ (Llama 3).
_CANDIDATES = (HF_TOKENIZER_FILE, "tokenizer.model", "original/tokenizer.model")

TINY_TOKENIZERS = {"llama2": "tiny_llama2.model", "llama3": "tiny_llama3.model"}


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
  """Open a tokenizer, detecting its format from the files present and their contents.

  Args:
    path: one of
      - a Hugging Face checkpoint directory with `tokenizer.json` (its tokenizer_config.json,
        chat_template.jinja and generation_config.json are read too) -> `HFTokenizer`;
      - a `tokenizer.json` file (its directory's other files are read the same way);
      - a `tokenizer.model` file: a SentencePiece model (Llama 2; a protobuf) or a tiktoken
        rank file (Llama 3; `base64(token) rank` lines);
      - a directory without tokenizer.json holding `tokenizer.model` or
        `original/tokenizer.model` (Meta's layout).

  Returns:
    An `HFTokenizer`, `SentencePieceTokenizer` or `TiktokenTokenizer`.

  Raises:
    FileNotFoundError: nothing at `path`, or a directory with none of the files above.
    ValueError: the file is in none of the formats.
  """
  path = Path(path)
  if path.is_dir():
    found = [path / c for c in _CANDIDATES if (path / c).is_file()]
    if not found:
      raise FileNotFoundError(
        f"load_tokenizer: no tokenizer in {path}: looked for {', '.join(_CANDIDATES)}"
      )
    path = found[0]
  if not path.is_file():
    raise FileNotFoundError(f"load_tokenizer: no file at {path}")
  with open(path, "rb") as f:
    head = f.read(4096)
  if not head:
    raise ValueError(f"load_tokenizer: {path} is empty")
  if head.startswith(b"GGUF"):
    # Its tokenizer lives in the checkpoint's metadata, which llama_jax.checkpoint reads.
    raise ValueError(
      f"load_tokenizer: {path} is a GGUF checkpoint; open its tokenizer with "
      "llama_jax.checkpoint.load_gguf_tokenizer"
    )
  if path.name == HF_TOKENIZER_FILE or head.lstrip()[:1] == b"{":
    return _load_tokenizer_json(path)
  if looks_like_tiktoken_model(head):
    return TiktokenTokenizer(path)
  try:
    return SentencePieceTokenizer(path)
  except ValueError as e:
    raise ValueError(
      f"load_tokenizer: {path} is neither a SentencePiece model (Llama 2), a tiktoken rank "
      f"file of 'base64(token) rank' lines (Llama 3) nor a Hugging Face tokenizer.json; "
      f"first bytes: {head[:32]!r}"
    ) from e


def _load_tokenizer_json(path: Path) -> HFTokenizer:
  """An `HFTokenizer` from a tokenizer.json, with the configs that sit next to it."""
  if path.name == HF_TOKENIZER_FILE:
    return HFTokenizer.from_dir(path.parent)
  # A JSON file under another name: its directory's configs may belong to another tokenizer,
  # so read the vocabulary alone.
  try:
    backend = tokenizers.Tokenizer.from_file(str(path))
  except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
    raise ValueError(f"load_tokenizer: {path} is JSON but not a tokenizers file: {e}") from e
  tok = HFTokenizer(backend)
  tok.path = os.fspath(path)
  return tok


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
