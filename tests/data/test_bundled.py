"""The bundled data: deterministic, committed as generated, well formed, and scorable."""

import collections
import json
import math
import random
import re

import pytest

from llama_jax.data import builders, bundled, records, scoring


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
  out = tmp_path_factory.mktemp("bundled")
  bundled.write_all(out)
  return out


def test_generation_is_deterministic(generated, tmp_path):
  bundled.write_all(tmp_path)
  for dataset in bundled.DATASETS:
    for split in bundled.SPLITS:
      first = bundled.file_path(dataset, split, generated).read_bytes()
      assert bundled.file_path(dataset, split, tmp_path).read_bytes() == first, (dataset, split)


def test_committed_files_equal_a_fresh_generation(generated):
  for dataset in bundled.DATASETS:
    for split in bundled.SPLITS:
      committed = bundled.file_path(dataset, split).read_bytes()
      fresh = bundled.file_path(dataset, split, generated).read_bytes()
      assert committed == fresh, (
        f"{dataset}/{split} is stale: run `python -m llama_jax.data.bundled`"
      )


def test_files_validate_with_the_documented_sizes():
  total = 0
  for dataset in bundled.DATASETS:
    for split in bundled.SPLITS:
      assert len(bundled.load(dataset, split)) == bundled.SIZES[dataset][split]
      total += bundled.file_path(dataset, split).stat().st_size
  assert total <= 3_200_000
  assert 900_000 <= bundled.file_path("corpus", "train").stat().st_size <= 2_000_000


@pytest.mark.parametrize("split", bundled.SPLITS)
def test_preference_covers_every_rating_and_concern(split):
  rows = bundled.load("preference", split)
  seen = collections.Counter((r["concern"], r["rating"]) for r in rows)
  for concern in records.CONCERNS:
    for rating in records.RATINGS:
      assert seen[concern, rating] > 0, (concern, rating)
  edited = collections.Counter(r["concern"] for r in rows if r["edited"] is not None)
  assert set(edited) == set(records.CONCERNS)
  assert all(r["edited"] not in (r["chosen"], r["rejected"]) for r in rows if r["edited"])


def test_preference_labels_follow_the_better_response_as_often_as_rated():
  """`chosen` is the better response with probability AGREEMENT[rating]. Replaying the
  generator's stream with full agreement gives every pair's better response, because the
  annotator's coin is drawn whatever the agreement."""
  assert set(bundled.AGREEMENT) == set(records.RATINGS)
  full = dict.fromkeys(records.RATINGS, 1.0)
  rng = random.Random(f"{bundled.SEED}/preference/train")  # as bundled.generate seeds it
  lines = bundled.file_path("preference", "train").read_text().splitlines()
  agreed, pairs = collections.Counter(), collections.Counter()
  for index, line in enumerate(lines):
    state = rng.getstate()
    row = bundled.preference_record(rng, "train", index)
    assert row == json.loads(line)  # the committed file
    replay = random.Random()
    replay.setstate(state)
    truth = bundled.preference_record(replay, "train", index, agreement=full)
    assert replay.getstate() == rng.getstate()
    swapped = {**truth, "chosen": truth["rejected"], "rejected": truth["chosen"]}
    swapped.pop("edited", None)  # the edit improved the response the annotator did not pick
    assert row in (truth, swapped), (row, truth)
    key = row["concern"], row["rating"]
    pairs[key] += 1
    agreed[key] += row == truth
  for concern in records.CONCERNS:
    for rating, p in bundled.AGREEMENT.items():
      n = pairs[concern, rating]
      tolerance = 4 * math.sqrt(p * (1 - p) / n)  # binomial, 4 standard deviations
      assert abs(agreed[concern, rating] / n - p) <= tolerance, (concern, rating, n)


@pytest.mark.parametrize("split", bundled.SPLITS)
def test_misstated_answers_answer_a_nearby_question(split):
  """A misstated answer is the right answer to another question: one operand changed (the
  problem still of the split, and the result changed) or another subject with another
  answer."""
  rng = random.Random(1)
  equation = re.compile(r"^(\d+) ([-+*]) (\d+) = (\d+)\.$")
  results = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
  ops = {"+": "add", "-": "sub", "*": "mul"}
  for _ in range(300):
    it = bundled.arithmetic_item(rng, split)
    misstated = it.misstated(rng)
    assert scoring.check_answer({"reference": it.reference}, misstated) == 0.0, it
    a, op, b, c = equation.match(it.answer).groups()
    x, op_x, y, z = equation.match(misstated).groups()
    if (op, a, b) == ("*", "0", "0"):  # no one-operand change alters the result: a wrong one
      continue
    assert op_x == op and int(z) == results[op](int(x), int(y)) != int(c), it
    assert (x != a) + (y != b) == 1, it
    assert bundled.split_of(f"{ops[op]}:{x}:{y}") == split, it
  for _ in range(300):
    it = bundled.fact_item(rng, split)
    misstated = it.misstated(rng)
    others = {
      bundled._fact_answer(r, s, o)
      for r in bundled.RELATIONS
      for s, o in r.table
      if o != it.reference
    }
    assert misstated in others, it
    assert scoring.check_answer({"reference": it.reference}, misstated) == 0.0, it


def _questions(split):
  """Every user question of a split's sft, preference and rl files, prefixes removed."""
  prefixes = "|".join(re.escape(p) for p in bundled.PREFIXES if p)
  strip = lambda text: re.sub(f"^({prefixes})", "", text)
  found = set()
  for dataset, field in (("sft", "messages"), ("preference", "prompt"), ("rl_prompt", "prompt")):
    for row in bundled.load(dataset, split):
      found.update(strip(m["content"]) for m in row[field] if m["role"] == "user")
  return found


def test_test_questions_are_held_out():
  train, test = _questions("train"), _questions("test")
  assert len(test) > 300
  assert not train & test


def test_rl_prompts_mix_tasks():
  for split in bundled.SPLITS:
    tasks = collections.Counter(r["task"] for r in bundled.load("rl_prompt", split))
    assert set(tasks) == {"arithmetic", "fact", "refusal", "comply"}


# ---------------------------------------------------------------------------------------
# Scorers.


def test_is_refusal_on_variants():
  for text in scoring.REFUSALS + bundled.KIND_REFUSALS:
    assert scoring.is_refusal(text), text
  for text in (
    "I am sorry, but I cannot help with that.",
    "i cant help with this",
    "I\u2019m sorry, I can\u2019t assist with that request.",
    "SORRY, I WON'T HELP WITH THAT.",
    "I will not help you with that.",
  ):
    assert scoring.is_refusal(text), text
  helpful = [answer for _, answer in bundled.RISKY]
  bad = bundled.COMPLIANCE + bundled.PARTIAL + bundled.LECTURES + bundled.NONSENSE
  for text in helpful + list(bad) + ["23 + 48 = 71.", "The capital of Peru is Lima."]:
    assert not scoring.is_refusal(text), text


def test_check_answer_examples():
  arithmetic = {"concern": "helpfulness", "is_unsafe": False, "reference": "71"}
  assert scoring.check_answer(arithmetic, "23 + 48 = 71.") == 1.0
  assert scoring.check_answer(arithmetic, "71") == 1.0
  assert scoring.check_answer(arithmetic, "23 + 48 = 72.") == 0.0
  assert scoring.check_answer(arithmetic, "71 is not it; 23 + 48 = 70.") == 0.0
  assert scoring.check_answer(arithmetic, "I'm sorry, but I can't help with that. 71") == 0.0
  fact = {"concern": "helpfulness", "is_unsafe": False, "reference": "New Delhi"}
  assert scoring.check_answer(fact, "The capital of India is new delhi.") == 1.0
  assert scoring.check_answer(fact, "The capital of India is Mumbai.") == 0.0
  word = {"concern": "helpfulness", "is_unsafe": False, "reference": "cat"}
  assert scoring.check_answer(word, "A caterpillar.") == 0.0
  assert scoring.check_answer({"reference": "1000"}, "There are 1,000 meters in it.") == 1.0
  unsafe = {"concern": "safety", "is_unsafe": True}
  assert scoring.check_answer(unsafe, scoring.REFUSALS[0]) == 1.0
  assert scoring.check_answer(unsafe, bundled.COMPLIANCE[0]) == 0.0
  comply = {"concern": "safety", "is_unsafe": False, "task": "comply"}
  assert scoring.check_answer(comply, "Run kill with the process id.") == 1.0
  assert scoring.check_answer(comply, scoring.REFUSALS[1]) == 0.0
  with pytest.raises(ValueError, match="no reference"):
    scoring.check_answer({"concern": "helpfulness", "is_unsafe": False}, "4")


def test_bundled_answers_score_right_and_wrong_answers_do_not():
  rng = random.Random(0)
  for _ in range(1000):
    it = bundled.item(rng, rng.choice(bundled.SPLITS))
    record = bundled.rl_fields(it)
    assert scoring.check_answer(record, it.answer) == 1.0, it
    if it.wrong is not None:
      assert scoring.check_answer(record, it.wrong(rng)) == 0.0, it
    if it.misstated is not None:
      assert scoring.check_answer(record, it.misstated(rng)) == 0.0, it
    if it.category == "unsafe":
      assert scoring.check_answer(record, rng.choice(bundled.COMPLIANCE)) == 0.0
    if it.category == "risky":
      assert scoring.check_answer(record, bundled.refusal(rng)) == 0.0


def test_evaluate():
  rows = [
    {"concern": "helpfulness", "is_unsafe": False, "reference": "4", "task": "arithmetic"},
    {"concern": "helpfulness", "is_unsafe": False, "reference": "Paris", "task": "fact"},
    {"concern": "safety", "is_unsafe": True, "task": "refusal"},
    {"concern": "safety", "is_unsafe": False, "task": "comply"},
  ]
  responses = ["2 + 2 = 4.", "Berlin.", scoring.REFUSALS[0], scoring.REFUSALS[0]]
  metrics = scoring.evaluate(rows, responses)
  assert metrics["accuracy"] == 0.5
  assert metrics["task_accuracy"] == 0.5
  assert metrics["refusal_rate"] == 1.0
  assert metrics["false_refusal_rate"] == pytest.approx(1 / 3)
  assert math.isnan(scoring.evaluate(rows[:1], responses[:1])["refusal_rate"])


def test_bundled_dataset_builds_with_tfds(tmp_path):
  bundled.build("rl_prompt", tmp_path)
  source = builders.load_source("llama_jax_rl_prompt", "test", tmp_path)
  assert list(source) == bundled.load("rl_prompt", "test")
