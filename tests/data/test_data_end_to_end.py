"""End to end: bundled JSONL -> TFDS -> tokenize -> grain pipeline -> global batches -> model."""

import collections

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from llama_jax import LlamaConfig
from llama_jax.data import (
  CONCERNS,
  RATINGS,
  PipelineConfig,
  build_dataset,
  bundled,
  load_source,
  make_eval_pipeline,
  make_pair_pipeline,
  make_pipeline,
  make_tokenize_fn,
)
from llama_jax.parallel.sharding import init_params, make_mesh
from llama_jax.testing import apply
from llama_jax.tokenizer import LLAMA3_CHAT, render_chat, render_prompt_response, tiny_tokenizer

T = 128  # seq_len
B = 8  # global batch: one row per device of the (data=2, fsdp=4) mesh
NUM_SFT = 48  # records in the TFDS slice
SCALARS = ("rating", "concern", "has_edited")  # of every preference side


@pytest.fixture(scope="module")
def tok():
  return tiny_tokenizer("llama3")


@pytest.fixture(scope="module")
def mesh():
  return make_mesh(data=2, fsdp=4)


@pytest.fixture(scope="module")
def model(tok):
  config = LlamaConfig.preset("tiny", vocab_size=tok.vocab_size)
  return config, init_params(config, jax.random.PRNGKey(0))


def _tfds_slice(tmp_path_factory, dataset: str, count: int):
  """The first `count` lines of a bundled train file, built with TFDS and opened for grain."""
  tmp = tmp_path_factory.mktemp(dataset)
  path = tmp / "train.jsonl"
  lines = bundled.file_path(dataset, "train").read_bytes().splitlines(keepends=True)
  path.write_bytes(b"".join(lines[:count]))
  build_dataset(bundled.DATASETS[dataset], f"{dataset}_slice", {"train": [path]}, tmp / "tfds")
  return load_source(f"{dataset}_slice", "train", tmp / "tfds")


@pytest.fixture(scope="module")
def sft_source(tmp_path_factory):
  return _tfds_slice(tmp_path_factory, "sft", NUM_SFT)


@pytest.fixture(scope="module")
def sft_batches(sft_source, tok, mesh):
  config = PipelineConfig(seq_len=T, batch_size=B, num_epochs=1, drop_remainder=False, seed=7)
  it = make_pipeline(sft_source, make_tokenize_fn("sft", tok), config, mesh=mesh)
  batches = list(it)
  return batches, it.stats()


def to_numpy(batch):
  return {k: np.asarray(v) for k, v in batch.items()}


def documents(batch, row):
  """The index arrays of each document (segment) of one row, in order."""
  seg = batch["segment_ids"][row]
  return [np.flatnonzero(seg == s) for s in np.unique(seg[seg > 0])]


def check_global(batch, mesh, per_token_rows):
  """Every field is a global [B, ...] array sharded over the mesh's batch axes."""
  want = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  for name, value in batch.items():
    assert isinstance(value, jax.Array), name
    assert value.shape == ((B, T) if per_token_rows(name) else (B,)), name
    assert value.sharding.is_equivalent_to(want, value.ndim), (name, value.sharding)


def sequence_logprob(logits, targets, mask):
  """sum_t log p(targets[t]) * mask[t] in float64; logits [n, V], targets/mask [n]."""
  z = np.asarray(logits, np.float64)
  z -= z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return float((np.take_along_axis(logp, targets[:, None], -1)[:, 0] * mask).sum())


def run(model, batch):
  """Logits [rows, T, V] of a batch, attending within documents (segment ids, positions)."""
  config, params = model
  kw = {"positions": batch["positions"], "segment_ids": batch["segment_ids"]}
  return np.asarray(apply(config, params, batch["tokens"], **kw))


def alone(model, tokens):
  """Logits [n, V] of one sequence run by itself (no padding, no other documents)."""
  config, params = model
  return np.asarray(apply(config, params, np.asarray(tokens)[None]))[0]


# ---------------------------------------------------------------------------------------------
# SFT: TFDS -> packed global batches.


def test_sft_tfds_to_packed_global_batches(sft_source, sft_batches, tok, mesh):
  batches, stats = sft_batches
  records = list(sft_source)
  assert records == bundled.load("sft", "train")[:NUM_SFT]  # the TFDS round trip is exact
  for batch in batches:
    check_global(batch, mesh, per_token_rows=lambda name: name != "valid")
  tokenize = make_tokenize_fn("sft", tok)
  examples = [tokenize(r) for r in records]
  # Long chats (system prompt, several turns) are cut to T: what is kept is their first T.
  expected = {tuple(e["tokens"][:T]): (r, e) for r, e in zip(records, examples, strict=True)}
  found = collections.Counter()
  docs_per_row = []
  for batch in map(to_numpy, batches):
    for row in range(B):
      docs = documents(batch, row)
      docs_per_row.append(len(docs))
      for where in docs:
        tokens = tuple(batch["tokens"][row, where])
        found[tokens] += 1
        record, example = expected[tokens]
        np.testing.assert_array_equal(batch["positions"][row, where], np.arange(len(where)))
        for field in ("loss_mask", "format_mask"):
          np.testing.assert_array_equal(batch[field][row, where], example[field][:T])
        # A packed document decodes to the rendered conversation (its start, if truncated).
        text = LLAMA3_CHAT.render_text(record["messages"])
        if len(example["tokens"]) <= T:
          assert tok.decode(tokens) == text
        else:
          assert text.startswith(tok.decode(tokens))
  # Every record exactly once over the epoch (no two records of the slice render alike).
  assert len(expected) == NUM_SFT and found == collections.Counter(list(expected))
  assert max(docs_per_row) >= 2, "rows should hold several documents"
  long = sum(len(e["tokens"]) > T for e in examples)
  assert stats["examples"] == NUM_SFT and stats["truncated"] == long
  assert 0 < long < NUM_SFT // 4  # both cases are covered


def test_packed_rows_attend_within_documents(sft_batches, model):
  """The packed row's logits and LM loss equal those of its documents run one by one."""
  batch = to_numpy(sft_batches[0][0])
  logits = run(model, sft_batches[0][0])  # the global, sharded batch as the pipeline gives it
  row = max(range(B), key=lambda r: len(documents(batch, r)))
  docs = documents(batch, row)
  assert len(docs) >= 2
  # Summed next-token cross-entropy of the row, as an LM step computes it from the batch.
  packed_loss = -sequence_logprob(logits[row], batch["targets"][row], batch["target_mask"][row])
  separate_loss = 0.0
  for where in docs:
    tokens = batch["tokens"][row, where]
    single = alone(model, tokens)
    np.testing.assert_allclose(logits[row, where], single, atol=1e-5, rtol=0)
    # Next-token loss of the document by itself: predict tokens[1:], masked by loss_mask[1:].
    separate_loss -= sequence_logprob(single[:-1], tokens[1:], batch["loss_mask"][row, where][1:])
  np.testing.assert_allclose(packed_loss, separate_loss, rtol=1e-6)
  assert packed_loss > 0  # some tokens are trained on


# ---------------------------------------------------------------------------------------------
# Preference pairs: aligned pad-mode rows per side.


def test_preference_pairs_share_rows_and_scalars(tmp_path_factory, tok, mesh, model):
  source = _tfds_slice(tmp_path_factory, "preference", 40)
  records = list(source)
  config = PipelineConfig(seq_len=T, batch_size=B, mode="pad", num_epochs=1, seed=3)
  sides = ("chosen", "rejected", "edited")
  it = make_pair_pipeline(source, tok, config, sides=sides, mesh=mesh)
  batches = list(it)
  assert len(batches) == 5 and all(set(b) == set(sides) for b in batches)
  by_prompt_chosen = {
    tuple(render_prompt_response(tok, r["prompt"], r["chosen"]).tokens): r for r in records
  }
  seen = []
  for pair_batch in batches:
    for side_batch in pair_batch.values():
      check_global(side_batch, mesh, per_token_rows=lambda n: n not in ("valid", *SCALARS))
    chosen, rejected, edited = (to_numpy(pair_batch[s]) for s in sides)
    for row in range(B):
      n = int(chosen["segment_ids"][row].sum())
      record = by_prompt_chosen[tuple(chosen["tokens"][row, :n])]
      seen.append(record["id"])
      for side, side_batch in (("rejected", rejected), ("edited", edited)):
        text = record[side] if side != "edited" or record["edited"] else record["chosen"]
        want = render_prompt_response(tok, record["prompt"], text)
        m = len(want)
        np.testing.assert_array_equal(side_batch["tokens"][row, :m], want.tokens)
        np.testing.assert_array_equal(side_batch["loss_mask"][row, :m], want.response_mask)
        assert side_batch["segment_ids"][row].sum() == m
      for scalar in SCALARS:  # the same pair on every side
        assert chosen[scalar][row] == rejected[scalar][row] == edited[scalar][row]
      assert chosen["rating"][row] == 3 - RATINGS.index(record["rating"])
      assert chosen["concern"][row] == CONCERNS.index(record["concern"])
      assert chosen["has_edited"][row] == (record["edited"] is not None)
  assert sorted(seen) == sorted(r["id"] for r in records)
  assert {r["edited"] is None for r in records} == {True, False}  # both cases are covered

  # A DPO step runs chosen and rejected as one [2B, T] batch; each row's response log-prob
  # from targets/target_mask equals that of the sequence run alone.
  both = {k: np.concatenate([chosen[k], rejected[k]]) for k in chosen}
  logits = run(model, both)
  for row in (0, B):  # the last batch's first pair: chosen and rejected
    n = int(both["segment_ids"][row].sum())
    tokens = both["tokens"][row, :n]
    single = alone(model, tokens)
    np.testing.assert_allclose(logits[row, :n], single, atol=1e-5, rtol=0)
    in_batch = sequence_logprob(logits[row], both["targets"][row], both["target_mask"][row])
    by_hand = sequence_logprob(single[:-1], tokens[1:], both["loss_mask"][row, 1:n])
    np.testing.assert_allclose(in_batch, by_hand, rtol=1e-6)


def test_pair_pipeline_refuses_layouts_that_misalign_pairs(tok):
  source = bundled.load("preference", "test")[:8]
  with pytest.raises(ValueError, match="mode='pad'"):
    make_pair_pipeline(source, tok, PipelineConfig(seq_len=T, batch_size=B, mode="pack"))
  with pytest.raises(ValueError, match="skip"):
    make_pair_pipeline(
      source, tok, PipelineConfig(seq_len=T, batch_size=B, mode="pad", on_too_long="skip")
    )
  with pytest.raises(ValueError, match="side"):
    make_tokenize_fn("preference", tok)
  with pytest.raises(TypeError, match="unknown options"):
    make_tokenize_fn("text", tok, fmt="llama3")


# ---------------------------------------------------------------------------------------------
# Pad mode: the text corpus; RL prompts.


def test_text_corpus_in_pad_mode(tok, mesh, model):
  records = bundled.load("corpus", "test")[:36]
  config = PipelineConfig(seq_len=T, batch_size=B, mode="pad")
  it = make_eval_pipeline(records, make_tokenize_fn("text", tok), config, mesh=mesh)
  batches = [to_numpy(b) for b in it]
  assert len(batches) == len(it) == 5
  rows = {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}
  np.testing.assert_array_equal(rows["valid"], [1] * 36 + [0] * 4)
  truncated = 0
  for i, record in enumerate(records):  # unshuffled: row i is record i
    ids = tok.encode(record["text"], bos=True, eos=True)
    n = min(len(ids), T)
    truncated += len(ids) > T
    np.testing.assert_array_equal(rows["tokens"][i, :n], ids[:n])
    np.testing.assert_array_equal(rows["segment_ids"][i], np.arange(T) < n)
    np.testing.assert_array_equal(rows["positions"][i], np.where(np.arange(T) < n, np.arange(T), 0))
    np.testing.assert_array_equal(rows["targets"][i, : n - 1], ids[1:n])
    np.testing.assert_array_equal(rows["target_mask"][i], np.arange(T) < n - 1)
  assert (rows["segment_ids"][36:] == 0).all()
  assert it.stats()["truncated"] == truncated > 0

  # Padding after a document changes none of its logits.
  first = batches[0]
  logits = run(model, first)
  n = int(first["segment_ids"][0].sum())
  np.testing.assert_allclose(logits[0, :n], alone(model, first["tokens"][0, :n]), atol=1e-5)


def test_rl_prompts_end_at_the_assistant_header(tok):
  records = bundled.load("rl_prompt", "test")[:16]
  tokenize = make_tokenize_fn("rl_prompt", tok)
  config = PipelineConfig(seq_len=T, batch_size=B, mode="pad")
  batch = next(iter(make_eval_pipeline(records, tokenize, config)))
  for row, record in enumerate(records[:B]):
    want = render_chat(tok, record["prompt"], add_generation_prompt=True).tokens
    np.testing.assert_array_equal(batch["tokens"][row, : len(want)], want)
    assert tok.decode(want).endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert batch["is_unsafe"][row] == record["is_unsafe"]
    assert batch["concern"][row] == CONCERNS.index(record["concern"])
  assert batch["target_mask"].sum() > 0 and "loss_mask" not in batch
