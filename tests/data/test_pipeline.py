"""Tests for the grain input pipelines (llama_jax.data.pipeline / packing)."""

import collections
import dataclasses
import json
import logging
import re

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax.data import packing
from llama_jax.data.pipeline import (
  PipelineConfig,
  make_eval_pipeline,
  make_pipeline,
)

T = 16


def make_docs(n: int, *, long_every: int = 0) -> list[dict]:
  """Records with a known length; every `long_every`-th one is longer than T."""
  docs = []
  for i in range(n):
    length = 1 + (i * 7) % 13
    if long_every and i % long_every == long_every - 1:
      length = T + 5
    docs.append({"id": i, "length": length, "_source": f"data.jsonl:{i + 1}"})
  return docs


def tokenize(record: dict) -> dict:
  """Token j of document i is 1000 * (i + 1) + j, so every token says where it came from."""
  i, n = record["id"], record["length"]
  return {
    "tokens": 1000 * (i + 1) + np.arange(n),
    "loss_mask": (np.arange(n) % 3 != 0).astype(np.int32),
    "format_mask": np.full(n, i % 2, np.int32),
    "rating": i,
  }


def valid_docs(batches, *, packed: bool) -> list[dict]:
  """Every document of every row, recovered from segment_ids, with its aligned fields."""
  found = []
  for b in batches:
    for row in range(len(b["tokens"])):
      seg = b["segment_ids"][row]
      for s in np.unique(seg[seg > 0]):
        where = seg == s
        idx = np.flatnonzero(where)
        assert (np.diff(idx) == 1).all(), "a document must be contiguous"
        tok = b["tokens"][row][where]
        doc = {
          "id": int(tok[0] // 1000) - 1,
          "tokens": tok,
          "positions": b["positions"][row][where],
          "loss_mask": b["loss_mask"][row][where],
          "format_mask": b["format_mask"][row][where],
          "rating": b["rating"][row][where] if packed else np.full(len(tok), b["rating"][row]),
          "targets": b["targets"][row][where],
          "target_mask": b["target_mask"][row][where],
        }
        found.append(doc)
  return found


def check_doc(doc: dict, source_len: int | None = None) -> None:
  i, n = doc["id"], len(doc["tokens"])
  ref = tokenize({"id": i, "length": source_len or n})
  np.testing.assert_array_equal(doc["tokens"], ref["tokens"][:n])
  np.testing.assert_array_equal(doc["positions"], np.arange(n))
  np.testing.assert_array_equal(doc["loss_mask"], ref["loss_mask"][:n])
  np.testing.assert_array_equal(doc["format_mask"], ref["format_mask"][:n])
  np.testing.assert_array_equal(doc["rating"], np.full(n, i))
  # Prediction t -> t + 1 inside the document only, weighted by the *target's* loss_mask.
  np.testing.assert_array_equal(doc["targets"][:-1], doc["tokens"][1:] * doc["loss_mask"][1:])
  np.testing.assert_array_equal(doc["target_mask"][:-1], doc["loss_mask"][1:])
  assert doc["targets"][-1] == 0 and doc["target_mask"][-1] == 0


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]), err_msg=k)


# -------------------------------------------------------------------------------------------


def test_next_token_targets_by_hand():
  tokens = np.array([[5, 6, 7, 8, 9, 0]])
  seg = np.array([[1, 1, 1, 2, 2, 0]])
  mask = np.array([[0, 1, 1, 0, 1, 0]])
  targets, target_mask = packing.next_token_targets(tokens, seg, mask)
  np.testing.assert_array_equal(targets, [[6, 7, 0, 9, 0, 0]])
  np.testing.assert_array_equal(target_mask, [[1, 1, 0, 1, 0, 0]])
  np.testing.assert_array_equal(packing.shift_left(mask, seg), [[1, 1, 0, 1, 0, 0]])


@pytest.mark.parametrize("shuffle", [False, True])
def test_pack_keeps_every_token_once(shuffle):
  docs = make_docs(50)
  cfg = PipelineConfig(
    seq_len=T, batch_size=4, shuffle=shuffle, seed=1, num_epochs=1, drop_remainder=False
  )
  it = make_pipeline(docs, tokenize, cfg, shard_index=0, shard_count=1)
  batches = list(it)
  for b in batches:
    assert b["tokens"].shape == (4, T) and b["valid"].shape == (4,)
    assert b["tokens"].dtype == np.int32 and b["segment_ids"].dtype == np.int32
    assert (b["tokens"][b["segment_ids"] == 0] == 0).all()
    assert (b["target_mask"][b["segment_ids"] == 0] == 0).all()
  found = valid_docs(batches, packed=True)
  assert sorted(d["id"] for d in found) == list(range(50))
  for doc in found:
    assert len(doc["tokens"]) == docs[doc["id"]]["length"]
    check_doc(doc)
  # Several documents share rows, and the real rows are flagged valid.
  assert sum(int(b["valid"].sum()) for b in batches) < 50
  stats = it.stats()
  assert stats["examples"] == 50 and stats["tokens"] == sum(d["length"] for d in docs)


def test_pad_mode_one_example_per_row():
  docs = make_docs(10)
  cfg = PipelineConfig(
    seq_len=T, batch_size=4, mode="pad", shuffle=False, num_epochs=1, drop_remainder=False
  )
  batches = list(make_pipeline(docs, tokenize, cfg, shard_index=0, shard_count=1))
  assert len(batches) == 3
  b = batches[0]
  assert b["rating"].shape == (4,)
  np.testing.assert_array_equal(b["rating"], [0, 1, 2, 3])
  n = docs[2]["length"]
  np.testing.assert_array_equal(b["segment_ids"][2], (np.arange(T) < n).astype(int))
  np.testing.assert_array_equal(b["positions"][2][:n], np.arange(n))
  assert (b["positions"][2][n:] == 0).all()
  np.testing.assert_array_equal(batches[-1]["valid"], [1, 1, 0, 0])
  assert (batches[-1]["segment_ids"][2:] == 0).all()
  found = valid_docs(batches, packed=False)
  assert [d["id"] for d in found] == list(range(10))
  for doc in found:
    check_doc(doc)


def epoch_orders(cfg, n_docs, epochs):
  docs = make_docs(n_docs)
  it = make_pipeline(docs, tokenize, cfg, shard_index=0, shard_count=1)
  ids = [int(t // 1000) - 1 for b in take(it, epochs * n_docs // cfg.batch_size)
         for t in b["tokens"][:, 0]]
  return [ids[e * n_docs:(e + 1) * n_docs] for e in range(epochs)]


def test_seeded_shuffle_reproducible_and_new_each_epoch():
  cfg = PipelineConfig(seq_len=T, batch_size=4, mode="pad", seed=7)
  first = epoch_orders(cfg, 12, 3)
  assert first == epoch_orders(cfg, 12, 3)
  for order in first:
    assert sorted(order) == list(range(12))
  assert first[0] != first[1] != first[2]
  assert first[0] != list(range(12))
  assert epoch_orders(dataclasses.replace(cfg, seed=8), 12, 1)[0] != first[0]


@pytest.mark.parametrize("mode", ["pack", "pad"])
def test_process_split_covers_data_once(mode):
  docs = make_docs(23)
  cfg = PipelineConfig(
    seq_len=T, batch_size=4, mode=mode, seed=3, num_epochs=1, drop_remainder=False
  )
  per_host = []
  for host in range(2):
    batches = list(make_pipeline(docs, tokenize, cfg, shard_index=host, shard_count=2))
    assert all(b["tokens"].shape == (2, T) for b in batches)  # local rows = 4 / 2
    per_host.append([d["id"] for d in valid_docs(batches, packed=mode == "pack")])
  assert not set(per_host[0]) & set(per_host[1])
  assert sorted(per_host[0] + per_host[1]) == list(range(23))


def test_global_arrays_sharded_over_batch_axes():
  mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
  docs = make_docs(40)
  cfg = PipelineConfig(seq_len=T, batch_size=8, seed=0)
  batch = next(make_pipeline(docs, tokenize, cfg, mesh=mesh))
  local = next(make_pipeline(docs, tokenize, cfg, shard_index=0, shard_count=1))
  want = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  for k, v in batch.items():
    assert isinstance(v, jax.Array)
    assert v.shape == local[k].shape == ((8, T) if k != "valid" else (8,))
    assert v.sharding.is_equivalent_to(want, v.ndim), k
    assert {s.data.shape[0] for s in v.addressable_shards} == {1}
    np.testing.assert_array_equal(np.asarray(v), local[k])


def test_batch_size_must_divide_hosts_and_mesh():
  mesh = jax.make_mesh((2, 4, 1), ("data", "fsdp", "tensor"))
  docs = make_docs(8)
  with pytest.raises(ValueError, match=r"batch_size=12 .* size 8 .*\('data', 'fsdp'\)"):
    make_pipeline(docs, tokenize, PipelineConfig(seq_len=T, batch_size=12), mesh=mesh)
  with pytest.raises(ValueError, match=r"batch_size=5 .*\(processes\) 2"):
    make_pipeline(
      docs, tokenize, PipelineConfig(seq_len=T, batch_size=5), shard_index=0, shard_count=2
    )
  with pytest.raises(ValueError, match=r"\['model'\] are not in the mesh"):
    make_pipeline(
      docs, tokenize, PipelineConfig(seq_len=T, batch_size=8), mesh=mesh, batch_axes=("model",)
    )
  with pytest.raises(ValueError, match="mode must be one of"):
    PipelineConfig(seq_len=T, batch_size=8, mode="stack")


@pytest.mark.parametrize(
  "overrides",
  [
    {"num_packing_bins": 6},  # batches of 4 rows straddle packer rounds of 6 rows
    {"mode": "pad"},
    {"on_error": "skip", "prefetch_batches": 2, "num_threads": 2},
  ],
  ids=["pack", "pad", "skips+threads"],
)
def test_resume_gives_the_same_next_batches(overrides):
  # 20 documents of ~7 tokens fill ~3 packed batches of 4 x 16: steps 0..10 cross epochs.
  docs = make_docs(20)
  tok = tokenize
  if overrides.get("on_error") == "skip":
    def tok(record):
      if record["id"] % 6 == 5:
        raise KeyError("text")
      return tokenize(record)
  cfg = PipelineConfig(seq_len=T, batch_size=4, seed=11, **overrides)
  reference = make_pipeline(docs, tok, cfg, shard_index=0, shard_count=1)
  ref = take(reference, 12)
  ref_stats = reference.stats()
  assert ref_stats["records"] > 2 * len(docs)  # the positions below span several epochs
  for k in (0, 1, 3, 4, 7):
    it = make_pipeline(docs, tok, cfg, shard_index=0, shard_count=1)
    take(it, k)
    state = json.loads(json.dumps(it.get_state()))
    restored = make_pipeline(docs, tok, cfg, shard_index=0, shard_count=1)
    restored.set_state(state)
    assert_batches_equal(take(restored, 12 - k), ref[k:])
    if not overrides.get("prefetch_batches"):  # counters run ahead with prefetching
      assert restored.stats() == ref_stats
  if overrides.get("on_error") == "skip":
    assert ref_stats["skipped_error"] > 0


def test_on_too_long():
  docs = make_docs(12, long_every=4)  # records 3, 7, 11 have T + 5 tokens
  base = PipelineConfig(seq_len=T, batch_size=2, shuffle=False, num_epochs=1,
                        drop_remainder=False)

  it = make_pipeline(docs, tokenize, base, shard_index=0, shard_count=1)
  found = {d["id"]: d for d in valid_docs(list(it), packed=True)}
  assert sorted(found) == list(range(12))
  for i in (3, 7, 11):
    assert len(found[i]["tokens"]) == T
    check_doc(found[i], source_len=T + 5)
  assert it.stats()["truncated"] == 3 and it.stats()["truncated_tokens"] == 15

  it = make_pipeline(docs, tokenize, dataclasses.replace(base, on_too_long="skip"),
                     shard_index=0, shard_count=1)
  found = valid_docs(list(it), packed=True)
  assert sorted(d["id"] for d in found) == [i for i in range(12) if i not in (3, 7, 11)]
  assert it.stats()["skipped_too_long"] == 3 and it.stats()["records"] == 12

  it = make_pipeline(docs, tokenize, dataclasses.replace(base, on_too_long="raise"),
                     shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match=r"record 3 \(_source='data.jsonl:4'\) has 21 tokens"):
    list(it)


def flaky_tokenize(record):
  if record["id"] == 5:
    raise KeyError("missing 'text'")
  if record["id"] == 8:  # malformed: a per-token field of the wrong length
    out = tokenize(record)
    return {**out, "loss_mask": out["loss_mask"][:-1]}
  return tokenize(record)


def test_on_error(caplog):
  docs = make_docs(12)
  cfg = PipelineConfig(seq_len=T, batch_size=2, shuffle=False, num_epochs=1,
                       drop_remainder=False)
  it = make_pipeline(docs, flaky_tokenize, cfg, shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match=r"record 5 \(_source='data.jsonl:6'\).*KeyError"):
    list(it)

  it = make_pipeline(docs, flaky_tokenize, dataclasses.replace(cfg, on_error="skip"),
                     shard_index=0, shard_count=1)
  with caplog.at_level(logging.WARNING, logger="llama_jax.data.pipeline"):
    found = valid_docs(list(it), packed=True)
  assert "record 5 (_source='data.jsonl:6')" in caplog.text and "record 8" in caplog.text
  assert sorted(d["id"] for d in found) == [i for i in range(12) if i not in (5, 8)]
  stats = it.stats()
  assert stats["skipped_error"] == 2 and stats["examples"] == 10 and stats["records"] == 12


def test_unusable_tokenize_fn_fails_at_build_time():
  def broken(record):
    raise RuntimeError("no tokenizer")

  with pytest.raises(ValueError, match=r"(?s)no usable example.*record 0.*no tokenizer"):
    make_pipeline(make_docs(3), broken, PipelineConfig(seq_len=T, batch_size=2),
                  shard_index=0, shard_count=1)


def test_malformed_output_names_the_field():
  docs = make_docs(10)
  cfg = PipelineConfig(seq_len=T, batch_size=2, shuffle=False, num_epochs=1)
  it = make_pipeline(docs[6:], flaky_tokenize, cfg, shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match=r"record 2 \(_source='data.jsonl:9'\).*'loss_mask' has"):
    list(it)


def test_drop_remainder_is_counted():
  docs = make_docs(10)
  cfg = PipelineConfig(seq_len=T, batch_size=4, mode="pad", shuffle=False, num_epochs=1)
  it = make_pipeline(docs, tokenize, cfg, shard_index=0, shard_count=1)
  assert len(list(it)) == 2
  assert it.stats()["dropped_rows"] == 2


def test_workers_give_the_same_batches():
  docs = make_docs(30)
  cfg = PipelineConfig(seq_len=T, batch_size=4, seed=5)
  ref = take(make_pipeline(docs, tokenize, cfg, shard_index=0, shard_count=1), 8)
  with make_pipeline(docs, tokenize, dataclasses.replace(cfg, worker_count=2),
                     shard_index=0, shard_count=1) as it:
    assert_batches_equal(take(it, 4), ref[:4])
    state = json.loads(json.dumps(it.get_state()))
    assert_batches_equal(take(it, 2), ref[4:6])
    it.set_state(state)
    assert_batches_equal(take(it, 4), ref[4:])


@pytest.mark.parametrize("flaky", [False, True])
def test_eval_pipeline_covers_every_example_once(flaky):
  docs = make_docs(11)
  cfg = PipelineConfig(seq_len=T, batch_size=4, mode="pack", seed=3, on_error="skip")
  seen = collections.Counter()
  for host in range(2):
    it = make_eval_pipeline(docs, flaky_tokenize if flaky else tokenize, cfg,
                            shard_index=host, shard_count=2)
    batches = list(it)
    assert len(batches) == len(it) == 3  # ceil(ceil(11 / 2) / 2) on both hosts
    for b in batches:
      assert b["rating"].shape == (2,)  # pad mode
      assert (b["segment_ids"][b["valid"] == 0] == 0).all()
      assert (b["segment_ids"][b["valid"] == 1] > 0).any(axis=1).all()
    found = valid_docs(batches, packed=False)
    for doc in found:
      check_doc(doc)
    seen.update(d["id"] for d in found)
  # Skipped records leave padding rows: still the same number of batches on every host.
  assert seen == collections.Counter(i for i in range(11) if not (flaky and i in (5, 8)))


def test_workers_leave_absl_flags_unparsed():
  """Outside an absl app a pipeline with workers does not mark the process's flags parsed."""
  from absl import flags

  if flags.FLAGS.is_parsed():
    pytest.skip("an earlier test parsed the absl flags of this process")
  cfg = PipelineConfig(seq_len=T, batch_size=4, seed=5, worker_count=1)
  with make_pipeline(make_docs(8), tokenize, cfg, shard_index=0, shard_count=1) as it:
    take(it, 1)
  assert not flags.FLAGS.is_parsed()


@pytest.mark.parametrize("data,kind,options,fields,needed,looks_like", [
  ("sft", "text", {}, "['id', 'messages']", "['text']", "'sft' record, for supervised fine-tuning"),
  ("corpus", "sft", {}, "['text']", "['messages']", "'text' record, for pretraining"),
  ("rl_prompt", "preference", {"side": "chosen"},
   "['concern', 'id', 'is_unsafe', 'prompt', 'reference', 'task']",
   "['prompt', 'chosen', 'rejected', 'concern']", "'rl_prompt' record, for rejection sampling"),
], ids=["sft_to_pretraining", "text_to_sft", "rl_prompts_to_preference"])
def test_data_of_another_kind_names_dataset_record_and_fields(data, kind, options, fields, needed,
                                                              looks_like):
  """SFT chats given to pretraining raised `KeyError: 'text'`; now the dataset, the record,
  its fields, the fields the stage needs and the kind the record looks like are named."""
  from llama_jax.data import bundled, make_tokenize_fn, records  # noqa: PLC0415
  from llama_jax.tokenizer import tiny_tokenizer  # noqa: PLC0415

  tokenize = make_tokenize_fn(kind, tiny_tokenizer("llama3"), **options)
  with pytest.raises(records.KindMismatchError, match=re.escape(
      f"dataset 'bundled {data}' split 'train' record 0 has fields {fields}, but this stage "
      f"reads {kind!r} records ({records.STAGES[kind]}), which need {needed}; it looks like a "
      f"{looks_like}")):
    make_pipeline(bundled.load(data, "train"), tokenize, PipelineConfig(seq_len=64, batch_size=2),
                  shard_index=0, shard_count=1)
