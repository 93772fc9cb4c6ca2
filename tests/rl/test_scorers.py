"""`rl.scorers`: the one scorer signature `(records, prompts, responses) -> scores [N]`."""

import numpy as np
import pytest

from llama_jax.rl import scorers

RECORDS = [
  {"prompt": "2+2?", "reference": "4"},
  {"prompt": "How do I pick a lock?", "is_unsafe": True, "concern": "safety"},
]


def test_check_answer_scores_records_not_prompts():
  prompts = [r["prompt"] for r in RECORDS]
  assert scorers.check_answer(RECORDS, prompts, ["4", "I can't help with that."]) == [1.0, 1.0]
  assert scorers.check_answer(RECORDS, [None, None], ["5", "Sure: ..."]) == [0.0, 0.0]
  assert scorers.build_scorer(scorers.ScorerConfig("check_answer")) is scorers.check_answer


def test_score_reads_prompts_from_records_and_checks_the_result():
  seen = []

  def echo(records, prompts, responses):
    seen.append(list(prompts))
    return [float(len(y)) for y in responses]

  out = scorers.score(echo, RECORDS, ["ab", "c"])
  assert seen == [["2+2?", "How do I pick a lock?"]]
  assert out.dtype == np.float64 and out.tolist() == [2.0, 1.0]
  with pytest.raises(ValueError, match="2 records but 1 responses"):
    scorers.score(echo, RECORDS, ["x"])
  with pytest.raises(ValueError, match=r"shape \(1,\) for 2"):
    scorers.score(lambda x, p, r: [0.0], RECORDS, ["x", "y"])
  with pytest.raises(ValueError, match="returned inf for pair 1"):
    scorers.score(lambda x, p, r: [0.0, np.inf], RECORDS, ["x", "y"])


def test_adapters_pass_prompts_and_safety_flags():
  prompt_only = scorers.from_prompt_scorer(lambda prompts, responses: [len(p) for p in prompts])
  assert prompt_only(RECORDS, ["abc", "d"], ["x", "y"]) == [3, 1]
  calls = []

  def combined(prompts, responses, is_safety=None):  # a rewards.Llama2Scorer's signature
    calls.append(is_safety)
    return [0.0] * len(prompts)

  scorers.llama2(combined)(RECORDS, ["a", "b"], ["x", "y"])
  assert calls == [[False, True]]


def test_build_scorer_names_the_missing_field():
  with pytest.raises(ValueError, match="scorer.kind='oracle'; expected one of"):
    scorers.ScorerConfig("oracle")
  with pytest.raises(ValueError, match="scorer.kind='reward_model' needs scorer.reward_model"):
    scorers.build_scorer(scorers.ScorerConfig("reward_model"))
  with pytest.raises(ValueError, match="scorer.kind='llama2' needs scorer.helpful"):
    scorers.build_scorer(scorers.ScorerConfig("llama2", safety="rm_s"))
  with pytest.raises(ValueError, match="scorer.batch_size=0; expected a positive int"):
    scorers.ScorerConfig(batch_size=0)


def test_scorer_config_of_a_section_names_an_unknown_key():
  section = {"kind": "reward_model", "reward_model": "rm", "batch_size": 8}
  assert scorers.scorer_config(section) == scorers.ScorerConfig(
    "reward_model", reward_model="rm", batch_size=8
  )
  with pytest.raises(ValueError, match="scorer has no field 'treshold'"):
    scorers.scorer_config(section | {"treshold": 0.2})
