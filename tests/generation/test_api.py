"""`generate` and `best_of_k` with a tokenizer, and `experiments.generate` end to end."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import generate as generate_exp
from experiments import models, runs, sections
from experiments.configs import generate as generate_configs
from llama_jax import LlamaConfig
from llama_jax.checkpoint import orbax as ckpt_lib
from llama_jax.checkpoint import save_hf_checkpoint
from llama_jax.generation import generate, response_text
from llama_jax.model import reward_model
from llama_jax.parallel import sharding
from llama_jax.parallel.sharding import init_params
from llama_jax.rl import rewards
from llama_jax.rl.best_of_k import best_of_k, score_candidates, select_best
from llama_jax.testing import save_workdir
from llama_jax.tokenizer import render_chat, tiny_tokenizer
from llama_jax.training import train_state as ts

ROOT = Path(__file__).resolve().parents[2]
# One prompt bucket (64) for every call below, so they share one compiled decoder.
OPTIONS = dict(max_new_tokens=12, temperature=1.0, top_p=0.95, key=5, prompt_bucket=64)


@pytest.fixture(scope="module")
def tiny():
  tokenizer = tiny_tokenizer("llama3")
  config = LlamaConfig.preset("tiny", vocab_size=tokenizer.vocab_size, initializer_range=0.1)
  return config, init_params(config, jax.random.key(0)), tokenizer


PROMPTS = [
  "What is 2 + 3?",
  [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "Name the capital of France."},
  ],
]


@pytest.fixture(scope="module")
def chat_generation(tiny):
  config, params, tokenizer = tiny
  return generate(config, params, tokenizer, PROMPTS, num_samples=3, chat=True, **OPTIONS)


def test_generate_renders_chats_and_decodes_texts(tiny, chat_generation):
  _, _, tokenizer = tiny
  out = chat_generation
  assert out.tokens.shape == out.mask.shape == out.logprobs.shape == (2, 3, 12)
  user = [{"role": "user", "content": PROMPTS[0]}]
  assert (
    out.prompt_tokens[0] == render_chat(tokenizer, user, add_generation_prompt=True).tokens.tolist()
  )
  assert out.prompt_tokens[1][-1] == tokenizer.encode("\n\n")[-1]  # the assistant header
  for b in range(2):
    for r in range(3):
      ids = out.tokens[b, r][out.mask[b, r] == 1].tolist()
      if ids[-1] in tokenizer.stop_ids:
        ids = ids[:-1]
      assert out.texts[b][r] == tokenizer.decode(ids)
  assert len({t for row in out.texts for t in row}) == 6  # samples differ


def test_generate_text_prompts_without_chat(tiny):
  config, params, tokenizer = tiny
  texts = ["Once upon a time", "The cat"]
  out = generate(config, params, tokenizer, texts, num_samples=3, **OPTIONS)
  assert out.prompt_tokens == [tokenizer.encode(t, bos=True) for t in texts]
  assert len(out.texts) == 2 and len(out.texts[1]) == 3
  with pytest.raises(TypeError, match="not one string"):
    generate(config, params, tokenizer, "Once upon a time")


def test_response_text_drops_only_a_final_stop_id(tiny):
  _, _, tok = tiny
  eot = tok.special_id("<|eot_id|>")
  ids = tok.encode("Paris.")
  assert response_text(tok, ids + [eot, 0], [1] * len(ids) + [1, 0], tok.stop_ids) == "Paris."
  assert response_text(tok, ids, [1] * len(ids), tok.stop_ids) == "Paris."


def test_best_of_k_keeps_the_highest_score(tiny, chat_generation):
  config, params, tokenizer = tiny
  calls = []

  def longest(records, prompts, responses):  # a real programmatic scorer: prefer longer answers
    calls.append((list(records), list(prompts), list(responses)))
    return [float(len(r)) for r in responses]

  result = best_of_k(
    config, params, tokenizer, PROMPTS, 3, longest, chat=True, **OPTIONS
  )  # fmt: skip
  # Same key and options as `chat_generation`: the same compiled function, the same samples.
  assert result.candidates == chat_generation.texts
  assert calls[0][1] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
  assert calls[0][0] == [{"prompt": p} for p in calls[0][1]]  # records default to the prompt
  assert result.scores.shape == (2, 3)
  for b in range(2):
    lengths = [len(t) for t in result.candidates[b]]
    assert result.best_index[b] == int(np.argmax(lengths))
    assert result.best[b] == result.candidates[b][result.best_index[b]]
    assert result.scores[b].tolist() == lengths


def test_scorer_mistakes_fail_loudly():
  records, candidates = [{"prompt": "a"}, {"prompt": "b"}], [["x", "yy"], ["z", "w"]]
  with pytest.raises(ValueError, match="shape \\(3,\\) for 4"):
    score_candidates(lambda x, p, r: [1.0, 2.0, 3.0], records, candidates)
  with pytest.raises(ValueError, match="returned nan for pair 1"):
    score_candidates(lambda x, p, r: [1.0, float("nan"), 0.0, 0.0], records, candidates)
  with pytest.raises(ValueError, match="same number of candidates"):
    score_candidates(lambda x, p, r: [0.0] * 3, records, [["x", "y"], ["z"]])


def test_select_best_takes_the_first_of_tied_maxima():
  records = [{"prompt": "a", "answer": "yy"}, {"prompt": "b", "answer": "z"}]
  seen = []

  def by_record(recs, prompts, responses):  # the scorer sees each candidate's record
    seen.extend(zip([r["answer"] for r in recs], prompts, responses, strict=True))
    return [float(r["answer"] == y) for r, y in zip(recs, responses, strict=True)]

  out = select_best(by_record, records, [["x", "yy", "yy"], ["q", "w", "e"]])
  assert seen[:3] == [("yy", "a", "x"), ("yy", "a", "yy"), ("yy", "a", "yy")]
  assert out.scores.tolist() == [[0.0, 1.0, 1.0], [0.0, 0.0, 0.0]]
  assert out.best_index.tolist() == [1, 0] and out.best == ["yy", "q"]
  assert out.generation is None


# --------------------------------------------------------------------------- experiment


def small_config(init_from: str):
  cfg = generate_configs.get_config("tiny")
  cfg.model.update(num_layers=1, d_model=64, head_dim=16, mlp_dim=128)
  cfg.init_from = init_from
  cfg.data.update(num_prompts=4, batch_size=4)
  cfg.generation.update(max_new_tokens=8, num_samples=2)
  return cfg


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """The same random tiny weights as an experiment workdir and as a Hugging Face dir."""
  cfg = small_config("")
  model_cfg, _ = models.load_model(cfg, mesh=None)
  params = init_params(model_cfg, jax.random.key(1))
  workdir = tmp_path_factory.mktemp("trained")
  (workdir / runs.MODEL_CONFIG_FILE).write_text(json.dumps(model_cfg.to_dict()))
  with ckpt_lib.CheckpointManager(ckpt_lib.checkpoint_dir(workdir)) as manager:
    manager.save(1, {"params": params}, force=True)
  hf_dir = tmp_path_factory.mktemp("hf")
  save_hf_checkpoint(hf_dir, model_cfg, params)
  return model_cfg, params, workdir, hf_dir


def read_samples(workdir):
  return [json.loads(line) for line in (Path(workdir) / "samples.jsonl").read_text().splitlines()]


def test_generate_experiment_from_a_workdir(checkpoints, tmp_path):
  model_cfg, params, workdir, _ = checkpoints
  cfg = small_config(str(workdir))
  summary = generate_exp.run(cfg, str(tmp_path))
  rows = read_samples(tmp_path)
  assert [r["id"] for r in rows] == [f"rl-test-{i:05d}" for i in range(4)]
  assert all(len(r["responses"]) == len(r["scores"]) == 2 for r in rows)
  assert all(0 < n <= 8 for r in rows for n in r["num_tokens"])
  assert summary["prompts"] == 4 and 0 <= summary["mean_score"] <= summary["best_of_k_score"]
  # The samples are those of the library call with the checkpoint's weights.
  direct = generate(
    model_cfg, params, tiny_tokenizer("llama3"), [r["prompt"] for r in rows],
    max_new_tokens=8, num_samples=2, key=jax.random.fold_in(jax.random.key(0), 0),
    mesh=sections.build_mesh(cfg.mesh),
  )  # fmt: skip
  assert [r["responses"] for r in rows] == direct.texts


def test_generate_command_line_from_a_hf_checkpoint(checkpoints, tmp_path):
  _, _, _, hf_dir = checkpoints
  cmd = [
    sys.executable, "-m", "experiments.generate",
    "--config=experiments/configs/generate.py:tiny", f"--workdir={tmp_path}",
    f"--config.init_from={hf_dir}", "--config.data.num_prompts=3",
    "--config.generation.max_new_tokens=8", "--config.generation.temperature=0",
  ]  # fmt: skip
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = read_samples(tmp_path)
  assert len(rows) == 3 and all(len(r["responses"]) == 4 for r in rows)
  assert all(len(set(r["responses"])) == 1 for r in rows)  # greedy: all 4 samples agree
  assert json.loads((tmp_path / "generate_config.json").read_text())["init_from"] == str(hf_dir)


def test_generate_experiment_scores_with_a_reward_model_workdir(checkpoints, tmp_path):
  """`scorer.kind="reward_model"`: every sample is scored by the RM (the scorer of rejection
  sampling, GRPO and PPO), and the best index is the argmax of its scores."""
  model_cfg, _, workdir, _ = checkpoints
  opt = ts.make_optimizer(ts.OptimizerConfig(warmup_steps=1, total_steps=2))
  rm = reward_model.RewardModel(model_cfg)
  rm_state = ts.init_train_state(rm, opt, sharding.make_mesh(), jax.random.PRNGKey(3))
  rm_dir = save_workdir(tmp_path / "rm", model_cfg, rm_state)
  cfg = small_config(str(workdir))
  cfg.scorer.update(kind="reward_model", reward_model=rm_dir, batch_size=8)
  summary = generate_exp.run(cfg, str(tmp_path / "out"))
  rows = read_samples(tmp_path / "out")
  scores = np.array([r["scores"] for r in rows])
  assert scores.shape == (4, 2) and [r["best"] for r in rows] == scores.argmax(1).tolist()
  scorer = rewards.RewardScorer.from_workdir(rm_dir, tiny_tokenizer("llama3"))
  prompts = [r["prompt"] for r in rows for _ in r["responses"]]
  direct = scorer(prompts, [y for r in rows for y in r["responses"]])
  np.testing.assert_allclose(scores.ravel(), direct, rtol=1e-5, atol=1e-5)
  assert summary["best_of_k_score"] == pytest.approx(scores.max(1).mean())


def test_generate_experiment_without_a_scorer_and_with_a_bad_kind(checkpoints, tmp_path):
  _, _, workdir, _ = checkpoints
  cfg = small_config(str(workdir))
  cfg.scorer.kind = ""
  summary = generate_exp.run(cfg, str(tmp_path))
  assert "mean_score" not in summary
  assert all("scores" not in r and "best" not in r for r in read_samples(tmp_path))
  cfg.scorer.kind = "oracle"
  with pytest.raises(ValueError, match="scorer.kind='oracle'"):
    generate_exp.run(cfg, str(tmp_path))
  old = small_config(str(workdir))  # a config of before the scorer section: its kind, a string
  del old["scorer"]
  old.scorer = "check_answer"
  with pytest.raises(sections.ConfigError, match="scorer='check_answer' is now config.scorer.kind"):
    generate_exp.run(old, str(tmp_path))
