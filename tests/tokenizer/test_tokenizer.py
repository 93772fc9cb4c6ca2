"""Tokenizers: round trips, ids, and agreement with sentencepiece, tiktoken and transformers.

Real Llama tokenizer files cannot be downloaded here, so each test module trains its own small
ones (SentencePiece BPE with Llama 2's options; byte-level BPE ranks in tiktoken format).
"""

import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import regex
import sentencepiece as spm
import tiktoken
import tiktoken.load

from llama_jax.tokenizer import (
  LLAMA3_PATTERN,
  SentencePieceTokenizer,
  TiktokenTokenizer,
  llama3_special_tokens,
  load_tokenizer,
  read_tiktoken_model,
  tiny_tokenizer,
  train_sentencepiece_bpe,
  train_tiktoken_ranks,
  write_tiktoken_model,
)
from llama_jax.tokenizer.tiktoken_bpe import _split_for_tiktoken

TRAIN_TEXT = """\
Once upon a time there was a small robot who loved numbers.
Every morning it counted: 1, 2, 3, 10, 20, 300, 4000 and 12345.
It asked its friends: "What is 17 plus 25?" and they answered 42.
The robot liked tea, toast and the smell of rain on warm stones.
Sometimes it said no: I'm sorry, I can't do that, it wouldn't be safe.
Rivers run to the sea; mountains stand still; the wind never sleeps.
Dear user, thank you for your question. Here is my answer.
She'll say it's fine, they've gone, we're late, I'd go, you'll see.
Numbers like 3.14159, 2.71828 and 1,000,000 appear in maths books.
Zebras, yaks and quokkas are animals; apples, kiwis and figs are fruits.
"""
TRAIN_LINES = [line for line in TRAIN_TEXT.splitlines() if line]

# Texts the tokenizers must round-trip exactly: unicode, digits, whitespace runs, newlines,
# tabs, CRLF, apostrophes, special-token look-alikes, the empty string.
ROUND_TRIP = [
  "",
  "Hello world",
  "The robot counted 1234567890 apples.",
  "  leading spaces and   inner runs   and trailing  ",
  "line one\nline two\n\n\nline five\n",
  "tabs\tand\r\nwindows\r\nnewlines",
  "Unicode: café, naïve, Ærøskøbing, Straße, Привет мир, 東京, 😀👍🏽",
  "She'll say it's fine; THEY'VE gone; I'D go.",
  "x=3.14159; y = x**2 // 7 % 5 -> {'a': [1, 2]}",
  "<s>[INST] not special here [/INST] </s> <|eot_id|> <|begin_of_text|>",
  "\u00a0non-breaking\u2003spaces\u200b and zero width",
  " ",
  "\n",
  "0",
  "999 1000 100000 1234.5678",
]


def synthetic_texts(n: int, seed: int = 0) -> list[str]:
  """Random strings of words, numbers, punctuation and whitespace, for agreement rates."""
  rng = random.Random(seed)
  words = " ".join(TRAIN_LINES).split() + ["Ω", "日本", "naïve", "😀", "don't", "ABC", "x_1"]
  seps = [" ", " ", " ", "  ", "\n", "\t", ", ", ". ", "\n\n", "   "]
  out = []
  for _ in range(n):
    parts = []
    for _ in range(rng.randint(1, 12)):
      parts.append(rng.choice(words) if rng.random() < 0.8 else str(rng.randint(0, 10**7)))
      parts.append(rng.choice(seps))
    out.append("".join(parts).rstrip() if rng.random() < 0.5 else "".join(parts))
  return out


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama2") / "tokenizer.model"
  path.write_bytes(train_sentencepiece_bpe(TRAIN_LINES, 400))
  return path


@pytest.fixture(scope="module")
def sp_tok(sp_path):
  return SentencePieceTokenizer(sp_path)


@pytest.fixture(scope="module")
def tt_path(tmp_path_factory):
  path = tmp_path_factory.mktemp("llama3") / "tokenizer.model"
  write_tiktoken_model(train_tiktoken_ranks([TRAIN_TEXT], 500), path)
  return path


@pytest.fixture(scope="module")
def tt_tok(tt_path):
  return TiktokenTokenizer(tt_path)


@pytest.fixture(scope="module")
def reference_encoding(tt_path):
  """tiktoken.Encoding built the way Meta's tokenizer.py builds it, from tiktoken's own loader."""
  ranks = tiktoken.load.load_tiktoken_bpe(str(tt_path))
  specials = {s: len(ranks) + i for i, s in enumerate(llama3_special_tokens())}
  return tiktoken.Encoding(
    name="reference", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=specials
  )


# ----------------------------------------------------------------------------- SentencePiece


def test_sentencepiece_ids_and_specials(sp_tok):
  assert (sp_tok.bos_id, sp_tok.eos_id, sp_tok.pad_id) == (1, 2, 0)
  assert sp_tok.vocab_size == 400
  assert sp_tok.special_tokens == {"<unk>": 0, "<s>": 1, "</s>": 2}
  assert sp_tok.special_id("</s>") == 2
  assert sp_tok.stop_ids == {2}
  assert sp_tok.chat_format == "llama2"
  with pytest.raises(KeyError, match="'<|eot_id|>' is not a special token"):
    sp_tok.special_id("<|eot_id|>")


def test_sentencepiece_is_llama2_like(sp_tok):
  sp = sp_tok.processor
  # Digits are split one by one; unseen characters fall back to bytes instead of <unk>.
  digits = sp_tok.encode("12345")
  assert [sp.id_to_piece(i).strip("▁") for i in digits if sp.id_to_piece(i) != "▁"] == list("12345")
  ids = sp_tok.encode("東")
  assert 0 not in ids and all(sp.is_byte(i) for i in ids if sp.id_to_piece(i) != "▁")


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_sentencepiece_round_trip(sp_tok, text):
  assert sp_tok.decode(sp_tok.encode(text)) == text
  assert sp_tok.decode(sp_tok.encode(text, bos=True, eos=True)) == text


def test_sentencepiece_bos_eos_and_plain_text_specials(sp_tok):
  ids = sp_tok.encode("hi", bos=True, eos=True)
  assert ids[0] == 1 and ids[-1] == 2 and ids[1:-1] == sp_tok.encode("hi")
  # Typed "</s>" is text: it must not end a sequence.
  assert not {1, 2} & set(sp_tok.encode("<s> </s>"))


def test_sentencepiece_encode_special_is_per_segment(sp_tok):
  text = "<s>[INST] hi [/INST] ok </s><s>[INST] again [/INST]"
  expected = (
    [1] + sp_tok.encode("[INST] hi [/INST] ok ") + [2, 1] + sp_tok.encode("[INST] again [/INST]")
  )
  assert sp_tok.encode_special(text) == expected


def test_sentencepiece_offsets(sp_tok):
  text = "Hé said: 12 apples  😀\nok"
  ids, starts = sp_tok.encode_with_offsets(text)
  assert ids == sp_tok.encode(text)
  assert starts == sorted(starts) and all(0 <= s < len(text) for s in starts)
  # "😀" is 4 byte-fallback tokens, all starting at its character; "ok" starts a token.
  assert starts.count(text.index("😀")) == 4 and text.index("ok") in starts


def test_sentencepiece_matches_sentencepiece_processor(sp_tok, sp_path):
  reference = spm.SentencePieceProcessor(model_file=str(sp_path))
  texts = ROUND_TRIP + TRAIN_LINES + synthetic_texts(200)
  assert [sp_tok.encode(t) for t in texts] == [reference.encode(t) for t in texts]
  assert reference.bos_id() == sp_tok.bos_id and reference.eos_id() == sp_tok.eos_id


def test_sentencepiece_training_is_deterministic():
  assert train_sentencepiece_bpe(TRAIN_LINES, 380) == train_sentencepiece_bpe(TRAIN_LINES, 380)


def test_sentencepiece_matches_transformers_llama_tokenizer(sp_path, sp_tok, tmp_path):
  transformers = pytest.importorskip("transformers")
  shutil.copy(sp_path, tmp_path / "tokenizer.model")
  hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), legacy=True)
  assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id, len(hf)) == (1, 2, 0, 400)
  texts = ROUND_TRIP + TRAIN_LINES + synthetic_texts(200)
  # HF reads "<s>" in text as BOS even without add_special_tokens: compare encode_special.
  ours = [sp_tok.encode_special(t) for t in texts]
  theirs = [hf.encode(t, add_special_tokens=False) for t in texts]
  plain = [i for i, t in enumerate(texts) if not any(p[:1] == " " for p in _segments(t))]
  assert len(plain) > 200 and all(ours[i] == theirs[i] for i in plain)
  # The one known difference: tokenizers' Metaspace adds no "▁" dummy prefix to a segment
  # that already starts with a space; SentencePiece always adds one.
  assert theirs == [metaspace_like(sp_tok, t) for t in texts]
  # Chat strings: with legacy=True HF reads "<s>[INST]" as Meta's chat_completion encodes it.
  chat = "<s>[INST] What is 17 plus 25? [/INST] 42 </s><s>[INST] Thanks [/INST]"
  assert hf.encode(chat, add_special_tokens=False) == sp_tok.encode_special(chat)
  assert hf.decode(sp_tok.encode("Dear user, 12 apples")) == "Dear user, 12 apples"


def _segments(text):
  """`text` split around the Llama 2 special-token strings, which are kept."""
  return [part for part in regex.split(r"(<s>|</s>|<unk>)", text) if part]


def metaspace_like(tok, text):
  """encode_special(text), minus the dummy-prefix "▁" of segments that start with a space."""
  lone_space = tok.processor.piece_to_id("▁")
  ids = []
  for part in _segments(text):
    if part in tok.special_tokens:
      ids.append(tok.special_id(part))
    else:
      part_ids = tok.encode(part)
      ids += part_ids[1:] if part[0] == " " and part_ids[0] == lone_space else part_ids
  return ids


# ----------------------------------------------------------------------------- tiktoken format


def test_llama3_special_token_list():
  names = llama3_special_tokens()
  assert len(names) == 256 and len(set(names)) == 256
  assert names[:12] == [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|reserved_special_token_2|>",
  ]
  assert names[-1] == "<|reserved_special_token_246|>"


def test_tiktoken_ids_at_real_size():
  """With 128000 base tokens the special ids are Meta's: 128000 BOS ... 128009 eot."""
  ranks = {bytes([b]): b for b in range(256)}
  for i in range(128000 - 256):
    ranks[b"\xff\xfe" + i.to_bytes(3, "big")] = 256 + i
  tok = TiktokenTokenizer.from_ranks(ranks)
  assert tok.vocab_size == 128256
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (128000, 128001, 128004)
  expected = {
    "<|start_header_id|>": 128006,
    "<|end_header_id|>": 128007,
    "<|eom_id|>": 128008,
    "<|eot_id|>": 128009,
    "<|python_tag|>": 128010,
    "<|reserved_special_token_2|>": 128011,
    "<|reserved_special_token_246|>": 128255,
  }
  assert {name: tok.special_id(name) for name in expected} == expected
  assert tok.stop_ids == {128001, 128008, 128009}


def test_tiktoken_ids_and_specials(tt_tok):
  n = tt_tok.num_base_tokens
  assert n == 500 and tt_tok.vocab_size == 756
  assert (tt_tok.bos_id, tt_tok.eos_id, tt_tok.pad_id) == (n, n + 1, n + 4)
  assert tt_tok.special_id("eot_id") == tt_tok.special_id("<|eot_id|>") == n + 9
  assert tt_tok.stop_ids == {n + 1, n + 8, n + 9}
  assert tt_tok.chat_format == "llama3"
  with pytest.raises(KeyError, match="'<|im_end|>' is not a special token"):
    tt_tok.special_id("<|im_end|>")


@pytest.mark.parametrize("text", ROUND_TRIP)
def test_tiktoken_round_trip(tt_tok, text):
  assert tt_tok.decode(tt_tok.encode(text)) == text


def test_tiktoken_plain_vs_special_encoding(tt_tok):
  text = "a<|eot_id|>b"
  assert tt_tok.special_id("eot_id") not in tt_tok.encode(text)
  assert tt_tok.encode_special(text) == (
    tt_tok.encode("a") + [tt_tok.special_id("eot_id")] + tt_tok.encode("b")
  )
  assert tt_tok.decode(tt_tok.encode_special(text)) == text
  ids = tt_tok.encode("hi", bos=True, eos=True)
  assert ids[0] == tt_tok.bos_id and ids[-1] == tt_tok.eos_id


def test_tiktoken_digits_split_in_groups_of_three(tt_tok):
  for number in ["7", "12", "123", "1234", "1234567", "12345678901"]:
    pieces = [tt_tok.decode([i]) for i in tt_tok.encode(number)]
    assert "".join(pieces) == number
    assert all(len(p) <= 3 for p in pieces), pieces
  # Even a vocabulary holding "1234" cannot produce it: the regex cuts numbers first.
  ranks = {bytes([b]): b for b in range(256)}
  for token in (b"12", b"123", b"34", b"1234"):
    ranks[token] = len(ranks)
  tok = TiktokenTokenizer.from_ranks(ranks)
  assert [tok.decode([i]) for i in tok.encode("1234")] == ["123", "4"]
  assert regex.findall(LLAMA3_PATTERN, "x 1234567") == ["x", " ", "123", "456", "7"]


def test_tiktoken_matches_tiktoken_encoding(tt_tok, reference_encoding):
  texts = ROUND_TRIP + TRAIN_LINES + synthetic_texts(300)
  assert [tt_tok.encode(t) for t in texts] == [
    reference_encoding.encode(t, disallowed_special=()) for t in texts
  ]
  assert [tt_tok.encode_special(t) for t in texts] == [
    reference_encoding.encode(t, allowed_special="all") for t in texts
  ]


def test_tiktoken_long_runs_are_cut_like_meta(tt_tok, reference_encoding):
  def meta_split(s, max_len=25_000):
    # Meta's _split_whitespaces_or_nonwhitespaces, written out as the reference.
    run, is_space, start = 0, s[0].isspace() if s else False, 0
    for i, ch in enumerate(s):
      if is_space ^ ch.isspace():
        run, is_space = 1, ch.isspace()
      else:
        run += 1
        if run > max_len:
          yield s[start:i]
          start, run = i, 1
    yield s[start:]

  text = "a" * 60_001 + " " * 30_000 + "b\n" + "\t" * 25_000 + "c"
  assert _split_for_tiktoken(text) == list(meta_split(text))
  ids = tt_tok.encode(text)
  assert tt_tok.decode(ids) == text
  assert ids == [i for p in meta_split(text) for i in reference_encoding.encode(p)]


def test_tiktoken_offsets(tt_tok):
  text = "Hé said: 1234 😀\nok"
  ids, starts = tt_tok.encode_with_offsets(text)
  assert ids == tt_tok.encode(text)
  assert starts == sorted(starts) and text.index("ok") in starts


def test_tiktoken_matches_transformers(tt_path, tt_tok, tmp_path):
  transformers = pytest.importorskip("transformers")
  from transformers.convert_slow_tokenizer import TikTokenConverter

  # What transformers.integrations.tiktoken.convert_tiktoken_to_fast runs after re-dumping
  # the ranks (that dump needs the `blobfile` package, so we convert our file directly).
  converted = TikTokenConverter(
    vocab_file=str(tt_path), pattern=LLAMA3_PATTERN, extra_special_tokens=llama3_special_tokens()
  ).converted()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=converted)
  # What a user gets from AutoTokenizer on a folder holding Meta's tiktoken tokenizer.model
  # (transformers falls back to its tiktoken reader when the SentencePiece parse fails).
  shutil.copy(tt_path, tmp_path / "tokenizer.model")
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  texts = ROUND_TRIP + TRAIN_LINES + synthetic_texts(300)
  ours = [tt_tok.encode_special(t) for t in texts]
  assert [fast.encode(t, add_special_tokens=False) for t in texts] == ours
  assert [auto.encode(t, add_special_tokens=False) for t in texts] == [
    tt_tok.encode(t) for t in texts
  ]
  assert len(fast) == tt_tok.vocab_size
  assert fast.convert_tokens_to_ids("<|eot_id|>") == tt_tok.special_id("eot_id")
  assert fast.decode(ours[6]) == texts[6]


# ----------------------------------------------------------------------------- BPE trainer, I/O


def test_train_tiktoken_ranks_is_valid_and_deterministic():
  ranks = train_tiktoken_ranks([TRAIN_TEXT], 500)
  assert len(ranks) == 500 and sorted(ranks.values()) == list(range(500))
  assert all(ranks[bytes([b])] == b for b in range(256))
  # Each merged token is the concatenation of two lower-ranked tokens.
  for token, rank in ranks.items():
    if len(token) > 1:
      assert any(
        ranks.get(token[:k], rank) < rank and ranks.get(token[k:], rank) < rank
        for k in range(1, len(token))
      ), token
  # No token crosses a pre-tokenisation boundary: each is (part of) one regex chunk.
  for token in ranks:
    text = token.decode("utf-8", errors="ignore")
    if text:
      assert len(regex.findall(LLAMA3_PATTERN, text)) == 1, token
  # Only the texts' content matters, not their order.
  shuffled = TRAIN_LINES[::-1]
  assert train_tiktoken_ranks(shuffled, 400) == train_tiktoken_ranks(TRAIN_LINES, 400)
  assert train_tiktoken_ranks(["ab ab ab"], 1000) == {
    **{bytes([b]): b for b in range(256)},
    b"ab": 256,
    b" ab": 257,
  }


def test_train_tiktoken_ranks_errors():
  with pytest.raises(ValueError, match="vocab_size=100"):
    train_tiktoken_ranks(["x"], 100)
  with pytest.raises(TypeError, match=r"texts\[1\] must be a str"):
    train_tiktoken_ranks(["x", b"y"], 300)


def test_tiktoken_file_round_trip(tmp_path):
  ranks = train_tiktoken_ranks([TRAIN_TEXT], 300)
  path = tmp_path / "t.model"
  write_tiktoken_model(ranks, path)
  assert read_tiktoken_model(path) == ranks
  assert tiktoken.load.load_tiktoken_bpe(str(path)) == ranks
  first = path.read_text().splitlines()[0]
  assert first == "AA== 0"  # base64 of the byte 0, rank 0


def test_tiktoken_file_errors(tmp_path):
  bad = tmp_path / "bad.model"
  bad.write_text("AA== 0\nnot-base64! 1\n")
  with pytest.raises(ValueError, match=r"bad.model:2: not a tiktoken rank line"):
    read_tiktoken_model(bad)
  gap = tmp_path / "gap.model"
  gap.write_text("AA== 0\nAQ== 2\n")
  with pytest.raises(ValueError, match="without gaps"):
    read_tiktoken_model(gap)
  with pytest.raises(ValueError, match="without gaps"):
    write_tiktoken_model({b"a": 0, b"b": 0}, tmp_path / "dup.model")


# ----------------------------------------------------------------------------- loading


def test_load_tokenizer_detects_format(sp_path, tt_path, tmp_path):
  assert isinstance(load_tokenizer(sp_path), SentencePieceTokenizer)
  assert isinstance(load_tokenizer(tt_path), TiktokenTokenizer)
  assert isinstance(load_tokenizer(sp_path.parent), SentencePieceTokenizer)
  (tmp_path / "original").mkdir()
  shutil.copy(tt_path, tmp_path / "original" / "tokenizer.model")
  assert isinstance(load_tokenizer(tmp_path), TiktokenTokenizer)


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="no file at"):
    load_tokenizer(tmp_path / "missing.model")
  with pytest.raises(FileNotFoundError, match="looked for tokenizer.json, tokenizer.model"):
    load_tokenizer(tmp_path)
  empty = tmp_path / "empty.model"
  empty.write_bytes(b"")
  with pytest.raises(ValueError, match="is empty"):
    load_tokenizer(empty)
  junk = tmp_path / "junk.model"
  junk.write_bytes(b"\x00\x01 not a model")
  with pytest.raises(ValueError, match="neither a SentencePiece model"):
    load_tokenizer(junk)
  # JSON goes to the tokenizer.json reader, which names what it could not parse.
  json_junk = tmp_path / "junk.json"
  json_junk.write_bytes(b'{"model": {"type": "BPE"}}')
  with pytest.raises(ValueError, match="junk.json is JSON but not a tokenizers file"):
    load_tokenizer(json_junk)


def test_bad_inputs(sp_tok, tt_tok):
  for tok in (sp_tok, tt_tok):
    with pytest.raises(TypeError, match="text must be a str, got bytes"):
      tok.encode(b"abc")
    with pytest.raises(ValueError, match=r"ids\[1\] = -1 is outside the vocabulary"):
      tok.decode([5, -1])
    assert tok.decode(np.array(tok.encode("ok"), dtype=np.int32)) == "ok"


# ----------------------------------------------------------------------------- bundled tiny ones


def test_tiny_tokenizers():
  from llama_jax.assets.tokenizers import build

  llama2, llama3 = tiny_tokenizer("llama2"), tiny_tokenizer("llama3")
  assert isinstance(llama2, SentencePieceTokenizer) and llama2.vocab_size == 512
  assert isinstance(llama3, TiktokenTokenizer) and llama3.num_base_tokens == 1024
  assert llama3.vocab_size == 1280 and llama3.bos_id == 1024
  for path in (build.LLAMA2_FILE, build.LLAMA3_FILE):
    assert path.stat().st_size < 100_000
  text = "What is 17 + 26? The answer is 43. I'm sorry, but I can't help with that."
  for tok in (llama2, llama3):
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text) / 2
  with pytest.raises(ValueError, match="kind='gpt2'"):
    tiny_tokenizer("gpt2")
  # The shipped files are exactly what build.py produces.
  assert build.LLAMA2_FILE.read_bytes() == build.build_llama2()
  assert read_tiktoken_model(build.LLAMA3_FILE) == build.build_llama3_ranks()


def test_import_pulls_in_neither_transformers_nor_torch():
  code = (
    "import sys, llama_jax.tokenizer; "
    "bad = {'transformers', 'torch'} & set(sys.modules); assert not bad, bad"
  )
  subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
