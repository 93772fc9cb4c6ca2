"""`experiments.findings` at smoke size: every finding is computed from real stage runs with
a per-seed difference, an interval and a verdict; the report files are written; a rerun
skips every finished stage and gives the same findings."""

import json
import math

from experiments import findings as findings_experiment
from experiments.configs import findings as findings_configs
from llama_jax import ablation

KEYS = [
  "RM accuracy by distinctness", "margin small vs none", "margin large vs none",
  "best-of-N reward gap", "best-of-N gold check", "pooling rejection samples",
  "DPO NLL term: log p(chosen)", "DPO NLL term: task accuracy", "DPO formatting-token mask",
  "averaging DPO runs", "Ghost Attention", "KL penalty: RM reward", "KL penalty: task accuracy",
]  # fmt: skip


def test_findings_smoke_and_resume(tmp_path, capsys):
  cfg = findings_configs.get_config("smoke")
  workdir = tmp_path / "findings"
  found = findings_experiment.run(cfg, str(workdir))

  assert [f.key for f in found] == KEYS
  for f in found:
    assert len(f.b_minus_a) == cfg.seeds and all(math.isfinite(d) for d in f.b_minus_a), f.key
    assert f.interval.low <= f.interval.mean <= f.interval.high
    assert f.verdict in (ablation.REPRODUCED, ablation.NOT_REPRODUCED, ablation.INCONCLUSIVE)
    for name, values in f.arms.items():
      assert len(values) == cfg.seeds and all(math.isfinite(v) for v in values), (f.key, name)
  by_key = {f.key: f for f in found}
  # The paired difference is arm B minus arm A, seed by seed.
  gap = by_key["best-of-N reward gap"]
  assert gap.b_minus_a == [b - a for a, b in zip(*gap.arms.values(), strict=True)]
  assert all(d >= 0 for d in gap.b_minus_a)  # the max-median gap cannot shrink with N
  assert len(by_key["DPO NLL term: log p(chosen)"].curve.x) == cfg.dpo.train.num_steps + 1

  markdown = (workdir / "findings.md").read_text()
  assert sum(line.startswith("| ") and "**" in line for line in markdown.splitlines()) == len(KEYS)
  saved = json.loads((workdir / "findings.json").read_text())
  assert [f["key"] for f in saved] == KEYS and saved[0]["interval"]["n"] == cfg.seeds
  assert (workdir / "findings.png").stat().st_size > 50_000

  capsys.readouterr()
  again = findings_experiment.run(cfg, str(workdir))
  log = capsys.readouterr().out
  assert "finished in" not in log and "done in an earlier run" in log
  assert [f.b_minus_a for f in again] == [f.b_minus_a for f in found]
