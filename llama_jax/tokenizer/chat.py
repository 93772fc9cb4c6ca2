"""Llama 2 and Llama 3 chat formats: token ids plus loss and formatting masks.

Masks are aligned with `tokens`: `loss_mask[t] = 1` means tokens[t] is a target the model
should learn to predict from tokens[:t] (shift by one when computing next-token losses).

Which tokens carry which mask:

| tokens                                        | loss_mask       | format_mask |
|-----------------------------------------------|-----------------|-------------|
| system / user text                            | 0               | 0           |
| assistant answer text                         | 1 (if selected) | 0           |
| token closing an assistant turn (`<|eot_id|>` Llama 3, `</s>` Llama 2) | 1 (if selected) | 1 |
| every other formatting token (below)          | 0               | 1           |

Formatting tokens — Llama 3: `<|begin_of_text|>`; per message `<|start_header_id|>`, the role
name, `<|end_header_id|>`, the "\n\n" after it, and `<|eot_id|>`. Llama 2: BOS `<s>` and EOS
`</s>`, and the tokens of the marker texts "[INST]", " [/INST]", " <<SYS>>\n" and
"\n<</SYS>>\n\n" (Meta's B_INST, E_INST, B_SYS, E_SYS with the separating space that precedes
them). Llama 2 encodes each turn as one string, so a token is attributed to the part of the
string (marker, prompt text, answer text) in which it starts.

So `loss_mask & ~format_mask` (or `loss_mask * (1 - format_mask)`) selects the answer text
alone, which is what the Llama 3 DPO recipe scores.

Checkpoints that ship a Jinja chat template (ChatML for SmolLM2, Meta's published Llama 3.1
template, ...) render through `template.TemplateChatFormat`, which derives the same four span
kinds from the template; `get_chat_format(None, tokenizer)` picks it whenever the tokenizer
has a template.
"""

from __future__ import annotations

import abc
import bisect
import dataclasses
import itertools
from collections.abc import Mapping, Sequence

import numpy as np

from llama_jax.tokenizer.base import Tokenizer

Message = Mapping[str, str]

ROLES = ("system", "user", "assistant")
LOSS_ON = ("all_assistant", "last_assistant")

# Span kinds: what a run of tokens is, which decides its two mask bits.
CONTEXT = "context"  # system / user text: no loss, not formatting
FORMAT = "format"  # headers, markers, BOS: no loss, formatting
ANSWER = "answer"  # assistant text: loss, not formatting
ANSWER_END = "answer_end"  # token that closes an assistant turn: loss and formatting


@dataclasses.dataclass(frozen=True)
class Span:
  """A run of token ids of one kind; `turn` is the message index of its assistant turn."""

  ids: tuple[int, ...]
  kind: str
  turn: int = -1


@dataclasses.dataclass(frozen=True)
class RenderedChat:
  """A chat as token ids with aligned masks, all int32 arrays of shape [T]."""

  tokens: np.ndarray
  loss_mask: np.ndarray
  format_mask: np.ndarray

  def __len__(self) -> int:
    return len(self.tokens)

  @property
  def content_mask(self) -> np.ndarray:
    """`loss_mask` without formatting tokens: the answer text alone (Llama 3 DPO)."""
    return self.loss_mask & ~self.format_mask


@dataclasses.dataclass(frozen=True)
class PromptResponse:
  """A prompt followed by one response, for preference data and RL.

  Attributes:
    tokens: [T] int32, the prompt (ending where the answer starts) then the response.
    response_mask: [T] int32, 1 on the response tokens, including its end-of-turn token.
    format_mask: [T] int32, 1 on formatting tokens (see the module docstring).
    prompt_len: number of prompt tokens; `tokens[:prompt_len]` is the generation prompt.
  """

  tokens: np.ndarray
  response_mask: np.ndarray
  format_mask: np.ndarray
  prompt_len: int

  def __len__(self) -> int:
    return len(self.tokens)


class ChatFormat(abc.ABC):
  """How a list of messages becomes text and token spans for one model family."""

  name: str = ""

  @abc.abstractmethod
  def render_text(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
    """The chat as one string, special tokens written as text (e.g. "<|eot_id|>", "<s>").

    `tokenizer.encode_special(render_text(...))` gives the same ids as `spans`.
    """

  @abc.abstractmethod
  def spans(
    self, tokenizer: Tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False
  ) -> list[Span]:
    """The chat as token spans, in order."""

  def __repr__(self) -> str:
    return f"{type(self).__name__}()"


@dataclasses.dataclass(frozen=True)
class _Turn:
  index: int  # position in the caller's message list
  role: str
  content: str  # stripped


def check_messages(messages: Sequence[Message], *, add_generation_prompt: bool) -> list[_Turn]:
  """Validate roles and order; return the messages with stripped content.

  Rules: an optional system message first, then user and assistant alternating, starting with
  user. With `add_generation_prompt` the last message must be from the user.
  """
  if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
    raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
  if not messages:
    raise ValueError("messages is empty; a chat needs at least one user message")
  turns = [_check_message(i, m) for i, m in enumerate(messages)]
  first = 1 if turns[0].role == "system" else 0
  if first == len(turns):
    raise ValueError("messages has only a system message; a chat needs a user message")
  for t in turns[first:]:
    expected = "user" if (t.index - first) % 2 == 0 else "assistant"
    if t.role != expected:
      where = "only allowed first" if t.role == "system" else "out of turn"
      raise ValueError(
        f"messages[{t.index}]: role {t.role!r} is {where}; expected {expected!r} "
        "(an optional system message, then user and assistant alternating, user first)"
      )
  if add_generation_prompt and turns[-1].role != "user":
    raise ValueError(
      "add_generation_prompt=True needs the last message to be from the user; "
      f"messages[{turns[-1].index}] has role {turns[-1].role!r}"
    )
  return turns


def _check_message(index: int, message: Message) -> _Turn:
  if not isinstance(message, Mapping):
    raise TypeError(
      f"messages[{index}] must be a dict with 'role' and 'content', got {type(message).__name__}"
    )
  for key in ("role", "content"):
    if key not in message:
      raise ValueError(f"messages[{index}] lacks {key!r}: {dict(message)!r:.120}")
  role, content = message["role"], message["content"]
  if role not in ROLES:
    raise ValueError(f"messages[{index}]: unknown role {role!r}; expected one of {ROLES}")
  if not isinstance(content, str):
    raise TypeError(
      f"messages[{index}] (role {role!r}): content must be a str, got {type(content).__name__}"
    )
  # Meta strips every message's content before encoding (and Hugging Face's templates trim).
  return _Turn(index, role, content.strip())


class Llama2ChatFormat(ChatFormat):
  """`<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {assistant} </s>` per turn.

  Follows Meta's `chat_completion`: each user/assistant pair is one string
  `"[INST] {user} [/INST] {assistant} "` encoded in one call, wrapped in BOS/EOS ids; the system
  prompt goes inside the first user message; a prompt for generation ends after "[/INST]".
  A chat that ends with a user message (no answer yet) renders the same as its generation
  prompt. Unlike Meta, the system prompt is stripped too (a stray newline would otherwise
  shift the <<SYS>> layout).
  """

  name = "llama2"
  B_INST, E_INST = "[INST]", "[/INST]"
  B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"

  def _turn_segments(
    self, turns: list[_Turn]
  ) -> list[tuple[list[tuple[str, str, int]], _Turn | None]]:
    """Per user turn: (text segments with kind and turn index, the assistant reply or None)."""
    system = turns[0].content if turns[0].role == "system" else None
    rest = turns[1:] if system is not None else turns
    out = []
    for k in range(0, len(rest), 2):
      user = rest[k]
      answer = rest[k + 1] if k + 1 < len(rest) else None
      segments = [(self.B_INST, FORMAT, -1)]
      if k == 0 and system is not None:
        segments += [
          (" " + self.B_SYS, FORMAT, -1),
          (system, CONTEXT, -1),
          (self.E_SYS, FORMAT, -1),
          (user.content, CONTEXT, -1),
        ]
      else:
        segments.append((" " + user.content, CONTEXT, -1))
      segments.append((" " + self.E_INST, FORMAT, -1))
      if answer is not None:
        # Meta writes a space after the answer, before EOS.
        segments.append((f" {answer.content} ", ANSWER, answer.index))
      out.append((segments, answer))
    return out

  def render_text(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
    turns = check_messages(messages, add_generation_prompt=add_generation_prompt)
    parts = []
    for segments, answer in self._turn_segments(turns):
      eos = "</s>" if answer is not None else ""
      parts.append("<s>" + "".join(text for text, _, _ in segments) + eos)
    return "".join(parts)

  def spans(
    self, tokenizer: Tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False
  ) -> list[Span]:
    turns = check_messages(messages, add_generation_prompt=add_generation_prompt)
    spans: list[Span] = []
    for segments, answer in self._turn_segments(turns):
      spans.append(Span((tokenizer.bos_id,), FORMAT))
      spans += encode_segments(tokenizer, segments)
      if answer is not None:
        spans.append(Span((tokenizer.eos_id,), ANSWER_END, answer.index))
    return spans


class Llama3ChatFormat(ChatFormat):
  """`<|begin_of_text|>` then per message
  `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>`.

  Follows Meta's `ChatFormat.encode_dialog_prompt`: header pieces and content are encoded
  separately (identical to encoding the whole string, since special tokens and "\\n\\n" are
  pre-tokenisation boundaries and content is stripped); a generation prompt ends with the
  assistant header. No default system message is added.
  """

  name = "llama3"

  def render_text(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
    turns = check_messages(messages, add_generation_prompt=add_generation_prompt)
    text = "<|begin_of_text|>"
    for t in turns:
      text += f"<|start_header_id|>{t.role}<|end_header_id|>\n\n{t.content}<|eot_id|>"
    if add_generation_prompt:
      text += "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return text

  def spans(
    self, tokenizer: Tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False
  ) -> list[Span]:
    turns = check_messages(messages, add_generation_prompt=add_generation_prompt)
    start, end, eot = (
      _required_special(tokenizer, name, self.name)
      for name in ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    )

    def header(role: str) -> Span:
      ids = (start, *tokenizer.encode(role), end, *tokenizer.encode("\n\n"))
      return Span(ids, FORMAT)

    spans = [Span((tokenizer.bos_id,), FORMAT)]
    for t in turns:
      spans.append(header(t.role))
      content = tuple(tokenizer.encode(t.content))
      if t.role == "assistant":
        spans += [Span(content, ANSWER, t.index), Span((eot,), ANSWER_END, t.index)]
      else:
        spans += [Span(content, CONTEXT), Span((eot,), FORMAT)]
    if add_generation_prompt:
      spans.append(header("assistant"))
    return spans


def _required_special(tokenizer: Tokenizer, name: str, fmt: str) -> int:
  try:
    return tokenizer.special_id(name)
  except KeyError:
    raise ValueError(
      f"chat format {fmt!r} needs the special token {name!r}, which "
      f"{type(tokenizer).__name__} does not have"
    ) from None


def encode_segments(tokenizer: Tokenizer, segments: Sequence[tuple[str, str, int]]) -> list[Span]:
  """Encode the concatenated segment texts in one call; split the ids back into spans.

  Each token goes to the segment containing its first character. Encoding in one call (not
  segment by segment) keeps the ids exactly those of the whole string.

  Args:
    segments: (text, kind, turn) triples.
  """
  ids, starts = tokenizer.encode_with_offsets("".join(s for s, _, _ in segments))
  return label_tokens(ids, starts, segments)


def label_tokens(
  ids: Sequence[int], starts: Sequence[int], segments: Sequence[tuple[str, str, int]]
) -> list[Span]:
  """Group tokens into spans by the segment holding each token's first character.

  Args:
    ids: token ids of the concatenated segment texts.
    starts: for each token, the index of its first character in that text.
    segments: (text, kind, turn) triples.
  """
  ends = np.cumsum([len(s) for s, _, _ in segments]).tolist()
  last = len(segments) - 1
  labels = [segments[min(bisect.bisect_right(ends, start), last)][1:] for start in starts]
  runs = itertools.groupby(zip(ids, labels, strict=True), key=lambda pair: pair[1])
  return [Span(tuple(t for t, _ in run), kind, turn) for (kind, turn), run in runs]


LLAMA2_CHAT = Llama2ChatFormat()
LLAMA3_CHAT = Llama3ChatFormat()
CHAT_FORMATS: dict[str, ChatFormat] = {"llama2": LLAMA2_CHAT, "llama3": LLAMA3_CHAT}
