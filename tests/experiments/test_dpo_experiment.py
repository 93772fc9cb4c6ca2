"""`experiments.dpo` end to end at tiny size from a short SFT run: held-out preference accuracy
and margin rise, and the NLL term keeps the chosen responses' log-probability from falling as
far as it does without it.

Full size only (`make test-full`, 90 s): training to a measurable held-out accuracy takes an SFT
run and two DPO runs of 40 steps. `make test` runs `experiments.dpo` end to end at smoke size
in the Llama 3 recipe and findings smokes, and the DPO step's parity checks in tests/steps.
"""

import json
import shutil

import pytest

from experiments import dpo as dpo_experiment
from experiments import lm
from experiments.configs import dpo as dpo_configs
from experiments.configs import sft as sft_configs
from llama_jax.training.metrics import read_metrics

pytestmark = pytest.mark.full_size

SMALL = dict(num_layers=2, d_model=64, head_dim=16, mlp_dim=128)


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("sft")
  cfg = sft_configs.get_config("tiny")
  cfg.model.update(**SMALL)
  cfg.data.update(seq_len=128, batch_size=16, eval_split="")
  cfg.optimizer.update(learning_rate=3e-3, warmup_steps=5)
  cfg.train.update(num_steps=60, log_every=20, checkpoint_every=1000)
  lm.run(cfg, str(workdir))
  return str(workdir)


def dpo_run(sft_workdir, workdir, nll_coef):
  cfg = dpo_configs.get_config("tiny")
  cfg.init_from = sft_workdir
  cfg.data.update(batch_size=16)
  cfg.dpo.nll_coef = nll_coef
  cfg.optimizer.update(learning_rate=1e-3, warmup_steps=5)
  cfg.train.update(num_steps=40, log_every=10, eval_every=0, checkpoint_every=1000)
  return dpo_experiment.run(cfg, str(workdir))


@pytest.fixture(scope="module")
def runs(sft_workdir, tmp_path_factory):
  root = tmp_path_factory.mktemp("dpo")
  with_nll = dpo_run(sft_workdir, root / "nll", 0.2)
  # Same records and reference: the second run reuses the stored reference log-probs.
  (root / "no_nll").mkdir()
  shutil.copy(root / "nll" / dpo_experiment.REFERENCE_FILE, root / "no_nll")
  without = dpo_run(sft_workdir, root / "no_nll", 0.0)
  return root, with_nll, without


def test_dpo_raises_held_out_accuracy_and_margin(runs):
  root, with_nll, without = runs
  report = {
    name: {
      k: round(r[k], 3)
      for k in ("rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected", "nll")
    }
    | {"initial logps/chosen": round(r["initial"]["logps/chosen"], 3)}
    for name, r in (("nll 0.2", with_nll), ("nll 0", without))
  }
  print(json.dumps(report, indent=1))
  for r in (with_nll, without):
    start = r["initial"]
    # The policy starts as the reference: every implicit reward is 0 and no pair is won.
    assert start["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert start["rewards/accuracies"] == 0.0 and start["pairs"] == 300
    # 300 held-out pairs whose labels follow the better response on 264 (annotator
    # agreement, bundled.AGREEMENT): 0.88 is the ceiling, chance 0.5.
    assert r["rewards/accuracies"] >= 0.62
    assert r["rewards/margins"] > 0.2
    assert r["dpo_loss"] < start["dpo_loss"] - 0.1
  logged = set().union(*read_metrics(root / "nll"))
  assert {"eval/rewards/accuracies", "rewards/margins", "logps/chosen", "nll"} <= logged
  assert (root / "nll" / "metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_nll_term_keeps_the_chosen_log_prob_up(runs):
  _, with_nll, without = runs
  fall_with = with_nll["initial"]["logps/chosen"] - with_nll["logps/chosen"]
  fall_without = without["initial"]["logps/chosen"] - without["logps/chosen"]
  for key in ("logps/chosen", "logps/rejected", "dpo_loss", "nll"):  # the same start
    assert with_nll["initial"][key] == without["initial"][key]
  assert fall_with < fall_without
  assert with_nll["nll"] < without["nll"]
