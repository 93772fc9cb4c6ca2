"""HFTokenizer and load_tokenizer on Hugging Face directories: ids equal transformers'.

The three tokenizer.json directories (SmolLM2-135M-Instruct's, Llama 3-format, Llama 2-format)
come from conftest.py; `AutoTokenizer` on each is the oracle.
"""

import json
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import tokenizers

from llama_jax.tokenizer import (
  HFTokenizer,
  SentencePieceTokenizer,
  TiktokenTokenizer,
  load_tokenizer,
)

transformers = pytest.importorskip("transformers")

N_TEXTS = 3000


DIRS = ("smol_dir", "llama3_dir", "llama2_dir")


def mixed_texts(n, seed=0):
  """Random mixes of unicode, emoji, whitespace runs, newlines, digits, code and specials."""
  rng = random.Random(seed)
  pools = [
    "the quick brown fox jumps over a lazy dog Hello World don't I'M we'll THEY'VE".split(),
    ["café", "naïve", "Straße", "Привет", "мир", "東京", "日本語", "مرحبا", "हिन्दी", "Ærø", "ﬁ"],
    ["😀", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🤖🤖", "∑", "√2", "°C", "€5"],
    [" ", "  ", "   ", "\t", "\n", "\n\n", "\n\n\n", "\r\n", " \n ", "\u00a0", "\u3000", "\u200b"],
    ["0", "7", "42", "1234567", "3.14159", "1,000,000", "2024-06-01", "0x1F", "1e-9", "007"],
    [
      "def f(x):\n    return x**2",
      "{'a': [1, 2]}",
      "if (a && b) { x++; }",
      '<div class="x">',
      "SELECT * FROM t;",
      "a_b = c-d / e",
      "#include <stdio.h>",
    ],
    [
      "<|im_start|>",
      "<|im_end|>",
      "<|endoftext|>",
      "<file_sep>",
      "<s>",
      "</s>",
      "<unk>",
      "<|eot_id|>",
      "<|begin_of_text|>",
      "<|reserved_special_token_5|>",
      "[INST]",
      "<<SYS>>",
      "<|im_end",
    ],
    ["...", "!!", "?!", "—", "«»", "''", '"', "(", ")", "-", "*"],
  ]
  out = []
  for _ in range(n):
    parts = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(1, 14))]
    glue = rng.choice(["", " ", "", "\n"])
    out.append(glue.join(parts))
  return out


TEXTS = ["", " ", "\n", "  leading", "trailing  ", "Hello world"] + mixed_texts(N_TEXTS)


def mismatches(ours, theirs):
  return [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if list(a) != list(b)]


@pytest.mark.parametrize("name", DIRS)
def test_ids_equal_transformers(name, request):
  path = request.getfixturevalue(name)
  tok = HFTokenizer.from_dir(path)
  auto = transformers.AutoTokenizer.from_pretrained(str(path))
  plain = auto(TEXTS, add_special_tokens=False, split_special_tokens=True)["input_ids"]
  special = auto(TEXTS, add_special_tokens=False)["input_ids"]
  default = auto(TEXTS, split_special_tokens=True)["input_ids"]
  assert mismatches([tok.encode(t) for t in TEXTS], plain) == []
  assert mismatches([tok.encode_special(t) for t in TEXTS], special) == []
  # BOS exactly when transformers' own add_special_tokens=True adds it.
  assert mismatches([tok.encode(t, bos=tok.add_bos) for t in TEXTS], default) == []
  assert [tok.decode(ids) for ids in special] == auto.batch_decode(special)
  assert len(auto) == tok.vocab_size


@pytest.mark.parametrize("name", DIRS)
def test_plain_encode_never_emits_special_ids(name, request):
  tok = HFTokenizer.from_dir(request.getfixturevalue(name))
  specials = set(tok.special_tokens.values())
  for text in TEXTS[:500] + list(tok.special_tokens):
    ids, starts = tok.encode_with_offsets(text)
    assert not specials & set(ids), text
    assert ids == tok.encode(text) and starts == sorted(starts)
    # Byte-level BPE round-trips exactly; SentencePiece's decoder drops the leading space.
    assert tok.decode(ids) == text or name == "llama2_dir"
  # An ordinary round trip of each special string through encode_special is one id.
  for name_, i in tok.special_tokens.items():
    assert tok.encode_special(name_) == [i]


def test_smollm2_attributes(smol_dir):
  tok = HFTokenizer.from_dir(smol_dir)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
  # SmolLM2's own pad token is <|im_end|>: kept, although it is also the stop id.
  assert tok.pad_id == 2 and tok.stop_ids == frozenset({2})
  assert tok.special_id("<|im_start|>") == 1 and len(tok.special_tokens) == 17
  assert tok.chat_template.startswith("{% for message in messages %}")
  assert tok.template_variables["bos_token"] == "<|im_start|>"
  assert tok.encode("Hello", bos=True, eos=True) == [1, *tok.encode("Hello"), 2]
  assert "add_bos=False" in repr(tok)


def test_llama3_attributes(llama3_dir):
  tok = HFTokenizer.from_dir(llama3_dir)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (1280, 1024, 1033, True)
  # No pad_token: Llama 3's <|finetune_right_pad_id|>, as TiktokenTokenizer uses.
  assert tok.pad_id == 1028
  assert tok.stop_ids == frozenset({1025, 1032, 1033})  # end_of_text, eom, eot
  tiny = load_tokenizer(Path(__file__).parents[2] / "llama_jax/assets/tokenizers/tiny_llama3.model")
  assert tok.special_tokens == tiny.special_tokens and tok.pad_id == tiny.pad_id
  text = "What is 17 + 26? The answer is 43. <|eot_id|> 😀"
  assert tok.encode(text) == tiny.encode(text)
  assert tok.encode_special(text) == tiny.encode_special(text)


def test_llama2_attributes(llama2_dir):
  tok = HFTokenizer.from_dir(llama2_dir)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (512, 1, 2, True)
  assert tok.pad_id == 0 and tok.stop_ids == frozenset({2})  # <unk>, as SentencePieceTokenizer


def test_llama2_legacy_flag(llama2_dir, tmp_path):
  """legacy=True: every piece between special tokens gets the "▁" prefix, as in Meta's code."""
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(llama2_dir / name, tmp_path / name)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "legacy": True}))
  tok = HFTokenizer.from_dir(tmp_path)
  auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  texts = TEXTS[:1000]
  assert (
    mismatches(
      [tok.encode_special(t) for t in texts], auto(texts, add_special_tokens=False)["input_ids"]
    )
    == []
  )
  chat = "<s>[INST] What is 17 plus 25? [/INST] 42 </s><s>[INST] Thanks [/INST]"
  meta = SentencePieceTokenizer(
    Path(__file__).parents[2] / "llama_jax/assets/tokenizers/tiny_llama2.model"
  )
  assert tok.encode_special(chat) == meta.encode_special(chat)
  assert HFTokenizer.from_dir(llama2_dir).encode_special(chat) != meta.encode_special(chat)


def test_from_dir_reads_every_file(smol_dir, tmp_path):
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(smol_dir / name, tmp_path / name)
  config = json.loads((tmp_path / "tokenizer_config.json").read_text())
  # Older transformers: the template inside the config, tokens as AddedToken dicts, no pad.
  config["chat_template"] = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
  config["bos_token"] = {"content": "<|endoftext|>", "special": True}
  del config["pad_token"]
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
  tok = HFTokenizer.from_dir(tmp_path)
  assert tok.chat_template == config["chat_template"]
  assert tok.bos_id == 0 and tok.stop_ids == frozenset({0, 2})
  assert tok.pad_id not in tok.stop_ids | {tok.bos_id}  # first other special: <|im_start|>
  assert tok.pad_id == 1
  # chat_template.jinja wins over the config's template.
  (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
  assert HFTokenizer.from_dir(tmp_path).chat_template == "{{ messages[0]['content'] }}"
  # A named-template list: transformers uses "default".
  config["chat_template"] = [
    {"name": "tool_use", "template": "x"},
    {"name": "default", "template": "y"},
  ]
  (tmp_path / "chat_template.jinja").unlink()
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
  assert HFTokenizer.from_dir(tmp_path).chat_template == "y"


def test_pickle_keeps_plain_text_encoding(smol_dir):
  """Data pipelines pickle the tokenizer into worker processes."""
  tok = HFTokenizer.from_dir(smol_dir)
  copy = pickle.loads(pickle.dumps(tok))
  text = "a <|im_end|> b"
  assert copy.encode(text) == tok.encode(text) != copy.encode_special(text)
  assert copy.encode_special(text) == tok.encode_special(text)
  assert (copy.chat_template, copy.stop_ids, copy.pad_id) == (tok.chat_template, {2}, 2)


def test_constructor(smol_dir):
  backend = tokenizers.Tokenizer.from_file(str(smol_dir / "tokenizer.json"))
  tok = HFTokenizer(backend, eos_token="<|im_end|>", stop_tokens=["<|endoftext|>"])
  assert tok.stop_ids == frozenset({0, 2}) and tok.add_bos is False and tok.chat_template is None
  assert tok.pad_id not in tok.stop_ids
  with pytest.raises(ValueError, match="defines no bos_token"):
    tok.encode("x", bos=True)
  assert "bos_id=None" in repr(tok)
  with pytest.raises(ValueError, match="bos_token '<nope>' is not in the vocabulary"):
    HFTokenizer(backend, bos_token="<nope>")
  with pytest.raises(TypeError, match="tokenizers.Tokenizer"):
    HFTokenizer(str(smol_dir))
  # The caller's backend is left as it was.
  assert backend.encode_special_tokens is False and backend.post_processor is not None
  with pytest.raises(TypeError, match="text must be a str"):
    tok.encode(b"x")
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([49152])
  assert tok.decode(np.array(tok.encode("ok"), np.int32)) == "ok"


# ----------------------------------------------------------------------------- load_tokenizer


def test_load_tokenizer_hf_layouts(smol_dir, tmp_path):
  from llama_jax.assets.tokenizers import build

  assert isinstance(load_tokenizer(smol_dir), HFTokenizer)
  tok = load_tokenizer(smol_dir / "tokenizer.json")
  assert isinstance(tok, HFTokenizer) and tok.chat_template is not None and tok.eos_id == 2
  # tokenizer.json is preferred over Meta's files in the same checkpoint.
  shutil.copy(smol_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  (tmp_path / "original").mkdir()
  shutil.copy(build.LLAMA3_FILE, tmp_path / "original" / "tokenizer.model")
  shutil.copy(build.LLAMA2_FILE, tmp_path / "tokenizer.model")
  assert isinstance(load_tokenizer(tmp_path), HFTokenizer)
  (tmp_path / "tokenizer.json").unlink()
  assert isinstance(load_tokenizer(tmp_path), SentencePieceTokenizer)
  (tmp_path / "tokenizer.model").unlink()
  assert isinstance(load_tokenizer(tmp_path), TiktokenTokenizer)
  # A tokenizer.json under another name: the vocabulary alone.
  shutil.copy(smol_dir / "tokenizer.json", tmp_path / "smol.json")
  bare = load_tokenizer(tmp_path / "smol.json")
  assert bare.encode("Hello") == tok.encode("Hello") and bare.chat_template is None


def test_load_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="looked for tokenizer.json, tokenizer.model"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE"')
  with pytest.raises(ValueError, match="cannot parse .*tokenizer.json"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer.json").write_text("[]")
  with pytest.raises(ValueError, match="cannot parse"):
    load_tokenizer(tmp_path / "tokenizer.json")
  other = tmp_path / "vocab.json"
  other.write_text('{"a": 1}')
  with pytest.raises(ValueError, match="vocab.json is JSON but not a tokenizers file"):
    load_tokenizer(other)
  with pytest.raises(FileNotFoundError, match="no tokenizer.json in"):
    HFTokenizer.from_dir(tmp_path / "nowhere")
  gguf = tmp_path / "model.gguf"
  gguf.write_bytes(b"GGUF\x03\x00\x00\x00")
  with pytest.raises(ValueError, match="GGUF checkpoint; .*load_gguf_tokenizer"):
    load_tokenizer(gguf)


def test_load_tokenizer_bad_config(smol_dir, tmp_path):
  shutil.copy(smol_dir / "tokenizer.json", tmp_path / "tokenizer.json")
  (tmp_path / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer_config.json is not valid JSON"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|nope|>"}))
  with pytest.raises(ValueError, match=re.escape("eos_token '<|nope|>' is not in the vocabulary")):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": 5}))
  with pytest.raises(ValueError, match="eos_token must be a string"):
    load_tokenizer(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text("{}")
  (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 10**6}))
  with pytest.raises(ValueError, match="eos_token_id 1000000 is not in the vocabulary"):
    load_tokenizer(tmp_path)
