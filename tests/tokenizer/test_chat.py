"""Llama 2 / Llama 3 chat rendering: exact strings and ids, masks token by token, errors.

Oracles: the strings of RECIPES.md, Meta's chat_completion / ChatFormat rewritten here on top
of `sentencepiece` and `tiktoken` directly, and Hugging Face's published chat templates.
"""

import numpy as np
import pytest
import sentencepiece as spm
import tiktoken
import tiktoken.load

from llama_jax.tokenizer import (
  LLAMA2_CHAT,
  LLAMA3_CHAT,
  LLAMA3_PATTERN,
  get_chat_format,
  render_chat,
  render_prompt_response,
  tiny_tokenizer,
)
from llama_jax.tokenizer.loading import TINY_TOKENIZERS

SYSTEM = "You are a careful assistant. Answer briefly."
CHAT = [
  {"role": "system", "content": SYSTEM},
  {"role": "user", "content": "What is 17 plus 25?"},
  {"role": "assistant", "content": "17 plus 25 is 42."},
  {"role": "user", "content": "And the capital of France?"},
  {"role": "assistant", "content": "Paris."},
]
NO_SYSTEM = CHAT[1:]

# Hugging Face's published templates (tokenizer_config.json of meta-llama/Llama-2-7b-chat-hf
# and meta-llama/Meta-Llama-3-8B-Instruct).
HF_LLAMA2_TEMPLATE = (
  "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
  "{% set system_message = messages[0]['content'] %}{% else %}"
  "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
  "{% for message in loop_messages %}"
  "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
  "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
  "{% endif %}"
  "{% if loop.index0 == 0 and system_message != false %}"
  "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
  "{% else %}{% set content = message['content'] %}{% endif %}"
  "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
  "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
  "{% endif %}{% endfor %}"
)
HF_LLAMA3_TEMPLATE = (
  "{% set loop_messages = messages %}{% for message in loop_messages %}"
  "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
  "+ message['content'] | trim + '<|eot_id|>' %}"
  "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
  "{{ content }}{% endfor %}"
  "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
  "{% endif %}"
)


@pytest.fixture(scope="module")
def llama2():
  return tiny_tokenizer("llama2")


@pytest.fixture(scope="module")
def llama3():
  return tiny_tokenizer("llama3")


def tiny_path(kind):
  from llama_jax.assets.tokenizers import build

  return build.HERE / TINY_TOKENIZERS[kind]


# ----------------------------------------------------------------------------- reference code


B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def meta_llama2_tokens(sp: spm.SentencePieceProcessor, dialog):
  """Meta's Llama 2 `chat_completion` prompt building, on sentencepiece directly."""
  if dialog[0]["role"] == "system":
    first = {"role": "user", "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
    dialog = [first] + dialog[2:]
  tokens = []
  for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):
    text = f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} "
    tokens += sp.encode(text, add_bos=True, add_eos=True)
  if len(dialog) % 2:
    tokens += sp.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", add_bos=True)
  return tokens


def meta_llama3_tokens(path, dialog, add_generation_prompt):
  """Meta's Llama 3 `ChatFormat.encode_dialog_prompt`, on tiktoken directly."""
  ranks = tiktoken.load.load_tiktoken_bpe(str(path))
  names = [
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
  ]
  special = {name: len(ranks) + i for i, name in enumerate(names)}
  enc = tiktoken.Encoding(
    "ref", pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens=special
  )

  def header(role):
    return [
      special["<|start_header_id|>"],
      *enc.encode(role),
      special["<|end_header_id|>"],
      *enc.encode("\n\n"),
    ]

  tokens = [special["<|begin_of_text|>"]]
  for message in dialog:
    tokens += header(message["role"]) + enc.encode(message["content"].strip())
    tokens.append(special["<|eot_id|>"])
  return tokens + (header("assistant") if add_generation_prompt else [])


def prefix_masks(tok, turn_segments):
  """Masks of one Llama 2 turn computed from prefix encodings, independent of offsets.

  turn_segments: (text, loss, fmt) triples making up "[INST] ... [/INST] answer ".
  """
  tokens, loss, fmt, text = [], [], [], ""
  for segment, seg_loss, seg_fmt in turn_segments:
    text += segment
    ids = tok.encode(text)
    assert ids[: len(tokens)] == tokens, "prefix property broken; pick other test strings"
    n_new = len(ids) - len(tokens)
    tokens, loss, fmt = ids, loss + [seg_loss] * n_new, fmt + [seg_fmt] * n_new
  return tokens, loss, fmt


# ----------------------------------------------------------------------------- Llama 3


def test_llama3_exact_string_and_ids(llama3):
  expected = (
    "<|begin_of_text|>"
    f"<|start_header_id|>system<|end_header_id|>\n\n{SYSTEM}<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nWhat is 17 plus 25?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n17 plus 25 is 42.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nAnd the capital of France?<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nParis.<|eot_id|>"
  )
  assert LLAMA3_CHAT.render_text(CHAT) == expected
  chat = render_chat(llama3, CHAT, fmt="llama3")
  assert chat.tokens.tolist() == llama3.encode_special(expected)
  assert llama3.decode(chat.tokens) == expected
  assert chat.tokens.tolist() == meta_llama3_tokens(tiny_path("llama3"), CHAT, False)
  for name in ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"):
    assert name not in llama3.decode([t for t in chat.tokens if t < llama3.num_base_tokens])


def test_llama3_generation_prompt(llama3):
  prompt = render_chat(llama3, NO_SYSTEM[:3], add_generation_prompt=True)
  assert llama3.decode(prompt.tokens).endswith(
    "And the capital of France?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
  )
  assert prompt.tokens.tolist() == meta_llama3_tokens(tiny_path("llama3"), NO_SYSTEM[:3], True)
  # The earlier answer keeps its loss unless only the (pending) last answer is scored.
  assert llama3.decode(prompt.tokens[prompt.loss_mask == 1]) == "17 plus 25 is 42.<|eot_id|>"
  last = render_chat(llama3, NO_SYSTEM[:3], add_generation_prompt=True, loss_on="last_assistant")
  assert not last.loss_mask.any()
  full = render_chat(llama3, NO_SYSTEM)
  np.testing.assert_array_equal(full.tokens[: len(prompt)], prompt.tokens)
  np.testing.assert_array_equal(full.format_mask[: len(prompt)], prompt.format_mask)


def test_llama3_masks_token_by_token(llama3):
  s = llama3.special_id
  bot, start, end, eot = (
    s(n) for n in ("begin_of_text", "start_header_id", "end_header_id", "eot_id")
  )
  nl = llama3.encode("\n\n")
  user, answer = llama3.encode("What is 2+2?"), llama3.encode("2+2 is 4.")
  # (ids, loss, format) per piece, written out by hand.
  pieces = [
    ([bot], 0, 1),
    ([start, *llama3.encode("user"), end, *nl], 0, 1),
    (user, 0, 0),
    ([eot], 0, 1),
    ([start, *llama3.encode("assistant"), end, *nl], 0, 1),
    (answer, 1, 0),
    ([eot], 1, 1),
  ]
  chat = render_chat(
    llama3,
    [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "2+2 is 4."}],
  )
  assert chat.tokens.tolist() == [t for ids, _, _ in pieces for t in ids]
  assert chat.loss_mask.tolist() == [m for ids, m, _ in pieces for _ in ids]
  assert chat.format_mask.tolist() == [f for ids, _, f in pieces for _ in ids]
  assert chat.tokens.dtype == chat.loss_mask.dtype == chat.format_mask.dtype == np.int32
  # DPO scores loss & ~format: the answer text alone.
  assert llama3.decode(chat.tokens[chat.content_mask == 1]) == "2+2 is 4."
  assert (chat.loss_mask & ~chat.format_mask).tolist() == chat.content_mask.tolist()


def test_llama3_loss_on(llama3):
  every = render_chat(llama3, CHAT, loss_on="all_assistant")
  last = render_chat(llama3, CHAT, loss_on="last_assistant")
  eot = llama3.special_id("eot_id")
  assert llama3.decode(every.tokens[every.loss_mask == 1]) == (
    "17 plus 25 is 42.<|eot_id|>Paris.<|eot_id|>"
  )
  assert llama3.decode(last.tokens[last.loss_mask == 1]) == "Paris.<|eot_id|>"
  np.testing.assert_array_equal(every.format_mask, last.format_mask)
  # Every <|eot_id|> is formatting; those closing a scored answer carry loss too.
  assert every.format_mask[every.tokens == eot].all()
  assert every.loss_mask[every.tokens == eot].tolist() == [0, 0, 1, 0, 1]


def test_llama3_matches_hf_chat_template(llama3):
  transformers = pytest.importorskip("transformers")
  from transformers.convert_slow_tokenizer import TikTokenConverter

  converted = TikTokenConverter(
    vocab_file=str(tiny_path("llama3")),
    extra_special_tokens=list(llama3.special_tokens),
  ).converted()
  hf = transformers.PreTrainedTokenizerFast(
    tokenizer_object=converted, bos_token="<|begin_of_text|>", chat_template=HF_LLAMA3_TEMPLATE
  )
  for messages, gen in ((CHAT, False), (NO_SYSTEM[:3], True), (NO_SYSTEM[:1], False)):
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert text == LLAMA3_CHAT.render_text(messages, add_generation_prompt=gen)
    ours = render_chat(llama3, messages, add_generation_prompt=gen).tokens.tolist()
    assert hf.encode(text, add_special_tokens=False) == ours


def test_special_strings_in_content_stay_text(llama3, llama2):
  messages = [{"role": "user", "content": "Say <|eot_id|> and </s> please"}]
  chat3 = render_chat(llama3, messages)
  assert chat3.tokens.tolist().count(llama3.special_id("eot_id")) == 1
  chat2 = render_chat(llama2, messages)
  assert chat2.tokens.tolist().count(llama2.eos_id) == 0


# ----------------------------------------------------------------------------- Llama 2


def test_llama2_exact_string_and_ids(llama2):
  expected = (
    f"<s>[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\nWhat is 17 plus 25? [/INST] 17 plus 25 is 42. </s>"
    "<s>[INST] And the capital of France? [/INST] Paris. </s>"
  )
  assert LLAMA2_CHAT.render_text(CHAT) == expected
  chat = render_chat(llama2, CHAT, fmt="llama2")
  sp = spm.SentencePieceProcessor(model_file=str(tiny_path("llama2")))
  assert chat.tokens.tolist() == meta_llama2_tokens(sp, CHAT)
  assert chat.tokens.tolist() == llama2.encode_special(expected)
  # BOS/EOS are ids 1 and 2, never the text "<s>"; each turn decodes to its text.
  tokens = chat.tokens.tolist()
  assert [i for i, t in enumerate(tokens) if t in (1, 2)] == [
    0,
    tokens.index(2),
    tokens.index(2) + 1,
    len(tokens) - 1,
  ]
  turn1, turn2 = tokens[1 : tokens.index(2)], tokens[tokens.index(2) + 2 : -1]
  assert llama2.decode(turn1) == (
    f"[INST] <<SYS>>\n{SYSTEM}\n<</SYS>>\n\nWhat is 17 plus 25? [/INST] 17 plus 25 is 42. "
  )
  assert llama2.decode(turn2) == "[INST] And the capital of France? [/INST] Paris. "


def test_llama2_without_system_and_generation_prompt(llama2):
  sp = spm.SentencePieceProcessor(model_file=str(tiny_path("llama2")))
  chat = render_chat(llama2, NO_SYSTEM)
  assert chat.tokens.tolist() == meta_llama2_tokens(sp, NO_SYSTEM)
  assert LLAMA2_CHAT.render_text(NO_SYSTEM).startswith("<s>[INST] What is 17 plus 25? [/INST]")
  prompt = render_chat(llama2, NO_SYSTEM[:3], add_generation_prompt=True)
  assert prompt.tokens.tolist() == meta_llama2_tokens(sp, NO_SYSTEM[:3])
  last_turn = prompt.tokens.tolist()[prompt.tokens.tolist().index(2) + 2 :]
  assert llama2.decode(last_turn) == "[INST] And the capital of France? [/INST]"
  np.testing.assert_array_equal(chat.tokens[: len(prompt)], prompt.tokens)
  np.testing.assert_array_equal(chat.loss_mask[: len(prompt)], prompt.loss_mask)
  # Llama 2 has no assistant header: a chat ending with a user turn is the same prompt.
  same = render_chat(llama2, NO_SYSTEM[:3])
  np.testing.assert_array_equal(same.tokens, prompt.tokens)


def test_llama2_masks_token_by_token(llama2):
  turn1 = [
    (B_INST, 0, 1),
    (" " + B_SYS, 0, 1),
    (SYSTEM, 0, 0),
    (E_SYS, 0, 1),
    ("What is 17 plus 25?", 0, 0),
    (" " + E_INST, 0, 1),
    (" 17 plus 25 is 42. ", 0, 0),  # an earlier answer: no loss with last_assistant
  ]
  turn2 = [
    (B_INST, 0, 1),
    (" And the capital of France?", 0, 0),
    (" " + E_INST, 0, 1),
    (" Paris. ", 1, 0),
  ]
  tokens, loss, fmt = [], [], []
  for segments, eos_loss in ((turn1, 0), (turn2, 1)):
    ids, turn_loss, turn_fmt = prefix_masks(llama2, segments)
    tokens += [1, *ids, 2]
    loss += [0, *turn_loss, eos_loss]
    fmt += [1, *turn_fmt, 1]
  chat = render_chat(llama2, CHAT, loss_on="last_assistant")
  assert chat.tokens.tolist() == tokens
  assert chat.loss_mask.tolist() == loss
  assert chat.format_mask.tolist() == fmt
  assert llama2.decode(chat.tokens[chat.content_mask == 1]) == "Paris. "
  every = render_chat(llama2, CHAT)
  assert llama2.decode(every.tokens[every.content_mask == 1]) == "17 plus 25 is 42.  Paris. "
  assert every.loss_mask[every.tokens == 2].tolist() == [1, 1]


def test_llama2_matches_hf_chat_template(llama2, tmp_path):
  transformers = pytest.importorskip("transformers")
  (tmp_path / "tokenizer.model").write_bytes(tiny_path("llama2").read_bytes())
  hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), legacy=True)
  hf.chat_template = HF_LLAMA2_TEMPLATE
  for messages in (CHAT, NO_SYSTEM, NO_SYSTEM[:3]):
    text = hf.apply_chat_template(messages, tokenize=False)
    assert text == LLAMA2_CHAT.render_text(messages)
    ours = render_chat(llama2, messages).tokens.tolist()
    assert hf.encode(text, add_special_tokens=False) == ours


# ----------------------------------------------------------------------------- prompt + response


@pytest.mark.parametrize("kind", ["llama2", "llama3"])
def test_render_prompt_response(kind, request):
  tok = request.getfixturevalue(kind)
  prompt_messages = CHAT[:4]
  pair = render_prompt_response(tok, prompt_messages, "  Paris. ")
  prompt = render_chat(tok, prompt_messages, add_generation_prompt=True)
  full = render_chat(tok, CHAT, loss_on="last_assistant")
  assert pair.prompt_len == len(prompt)
  np.testing.assert_array_equal(pair.tokens, full.tokens)
  np.testing.assert_array_equal(pair.response_mask, full.loss_mask)
  np.testing.assert_array_equal(pair.format_mask, full.format_mask)
  assert not pair.response_mask[: pair.prompt_len].any()
  assert pair.response_mask[pair.prompt_len :].all()
  assert pair.tokens[-1] in tok.stop_ids and pair.format_mask[-1] == 1
  # Sampled ids are appended verbatim.
  sampled = tok.encode(" Paris.") + [min(tok.stop_ids)]
  from_ids = render_prompt_response(tok, prompt_messages, sampled)
  assert from_ids.tokens.tolist() == prompt.tokens.tolist() + sampled
  assert from_ids.response_mask.tolist() == [0] * len(prompt) + [1] * len(sampled)
  assert from_ids.format_mask[-1] == 1 and not from_ids.format_mask[len(prompt) : -1].any()


def test_content_is_stripped(llama2, llama3):
  clean = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
  messy = [{"role": "user", "content": "  hi\n"}, {"role": "assistant", "content": "\thello  "}]
  for tok in (llama2, llama3):
    np.testing.assert_array_equal(render_chat(tok, messy).tokens, render_chat(tok, clean).tokens)


def test_format_resolution(llama2, llama3):
  assert get_chat_format(None, llama2) is LLAMA2_CHAT
  assert get_chat_format(None, llama3) is LLAMA3_CHAT
  assert get_chat_format(LLAMA3_CHAT) is LLAMA3_CHAT
  np.testing.assert_array_equal(
    render_chat(llama2, NO_SYSTEM).tokens, render_chat(llama2, NO_SYSTEM, fmt=LLAMA2_CHAT).tokens
  )


# ----------------------------------------------------------------------------- errors

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}
S = {"role": "system", "content": "be nice"}


@pytest.mark.parametrize(
  "messages, kwargs, error, pattern",
  [
    ([], {}, ValueError, "messages is empty"),
    ("hi", {}, TypeError, "messages must be a list of dicts, got str"),
    ([S], {}, ValueError, "only a system message"),
    ([A, U], {}, ValueError, r"messages\[0\]: role 'assistant' is out of turn; expected 'user'"),
    ([U, U], {}, ValueError, r"messages\[1\]: role 'user' is out of turn; expected 'assistant'"),
    ([U, S], {}, ValueError, r"messages\[1\]: role 'system' is only allowed first"),
    ([S, A], {}, ValueError, r"messages\[1\]: role 'assistant' is out of turn"),
    ([U, {"role": "tool", "content": "x"}], {}, ValueError, r"messages\[1\]: unknown role 'tool'"),
    ([U, {"role": "assistant"}], {}, ValueError, r"messages\[1\] lacks 'content'"),
    ([{"role": "user", "content": 3}], {}, TypeError, r"messages\[0\] \(role 'user'\): content"),
    ([U, "hello"], {}, TypeError, r"messages\[1\] must be a dict"),
    (
      [U, A],
      {"add_generation_prompt": True},
      ValueError,
      r"add_generation_prompt=True needs the last message to be from the user; messages\[1\]",
    ),
    ([U, A], {"loss_on": "everything"}, ValueError, "loss_on='everything'"),
    ([U, A], {"fmt": "chatml"}, ValueError, "fmt='chatml': unknown chat format"),
  ],
)
def test_render_errors(llama3, llama2, messages, kwargs, error, pattern):
  for tok in (llama3, llama2):
    with pytest.raises(error, match=pattern):
      render_chat(tok, messages, **kwargs)


def test_llama3_format_needs_llama3_specials(llama2):
  with pytest.raises(ValueError, match="needs the special token '<|start_header_id|>'"):
    render_chat(llama2, [U], fmt="llama3")


def test_prompt_response_errors(llama3):
  with pytest.raises(ValueError, match="last message to be from the user"):
    render_prompt_response(llama3, [U, A], "more")
  with pytest.raises(ValueError, match="outside the vocabulary"):
    render_prompt_response(llama3, [U], [llama3.vocab_size])
