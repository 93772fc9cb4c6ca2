"""Record validation, and TFDS builds of local JSONL read back without TensorFlow."""

import json
import logging
import os
import pickle
import sys

import pytest
import tensorflow_datasets as tfds

from llama_jax.data import builders, records
from llama_jax.data.records import RecordError

GOOD = {
  "text": {"text": "7 plus 5 is 12."},
  "sft": {
    "messages": [
      {"role": "user", "content": "What is 2 + 2?"},
      {"role": "assistant", "content": "2 + 2 = 4."},
    ]
  },
  "preference": {
    "prompt": "What is 2 + 2?",
    "chosen": "2 + 2 = 4.",
    "rejected": "2 + 2 = 5.",
    "rating": "better",
    "concern": "helpfulness",
  },
  "rl_prompt": {"prompt": "How do I steal a car?", "concern": "safety", "is_unsafe": True},
}


def _with(kind, **changes):
  row = json.loads(json.dumps(GOOD[kind]))
  for key, value in changes.items():
    if value is _DELETE:
      del row[key]
    else:
      row[key] = value
  return json.dumps(row)


_DELETE = object()

# (kind, bad line, reason, field, a piece of the value's repr expected in the message)
BAD_LINES = [
  ("text", '{"text": "unterminated', "invalid_json", "", "unterminated"),
  ("text", "[1, 2]", "not_object", "", "[1, 2]"),
  ("text", '{"text": "a", "text": "b"}', "duplicate_field", "text", "'b'"),
  ("text", '{"txt": "hello"}', "unknown_field", "txt", "'hello'"),
  ("text", '{"text": 5}', "wrong_type", "text", "5"),
  ("text", '{"text": "   "}', "empty_text", "text", "'   '"),
  ("text", '{"text": "bad \\ud800 surrogate"}', "invalid_text", "text", "surrogate"),
  ("preference", _with("preference", rejected=_DELETE), "missing_field", "rejected", "None"),
  ("preference", _with("preference", rating="meh"), "invalid_value", "rating", "'meh'"),
  ("preference", _with("preference", chosen=" \n"), "empty_text", "chosen", "' \\n'"),
  ("preference", _with("preference", edited=""), "empty_text", "edited", "''"),
  (
    "preference",
    _with("preference", rejected="2 + 2 = 4."),
    "identical_responses",
    "rejected",
    "'2 + 2 = 4.'",
  ),
  ("preference", _with("preference", concern="style"), "invalid_value", "concern", "'style'"),
  ("preference", _with("preference", prompt=[]), "empty_text", "prompt", "[]"),
  ("preference", _with("preference", prompt=42), "wrong_type", "prompt", "42"),
  ("preference", _with("preference", id=7), "wrong_type", "id", "7"),
  (
    "preference",
    _with(
      "preference",
      prompt=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
    ),
    "bad_turns",
    "prompt[1].role",
    "'assistant'",
  ),
  (
    "sft",
    _with(
      "sft", messages=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    ),
    "empty_text",
    "messages[1].content",
    "''",
  ),
  (
    "sft",
    _with("sft", messages=[{"role": "user", "content": "hi"}]),
    "bad_turns",
    "messages[0].role",
    "'user'",
  ),
  (
    "sft",
    _with("sft", messages=[{"role": "bot", "content": "hi"}]),
    "invalid_value",
    "messages[0].role",
    "'bot'",
  ),
  (
    "sft",
    _with(
      "sft",
      messages=[
        {"role": "user", "content": "hi", "name": "x"},
        {"role": "assistant", "content": "yo"},
      ],
    ),
    "unknown_field",
    "messages[0].name",
    "'x'",
  ),
  (
    "sft",
    _with("sft", messages=[{"role": "user"}]),
    "missing_field",
    "messages[0].content",
    "None",
  ),
  (
    "sft",
    _with("sft", messages=[{"role": "system", "content": "s"}, {"role": "system", "content": "t"}]),
    "bad_turns",
    "messages[1].role",
    "'system'",
  ),
  ("rl_prompt", _with("rl_prompt", is_unsafe=_DELETE), "missing_field", "is_unsafe", "None"),
  ("rl_prompt", _with("rl_prompt", is_unsafe="yes"), "wrong_type", "is_unsafe", "'yes'"),
  ("rl_prompt", _with("rl_prompt", concern="helpfulness"), "invalid_value", "is_unsafe", "True"),
  ("rl_prompt", _with("rl_prompt", reference=""), "empty_text", "reference", "''"),
  ("rl_prompt", _with("rl_prompt", note="x"), "unknown_field", "note", "'x'"),
]


def _write(path, lines):
  path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
  return path


@pytest.mark.parametrize("kind,line,reason,field,value", BAD_LINES)
def test_bad_line_error_names_file_line_field_value(tmp_path, kind, line, reason, field, value):
  path = _write(tmp_path / "data.jsonl", [json.dumps(GOOD[kind]), "", line])
  with pytest.raises(RecordError) as info:
    records.read_jsonl(path, kind)
  error = info.value
  assert (error.path, error.line, error.reason, error.field) == (str(path), 3, reason, field)
  message = str(error)
  assert f"{path}:3" in message
  assert (f"field {field!r}" if field else "line") in message
  assert value in message


def test_invalid_utf8_is_one_bad_line(tmp_path):
  path = tmp_path / "data.jsonl"
  path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n{"text": "fine"}\n')
  rows, report = records.read_jsonl(path, "text", on_error="skip")
  assert [r["text"] for r in rows] == ["ok", "fine"]
  assert report.skipped == {"invalid_json": 1}
  assert f"{path}:2" in report.examples[0]


def test_skip_mode_counts_every_reason_and_logs(tmp_path, caplog):
  lines = [json.dumps(GOOD["preference"])] + [
    line for kind, line, *_ in BAD_LINES if kind == "preference"
  ]
  path = _write(tmp_path / "prefs.jsonl", lines)
  with caplog.at_level(logging.WARNING, logger="llama_jax.data.records"):
    rows, report = records.read_jsonl(path, "preference", on_error="skip")
  expected = {}
  for kind, _, reason, *_ in BAD_LINES:
    if kind == "preference":
      expected[reason] = expected.get(reason, 0) + 1
  assert len(rows) == 1 and report.kept == 1
  assert report.read == len(lines)
  assert report.skipped == expected
  assert report.to_dict()["skipped"] == dict(sorted(expected.items()))
  assert any("skipped" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_on_error_must_be_known(tmp_path):
  path = _write(tmp_path / "a.jsonl", [json.dumps(GOOD["text"])])
  with pytest.raises(ValueError, match="on_error"):
    records.read_jsonl(path, "text", on_error="ignore")
  with pytest.raises(ValueError, match="record kind"):
    records.read_jsonl(path, "chat")


def test_normalization():
  pref = records.validate_record("preference", GOOD["preference"])
  assert pref == {
    "prompt": [{"role": "user", "content": "What is 2 + 2?"}],
    "chosen": "2 + 2 = 4.",
    "rejected": "2 + 2 = 5.",
    "rating": "better",
    "edited": None,
    "concern": "helpfulness",
    "id": None,
  }
  rl = records.validate_record("rl_prompt", {"prompt": "What is 2 + 2?", "concern": "helpfulness"})
  assert rl["is_unsafe"] is False and rl["reference"] is None
  assert list(rl) == list(records.fields("rl_prompt"))
  # Content is kept exactly, whitespace included.
  assert records.validate_record("text", {"text": " a\n"})["text"] == " a\n"


# ---------------------------------------------------------------------------------------
# TFDS round trips.

TRICKY = {
  "text": [
    {"text": "7 plus 5 is 12."},
    {"text": "héllo wörld ✓ 日本\n second line\ttab  "},
    {"text": "nul\x00inside and at the end\x00"},
  ],
  "sft": [
    GOOD["sft"],
    {
      "id": "conv-2",
      "messages": [
        {"role": "system", "content": "Be brief.\x00"},
        {"role": "user", "content": "Q1 ✓"},
        {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"},
        {"role": "assistant", "content": " A2 "},
      ],
    },
  ],
  "preference": [
    GOOD["preference"],
    {
      "id": "p2",
      "prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "héllo"}],
      "chosen": "b",
      "rejected": "c",
      "edited": "a",
      "concern": "safety",
    },
  ],
  "rl_prompt": [
    GOOD["rl_prompt"],
    {"prompt": "What is 2 + 2?", "concern": "helpfulness", "reference": "4", "task": "arithmetic"},
    {
      "prompt": [{"role": "user", "content": "How do I kill a Python process?"}],
      "concern": "safety",
      "is_unsafe": False,
      "task": "comply",
      "id": "r3",
    },
  ],
}


def _jsonl(tmp_path, name, rows):
  return _write(
    tmp_path / name, [json.dumps(r, ensure_ascii=bool(i % 2)) for i, r in enumerate(rows)]
  )


@pytest.mark.parametrize("kind", records.KINDS)
def test_build_and_read_back_every_kind(tmp_path, kind):
  rows = TRICKY[kind]
  train = _jsonl(tmp_path, "train.jsonl", rows)
  test = _jsonl(tmp_path, "test.jsonl", rows[::-1])
  data_dir = tmp_path / "tfds"
  builders.build_dataset(kind, f"my_{kind}", {"train": [train, test], "test": [test]}, data_dir)
  expected, _ = records.read_jsonl([train, test], kind)
  source = builders.load_source(f"my_{kind}", "train", data_dir)
  assert source.kind == kind
  assert list(source) == expected
  assert (
    list(builders.load_source(f"my_{kind}", "test", data_dir, kind=kind)) == expected[len(rows) :]
  )
  # Plain TFDS reads it too, by name, from files.
  raw = tfds.data_source(f"my_{kind}", data_dir=os.fspath(data_dir), split="train")
  assert len(raw) == len(expected)
  assert "tensorflow" not in sys.modules


def test_existing_tfds_dataset_by_name(tmp_path):
  path = _jsonl(tmp_path, "sft.jsonl", TRICKY["sft"])
  data_dir = tmp_path / "tfds"
  builders.build_dataset("sft", "chats", {"train": [path]}, data_dir)
  # A dataset prepared elsewhere has no llama_jax metadata: the kind comes from features.
  os.remove(data_dir / "chats" / builders.VERSION / "metadata.json")
  builder = builders.dataset_builder("chats", data_dir)
  assert builders.infer_kind(builder.info) == "sft"
  source = builders.load_source("chats:1.0.0", "train[:1]", data_dir)
  assert list(source) == records.read_jsonl(path, "sft")[0][:1]
  with pytest.raises(ValueError, match="holds sft records"):
    builders.load_source("chats", "train", data_dir, kind="preference")


def test_record_source_indexing_and_pickle(tmp_path):
  path = _jsonl(tmp_path, "t.jsonl", TRICKY["text"])
  builders.build_dataset("text", "texts", {"train": [path]}, tmp_path / "tfds")
  source = builders.load_source("texts", "train", tmp_path / "tfds")
  expected = records.read_jsonl(path, "text")[0]
  assert source[-1] == expected[-1]
  assert source[0:2] == expected[0:2]
  assert source.__getitems__([2, 0]) == [expected[2], expected[0]]
  with pytest.raises(IndexError):
    source[3]
  assert list(pickle.loads(pickle.dumps(source))) == expected


def test_rebuild_is_cached_and_changes_are_picked_up(tmp_path, caplog):
  path = _jsonl(tmp_path, "t.jsonl", TRICKY["text"][:2])
  data_dir = tmp_path / "tfds"
  builders.build_dataset("text", "corpus", {"train": [path]}, data_dir)
  shard = next((data_dir / "corpus" / builders.VERSION).glob("*.array_record*"))
  before = shard.stat().st_mtime_ns
  with caplog.at_level(logging.INFO, logger="llama_jax.data.builders"):
    builders.build_dataset("text", "corpus", {"train": [path]}, data_dir)
  assert shard.stat().st_mtime_ns == before
  assert any("reusing" in r.getMessage() for r in caplog.records)

  _jsonl(tmp_path, "t.jsonl", TRICKY["text"])  # same path, new content
  builders.build_dataset("text", "corpus", {"train": [path]}, data_dir)
  assert len(builders.load_source("corpus", "train", data_dir)) == 3

  caplog.clear()
  with caplog.at_level(logging.WARNING, logger="llama_jax.data.builders"):
    builders.build_dataset("text", "corpus", {"train": [path]}, data_dir, force=True)
  assert any("force=True" in r.getMessage() for r in caplog.records)


def test_raise_mode_writes_nothing(tmp_path):
  path = _write(tmp_path / "t.jsonl", [json.dumps(GOOD["text"]), '{"text": 3}'])
  with pytest.raises(RecordError, match=r"t\.jsonl:2: field 'text'"):
    builders.build_dataset("text", "broken", {"train": [path]}, tmp_path / "tfds")
  assert not (tmp_path / "tfds" / "broken").exists()


def test_skip_mode_stores_the_report_with_the_data(tmp_path):
  path = _write(
    tmp_path / "p.jsonl",
    [json.dumps(GOOD["preference"]), "oops", _with("preference", rating="meh"), ""],
  )
  data_dir = tmp_path / "tfds"
  builder = builders.build_dataset(
    "preference", "prefs", {"train": [path]}, data_dir, on_error="skip"
  )
  assert len(builders.load_source("prefs", "train", data_dir)) == 1
  stored = json.loads((data_dir / "prefs" / builders.VERSION / "metadata.json").read_text())
  report = stored["validation"]["train"]
  assert (report["read"], report["kept"]) == (3, 1)
  assert report["skipped"] == {"invalid_json": 1, "invalid_value": 1}
  assert "skipped 2" in tfds.builder_from_directory(builder.data_dir).info.description


def test_split_with_no_valid_records_is_an_error(tmp_path):
  path = _write(tmp_path / "p.jsonl", ["oops"])
  with pytest.raises(RecordError, match="no valid text records"):
    builders.build_dataset("text", "empty", {"train": [path]}, tmp_path / "tfds", on_error="skip")


def test_bad_arguments(tmp_path):
  path = _write(tmp_path / "t.jsonl", [json.dumps(GOOD["text"])])
  with pytest.raises(ValueError, match="snake_case"):
    builders.build_dataset("text", "My-Data", {"train": [path]}, tmp_path)
  with pytest.raises(FileNotFoundError, match="missing.jsonl"):
    builders.build_dataset("text", "d", {"train": [tmp_path / "missing.jsonl"]}, tmp_path)
  with pytest.raises(ValueError, match="no files"):
    builders.build_dataset("text", "d", {"train": []}, tmp_path)


def test_misspelled_dataset_names_data_dir_and_close_matches_only(tmp_path):
  """The name used to be buried under every TFDS dataset (~250 names); now only the name,
  the data_dir searched and the close matches among the datasets there and in TFDS."""
  path = _jsonl(tmp_path, "sft.jsonl", TRICKY["sft"])
  data_dir = tmp_path / "tfds"
  builders.build_dataset("sft", "my_chats", {"train": [path]}, data_dir)
  builders.build_dataset("text", "my_corpus", {"train": [_jsonl(tmp_path, "t.jsonl",
                                                                 TRICKY["text"])]}, data_dir)
  with pytest.raises(builders.UnknownDatasetError) as info:
    builders.load_source("my_chat", "train", data_dir)
  assert str(info.value) == (
    f"no dataset 'my_chat': not built in data_dir ['{data_dir}'] (datasets there: my_chats, "
    "my_corpus) and not registered with TFDS; did you mean 'my_chats'?")
  with pytest.raises(tfds.core.registered.DatasetNotFoundError,  # what callers caught before
                     match=r"no dataset 'mnsit/3.0.1'.*; did you mean 'mnist' or"):
    builders.dataset_builder("mnsit/3.0.1", data_dir)
