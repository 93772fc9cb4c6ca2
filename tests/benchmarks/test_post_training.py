"""`benchmarks.post_training` runs end to end at tiny size against TRL, and its parity checks
pass on the same model and fail on a perturbed one (no timing is asserted)."""

import math

import numpy as np
import pytest

pytest.importorskip("trl")

from benchmarks import post_training  # noqa: E402

TINY = ["--preset", "tiny", "--batch", "2", "--seq", "32", "--iters", "1"]
TINY_GRPO = ["--prompts", "2", "--generations", "4", "--prompt-len", "8", "--new-tokens", "16"]


def test_check_refuses_a_difference_beyond_tolerance_and_nan():
  assert post_training.check("loss", 1.00001, 1.0, 1e-4)["abs_diff"] == pytest.approx(1e-5)
  with pytest.raises(post_training.ParityError, match="loss"):
    post_training.check("loss", 1.001, 1.0, 1e-4)
  with pytest.raises(post_training.ParityError):
    post_training.check("loss", math.nan, 1.0, 1e-4)


@pytest.mark.full_size  # 30 s: every workload against TRL; the refusal below stays in make test
def test_post_training_benchmark_runs_with_parity(capsys, tmp_path):
  results = post_training.main([*TINY, *TINY_GRPO, "--json", str(tmp_path / "out.json")])
  out = capsys.readouterr().out
  for name in ("dpo_precomputed", "dpo_in_step", "reward", "grpo"):
    assert f"{name} parity ok" in out
    entry = results["workloads"][name]
    assert {c["name"] for c in entry["parity"]} >= {"loss", "grad_norm"}
    assert entry["ratio"] > 0
    # The gradient is what the checks compare beyond a loss that can be trivially equal
    # (DPO starts at log 2, GRPO's token mean of centered advantages near 0): never zero.
    grad = next(c for c in entry["parity"] if c["name"] == "grad_norm")
    assert grad["theirs"] > 0
  assert "llama_jax DPO step (reference precomputed) / LM step" in out
  grpo = results["workloads"]["grpo"]
  for side in ("ours", "theirs"):
    assert set(grpo[side]["split"]) == set(post_training.GRPO_SPLIT)
  assert (tmp_path / "out.json").exists()


@pytest.mark.slow
def test_parity_check_fails_when_the_models_differ(monkeypatch):
  fresh = post_training.JaxSide.fresh_params

  def perturbed(self):  # the policy's final norm 1% off: log-probs and gradients move
    params = fresh(self)
    params["final_norm"]["scale"] = params["final_norm"]["scale"] * np.float32(1.01)
    return params

  monkeypatch.setattr(post_training.JaxSide, "fresh_params", perturbed)
  with pytest.raises(post_training.ParityError):
    post_training.main([*TINY, "--workloads", "dpo_precomputed"])
