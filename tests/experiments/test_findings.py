"""`experiments.findings` at smoke size: every finding is computed from real stage runs with
a per-seed difference, an interval and a verdict; the report files are written; a rerun
reuses every finished stage, and with another seed runs only the new seed's; any other change
is refused. `-m full_size` runs the DPO ablations, then all of them and a third seed; `make
test` runs the refusals (the paired statistics are tests/evaluation/test_ablation.py)."""

import json
import math

import pytest

from experiments import findings as findings_experiment
from experiments import runs, sections
from experiments.configs import findings as findings_configs
from llama_jax.evaluation import ablation

KEYS = {  # per ablation, in the papers' order
  "reward_models": ["RM accuracy by distinctness", "margin small vs none", "margin large vs none"],
  "best_of_n": ["best-of-N reward gap", "best-of-N gold check"],
  "pooling": ["pooling rejection samples"],
  "dpo": ["DPO NLL term: log p(chosen)", "DPO NLL term: task accuracy",
          "DPO formatting-token mask", "averaging DPO runs"],
  "ghost_attention": ["Ghost Attention"],
  "kl_penalty": ["KL penalty: RM reward", "KL penalty: task accuracy"],
}  # fmt: skip


@pytest.mark.full_size  # 26-38 s at smoke size; statistics: tests/evaluation/test_ablation.py
@pytest.mark.parametrize("full", [False, True])
def test_findings_smoke_and_resume(tmp_path, capsys, full):
  cfg = findings_configs.get_config("smoke")
  if not full:
    cfg.ablations = "dpo"
  assert list(KEYS) == list(findings_experiment.ABLATIONS)
  chosen = findings_experiment.names(cfg.ablations)
  keys = [key for name in findings_experiment.ABLATIONS if name in chosen for key in KEYS[name]]
  workdir = tmp_path / "findings"
  found = findings_experiment.run(cfg, str(workdir))

  assert [f.key for f in found] == keys
  for f in found:
    assert len(f.b_minus_a) == cfg.seeds and all(math.isfinite(d) for d in f.b_minus_a), f.key
    assert f.interval.low <= f.interval.mean <= f.interval.high
    assert f.verdict in (ablation.REPRODUCED, ablation.NOT_REPRODUCED, ablation.INCONCLUSIVE)
    for name, values in f.arms.items():
      assert len(values) == cfg.seeds and all(math.isfinite(v) for v in values), (f.key, name)
  by_key = {f.key: f for f in found}
  if full:  # the paired difference is arm B minus arm A, seed by seed
    gap = by_key["best-of-N reward gap"]
    assert gap.b_minus_a == [b - a for a, b in zip(*gap.arms.values(), strict=True)]
    assert all(d >= 0 for d in gap.b_minus_a)  # the max-median gap cannot shrink with N
  assert len(by_key["DPO NLL term: log p(chosen)"].curve.x) == cfg.dpo.train.num_steps + 1

  markdown = (workdir / "findings.md").read_text()
  assert sum(line.startswith("| ") and "**" in line for line in markdown.splitlines()) == len(keys)
  saved = json.loads((workdir / "findings.json").read_text())
  assert [f["key"] for f in saved] == keys and saved[0]["interval"]["n"] == cfg.seeds
  assert (workdir / "findings.png").stat().st_size > 50_000
  assert "Stage times" in (workdir / "report.md").read_text()
  assert (workdir / "base" / "sft" / "final.json").exists()  # a finished stage: no plot
  assert not (workdir / "base" / "sft" / "metrics.png").exists()  # (train.plot off)

  # A rerun reuses every stage and gives the same findings. Another seed (full size: a third
  # seed's stages run): the finished seeds' stages are reused, only the new seed's run (and a
  # new average of the DPO runs, which now has another member).
  capsys.readouterr()
  if full:
    cfg.seeds = 3
  more = findings_experiment.run(cfg, str(workdir))
  log = capsys.readouterr().out
  ran = {line[3:].split(":")[0] for line in log.splitlines()
         if line.startswith("== ") and ": finished in" in line}  # fmt: skip
  if not full:
    assert not ran and "done in an earlier run" in log, sorted(ran)
    assert [f.to_json() for f in more] == [f.to_json() for f in found]
  else:
    new = ("seed2/", "eval/seed_2", "dpo_average_3", "eval/dpo_average_of_3")
    assert ran and all(r.startswith(new) for r in ran), sorted(ran)
  for before, after in zip(found, more, strict=True):
    assert len(after.b_minus_a) == cfg.seeds
    if before.key != "averaging DPO runs":
      assert after.b_minus_a[:2] == before.b_minus_a, before.key
  cfg.dpo.dpo.beta = 0.5  # any other change is refused with the diff
  with pytest.raises(runs.ConfigChanged, match="dpo.dpo.beta: 0.1 -> 0.5"):
    findings_experiment.run(cfg, str(workdir))


@pytest.mark.parametrize(
  "field, value, match",
  [("seeds", 1, "seeds=1: an interval needs at least 2"),
   ("best_of_n.ns", "2,4", "best_of_n.ns='2,4': rising from 1"),
   ("best_of_n.ns", "1,8", "at most num_samples"),
   ("ablations", "dpo,ppo", "ablations='dpo,ppo': a comma-separated subset of reward_models")],
)  # fmt: skip
def test_unusable_values_are_refused_before_anything_is_written(tmp_path, field, value, match):
  cfg = findings_configs.get_config("smoke")
  cfg.update_from_flattened_dict({field: value})
  with pytest.raises(sections.ConfigError, match=match):
    findings_experiment.run(cfg, str(tmp_path / "w"))
  assert not (tmp_path / "w" / "recipe_config.json").exists()
