"""Chat formats from a checkpoint's Jinja chat template, with the masks of `chat.py`.

    fmt = TemplateChatFormat(tokenizer.chat_template, tokenizer.template_variables)
    fmt.render_text(messages)            # == transformers' apply_chat_template(..., tokenize=False)
    render_chat(tokenizer, messages)     # uses it when the tokenizer has a template

Rendering follows transformers' `apply_chat_template`: a sandboxed Jinja environment with
trim_blocks and lstrip_blocks, the globals `raise_exception`, `strftime_now`, `dict` and
`namespace`, a `tojson` that does not escape HTML, and the variables `messages`, `tools`,
`documents`, `add_generation_prompt` and the special tokens (`bos_token`, `eos_token`, ...).

Masks come from a second rendering in which each message's content is a unique sentinel:
the text around the sentinels is the template's own. Template text is FORMAT; system, user
and tool content is CONTEXT; assistant content is ANSWER, and so is the template text between
the end of the generation prompt and the answer (Llama 2's " " after "[/INST]"), since the
model writes it. The template text right after an assistant content, up to and including its
end-of-turn special token (the earliest stop token, else the earliest special token), is
ANSWER_END; the rest of that text is FORMAT. The real rendering is then cut at the same
places: templates that `trim` or `strip` content are handled, a template that transforms
content otherwise (or renders it twice) is refused with a ValueError. A token goes to the
segment of its first character, except that a token reaching into a content (the "▁Paris" of
"[INST] " + "Paris") belongs to that content.

Token ids: with no special-token string inside any content, the whole text is encoded in one
`encode_special_with_offsets` call — exactly transformers' `apply_chat_template(...,
tokenize=True)`. Special-token strings typed in content stay plain text (transformers would
turn them into control tokens); such a chat is encoded run by run between the template's own
special tokens.
"""

from __future__ import annotations

import bisect
import datetime
import functools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from llama_jax.tokenizer.base import Tokenizer, encode_runs, find_specials
from llama_jax.tokenizer.chat import (
  ANSWER,
  ANSWER_END,
  CONTEXT,
  FORMAT,
  ChatFormat,
  Message,
  Span,
  label_tokens,
)

# Private-use code points: never produced by a template, untouched by trim/strip.
_SENTINEL = "\ue000{}\ue001"
_SENTINEL_RE = re.compile("\ue000([0-9]+)\ue001")
Segment = tuple[str, str, int]  # (text, kind, message index or -1)


class TemplateChatFormat(ChatFormat):
  """A chat format defined by a Hugging Face Jinja chat template.

  Args:
    template: the Jinja source (`tokenizer.chat_template`).
    variables: special-token strings the template reads (`bos_token`, `eos_token`, ...);
      `HFTokenizer.template_variables` gives the checkpoint's.
    name: shown in errors and repr.
  """

  def __init__(
    self, template: str, variables: Mapping[str, str] | None = None, *, name: str = "template"
  ) -> None:
    if not isinstance(template, str) or not template:
      raise ValueError(
        f"TemplateChatFormat: template must be a non-empty str, got {template!r:.60}"
      )
    self.template = template
    self.variables = dict(variables or {})
    self.name = name
    self._compiled = compile_template(template)

  def __repr__(self) -> str:
    return f"TemplateChatFormat(name={self.name!r}, template={self.template[:40]!r}...)"

  def _render(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    # The same variables transformers passes: tools and documents explicitly None, so that
    # templates testing `tools is defined` take the same branch.
    return self._compiled.render(
      messages=messages,
      tools=None,
      documents=None,
      add_generation_prompt=add_generation_prompt,
      **self.variables,
    )

  def render_text(self, messages: Sequence[Message], *, add_generation_prompt: bool = False) -> str:
    return self._render(check_template_messages(messages), add_generation_prompt)

  def segments(
    self,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool = False,
    stop_tokens: Sequence[str] = (),
    special_tokens: Sequence[str] = (),
  ) -> list[Segment]:
    """The rendered chat cut into (text, kind, message index) segments, in order.

    Args:
      stop_tokens: special-token strings that end a turn; the earliest one in the template
        text after an assistant content closes that content's ANSWER_END.
      special_tokens: the other special-token strings; used the same way when the text after
        an assistant content holds no stop token.
    """
    plain = check_template_messages(messages)
    text = self._render(plain, add_generation_prompt)
    marked = [{**m, "content": _SENTINEL.format(i)} for i, m in enumerate(plain)]
    pieces = _SENTINEL_RE.split(self._render(marked, add_generation_prompt))
    between, order = pieces[0::2], [int(i) for i in pieces[1::2]]
    if len(set(order)) != len(order):
      raise ValueError(
        f"chat template {self.name!r} renders a message's content more than once; "
        "cannot tell which tokens belong to it"
      )
    contents = _locate(text, between, [plain[i]["content"] for i in order], self.name)
    out: list[Segment] = [(between[0], FORMAT, -1)]
    position = len(between[0])
    for index, content, after in zip(order, contents, between[1:], strict=True):
      if plain[index]["role"] == "assistant":
        prompt_end = self._prompt_end(plain[:index], text)
        out[-1:] = _split_preamble(out[-1], position, prompt_end, index)
        out.append((content, ANSWER, index))
        out += _split_answer_end(after, index, [stop_tokens, special_tokens])
      else:
        out += [(content, CONTEXT, -1), (after, FORMAT, -1)]
      position += len(content) + len(after)
    return [s for s in out if s[0]]

  def _prompt_end(self, before: list[dict[str, Any]], text: str) -> int | None:
    """Where the generation prompt for the answer after `before` ends in `text`, if it does."""
    if not before:
      return None
    try:
      prompt = self._render(before, True)
    except Exception:  # a template may refuse a prefix of the chat; then there is no preamble
      return None
    return len(prompt) if text.startswith(prompt) else None

  def spans(
    self, tokenizer: Tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = False
  ) -> list[Span]:
    specials = tokenizer.special_tokens
    stops = [name for name, i in specials.items() if i in tokenizer.stop_ids]
    others = [name for name, i in specials.items() if i not in tokenizer.stop_ids]
    segments = self.segments(
      messages,
      add_generation_prompt=add_generation_prompt,
      stop_tokens=stops,
      special_tokens=others,
    )
    text = "".join(s for s, _, _ in segments)
    content_has_special = any(
      find_specials(s, specials) for s, kind, _ in segments if kind in (CONTEXT, ANSWER)
    )
    if content_has_special:
      ids, starts = encode_runs(tokenizer, text, _template_specials(segments, specials))
    else:
      ids, starts = tokenizer.encode_special_with_offsets(text)
    return label_tokens(ids, _content_first_starts(starts, segments, len(text)), segments)


def _content_first_starts(
  starts: Sequence[int], segments: Sequence[Segment], length: int
) -> list[int]:
  """Token starts moved onto the first message content each token reaches into.

  Templates write the separator before a content ("[/INST] " + answer), and SentencePiece
  ("▁Paris") or GPT-2 (" Paris") tokens join it to the content's first word. Such a token
  carries the content, so it takes the content's kind: an answer's first token gets loss.
  """
  content_starts, content_ends, position = [], [], 0
  for text, kind, _ in segments:
    if kind in (CONTEXT, ANSWER):
      content_starts.append(position)
      content_ends.append(position + len(text))
    position += len(text)
  out = []
  for i, start in enumerate(starts):
    end = starts[i + 1] if i + 1 < len(starts) else length
    k = bisect.bisect_right(content_starts, start)
    inside = k > 0 and start < content_ends[k - 1]
    reaches = k < len(content_starts) and content_starts[k] < end
    out.append(content_starts[k] if reaches and not inside else start)
  return out


def check_template_messages(messages: Sequence[Message]) -> list[dict[str, Any]]:
  """Messages as plain dicts for the template: each needs a str `role` and a str `content`.

  Keys whose value is None are dropped, as transformers does; the caller's dicts are copied.
  """
  if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
    raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
  if not messages:
    raise ValueError("messages is empty; a chat needs at least one message")
  out = []
  for i, message in enumerate(messages):
    if not isinstance(message, Mapping):
      raise TypeError(
        f"messages[{i}] must be a dict with 'role' and 'content', got {message!r:.60}"
      )
    for key in ("role", "content"):
      if not isinstance(message.get(key), str):
        raise TypeError(f"messages[{i}][{key!r}] must be a str, got {message.get(key)!r:.60}")
    out.append({key: value for key, value in message.items() if value is not None})
  return out


def _locate(text: str, between: list[str], contents: list[str], name: str) -> list[str]:
  """Cut `text` into between[0] c0 between[1] c1 ...; return each c_k as it appears.

  c_k is `contents[k]` as written or trimmed (templates commonly `| trim` content).
  """
  found = []
  position = 0
  for k, content in enumerate([*contents, None]):
    if not text.startswith(between[k], position):
      raise ValueError(
        f"chat template {name!r}: its text around message contents depends on the contents "
        f"(expected {between[k][:40]!r} at character {position}); cannot derive masks"
      )
    position += len(between[k])
    if content is None:
      break
    candidates = dict.fromkeys([content, content.strip(), content.lstrip(), content.rstrip()])
    for candidate in candidates:
      if text.startswith(candidate + between[k + 1], position):
        found.append(candidate)
        position += len(candidate)
        break
    else:
      raise ValueError(
        f"chat template {name!r} changes message content {content[:40]!r} beyond trimming "
        "it; cannot derive masks"
      )
  if position != len(text):
    raise ValueError(f"chat template {name!r}: rendering is not stable; cannot derive masks")
  return found


def _split_preamble(
  segment: Segment, end: int, prompt_end: int | None, index: int
) -> list[Segment]:
  """The template text before an answer, cut where the generation prompt ends.

  What follows the generation prompt is what the model writes: Llama 2's prompt ends at
  "[/INST]" and its template continues with " " + answer, so that space is part of the answer.

  Args:
    segment: the FORMAT segment that ends at character `end`, where the answer starts.
    prompt_end: end of `render(messages[:index], add_generation_prompt=True)` in the text.
  """
  text, kind, _ = segment
  start = end - len(text)
  if kind != FORMAT or prompt_end is None or not start <= prompt_end < end:
    return [segment]
  cut = prompt_end - start
  return [(text[:cut], FORMAT, -1), (text[cut:], ANSWER, index)]


def _split_answer_end(
  after: str, index: int, token_groups: Sequence[Sequence[str]]
) -> list[Segment]:
  """Template text after an assistant content: ANSWER_END up to its end token, then FORMAT.

  The end token is the earliest occurrence of a token of the first group that has one.
  """
  for tokens in token_groups:
    found = [(after.find(t), -len(t)) for t in tokens if t in after]
    if found:
      start, minus_length = min(found)
      end = start - minus_length
      return [(after[:end], ANSWER_END, index), (after[end:], FORMAT, -1)]
  return [(after, FORMAT, -1)]


def _template_specials(
  segments: Sequence[Segment], specials: Mapping[str, int]
) -> list[tuple[int, int, int]]:
  """(start, end, id) of the special-token strings in template text (not in contents)."""
  out = []
  position = 0
  for text, kind, _ in segments:
    if kind in (FORMAT, ANSWER_END):
      out += [(position + a, position + b, i) for a, b, i in find_specials(text, specials)]
    position += len(text)
  return out


@functools.lru_cache(maxsize=32)
def compile_template(template: str) -> Any:
  """Compile `template` in a sandbox configured like transformers' chat template renderer."""
  import jinja2
  import jinja2.ext
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  def raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(
      x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )

  def strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)

  class Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders the body."""

    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
      return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
      return caller()

  env = ImmutableSandboxedEnvironment(
    trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
  )
  env.filters["tojson"] = tojson
  env.globals.update(
    raise_exception=raise_exception,
    strftime_now=strftime_now,
    dict=lambda *args, **kwargs: dict(*args, **kwargs),
    namespace=jinja2.utils.Namespace,
  )
  try:
    return env.from_string(template)
  except jinja2.exceptions.TemplateSyntaxError as e:
    raise ValueError(f"chat template does not parse: {e} (line {e.lineno})") from e
