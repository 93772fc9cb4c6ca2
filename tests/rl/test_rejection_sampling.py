"""Rejection sampling: the best of K is the argmax, answers pool across rounds (re-scored by the
current round's scorer), and the pool becomes a TFDS SFT dataset."""

import itertools
import json

import jax
import numpy as np
import pytest

from experiments import rejection_sampling as rs
from experiments.configs import rejection_sampling as configs
from experiments.configs.base import TINY_MODEL
from llama_jax import LlamaConfig
from llama_jax.data import load_source
from llama_jax.data.records import prompt_messages
from llama_jax.model import reward_model
from llama_jax.parallel import sharding
from llama_jax.rl import rejection_sampling as rs_lib
from llama_jax.rl import rewards, scorers
from llama_jax.rl.best_of_k import select_best
from llama_jax.testing import save_workdir
from llama_jax.tokenizer import tiny_tokenizer
from llama_jax.training import train_state as ts

SMALL = dict(num_layers=2, d_model=64, head_dim=16, mlp_dim=128)


def test_expected_best_of_n_equals_the_mean_over_all_subsets():
  scores = np.random.default_rng(0).normal(size=(3, 5))
  curve = rs_lib.expected_best_of_n(scores)
  for n in range(1, 6):
    brute = np.mean(
      [np.mean([max(row[list(c)]) for c in itertools.combinations(range(5), n)]) for row in scores]
    )
    assert curve[n - 1] == pytest.approx(brute, abs=1e-12)
  assert curve[0] == pytest.approx(scores.mean()) and curve[-1] == pytest.approx(
    scores.max(1).mean()
  )


def test_pool_keeps_the_higher_score_per_prompt_and_every_prompt():
  def entry(response, score, round_):
    return {"record": {"prompt": "p"}, "response": response, "score": score, "round": round_}

  earlier = {"a": entry("old a", 2.0, 1), "b": entry("old b", 0.5, 1), "c": entry("old c", 0.0, 1)}
  current = {"a": entry("new a", 1.0, 2), "b": entry("new b", 0.5, 2), "d": entry("new d", -1.0, 2)}
  pooled = rs_lib.pool_answers(current, earlier)
  assert {k: v["response"] for k, v in pooled.items()} == {
    "a": "old a",  # the earlier answer scores higher
    "b": "new b",  # a tie goes to this round
    "c": "old c",  # prompts of earlier rounds only are kept
    "d": "new d",
  }


def entry(response, score, round_, prompt="p"):
  return {"record": {"prompt": prompt}, "response": response, "score": score, "round": round_}


def test_round_stats_by_hand():
  scores = np.array([[1.0, 3.0, 2.0], [0.0, 0.0, 6.0]])
  stats = rs_lib.round_stats(scores, 3)
  assert stats["round"] == 3 and stats["prompts"] == 2 and stats["samples_per_prompt"] == 3
  assert stats["score/best"] == pytest.approx((3 + 6) / 2)
  assert stats["score/median"] == pytest.approx((2 + 0) / 2)
  assert stats["score/mean"] == pytest.approx(12 / 6)
  assert stats["score/best_minus_median"] == pytest.approx((1 + 6) / 2)
  # Best of 2 of {1, 2, 3}: pairs' maxima 2, 3, 3 → 8/3; of {0, 0, 6}: 0, 6, 6 → 4.
  assert stats["best_of_n"] == pytest.approx([2.0, (8 / 3 + 4) / 2, 4.5])


def test_round_entries_keep_the_argmax_per_record():
  records = [{"id": "a", "prompt": "pa"}, {"prompt": "pb"}]
  selection = select_best(
    lambda recs, prompts, ys: [float(len(y)) for y in ys], records, [["x", "xyz"], ["yy", "y"]]
  )
  samples, entries = rs_lib.round_entries(records, selection, 2)
  key_b = rs_lib.prompt_key(records[1])
  assert key_b == json.dumps(prompt_messages("pb"))  # no id: the messages identify it
  assert [s["key"] for s in samples] == ["a", key_b]
  assert [s["best"] for s in samples] == [1, 0]
  assert samples[0]["scores"] == [1.0, 3.0] and samples[1]["responses"] == ["yy", "y"]
  assert entries == {
    "a": {"record": records[0], "response": "xyz", "score": 3.0, "round": 2},
    key_b: {"record": records[1], "response": "yy", "score": 2.0, "round": 2},
  }


def test_merge_pools_keeps_the_best_earlier_entry_and_pool_entry_checks_rows():
  first = [("a", entry("a1", 1.0, 1)), ("b", entry("b1", 5.0, 1))]
  second = [("a", entry("a2", 2.0, 2)), ("b", entry("b2", 5.0, 2)), ("c", entry("c2", 0.0, 2))]
  merged = rs_lib.merge_pools([first, second])
  assert {k: e["response"] for k, e in merged.items()} == {"a": "a2", "b": "b1", "c": "c2"}
  row = {"key": "a", **entry("x", 1.0, 1), "extra": 0}
  assert rs_lib.pool_entry(row) == ("a", entry("x", 1.0, 1))
  with pytest.raises(ValueError, match="not a pool entry.*score"):
    rs_lib.pool_entry({"key": "a", "record": {"prompt": "p"}, "response": "x", "round": 1})
  with pytest.raises(ValueError, match="not a pool entry.*prompt"):
    rs_lib.pool_entry({"key": "a", **entry("x", 1.0, 1), "record": {}})


def test_rescore_uses_the_scorer_once_over_every_entry():
  calls = []

  def scorer(records, prompts, responses):
    calls.append(list(responses))
    return [10.0 * len(y) for y in responses]

  old = {"a": entry("xx", 1.0, 1, "pa"), "b": entry("y", 9.0, 1, "pb")}
  new = rs_lib.rescore(scorer, old)
  assert calls == [["xx", "y"]]
  assert {k: e["score"] for k, e in new.items()} == {"a": 20.0, "b": 10.0}
  assert new["a"]["response"] == "xx" and new["a"]["round"] == 1 and old["a"]["score"] == 1.0
  assert rs_lib.rescore(scorer, {}) == {} and len(calls) == 1


def test_pool_stats_and_sft_records():
  current = {"a": entry("new a", 1.0, 2), "b": entry("", 3.0, 2)}
  earlier = {"a": entry("old a", 2.0, 1), "c": entry("old c", 0.0, 1)}
  pool = rs_lib.pool_answers(current, earlier)
  assert rs_lib.pool_stats(pool, current, 2) == {
    "pool/size": 2,  # old a, old c; b's answer is empty
    "pool/from_this_round": 0,
    "pool/earlier_answer_kept": 1,  # a
    "pool/dropped_empty": 1,
  }
  kept = {"record": {"id": "q1", "prompt": "Hi?"}, "response": "Hello.", "score": 1, "round": 1}
  assert rs_lib.sft_record(kept) == {
    "id": "q1",
    "messages": [*prompt_messages("Hi?"), {"role": "assistant", "content": "Hello."}],
  }


def test_check_stats_cover_checkable_records_only():
  samples = [
    {"record": {"prompt": "2+2?", "reference": "4"}, "responses": ["4", "5"], "best": 0},
    {"record": {"prompt": "2+3?", "reference": "5"}, "responses": ["5", "6"], "best": 1},
    {"record": {"prompt": "chat"}, "responses": ["hi", "yo"], "best": 0},
  ]
  assert rs_lib.check_stats(samples) == {"check/best": 0.5, "check/all_samples": 0.5}
  assert rs_lib.check_stats(samples[2:]) == {}


def make_rm_workdir(path, seed):
  """A reward-model workdir as `experiments.reward_model` leaves it: model_config.json and an
  Orbax TrainState checkpoint (random weights: the scores only need to be a fixed function)."""
  config = LlamaConfig.preset(
    "tiny", **{k: v for k, v in TINY_MODEL.items() if k != "preset"} | SMALL
  )
  opt = ts.make_optimizer(ts.OptimizerConfig(warmup_steps=1, total_steps=2))
  rm = reward_model.RewardModel(config)
  state = ts.init_train_state(rm, opt, sharding.make_mesh(), jax.random.PRNGKey(seed))
  return save_workdir(path, config, state)


def round_config(start, seed, **scorer):
  cfg = configs.get_config("tiny")
  cfg.model.update(**SMALL, initializer_range=0.1)  # a random policy, but not a uniform one
  cfg.data.update(start=start, num_prompts=8, batch_size=8)
  cfg.generation.update(num_samples=4, max_new_tokens=12, seed=seed, prompt_bucket=64)
  cfg.scorer.update(batch_size=16, **scorer)
  return cfg


def read_jsonl(path):
  return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
  root = tmp_path_factory.mktemp("rs")
  rm_a, rm_b = make_rm_workdir(root / "rm_a", 1), make_rm_workdir(root / "rm_b", 2)
  first = rs.run(round_config(0, seed=0, reward_model=rm_a), str(root / "round1"))
  cfg = round_config(4, seed=1, kind="llama2", helpful=rm_a, safety=rm_b)
  cfg.pool_from = str(root / "round1")
  second = rs.run(cfg, str(root / "round2"))
  return root, (rm_a, rm_b), first, second


def test_a_round_keeps_the_argmax_and_writes_an_sft_dataset(rounds):
  root, (rm_a, _), first, _ = rounds
  samples = read_jsonl(root / "round1" / rs.SAMPLES_FILE)
  assert len(samples) == 8 and all(len(s["responses"]) == 4 for s in samples)
  scores = np.array([s["scores"] for s in samples])
  assert [s["best"] for s in samples] == np.argmax(scores, axis=1).tolist()
  # The scores are the reward model's: score the kept answers again, independently.
  scorer = rewards.RewardScorer.from_workdir(rm_a, tiny_tokenizer("llama3"))
  best = [s["responses"][s["best"]] for s in samples]
  np.testing.assert_allclose(
    scorer([s["record"]["prompt"] for s in samples], best), scores.max(1), rtol=1e-5, atol=1e-5
  )
  assert first["score/best"] == pytest.approx(scores.max(1).mean())
  assert first["score/median"] == pytest.approx(np.median(scores, 1).mean())
  assert first["score/best"] > first["score/median"]
  assert first["round"] == 1 and first["pool/size"] + first["pool/dropped_empty"] == 8

  # The SFT dataset: the prompt's messages, then the kept answer; readable through TFDS.
  source = load_source("rejection_sampled", "train", root / "round1" / rs.TFDS_DIR)
  by_id = {r["id"]: r for r in source}
  for s, answer in zip(samples, best, strict=True):
    if answer.strip():
      messages = by_id[s["record"]["id"]]["messages"]
      assert messages[:-1] == prompt_messages(s["record"]["prompt"])
      assert messages[-1] == {"role": "assistant", "content": answer}
  assert len(by_id) == first["pool/size"]
  assert (root / "round1" / rs.PLOT_FILE).read_bytes()[:4] == b"\x89PNG"


def test_the_next_round_pools_every_earlier_answer_rescored(rounds):
  root, (rm_a, rm_b), first, second = rounds
  tokenizer = tiny_tokenizer("llama3")
  combined = rewards.Llama2Scorer(
    rewards.RewardScorer.from_workdir(rm_a, tokenizer),
    rewards.RewardScorer.from_workdir(rm_b, tokenizer),
    whitening="none",
  )

  def score(entries):
    records = [e["record"] for e in entries]
    safety = [r["concern"] == "safety" for r in records]
    return combined([r["prompt"] for r in records], [e["response"] for e in entries], safety)

  old = {e["key"]: e for e in read_jsonl(root / "round1" / rs.POOL_FILE)}
  new = {s["key"]: s for s in read_jsonl(root / "round2" / rs.SAMPLES_FILE)}
  pool = {e["key"]: e for e in read_jsonl(root / "round2" / rs.POOL_FILE)}
  assert len(old) == len(new) == 8 and set(pool) == set(old) | set(new) and len(pool) == 12
  old_keys = list(old)
  rescored = dict(zip(old_keys, score([old[k] for k in old_keys]), strict=True))
  earlier_kept = 0
  for key, entry in pool.items():
    candidates = []
    if key in new:
      s = new[key]
      candidates.append((max(s["scores"]), 2, s["responses"][s["best"]]))
    if key in old:
      candidates.append((rescored[key], 1, old[key]["response"]))
    best_score = max(c[0] for c in candidates)
    assert entry["score"] == pytest.approx(best_score, abs=1e-5)
    winners = [c for c in candidates if c[0] >= best_score - 1e-5]
    assert (entry["score"], entry["round"], entry["response"]) in [
      (pytest.approx(c[0], abs=1e-5), c[1], c[2]) for c in winners
    ]
    earlier_kept += key in new and entry["round"] == 1
  assert second["pool/earlier_answer_kept"] == earlier_kept
  print(rs_lib.stats_table([first, second]), f"earlier answers kept: {earlier_kept}")
  assert second["round"] == 2
  history = json.loads((root / "round2" / rs.STATS_FILE).read_text())["rounds"]
  assert [h["round"] for h in history] == [1, 2]
  assert history[0]["score/best"] == pytest.approx(first["score/best"])
  sft = read_jsonl(root / "round2" / rs.SFT_FILE)
  assert len(sft) == second["pool/size"] == 12 - second["pool/dropped_empty"]


def test_bad_pool_and_scorer_settings_name_the_field(tmp_path):
  with pytest.raises(FileNotFoundError, match="pool_from=.*no pool.jsonl"):
    rs.read_pool([str(tmp_path)])
  (tmp_path / rs.POOL_FILE).write_text('{"key": "a", "response": "x"}\n')
  (tmp_path / rs.STATS_FILE).write_text('{"round": 1, "rounds": []}')
  with pytest.raises(ValueError, match=r"pool.jsonl:1: not a pool entry"):
    rs.read_pool([str(tmp_path)])
  (tmp_path / rs.POOL_FILE).write_text("{not json\n")
  with pytest.raises(ValueError, match=r"pool.jsonl:1: not a pool entry"):
    rs.read_pool([str(tmp_path)])
  cfg = configs.get_config("tiny")
  with pytest.raises(ValueError, match="scorer.kind='llama2' needs scorer.helpful"):
    cfg.scorer.kind = "llama2"
    scorers.scorer_from_section(cfg.scorer)
  cfg.scorer.kind = "oracle"
  with pytest.raises(ValueError, match="scorer.kind='oracle'"):
    scorers.scorer_from_section(cfg.scorer)
