"""Chat rendering: pick a chat format (built-in or a checkpoint's Jinja template) and render
messages to token ids with loss and formatting masks (`chat` defines the masks; `template`
derives them from a Jinja template)."""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from llama_jax.tokenizer.base import Tokenizer, check_ids
from llama_jax.tokenizer.chat import (
  ANSWER,
  ANSWER_END,
  CHAT_FORMATS,
  FORMAT,
  LOSS_ON,
  ChatFormat,
  Message,
  PromptResponse,
  RenderedChat,
)
from llama_jax.tokenizer.template import TemplateChatFormat


def get_chat_format(fmt: str | ChatFormat | None, tokenizer: Tokenizer | None = None) -> ChatFormat:
  """Resolve a chat format.

  Args:
    fmt: "llama2" / "llama3" (the built-in formats), a `ChatFormat`, or None: the tokenizer's
      own Jinja template when it has one (`tokenizer.chat_template`, Hugging Face
      checkpoints), else its `chat_format` name.
    tokenizer: consulted when `fmt` is None.
  """
  if isinstance(fmt, ChatFormat):
    return fmt
  if fmt is None and tokenizer is not None:
    if tokenizer.chat_template:
      variables = getattr(tokenizer, "template_variables", {})
      return _template_format(tokenizer.chat_template, tuple(sorted(variables.items())))
    fmt = tokenizer.chat_format
  if fmt not in CHAT_FORMATS:
    hint = " (the tokenizer has no chat template)" if fmt in ("", None) else ""
    raise ValueError(
      f"fmt={fmt!r}: unknown chat format{hint}; "
      f"expected one of {list(CHAT_FORMATS)} or a ChatFormat"
    )
  return CHAT_FORMATS[fmt]


@functools.lru_cache(maxsize=8)
def _template_format(template: str, variables: tuple[tuple[str, str], ...]) -> ChatFormat:
  # One per template: compiling costs milliseconds, and data pipelines render per example.
  return TemplateChatFormat(template, dict(variables))


def render_chat(
  tokenizer: Tokenizer,
  messages: Sequence[Message],
  *,
  fmt: str | ChatFormat | None = None,
  loss_on: str = "all_assistant",
  add_generation_prompt: bool = False,
) -> RenderedChat:
  """Render `messages` to token ids with loss and formatting masks.

  Args:
    tokenizer: any `Tokenizer`.
    messages: `{"role": "system"|"user"|"assistant", "content": str}` dicts: an optional system
      message, then user and assistant alternating, user first. Content is stripped.
    fmt: "llama2", "llama3", a `ChatFormat`, or None for the tokenizer's own format (its Jinja
      chat template if it has one; see `get_chat_format`).
    loss_on: "all_assistant" puts loss on every assistant answer, "last_assistant" only on the
      last one (with `add_generation_prompt` that is the answer still to come, so no token
      gets loss). Answers include their closing token (`<|eot_id|>` / `</s>`) so the model
      learns to stop.
    add_generation_prompt: end exactly where the assistant's answer begins (Llama 3: after the
      assistant header and "\\n\\n"; Llama 2: after "[/INST]"). Needs a final user message.

  Returns:
    A `RenderedChat` of int32 arrays; see the module docstring for which token gets which mask.
  """
  if loss_on not in LOSS_ON:
    raise ValueError(f"loss_on={loss_on!r}: expected one of {LOSS_ON}")
  chat_format = get_chat_format(fmt, tokenizer)
  spans = chat_format.spans(tokenizer, messages, add_generation_prompt=add_generation_prompt)
  # With a generation prompt the pending answer is the last assistant turn, so
  # "last_assistant" leaves the whole prompt without loss.
  answer_turns = [s.turn for s in spans if s.kind in (ANSWER, ANSWER_END)]
  last = len(messages) if add_generation_prompt else max(answer_turns, default=-1)
  tokens, loss, form = [], [], []
  for span in spans:
    scored = loss_on == "all_assistant" or span.turn == last
    has_loss = span.kind in (ANSWER, ANSWER_END) and scored
    is_format = span.kind in (FORMAT, ANSWER_END)
    tokens += span.ids
    loss += [int(has_loss)] * len(span.ids)
    form += [int(is_format)] * len(span.ids)
  as_array = lambda xs: np.asarray(xs, dtype=np.int32)
  return RenderedChat(as_array(tokens), as_array(loss), as_array(form))


def render_prompt_response(
  tokenizer: Tokenizer,
  prompt_messages: Sequence[Message],
  response: str | Sequence[int],
  *,
  fmt: str | ChatFormat | None = None,
) -> PromptResponse:
  """Render a prompt (ending with a user message) followed by one assistant response.

  Args:
    tokenizer: any `Tokenizer`.
    prompt_messages: the conversation so far; the last message must be from the user.
    response: the answer text (rendered as an assistant turn, end-of-turn token included), or
      token ids sampled after the generation prompt (appended verbatim; the response mask
      covers all of them and the format mask marks those that are stop ids).
    fmt: as in `render_chat`.

  Returns:
    A `PromptResponse` whose `tokens[:prompt_len]` equal
    `render_chat(..., add_generation_prompt=True).tokens`.
  """
  prompt = render_chat(tokenizer, prompt_messages, fmt=fmt, add_generation_prompt=True)
  n = len(prompt)
  if not isinstance(response, str):
    ids = np.asarray(check_ids(response, tokenizer.vocab_size), dtype=np.int32)
    is_stop = np.isin(ids, list(tokenizer.stop_ids)).astype(np.int32)
    return PromptResponse(
      tokens=np.concatenate([prompt.tokens, ids]),
      response_mask=np.concatenate([np.zeros(n, np.int32), np.ones(len(ids), np.int32)]),
      format_mask=np.concatenate([prompt.format_mask, is_stop]),
      prompt_len=n,
    )
  answer = {"role": "assistant", "content": response}
  full = render_chat(tokenizer, [*prompt_messages, answer], fmt=fmt, loss_on="last_assistant")
  if not np.array_equal(full.tokens[:n], prompt.tokens) or full.loss_mask[:n].any():
    # Cannot happen with Llama 2/3 tokenizers (the answer follows a pre-tokenisation
    # boundary); a custom tokenizer that merges across it would make prompt_len a lie.
    raise ValueError(
      f"render_prompt_response: the tokenizer merges the response {response[:40]!r} into the "
      "prompt's last tokens, so the prompt is not a prefix of prompt+response"
    )
  return PromptResponse(full.tokens, full.loss_mask, full.format_mask, n)
