"""Record kinds, their JSONL schemas, and validation at the edge.

Every data file the project reads is JSON Lines: one JSON object per line, UTF-8. Blank
lines are ignored (they carry no data); every other line must be a valid record of the
file's kind. Four kinds exist:

``text`` (pre-training corpus)::

  {"text": str}

``sft`` (supervised fine-tuning conversations)::

  {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...], "id"?: str}

  An optional system message comes first, then user and assistant turns alternate,
  starting with the user and ending with the assistant (the message the loss is on).

``preference`` (reward-model and DPO pairs)::

  {"prompt": [messages...] | str, "chosen": str, "rejected": str,
   "rating"?: "significantly_better"|"better"|"slightly_better"|"negligibly_better",
   "edited"?: str, "concern": "helpfulness"|"safety", "id"?: str}

  ``edited`` is an annotator-edited response; the ranking is edited > chosen > rejected.
  ``rating`` says how much better ``chosen`` is than ``rejected`` (Llama 2's four levels).

``rl_prompt`` (prompts for rejection sampling, PPO and GRPO)::

  {"prompt": [messages...] | str, "concern": "helpfulness"|"safety",
   "is_unsafe": bool, "reference"?: str, "task"?: str, "id"?: str}

  ``is_unsafe`` is true when a refusal is the right answer. It is required for safety
  prompts; for helpfulness prompts it may be left out (false), and true is an error
  since a prompt whose right answer is a refusal is a safety prompt. ``reference`` is an
  answer a program can check (see :mod:`llama_jax.data.scoring`); ``task`` is a free
  label such as "arithmetic", "fact", "refusal" or "comply".

A prompt is a list of messages laid out like an sft conversation but ending with a user
message; a plain string is shorthand for ``[{"role": "user", "content": s}]``.

Normalization: :func:`validate_record` returns a new dict with every field of the kind
(optional ones as ``None`` when absent, ``is_unsafe`` as ``False`` when absent), prompts
always as lists of ``{"role", "content"}`` dicts, and strings exactly as given (no
stripping). Strings must be non-empty after stripping whitespace and encodable as UTF-8.
Unknown keys are errors, as are duplicated keys in one JSON object.

Errors: a bad record raises :class:`RecordError`, naming the file, the line number, the
field (as a path such as ``prompt[2].role``) and the offending value. With
``on_error="skip"`` bad lines are dropped instead, counted per :attr:`RecordError.reason`
in a :class:`ValidationReport`, and the summary is logged; nothing is dropped silently.
A record given to a stage that reads another kind (sft chats to pretraining) raises
:class:`KindMismatchError` from the tokenize function, naming its fields, the fields the
stage needs and the kind it looks like (the pipeline adds the dataset and record index).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal

logger = logging.getLogger(__name__)

KINDS = ("text", "sft", "preference", "rl_prompt")
ROLES = ("system", "user", "assistant")
RATINGS = ("significantly_better", "better", "slightly_better", "negligibly_better")
# The one rating table of the token arrays (`rating` fields; -1: no rating): 3 for
# significantly_better down to 0 for negligibly_better, so a larger code is a clearer pair.
RATING_CODES = {name: len(RATINGS) - 1 - i for i, name in enumerate(RATINGS)}
CONCERNS = ("helpfulness", "safety")

# Reasons a record is rejected; the keys of ValidationReport.skipped.
REASONS = (
  "invalid_json",  # the line is not JSON (or not UTF-8)
  "not_object",  # the line is JSON but not an object
  "duplicate_field",  # the same key twice in one object
  "missing_field",
  "unknown_field",
  "wrong_type",
  "invalid_value",  # unknown rating, concern or role; contradictory flags
  "empty_text",  # empty or whitespace-only string
  "invalid_text",  # string that cannot be encoded as UTF-8 (lone surrogate)
  "bad_turns",  # message order breaks the chat layout
  "identical_responses",  # chosen == rejected carries no preference
  "no_records",  # a whole split without one valid record (raised by the TFDS builder)
)

OnError = Literal["raise", "skip"]
Record = dict[str, Any]

# Field -> required?  The order here is the order of keys in normalized records.
_FIELDS: dict[str, dict[str, bool]] = {
  "text": {"text": True},
  "sft": {"messages": True, "id": False},
  "preference": {
    "prompt": True,
    "chosen": True,
    "rejected": True,
    "rating": False,
    "edited": False,
    "concern": True,
    "id": False,
  },
  "rl_prompt": {
    "prompt": True,
    "concern": True,
    "is_unsafe": False,
    "reference": False,
    "task": False,
    "id": False,
  },
}

_MAX_VALUE_REPR = 80


def fields(kind: str) -> tuple[str, ...]:
  """Returns the keys of a normalized record of ``kind``, in order."""
  return tuple(_FIELDS[check_kind(kind)])


def optional_fields(kind: str) -> tuple[str, ...]:
  """Returns the keys of ``kind`` records that may be absent (``None`` when normalized)."""
  return tuple(k for k, required in _FIELDS[check_kind(kind)].items() if not required)


def required_fields(kind: str) -> tuple[str, ...]:
  """Returns the keys every ``kind`` record has (what its tokenize function reads)."""
  return tuple(k for k, required in _FIELDS[check_kind(kind)].items() if required)


# Which training stages read each kind, for messages about data given to the wrong one.
STAGES = {
  "text": "pretraining",
  "sft": "supervised fine-tuning",
  "preference": "reward-model training / DPO",
  "rl_prompt": "rejection sampling / PPO / GRPO",
}


def guess_kind(record: Any) -> str | None:
  """The kind ``record`` looks like: the first whose required fields it has and whose
  fields are all it has, else the first whose required fields it has; None if none."""
  if not isinstance(record, Mapping):
    return None
  keys = set(record)
  fits = [k for k in KINDS if set(required_fields(k)) <= keys]
  exact = [k for k in fits if keys <= set(_FIELDS[k])]
  return (exact or fits or [None])[0]


class KindMismatchError(ValueError):
  """A record lacks the fields its stage reads: data of another kind (sft chats given to
  pretraining, ...). Names the record's fields, the ones needed and the kind it looks like.

  Attributes:
    kind: the kind the stage reads; ``fields``: the record's keys; ``needed``: the
    stage's required keys; ``looks_like``: ``guess_kind(record)``; ``where``: the record.
  """

  def __init__(self, kind: str, record: Any, where: str = "a record"):
    self.kind, self.where = kind, where
    self.fields = sorted(record) if isinstance(record, Mapping) else []
    self.needed = list(required_fields(kind))
    self.looks_like = guess_kind(record)
    self.record = record
    if self.looks_like is None:
      like = f"no known kind of record ({', '.join(KINDS)})"
    else:
      like = f"a {self.looks_like!r} record, for {STAGES[self.looks_like]}"
    super().__init__(
      f"{where} has fields {self.fields}, but this stage reads {kind!r} records "
      f"({STAGES[kind]}), which need {self.needed}; it looks like {like}. Is the data kind "
      "(data.kind) or the dataset wrong?"
    )

  def at(self, where: str) -> KindMismatchError:
    """This error, located (``"dataset 'x' split 'train' record 0"``)."""
    return KindMismatchError(self.kind, self.record, where)


def check_fields(kind: str, record: Any) -> None:
  """Raises :class:`KindMismatchError` if ``record`` lacks a field ``kind`` requires."""
  if not isinstance(record, Mapping) or not set(required_fields(kind)) <= set(record):
    raise KindMismatchError(kind, record)


def check_kind(kind: str) -> str:
  """Returns ``kind`` if it is a known record kind, else raises ``ValueError``."""
  if kind not in _FIELDS:
    raise ValueError(f"unknown record kind {kind!r}; expected one of {KINDS}")
  return kind


class RecordError(ValueError):
  """A data row that breaks its kind's schema.

  Attributes:
    path: the file (or another description of the source).
    line: 1-based line number in ``path``, or ``None`` for in-memory records.
    field: where in the record, e.g. ``"chosen"`` or ``"prompt[1].role"``; ``""`` for the
      whole line.
    value: the offending value (``repr`` is truncated in the message).
    reason: one of :data:`REASONS`.
    problem: what is wrong, in words.
  """

  def __init__(
    self,
    *,
    reason: str,
    problem: str,
    field: str = "",
    value: Any = None,
    path: str = "<record>",
    line: int | None = None,
  ):
    self.reason, self.problem, self.field, self.value = reason, problem, field, value
    self.path, self.line = path, line
    super().__init__(self._message())

  def _message(self) -> str:
    where = self.path if self.line is None else f"{self.path}:{self.line}"
    value = repr(self.value)
    if len(value) > _MAX_VALUE_REPR:
      value = value[: _MAX_VALUE_REPR - 3] + "..."
    field = f"field {self.field!r}" if self.field else "line"
    return f"{where}: {field}: {self.problem} (reason {self.reason}; value {value})"

  def at(self, path: str, line: int | None) -> RecordError:
    """Returns a copy of this error located at ``path:line``."""
    return RecordError(
      reason=self.reason,
      problem=self.problem,
      field=self.field,
      value=self.value,
      path=path,
      line=line,
    )


def _fail(reason: str, field: str, value: Any, problem: str) -> RecordError:
  return RecordError(reason=reason, problem=problem, field=field, value=value)


# ---------------------------------------------------------------------------------------
# Field checks. Each returns the normalized value or raises RecordError (no location).


def _string(value: Any, field: str) -> str:
  if not isinstance(value, str):
    raise _fail("wrong_type", field, value, f"expected a string, got {type(value).__name__}")
  if not value.strip():
    raise _fail("empty_text", field, value, "empty or whitespace-only string")
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    # JSON can spell lone surrogates ("\ud800"); they cannot be stored as UTF-8 bytes.
    raise _fail("invalid_text", field, value, f"not encodable as UTF-8 ({e.reason})") from None
  return value


def _choice(value: Any, field: str, choices: Sequence[str]) -> str:
  if not isinstance(value, str):
    raise _fail("wrong_type", field, value, f"expected a string, got {type(value).__name__}")
  if value not in choices:
    raise _fail("invalid_value", field, value, f"expected one of {tuple(choices)}")
  return value


def _bool(value: Any, field: str) -> bool:
  # bool is checked exactly: 0/1 or "true" in a bool field is usually a bug upstream.
  if not isinstance(value, bool):
    raise _fail("wrong_type", field, value, f"expected true or false, got {type(value).__name__}")
  return value


def _message(value: Any, field: str) -> dict[str, str]:
  if not isinstance(value, dict):
    raise _fail("wrong_type", field, value, f"expected an object, got {type(value).__name__}")
  for key in ("role", "content"):
    if key not in value:
      raise _fail("missing_field", f"{field}.{key}", None, f"message has no {key!r}")
  for key in value:
    if key not in ("role", "content"):
      raise _fail("unknown_field", f"{field}.{key}", value[key], "unknown message key")
  return {
    "role": _choice(value["role"], f"{field}.role", ROLES),
    "content": _string(value["content"], f"{field}.content"),
  }


def _messages(value: Any, field: str, last_role: str) -> list[dict[str, str]]:
  """Checks a conversation: [system], user, assistant, user, ... ending with last_role."""
  if not isinstance(value, list):
    raise _fail(
      "wrong_type", field, value, f"expected a list of messages, got {type(value).__name__}"
    )
  if not value:
    raise _fail("empty_text", field, value, "no messages")
  messages = [_message(m, f"{field}[{i}]") for i, m in enumerate(value)]
  start = 1 if messages[0]["role"] == "system" else 0
  for i, m in enumerate(messages[start:], start):
    expected = "user" if (i - start) % 2 == 0 else "assistant"
    if m["role"] != expected:
      raise _fail(
        "bad_turns",
        f"{field}[{i}].role",
        m["role"],
        f"expected {expected!r}: an optional system message, then user and assistant "
        "turns alternating from the user",
      )
  if messages[-1]["role"] != last_role:
    raise _fail(
      "bad_turns",
      f"{field}[{len(messages) - 1}].role",
      messages[-1]["role"],
      f"the last message must come from the {last_role}",
    )
  return messages


def _prompt(value: Any, field: str) -> list[dict[str, str]]:
  if isinstance(value, str):
    return [{"role": "user", "content": _string(value, field)}]
  if not isinstance(value, list):
    raise _fail(
      "wrong_type",
      field,
      value,
      f"expected a string or a list of messages, got {type(value).__name__}",
    )
  return _messages(value, field, last_role="user")


def _check_keys(kind: str, obj: dict[str, Any]) -> None:
  spec = _FIELDS[kind]
  for key in obj:
    if key not in spec:
      raise _fail(
        "unknown_field", key, obj[key], f"unknown field for a {kind} record (known: {tuple(spec)})"
      )
  for key, required in spec.items():
    if required and key not in obj:
      raise _fail("missing_field", key, None, f"a {kind} record needs {key!r}")


def _optional(obj: dict[str, Any], key: str, check) -> Any:
  return None if key not in obj else check(obj[key], key)


def _text(obj: dict[str, Any]) -> Record:
  return {"text": _string(obj["text"], "text")}


def _sft(obj: dict[str, Any]) -> Record:
  return {
    "messages": _messages(obj["messages"], "messages", last_role="assistant"),
    "id": _optional(obj, "id", _string),
  }


def _preference(obj: dict[str, Any]) -> Record:
  record = {
    "prompt": _prompt(obj["prompt"], "prompt"),
    "chosen": _string(obj["chosen"], "chosen"),
    "rejected": _string(obj["rejected"], "rejected"),
    "rating": _optional(obj, "rating", lambda v, f: _choice(v, f, RATINGS)),
    "edited": _optional(obj, "edited", _string),
    "concern": _choice(obj["concern"], "concern", CONCERNS),
    "id": _optional(obj, "id", _string),
  }
  if record["chosen"] == record["rejected"]:
    raise _fail("identical_responses", "rejected", record["rejected"], "rejected equals chosen")
  return record


def _rl_prompt(obj: dict[str, Any]) -> Record:
  concern = _choice(obj["concern"], "concern", CONCERNS)
  if concern == "safety" and "is_unsafe" not in obj:
    raise _fail("missing_field", "is_unsafe", None, "a safety prompt must say whether it is unsafe")
  is_unsafe = bool(_optional(obj, "is_unsafe", _bool))
  if concern == "helpfulness" and is_unsafe:
    raise _fail(
      "invalid_value",
      "is_unsafe",
      True,
      "a prompt whose right answer is a refusal has concern 'safety'",
    )
  return {
    "prompt": _prompt(obj["prompt"], "prompt"),
    "concern": concern,
    "is_unsafe": is_unsafe,
    "reference": _optional(obj, "reference", _string),
    "task": _optional(obj, "task", _string),
    "id": _optional(obj, "id", _string),
  }


_NORMALIZERS = {"text": _text, "sft": _sft, "preference": _preference, "rl_prompt": _rl_prompt}


def validate_record(
  kind: str, obj: Any, *, path: str = "<record>", line: int | None = None
) -> Record:
  """Validates one decoded JSON value as a ``kind`` record and returns it normalized.

  Args:
    kind: one of :data:`KINDS`.
    obj: the decoded JSON value.
    path, line: where the record came from, for the error message.

  Raises:
    RecordError: naming path, line, field and value.
  """
  check_kind(kind)
  try:
    if not isinstance(obj, dict):
      raise _fail("not_object", "", obj, f"expected a JSON object, got {type(obj).__name__}")
    _check_keys(kind, obj)
    return _NORMALIZERS[kind](obj)
  except RecordError as e:
    raise e.at(path, line) from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
  obj: dict[str, Any] = {}
  for key, value in pairs:
    if key in obj:
      raise _fail("duplicate_field", key, value, "key appears twice in one object")
    obj[key] = value
  return obj


def parse_line(
  kind: str, raw: bytes | str, *, path: str = "<record>", line: int | None = None
) -> Record:
  """Decodes and validates one JSONL line; raises :class:`RecordError` if it is bad."""
  try:
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
  except UnicodeDecodeError as e:
    raise RecordError(
      reason="invalid_json", problem=f"not UTF-8 ({e.reason})", value=raw[:40], path=path, line=line
    ) from None
  try:
    obj = json.loads(text, object_pairs_hook=_no_duplicates)
  except json.JSONDecodeError as e:
    raise RecordError(
      reason="invalid_json",
      problem=f"not valid JSON ({e.msg} at column {e.colno})",
      value=text,
      path=path,
      line=line,
    ) from None
  except RecordError as e:  # from _no_duplicates
    raise e.at(path, line) from None
  return validate_record(kind, obj, path=path, line=line)


class Records(list):
  """A list of records that knows the dataset and split it holds, so that errors about its
  records (`pipeline.describe_source`) can name them."""

  def __init__(self, rows: Iterable[Record] = (), *, name: str = "", split: str = ""):
    super().__init__(rows)
    self.name, self.split = name, split


@dataclasses.dataclass
class ValidationReport:
  """What validation did to a set of files: counts per outcome and the first errors.

  Attributes:
    kind: the record kind validated.
    read: non-blank lines seen.
    kept: valid records returned.
    skipped: count of dropped lines per reason (only with ``on_error="skip"``).
    examples: the first few error messages, so a user can find the bad lines.
  """

  kind: str
  read: int = 0
  kept: int = 0
  skipped: dict[str, int] = dataclasses.field(default_factory=dict)
  examples: list[str] = dataclasses.field(default_factory=list)

  max_examples = 10

  def add_error(self, error: RecordError) -> None:
    """Counts ``error`` under its reason and keeps its message if there is room."""
    self.skipped[error.reason] = self.skipped.get(error.reason, 0) + 1
    if len(self.examples) < self.max_examples:
      self.examples.append(str(error))

  @property
  def num_skipped(self) -> int:
    """Lines dropped, all reasons together."""
    return sum(self.skipped.values())

  def to_dict(self) -> dict[str, Any]:
    """A JSON-ready summary."""
    return {
      "kind": self.kind,
      "read": self.read,
      "kept": self.kept,
      "skipped": dict(sorted(self.skipped.items())),
      "examples": list(self.examples),
    }

  def summary(self) -> str:
    """One line for the log."""
    text = f"{self.kind}: kept {self.kept} of {self.read} records"
    if self.skipped:
      counts = ", ".join(f"{k}={v}" for k, v in sorted(self.skipped.items()))
      text += f"; skipped {self.num_skipped} ({counts}); first: {self.examples[0]}"
    return text


def check_on_error(on_error: str) -> str:
  """Returns ``on_error`` if it is "raise" or "skip", else raises ``ValueError``."""
  if on_error not in ("raise", "skip"):
    raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
  return on_error


def iter_jsonl(
  paths: str | os.PathLike | Iterable[str | os.PathLike],
  kind: str,
  *,
  on_error: OnError = "raise",
  report: ValidationReport | None = None,
) -> Iterator[Record]:
  """Yields the normalized records of JSONL files, in file and line order.

  Args:
    paths: one path or several; read in the order given.
    kind: the record kind of every file.
    on_error: "raise" stops at the first bad line with a :class:`RecordError`; "skip"
      drops bad lines and counts them in ``report``.
    report: filled in as lines are read (counts, first error messages).

  Raises:
    RecordError: for a bad line when ``on_error="raise"``.
    FileNotFoundError: for a missing file, whatever ``on_error`` is.
  """
  check_kind(kind)
  check_on_error(on_error)
  report = report if report is not None else ValidationReport(kind)
  paths = [paths] if isinstance(paths, str | os.PathLike) else list(paths)
  for path in paths:
    path = os.fspath(path)
    # Binary mode: split on b"\n" only, and decode per line so one bad byte sequence
    # costs one line, not the file.
    with open(path, "rb") as f:
      for number, raw in enumerate(f, 1):
        raw = raw.rstrip(b"\r\n")
        if not raw.strip():
          continue
        report.read += 1
        try:
          record = parse_line(kind, raw, path=path, line=number)
        except RecordError as e:
          if on_error == "raise":
            raise
          report.add_error(e)
          continue
        report.kept += 1
        yield record


def read_jsonl(
  paths: str | os.PathLike | Iterable[str | os.PathLike],
  kind: str,
  *,
  on_error: OnError = "raise",
) -> tuple[list[Record], ValidationReport]:
  """Reads whole JSONL files: returns (normalized records, report) and logs the summary.

  See :func:`iter_jsonl` for the arguments. The summary is logged at WARNING level when
  lines were skipped, INFO otherwise.
  """
  report = ValidationReport(check_kind(kind))
  records = list(iter_jsonl(paths, kind, on_error=on_error, report=report))
  log_report(report)
  return records, report


def log_report(report: ValidationReport) -> None:
  """Logs ``report.summary()``, as a warning if anything was skipped."""
  logger.log(logging.WARNING if report.skipped else logging.INFO, "%s", report.summary())


def prompt_messages(prompt: str | list[dict[str, str]]) -> list[dict[str, str]]:
  """Returns ``prompt`` as a list of messages (a string is one user message)."""
  return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
