"""Any Hugging Face tokenizer (`tokenizer.json`) behind llama_jax's `Tokenizer` interface.

    tok = HFTokenizer.from_dir("SmolLM2-135M-Instruct")     # tokenizer.json + tokenizer_config
    tok.encode("Hello", bos=tok.add_bos)                    # ids as transformers gives them
    render_chat(tok, messages)                              # the checkpoint's own chat template

Backed by the `tokenizers` library (no transformers, no torch), reading the files that
`save_pretrained` writes: tokenizer.json, tokenizer_config.json, chat_template.jinja,
special_tokens_map.json and generation_config.json.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tokenizers

from llama_jax.tokenizer.base import Tokenizer, check_ids, check_text

# Files of a Hugging Face tokenizer directory, in the order `from_dir` reads them.
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"

_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class HFTokenizer(Tokenizer):
  """A `tokenizers.Tokenizer` with the special tokens and chat template of its checkpoint.

  `encode` never parses special-token strings (the backend's `encode_special_tokens` mode,
  which is transformers' `split_special_tokens=True`); `encode_special` does, as transformers
  does by default. Neither runs the backend's post-processor: BOS and EOS are added only when
  asked for (`bos=tokenizer.add_bos` reproduces transformers' `add_special_tokens=True` for
  BOS-only post-processors such as Llama's). Truncation and padding stored in tokenizer.json
  are switched off.

  Special ids:
    bos_id / eos_id: the ids of `bos_token` / `eos_token`; reading one that was not given
      raises ValueError (Qwen-style checkpoints have no BOS).
    pad_id: `pad_token` when given, even if it is a stop id (SmolLM2 pads with `<|im_end|>`).
      Otherwise the first non-stop, non-BOS id among: a special token whose name contains
      "pad" (Llama 3's `<|finetune_right_pad_id|>`), `<unk>` / `[UNK]`, the other special tokens
      by id, and finally id 0 — a real embedding row that never ends a sequence.
    stop_ids: `eos_token` plus `stop_tokens` (from_dir: generation_config's `eos_token_id`).
  """

  def __init__(
    self,
    backend: tokenizers.Tokenizer,
    *,
    bos_token: str | None = None,
    eos_token: str | None = None,
    pad_token: str | None = None,
    add_bos_token: bool = False,
    chat_template: str | None = None,
    stop_tokens: Sequence[str] = (),
  ) -> None:
    """Wrap `backend`.

    Args:
      backend: the `tokenizers.Tokenizer` (e.g. `tokenizers.Tokenizer.from_file(...)`). It is
        copied, never modified.
      bos_token, eos_token, pad_token: token strings, each a token of `backend`.
      add_bos_token: whether the model expects BOS before plain text (`add_bos`).
      chat_template: the checkpoint's Jinja chat template, if any.
      stop_tokens: further token strings that end generation, besides `eos_token`.

    Raises:
      ValueError: a named token is not in the backend's vocabulary.
    """
    if not isinstance(backend, tokenizers.Tokenizer):
      raise TypeError(f"HFTokenizer: backend must be a tokenizers.Tokenizer, got {type(backend)}")
    self.path: str | None = None
    self.backend = backend
    # Two private copies with the encoding mode fixed, so concurrent calls never race on
    # the backend's mutable `encode_special_tokens` flag.
    self._special = _plain_copy(backend, encode_special_tokens=False)
    self._plain = _plain_copy(backend, encode_special_tokens=True)
    self.bos_token, self.eos_token, self.pad_token = bos_token, eos_token, pad_token
    # Only read by chat templates; `from_dir` sets it from the config.
    self.unk_token: str | None = None
    self.add_bos = bool(add_bos_token)
    self.chat_template = chat_template
    self.chat_format = ""
    self._specials = _special_tokens(backend)
    self._token_ids = {
      name: self._token_id(token, name)
      for name, token in (("bos_token", bos_token), ("eos_token", eos_token))
      if token is not None
    }
    stops = [eos_token, *stop_tokens] if eos_token is not None else list(stop_tokens)
    self._stop_ids = frozenset(self._token_id(t, "stop_tokens") for t in stops)
    self._pad_id = (
      self._token_id(pad_token, "pad_token")
      if pad_token is not None
      else default_pad_id(self._specials, self._stop_ids, self._token_ids.get("bos_token"))
    )
    self._vocab_size = max(
      backend.get_vocab_size(with_added_tokens=True), max(self._specials.values(), default=-1) + 1
    )

  @classmethod
  def from_dir(cls, path: str | os.PathLike[str]) -> HFTokenizer:
    """Load a Hugging Face tokenizer directory (what `save_pretrained` writes).

    Reads tokenizer.json (required); tokenizer_config.json for `bos_token`, `eos_token`,
    `pad_token`, `add_bos_token` and `chat_template`; chat_template.jinja, which takes
    precedence over the config's template (current transformers writes it); special_tokens_map.json
    for tokens the config lacks; generation_config.json, whose `eos_token_id` (an id or a list)
    adds stop ids. Without `add_bos_token` in the config, `add_bos` says whether the
    tokenizer.json post-processor prepends BOS (Llama 3 does, SmolLM2 does not). For
    `"tokenizer_class": "LlamaTokenizer"` (Llama 2), the pre-tokenizer is rebuilt the way
    transformers rebuilds it, honouring `legacy` and `add_prefix_space`, so ids stay equal to
    `AutoTokenizer`'s.

    Raises:
      FileNotFoundError: no tokenizer.json in `path`.
      ValueError: a file is malformed or names a token the vocabulary lacks.
    """
    path = Path(path)
    file = path / TOKENIZER_FILE
    if not file.is_file():
      raise FileNotFoundError(f"HFTokenizer.from_dir: no {TOKENIZER_FILE} in {path}")
    try:
      backend = tokenizers.Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
      raise ValueError(f"HFTokenizer.from_dir: cannot parse {file}: {e}") from e
    config = _read_json(path / CONFIG_FILE)
    backend = _as_transformers_builds_it(backend, config)
    tokens_map = _read_json(path / SPECIAL_TOKENS_MAP_FILE)
    tokens = {
      key: _token_text(config.get(key, tokens_map.get(key)), f"{path.name}: {key}")
      for key in _TOKEN_KEYS
    }
    template = _chat_template(path, config)
    eos_ids = _read_json(path / GENERATION_CONFIG_FILE).get("eos_token_id")
    stop_tokens = [_id_to_token(backend, i, path / GENERATION_CONFIG_FILE) for i in _ids(eos_ids)]
    add_bos = config.get("add_bos_token")
    if add_bos is None:
      add_bos = _post_processor_adds(backend, tokens["bos_token"])
    self = cls(
      backend,
      bos_token=tokens["bos_token"],
      eos_token=tokens["eos_token"],
      pad_token=tokens["pad_token"],
      add_bos_token=bool(add_bos),
      chat_template=template,
      stop_tokens=stop_tokens,
    )
    self.path = os.fspath(path)
    self.unk_token = tokens["unk_token"]
    return self

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes tokenizer.json and tokenizer_config.json (special tokens, `add_bos_token`, the
    chat template) into the directory `path`: what `from_dir` and `transformers.AutoTokenizer`
    read back (e.g. a tokenizer that came from a GGUF file, for an export)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    self.backend.save(str(path / TOKENIZER_FILE))
    config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "add_bos_token": self.add_bos,
      "add_eos_token": False,
      **{k: getattr(self, k, None) for k in _TOKEN_KEYS if getattr(self, k, None) is not None},
    }
    if self.chat_template:
      config["chat_template"] = self.chat_template
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")

  def __getstate__(self) -> dict[str, Any]:
    # Pickling a tokenizers.Tokenizer drops its encode_special_tokens flag, so the two
    # encoding copies are rebuilt from the backend instead (grain workers unpickle us).
    return {k: v for k, v in self.__dict__.items() if k not in ("_plain", "_special")}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._special = _plain_copy(self.backend, encode_special_tokens=False)
    self._plain = _plain_copy(self.backend, encode_special_tokens=True)

  @property
  def template_variables(self) -> dict[str, str]:
    """The special-token strings a chat template sees (`bos_token`, `eos_token`, ...)."""
    names = {
      "bos_token": self.bos_token,
      "eos_token": self.eos_token,
      "unk_token": self.unk_token,
      "pad_token": self.pad_token,
    }
    return {key: value for key, value in names.items() if value is not None}

  def _token_id(self, token: str, what: str) -> int:
    token_id = self.backend.token_to_id(token)
    if token_id is None:
      raise ValueError(f"HFTokenizer: {what} {token!r} is not in the vocabulary")
    return token_id

  def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Token ids of `text`; "<|im_end|>" typed in the text stays plain text."""
    ids = self._plain.encode(check_text(text), add_special_tokens=False).ids
    return self._wrap(ids, bos, eos)

  def encode_special(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """Encode `text`, turning every added-token string (e.g. "<|im_end|>") into its id."""
    ids = self._special.encode(check_text(text), add_special_tokens=False).ids
    return self._wrap(ids, bos, eos)

  def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """`encode(text)` and each token's first character index in `text`."""
    encoding = self._plain.encode(check_text(text), add_special_tokens=False)
    return encoding.ids, [start for start, _ in encoding.offsets]

  def encode_special_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
    """`encode_special(text)` and each token's first character index in `text`."""
    encoding = self._special.encode(check_text(text), add_special_tokens=False)
    return encoding.ids, [start for start, _ in encoding.offsets]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; special ids decode to their text, as transformers' `decode` does."""
    return self.backend.decode(check_ids(ids, self.vocab_size), skip_special_tokens=False)

  def token_to_id(self, token: str) -> int | None:
    """Id of a vocabulary entry (e.g. "Ġthe" or "<|im_end|>"), or None."""
    return self.backend.token_to_id(token)

  @property
  def bos_id(self) -> int:
    return self._named_id("bos_token")

  @property
  def eos_id(self) -> int:
    return self._named_id("eos_token")

  def _named_id(self, name: str) -> int:
    if name not in self._token_ids:
      raise ValueError(f"HFTokenizer {self.path or ''}: the checkpoint defines no {name}")
    return self._token_ids[name]

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def vocab_size(self) -> int:
    return self._vocab_size

  @property
  def special_tokens(self) -> Mapping[str, int]:
    return dict(self._specials)

  @property
  def stop_ids(self) -> frozenset[int]:
    return self._stop_ids

  def __repr__(self) -> str:
    ids = {name: self._token_ids.get(f"{name}_token") for name in ("bos", "eos")}
    return (
      f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={ids['bos']}, eos_id={ids['eos']}, "
      f"pad_id={self.pad_id}, add_bos={self.add_bos}, "
      f"chat_template={self.chat_template is not None})"
    )


def _plain_copy(
  backend: tokenizers.Tokenizer, *, encode_special_tokens: bool
) -> tokenizers.Tokenizer:
  """A copy that encodes exactly the text: no post-processor, truncation or padding."""
  copy = tokenizers.Tokenizer.from_str(backend.to_str())
  # The post-processor only adds BOS/EOS (we do that ourselves) and trims ByteLevel offsets,
  # which would attribute " Paris" to the "P" rather than to the space it starts with.
  copy.post_processor = None
  copy.no_truncation()
  copy.no_padding()
  copy.encode_special_tokens = encode_special_tokens
  return copy


# Tokenizer classes that transformers (v5) rebuilds from the vocabulary and merges alone,
# replacing tokenizer.json's normalizer, pre-tokenizer and decoder with the class's own.
_LLAMA_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")


def _as_transformers_builds_it(
  backend: tokenizers.Tokenizer, config: Mapping[str, Any]
) -> tokenizers.Tokenizer:
  """`backend` as transformers' `AutoTokenizer` runs it, for the classes it rebuilds.

  Llama 2 checkpoints name `LlamaTokenizer`, whose pipeline is a Metaspace pre-tokenizer that
  adds the "▁" dummy prefix to the first piece of the text only (`legacy=False`, the default)
  or to every piece between special tokens (`legacy=True`, Meta's SentencePiece behaviour);
  Hub tokenizer.json files (a Prepend normalizer) encode the legacy way.
  """
  if config.get("tokenizer_class") not in _LLAMA_CLASSES:
    return backend
  from tokenizers import decoders, pre_tokenizers

  add_prefix_space = config.get("add_prefix_space")
  add_prefix_space = True if add_prefix_space is None else bool(add_prefix_space)
  scheme = ("always" if config.get("legacy", False) else "first") if add_prefix_space else "never"
  rebuilt = tokenizers.Tokenizer.from_str(backend.to_str())
  rebuilt.normalizer = None
  rebuilt.pre_tokenizer = pre_tokenizers.Metaspace(
    replacement="▁", prepend_scheme=scheme, split=False
  )
  steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
  rebuilt.decoder = decoders.Sequence(
    steps + ([decoders.Strip(content=" ", left=1)] if add_prefix_space else [])
  )
  return rebuilt


def _special_tokens(backend: tokenizers.Tokenizer) -> dict[str, int]:
  """Added tokens flagged special, text -> id."""
  decoder = backend.get_added_tokens_decoder()
  return {token.content: i for i, token in sorted(decoder.items()) if token.special}


def default_pad_id(
  specials: Mapping[str, int], stop_ids: frozenset[int], bos_id: int | None
) -> int:
  """A padding id for a checkpoint that names no pad token (see `HFTokenizer`)."""
  avoid = set(stop_ids) | {bos_id}
  by_id = sorted(specials.items(), key=lambda item: item[1])
  named_pad = [i for name, i in by_id if "pad" in name.lower()]
  unk = [i for name, i in by_id if name in ("<unk>", "[UNK]")]
  for candidate in [*named_pad, *unk, *(i for _, i in by_id), 0]:
    if candidate not in avoid:
      return candidate
  return 0


def _post_processor_adds(backend: tokenizers.Tokenizer, bos_token: str | None) -> bool:
  """Whether encoding with `add_special_tokens=True` starts with BOS (Llama's post-processor)."""
  if bos_token is None or backend.post_processor is None:
    return False
  bos = backend.token_to_id(bos_token)
  with_specials = backend.encode("a", add_special_tokens=True).ids
  without = backend.encode("a", add_special_tokens=False).ids
  return len(with_specials) > len(without) and with_specials[0] == bos


def _read_json(path: Path) -> dict[str, Any]:
  """The JSON object in `path`, or {} if there is no such file."""
  if not path.is_file():
    return {}
  try:
    data = json.loads(path.read_text(encoding="utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"HFTokenizer.from_dir: {path} is not valid JSON: {e}") from e
  if not isinstance(data, dict):
    raise ValueError(f"HFTokenizer.from_dir: {path} holds a {type(data).__name__}, not an object")
  return data


def _token_text(value: object, what: str) -> str | None:
  """A token as written in tokenizer_config.json: a string or an AddedToken dict."""
  if value is None or isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  raise ValueError(
    f"HFTokenizer.from_dir: {what} must be a string or {{'content': ...}}, got {value!r}"
  )


def _chat_template(path: Path, config: Mapping[str, Any]) -> str | None:
  """chat_template.jinja, else the config's template (a string, or a list of named ones)."""
  file = path / TEMPLATE_FILE
  if file.is_file():
    return file.read_text(encoding="utf-8")
  template = config.get("chat_template")
  if isinstance(template, list):
    # Several named templates (e.g. "default", "tool_use"): transformers uses "default".
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  if template is not None and not isinstance(template, str):
    raise ValueError(f"HFTokenizer.from_dir: {path / CONFIG_FILE}: chat_template is not a string")
  return template


def _ids(value: object) -> list[int]:
  if value is None:
    return []
  return [int(v) for v in (value if isinstance(value, list) else [value])]


def _id_to_token(backend: tokenizers.Tokenizer, token_id: int, source: Path) -> str:
  token = backend.id_to_token(token_id)
  if token is None:
    raise ValueError(
      f"HFTokenizer.from_dir: {source}: eos_token_id {token_id} is not in the vocabulary"
    )
  return token
