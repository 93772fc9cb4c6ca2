"""The Llama 2 and Llama 3 recipes end to end at smoke size (a few steps per stage): every
stage runs, the report has every section with finite numbers, a rerun resumes by skipping
finished stages, and the post-training notebook runs on the Llama 3 workdir. `make test` runs
the Llama 3 recipe; the Llama 2 recipe (its RS, PPO and GAtt stages each tested on their own)
runs under `-m full_size`."""

import json
import math
from pathlib import Path

import pytest

from experiments import llama2_recipe, llama3_recipe
from experiments.configs import llama2_recipe as llama2_configs
from experiments.configs import llama3_recipe as llama3_configs
from llama_jax.testing import execute_notebook, notebook_text

SMALL = dict(num_layers=1, d_model=64, head_dim=16, mlp_dim=128)
POLICY_KEYS = ("task_accuracy", "refusal_rate", "false_refusal_rate", "accuracy/arithmetic",
               "accuracy/fact", "response_length")  # fmt: skip


def check_policy_rows(rows, stages):
  assert [r["stage"] for r in rows] == stages
  assert rows[0]["is_reference"] and "kl" not in rows[0]
  for row in rows:
    for key in POLICY_KEYS:
      assert math.isfinite(row[key]), (row["stage"], key)
    assert 0 <= row["task_accuracy"] <= 1 and 0 <= row["refusal_rate"] <= 1
  for row in rows[1:]:  # every later policy has a measured KL to the SFT model
    assert math.isfinite(row["kl"]) and row["kl_stderr"] >= 0 and row["sampled_length"] > 0


def check_report_files(workdir: Path, headings):
  markdown = (workdir / "report.md").read_text()
  for heading in headings:
    assert f"## {heading}" in markdown, heading
  assert (workdir / "report.png").stat().st_size > 10_000
  return markdown


def test_llama3_recipe_smoke_resume_and_walkthrough(tmp_path, monkeypatch, capsys):
  workdir = tmp_path / "llama3"
  cfg = llama3_configs.get_config("smoke")
  cfg.pretrain.model.update(**SMALL)
  report = llama3_recipe.run(cfg, str(workdir))

  check_policy_rows(report["policy"], ["SFT", "round 1 · RS + SFT", "round 1 · DPO average",
                                       "round 2 · RS + SFT", "round 2 · DPO average"])  # fmt: skip
  (rm,) = report["reward_models"]  # trained once: the bundled preferences do not change
  assert 0 <= rm["accuracy/chosen_rejected"] <= 1
  assert any(k.startswith("accuracy/") and "better" in k for k in rm)
  rounds = report["rejection_sampling"]
  assert [r["round"] for r in rounds] == [1, 2]
  assert rounds[1]["pool/size"] > rounds[0]["pool/size"]  # round 2 adds prompts to the pool
  assert len(report["dpo"]) == 4
  for run in report["dpo"]:
    assert run["initial"]["rewards/margins"] == pytest.approx(0, abs=1e-5)  # policy = reference
    assert math.isfinite(run["rewards/margins"]) and "logps/chosen" in run
  average = json.loads((workdir / "round2" / "average" / "average.json").read_text())
  assert average["weights"] == [0.5, 0.5] and len(average["inputs"]) == 2
  headings = ["Policy, per stage", "Reward models", "Rejection sampling rounds", "DPO",
              "Stage times"]  # fmt: skip
  markdown = check_report_files(workdir, headings)

  # A rerun skips every finished stage and reproduces the report.
  capsys.readouterr()
  again = llama3_recipe.run(cfg, str(workdir))
  log = capsys.readouterr().out
  assert log.count("done in an earlier run") == len(report["stages"]) and "finished in" not in log
  assert again["policy"] == report["policy"] and again["stages"] == report["stages"]
  assert (workdir / "report.md").read_text() == markdown
  cfg.rounds = 3  # another config would silently reuse stages made for this one
  with pytest.raises(ValueError, match="another config"):
    llama3_recipe.run(cfg, str(workdir))

  monkeypatch.setenv("LLAMA_JAX_RECIPE_DIR", str(workdir))
  text = notebook_text(execute_notebook("post_training_walkthrough.ipynb"))
  assert "Llama 3 recipe: smoke" in text and "held-out margin" in text
  assert "answers changed their check" in text


@pytest.mark.full_size  # 45 s; its stages run in their own tests, the recipe machinery above
def test_llama2_recipe_smoke(tmp_path):
  workdir = tmp_path / "llama2"
  cfg = llama2_configs.get_config("smoke")
  cfg.pretrain.model.update(**SMALL)
  report = llama2_recipe.run(cfg, str(workdir))

  check_policy_rows(report["policy"], ["SFT", "round 1 · RS + SFT", "PPO", "GAtt"])
  for row in report["policy"]:  # Ghost Attention's target is measured at every stage
    assert 0 <= row["gatt/follow_rate"] <= 1
  assert [r["name"] for r in report["reward_models"]] == ["helpful RM", "safety RM"]
  (rs,) = report["rejection_sampling"]
  assert rs["round"] == 1 and rs["pool/size"] > 0
  (ppo,) = report["ppo"]
  assert ppo["iterations"] == 2 and math.isfinite(ppo["end"]["score/mean"])
  gatt_records = (workdir / "gatt_data" / "gatt.jsonl").read_text().splitlines()
  assert 0 < len(gatt_records) == report["gatt"]["kept"] <= 16  # long dialogues are dropped
  assert json.loads(gatt_records[0])["messages"][0]["role"] == "system"
  check_report_files(workdir, ["Policy, per stage", "Reward models", "Rejection sampling rounds",
                               "PPO", "Ghost Attention data", "Stage times"])  # fmt: skip


@pytest.mark.parametrize("configs", [llama2_configs, llama3_configs])
def test_real_variants_use_the_real_stage_configs(configs):
  variant = "llama2_7b" if configs is llama2_configs else "llama3p1_8b"
  cfg = configs.get_config(variant)
  assert cfg.init_from and cfg.tokenizer.endswith("tokenizer.model")  # no pretrain stage
  assert cfg.sft.model.preset == variant and cfg.round_sft.model.preset == variant
  assert cfg.rejection_sampling.model.preset == variant
  assert cfg.sft.model.dtype == "bfloat16" and cfg.sft.mesh.fsdp == -1
  with pytest.raises(ValueError, match="known"):
    configs.get_config("huge")
