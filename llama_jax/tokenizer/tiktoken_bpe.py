"""Llama 3 tokenizer: tiktoken-format byte-level BPE (`tokenizer.model` = `base64(token) rank`)."""

from __future__ import annotations

import base64
import binascii
import heapq
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from itertools import pairwise

import regex
import tiktoken

from llama_jax.tokenizer.base import Tokenizer, check_ids, check_text

# Pre-tokenisation regex of Meta's Llama 3 tokenizer.py (the cl100k pattern). `\p{N}{1,3}` is
# what splits numbers into groups of at most three digits.
LLAMA3_PATTERN = (
  r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
  r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

NUM_LLAMA3_SPECIAL_TOKENS = 256

# Meta's Llama 3.1 list (llama-models, tokenizer.py); ids start at the number of base tokens
# (128000 for the real model). Llama 3.0 used the same ids with different names for 4 of them
# (128004/5/8/10 were reserved_2/3/4/5); the ids that chat formats use are identical.
_LLAMA3_NAMED_SPECIAL_TOKENS = (
  "<|begin_of_text|>",
  "<|end_of_text|>",
  "<|reserved_special_token_0|>",
  "<|reserved_special_token_1|>",
  "<|finetune_right_pad_id|>",
  "<|step_id|>",
  "<|start_header_id|>",
  "<|end_header_id|>",
  "<|eom_id|>",  # end of message: the model hands over to a tool (Llama 3.1)
  "<|eot_id|>",  # end of turn
  "<|python_tag|>",
)

# Meta splits text before handing it to tiktoken: its Rust BPE overflows the stack on very
# long runs of whitespace or of non-whitespace. Keeping the same limits keeps our ids equal
# to Meta's on such inputs too.
_MAX_ENCODE_CHARS = 400_000
_MAX_RUN_CHARS = 25_000

_TIKTOKEN_LINE = re.compile(rb"^[A-Za-z0-9+/]*={0,2} [0-9]+\r?$")


def llama3_special_tokens(num_special: int = NUM_LLAMA3_SPECIAL_TOKENS) -> list[str]:
  """The Llama 3.1 special tokens in id order: 11 named ones, then reserved_2, reserved_3, ..."""
  named = list(_LLAMA3_NAMED_SPECIAL_TOKENS)
  if num_special < len(named):
    raise ValueError(f"num_special={num_special} must be at least {len(named)}")
  reserved = [f"<|reserved_special_token_{2 + i}|>" for i in range(num_special - len(named))]
  return named + reserved


class TiktokenTokenizer(Tokenizer):
  """Llama 3's tokenizer: tiktoken BPE with the Llama 3 regex and 256 special tokens.

  With `n = len(ranks)` base tokens, special token k has id `n + k` (128000 + k for the real
  model). BOS is `<|begin_of_text|>`, EOS `<|end_of_text|>`, padding uses
  `<|finetune_right_pad_id|>` (Meta's id for exactly this), and a turn ends at `<|eot_id|>`,
  `<|eom_id|>` (hand-over to a tool) or `<|end_of_text|>`, as in Meta's Llama 3.1 code and the
  published generation configs.
  """

  chat_format = "llama3"

  def __init__(
    self,
    path: str | os.PathLike[str],
    *,
    special_tokens: Sequence[str] | None = None,
    pattern: str = LLAMA3_PATTERN,
  ) -> None:
    """Load a tiktoken-format `tokenizer.model` from `path`.

    Args:
      path: file of `base64(token) rank` lines.
      special_tokens: special token strings in id order; defaults to the Llama 3.1 list.
      pattern: pre-tokenisation regex; defaults to Llama 3's.
    """
    self.path = os.fspath(path)
    self._init(read_tiktoken_model(self.path), special_tokens, pattern)

  @classmethod
  def from_ranks(
    cls,
    ranks: Mapping[bytes, int],
    *,
    special_tokens: Sequence[str] | None = None,
    pattern: str = LLAMA3_PATTERN,
  ) -> TiktokenTokenizer:
    """A tokenizer from in-memory ranks (e.g. straight from `train_tiktoken_ranks`)."""
    _check_dense_ranks(ranks, "ranks")
    self = cls.__new__(cls)
    self.path = None
    self._init(dict(ranks), special_tokens, pattern)
    return self

  def _init(
    self, ranks: dict[bytes, int], special_tokens: Sequence[str] | None, pattern: str
  ) -> None:
    names = list(llama3_special_tokens() if special_tokens is None else special_tokens)
    self.num_base_tokens = len(ranks)
    self._specials = {name: self.num_base_tokens + k for k, name in enumerate(names)}
    if len(self._specials) != len(names):
      raise ValueError("special_tokens contains duplicates")
    for required in ("<|begin_of_text|>", "<|end_of_text|>"):
      if required not in self._specials:
        raise ValueError(f"special_tokens lacks {required!r}")
    self._enc = tiktoken.Encoding(
      name=os.path.basename(self.path or "tiktoken"),
      pat_str=pattern,
      mergeable_ranks=ranks,
      special_tokens=self._specials,
    )
    self.pattern = pattern
    stops = ("<|end_of_text|>", "<|eot_id|>", "<|eom_id|>")
    self._stop_ids = frozenset(self._specials[s] for s in stops if s in self._specials)
    self._pad_id = self._specials.get("<|finetune_right_pad_id|>", self.eos_id)

  @property
  def encoding(self) -> tiktoken.Encoding:
    """The underlying `tiktoken.Encoding`."""
    return self._enc

  @property
  def mergeable_ranks(self) -> dict[bytes, int]:
    """Base token bytes -> rank (= id)."""
    return dict(self._enc._mergeable_ranks)

  def _encode(self, text: str, allowed_special: str | set[str]) -> list[int]:
    ids: list[int] = []
    for piece in _split_for_tiktoken(text):
      ids += self._enc.encode(piece, allowed_special=allowed_special, disallowed_special=())
    return ids

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Token ids of `text`; "<|eot_id|>" typed in the text stays plain text, as in Meta's code."""
    ids = self._encode(check_text(text), set())
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode_special(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Encode `text`, turning every special-token string (e.g. "<|eot_id|>") into its id."""
    ids = self._encode(check_text(text), "all")
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """`encode(text)` and each token's first character index in `text`."""
    ids = self.encode(text)
    _, starts = self._enc.decode_with_offsets(ids)
    return ids, starts

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special ids decode to their token text, as in tiktoken."""
    return self._enc.decode(check_ids(ids, self.vocab_size))

  def token_bytes(self, token_id: int) -> bytes:
    """The bytes of one token (special tokens: their UTF-8 text)."""
    return self._enc.decode_single_token_bytes(check_ids([token_id], self.vocab_size)[0])

  @property
  def bos_id(self) -> int:
    return self._specials["<|begin_of_text|>"]

  @property
  def eos_id(self) -> int:
    return self._specials["<|end_of_text|>"]

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def vocab_size(self) -> int:
    return self.num_base_tokens + len(self._specials)

  @property
  def special_tokens(self) -> Mapping[str, int]:
    return dict(self._specials)

  @property
  def stop_ids(self) -> frozenset[int]:
    return self._stop_ids


def _split_for_tiktoken(text: str) -> list[str]:
  """Cut `text` like Meta does: 400k-char blocks, no same-class run longer than 25k chars.

  A cut falls every 25k characters inside a run of whitespace (or of non-whitespace), which is
  where Meta's `_split_whitespaces_or_nonwhitespaces` cuts.
  """
  pieces: list[str] = []
  for block_start in range(0, max(len(text), 1), _MAX_ENCODE_CHARS):
    block = text[block_start : block_start + _MAX_ENCODE_CHARS]
    if len(block) <= _MAX_RUN_CHARS:
      pieces.append(block)
      continue
    cuts = [0]
    for run in re.finditer(r"\s+|\S+", block):
      cuts.extend(range(run.start() + _MAX_RUN_CHARS, run.end(), _MAX_RUN_CHARS))
    cuts.append(len(block))
    pieces.extend(block[a:b] for a, b in pairwise(cuts))
  return pieces


def _check_dense_ranks(ranks: Mapping[bytes, int], what: str) -> None:
  """Ranks must be exactly 0..n-1: special tokens are numbered from n."""
  values = sorted(ranks.values())
  if values != list(range(len(values))):
    missing = sorted(set(range(len(values))) - set(values))[:5]
    raise ValueError(
      f"{what}: ranks must be 0..{len(values) - 1} without gaps or repeats (missing e.g. {missing})"
    )


def looks_like_tiktoken_model(head: bytes) -> bool:
  """Whether the first bytes of a file look like `base64(token) rank` lines."""
  first_line = head.split(b"\n", 1)[0]
  return bool(first_line) and bool(_TIKTOKEN_LINE.match(first_line))


def read_tiktoken_model(path: str | os.PathLike[str]) -> dict[bytes, int]:
  """Read a tiktoken-format file (`base64(token) rank` per line) into bytes -> rank."""
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = f.read()
  ranks: dict[bytes, int] = {}
  for line_no, line in enumerate(data.splitlines(), start=1):
    if not line.strip():
      continue
    parts = line.split()
    try:
      if len(parts) != 2:
        raise ValueError("expected 2 fields")
      token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
    except (ValueError, binascii.Error) as e:
      raise ValueError(
        f"{path}:{line_no}: not a tiktoken rank line ('base64(token) rank'): {line[:60]!r} ({e})"
      ) from e
    if token in ranks:
      raise ValueError(f"{path}:{line_no}: token {token!r} appears twice")
    ranks[token] = rank
  if not ranks:
    raise ValueError(f"{path}: empty tiktoken model")
  _check_dense_ranks(ranks, path)
  return ranks


def write_tiktoken_model(ranks: Mapping[bytes, int], path: str | os.PathLike[str]) -> None:
  """Write bytes -> rank as a tiktoken-format file, one `base64(token) rank` line per token."""
  _check_dense_ranks(ranks, "write_tiktoken_model")
  lines = [f"{base64.b64encode(tok).decode('ascii')} {rank}\n" for tok, rank in _by_rank(ranks)]
  with open(path, "w", encoding="ascii", newline="\n") as f:
    f.writelines(lines)


def _by_rank(ranks: Mapping[bytes, int]) -> list[tuple[bytes, int]]:
  return sorted(ranks.items(), key=lambda item: item[1])


def train_tiktoken_ranks(
  texts: Iterable[str], vocab_size: int, *, pattern: str = LLAMA3_PATTERN
) -> dict[bytes, int]:
  """Learn byte-level BPE ranks the way tiktoken vocabularies are built.

  Ranks 0..255 are the single bytes (rank = byte value). Each further rank is the merge of the
  most frequent adjacent token pair, counted inside the chunks that `pattern` cuts the texts
  into (so no token crosses a pre-tokenisation boundary, which is what makes the ranks valid
  for tiktoken). Ties go to the pair whose left, then right, token has the lowest rank, so the
  result depends only on the texts. A merge that recreates existing bytes adds no rank.

  Args:
    texts: training texts.
    vocab_size: number of ranks wanted (>= 256). Fewer are returned if the texts run out of
      pairs to merge.
    pattern: pre-tokenisation regex (Llama 3's by default).

  Returns:
    bytes -> rank, ranks dense from 0.
  """
  if vocab_size < 256:
    raise ValueError(f"vocab_size={vocab_size} must be at least 256 (the byte tokens)")
  splitter = regex.compile(pattern)
  chunk_counts: Counter[str] = Counter()
  for i, text in enumerate(texts):
    chunk_counts.update(splitter.findall(check_text(text, f"texts[{i}]")))
  chunks = sorted(chunk_counts)
  words = [[bytes([b]) for b in chunk.encode("utf-8")] for chunk in chunks]
  weights = [chunk_counts[c] for c in chunks]

  ranks = {bytes([b]): b for b in range(256)}
  pair_counts: Counter[tuple[bytes, bytes]] = Counter()
  words_with: defaultdict[tuple[bytes, bytes], set[int]] = defaultdict(set)
  heap: list[tuple[int, int, int, bytes, bytes]] = []

  def add(pair: tuple[bytes, bytes], delta: int, word: int) -> None:
    pair_counts[pair] += delta
    if delta > 0:
      words_with[pair].add(word)
    if pair_counts[pair] > 0:
      # Lazy heap: stale entries are skipped when popped.
      heapq.heappush(heap, (-pair_counts[pair], ranks[pair[0]], ranks[pair[1]], *pair))

  for w, word in enumerate(words):
    for pair in pairwise(word):
      add(pair, weights[w], w)

  while len(ranks) < vocab_size:
    best = _pop_best(heap, pair_counts)
    if best is None:
      break
    left, right = best
    ranks.setdefault(left + right, len(ranks))
    for w in sorted(words_with.pop(best, ())):
      word = words[w]
      for pair in pairwise(word):
        add(pair, -weights[w], w)
      word = _merge_pair(word, left, right)
      for pair in pairwise(word):
        add(pair, weights[w], w)
      words[w] = word
  return ranks


def _pop_best(
  heap: list[tuple[int, int, int, bytes, bytes]], pair_counts: Counter[tuple[bytes, bytes]]
) -> tuple[bytes, bytes] | None:
  """The most frequent pair still present, or None when no pair is left."""
  while heap:
    neg_count, _, _, left, right = heapq.heappop(heap)
    if pair_counts.get((left, right), 0) == -neg_count:
      return left, right
  return None


def _merge_pair(word: list[bytes], left: bytes, right: bytes) -> list[bytes]:
  """`word` with every non-overlapping (left, right) occurrence, left to right, merged."""
  out: list[bytes] = []
  i = 0
  while i < len(word):
    if i + 1 < len(word) and word[i] == left and word[i + 1] == right:
      out.append(left + right)
      i += 2
    else:
      out.append(word[i])
      i += 1
  return out
