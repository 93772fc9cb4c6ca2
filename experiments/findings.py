"""The Llama 2 and Llama 3 papers' findings, reproduced small: paired ablations over seeds.

    python -m experiments.findings --config=experiments/configs/findings.py:full --workdir=DIR

Each finding flips one switch with everything else held: the same pre-trained and SFT model,
the same data and, per seed, the same seeds in both arms. Every seed runs both arms; the
per-seed difference B − A gets a 95% Student-t interval over the seeds and a verdict
(`llama_jax.evaluation.ablation`). Policies are judged by programs (`llama_jax.data.scoring`: task
accuracy on held-out prompts, malformed answers, instruction following), never by the reward
models under study; RMs are judged on held-out preference pairs.

  1  RM accuracy rises with how distinct the pair is    Llama 2, Table 8
  2  the margin term helps separable pairs              Llama 2, Table 28 (small, large)
  3  best-of-N: the max − median reward gap grows with N, and the gold check of the RM's
     pick as N grows (over-optimization)                Llama 2, Figure 7
  4  pooling rejection samples across rounds            Llama 2, section 3.2.3
  5  DPO's NLL term keeps log p(chosen) from falling, and its effect on task accuracy
                                                        Llama 3, section 4.1.4
  6  masking formatting tokens in DPO: malformed answers   Llama 3, section 4.1.4
  7  averaging DPO runs vs each run                     Llama 3, section 4.1.5
  8  Ghost Attention: instruction following at later turns   Llama 2, section 3.3
  9  KL penalty strength vs reward hacking: RM reward and task accuracy against β
                                                        Llama 2, section 3.2.3

`ablations` picks which of them run (default: all): reward_models (1, 2), best_of_n (3),
pooling (4), dpo (5-7), ghost_attention (8), kl_penalty (9); best-of-N, pooling and the KL
penalty score with the reward models, so those train too.

Stages live in DIR/base (pre-training, SFT), DIR/seed<s>/... and DIR/eval/...; a finished
stage is not run again, so an interrupted run resumes, and a rerun with more `seeds` or more
`ablations` runs only the new stages (and a new average of the DPO runs). Writes DIR/findings.md,
DIR/findings.png and DIR/findings.json, and DIR/report.md / report.png with every evaluated
policy's held-out metrics and the stage times (`experiments.report`).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from absl import app, flags

from experiments import average, dpo, llama2_recipe, lm, ppo, recipes, runs, sections
from experiments import rejection_sampling as rs_experiment
from experiments import reward_model as rm_experiment
from llama_jax.checkpoint import atomic, workdirs
from llama_jax.data import gatt, scoring
from llama_jax.evaluation import ablation
from llama_jax.rl import rejection_sampling as rs_lib
from llama_jax.training.metrics import read_metrics

FINDINGS_MD, FINDINGS_PNG, FINDINGS_JSON = "findings.md", "findings.png", "findings.json"
RATINGS = ("negligibly_better", "slightly_better", "better", "significantly_better")
SEPARABLE = ("significantly_better", "better")
ABLATIONS = ("reward_models", "best_of_n", "pooling", "dpo", "ghost_attention", "kl_penalty")
SCORED_BY_REWARD_MODELS = ("best_of_n", "pooling", "kl_penalty")


class Lab:
  """Runs one finding's stages per seed under a `recipes.Recipe` (stage records, resume,
  held-out evaluation); `sft` is the shared starting policy."""

  def __init__(self, recipe: recipes.Recipe, sft: str):
    self.recipe, self.cfg, self.sft = recipe, recipe.cfg, sft
    self.seeds = list(range(recipe.cfg.seeds))

  def config(self, section: str, seed: int, **fields: Any) -> ml_collections.ConfigDict:
    """`section`'s stage config with every seed it has set to `seed`."""
    base = self.cfg[section]
    seeded = {f"{part}.seed": seed for part in ("train", "data", "generation")
              if part in base and "seed" in base[part]}  # fmt: skip
    return self.recipe.config(section, **seeded, **fields)

  def run(self, name: str, what: str, run: Callable, cfg: ml_collections.ConfigDict) -> Any:
    return self.recipe.experiment(name, what, run, cfg)

  def evaluate(self, label: str, policy: str) -> dict[str, float]:
    """Held-out program checks of `policy` (and its KL to the SFT model)."""
    return self.recipe.evaluate(label, policy, self.sft)

  def path(self, name: str) -> str:
    return self.recipe.path(name)


def check_values(cfg: ml_collections.ConfigDict) -> None:
  """Refuses values no finding can use, before anything runs."""
  chosen = names(cfg.ablations)
  if not chosen or set(chosen) - set(ABLATIONS):
    raise sections.ConfigError(
      f"ablations={cfg.ablations!r}: a comma-separated subset of {', '.join(ABLATIONS)}"
    )
  if cfg.seeds < 2:
    raise sections.ConfigError(f"seeds={cfg.seeds}: an interval needs at least 2 (findings: 3+)")
  ns = [int(n) for n in names(cfg.best_of_n.ns)]
  if not ns or ns[0] != 1 or ns != sorted(set(ns)) or ns[-1] > cfg.best_of_n.num_samples:
    raise sections.ConfigError(
      f"best_of_n.ns={cfg.best_of_n.ns!r}: rising from 1 to at most num_samples "
      f"({cfg.best_of_n.num_samples})"
    )


def names(text: str) -> list[str]:
  return [x.strip() for x in text.split(",") if x.strip()]


# ------------------------------------------------------------------- 1, 2: reward models


def reward_models(lab: Lab) -> dict[str, list[dict[str, float]]]:
  """Per margin arm, per seed: the helpfulness RM's held-out metrics (accuracy/<rating>)."""
  out: dict[str, list] = {}
  for margin in names(lab.cfg.margins):
    out[margin] = [
      lab.run(f"seed{s}/rm_margin_{margin}", f"helpfulness RM, margin {margin!r}, seed {s}",
              rm_experiment.run,
              lab.config("reward_model", s, init_from=lab.sft, **{"ranking.margins": margin}))
      for s in lab.seeds
    ]  # fmt: skip
  return out


def separable_accuracy(metrics: dict[str, float]) -> float:
  """Held-out accuracy over the significantly-better and better pairs together."""
  pairs = [metrics[f"pairs/{r}"] for r in SEPARABLE]
  return float(np.average([metrics[f"accuracy/{r}"] for r in SEPARABLE], weights=pairs))


def rm_findings(rms: dict[str, list[dict[str, float]]]) -> list[ablation.Finding]:
  acc = {m: {r: [x[f"accuracy/{r}"] for x in runs] for r in RATINGS} for m, runs in rms.items()}
  curve = ablation.Curve(
    "RM held-out accuracy by rating", "rating (1 negligibly … 4 significantly better)",
    "accuracy", [1, 2, 3, 4],
    {f"margin {m}": np.array([a[r] for r in RATINGS]).T.tolist() for m, a in acc.items()},
  )  # fmt: skip
  main = "small" if "small" in acc else next(iter(acc))
  a = acc[main]
  means = [float(np.mean(a[r])) for r in RATINGS]
  inverted = [f"{RATINGS[i]} {means[i]:.3f} > {RATINGS[i + 1]} {means[i + 1]:.3f}"
              for i in range(len(RATINGS) - 1) if means[i] > means[i + 1]]  # fmt: skip
  out = [ablation.Finding(
    "RM accuracy by distinctness", "Llama 2, Table 8",
    "RM accuracy is far higher on significantly-better pairs than on negligibly-better ones",
    f"accuracy on significantly − negligibly better pairs (margin {main})",
    np.subtract(a["significantly_better"], a["negligibly_better"]).tolist(),
    arms={r.replace("_better", ""): a[r] for r in RATINGS[::-1]}, negligible=0.01,
    curve=curve, note="the full order of the four buckets holds" if not inverted else
    "the full order does not hold: " + "; ".join(inverted),
  )]  # fmt: skip
  baseline = next(iter(acc))
  for m in list(acc)[1:]:
    sep = {x: [separable_accuracy(run) for run in rms[x]] for x in (baseline, m)}
    close = np.subtract(acc[m]["negligibly_better"], acc[baseline]["negligibly_better"])
    out.append(ablation.Finding(
      f"margin {m} vs {baseline}", "Llama 2, Table 28",
      "a rating-dependent margin raises RM accuracy on separable pairs",
      f"accuracy on significantly/better pairs, margin {m} − {baseline}",
      np.subtract(sep[m], sep[baseline]).tolist(), arms=sep, negligible=0.01,
      note=f"on negligibly-better pairs the margin changes accuracy by {close.mean():+.3f} "
           f"(seeds: {', '.join(f'{d:+.3f}' for d in close)})",
    ))  # fmt: skip
  return out


# --------------------------------------------------------------------------- 3: best-of-N


def best_of_n(lab: Lab, rms: dict[str, list]) -> list[ablation.Finding]:
  b = lab.cfg.best_of_n
  ns = [int(n) for n in names(b.ns)]
  curves = []
  for s in lab.seeds:
    name = f"seed{s}/best_of_n"
    lab.run(name, f"{b.num_samples} samples of {b.num_prompts} prompts, scored by the RM",
            rs_experiment.run, lab.config(
              "rejection_sampling", s, init_from=lab.sft, round=1, **{
                "scorer.reward_model": scoring_rm(lab, rms, s), "output.name": "best_of_n",
                "generation.num_samples": b.num_samples, "data.num_prompts": b.num_prompts,
                "data.batch_size": b.num_prompts}))  # fmt: skip
    rows = [json.loads(line) for line in Path(lab.path(name), rs_experiment.SAMPLES_FILE).open()]
    scores = np.array([r["scores"] for r in rows])
    gold = np.array([[scoring.check_answer(r["record"], y) for y in r["responses"]] for r in rows])
    curves.append(rs_lib.best_of_n_curves(scores, gold, ns))
  c = {k: [x[k] for x in curves] for k in ("max", "median", "gold_at_max")}
  gap = np.subtract(c["max"], c["median"])  # [seed, n]
  lo, hi = ns[1] if len(ns) > 1 else ns[0], ns[-1]
  return [
    ablation.Finding(
      "best-of-N reward gap", "Llama 2, Figure 7",
      "the gap between the max and the median RM reward of N samples grows with N",
      f"(max − median) at N={hi} − at N={lo}", (gap[:, -1] - gap[:, ns.index(lo)]).tolist(),
      arms={f"N={lo}": gap[:, ns.index(lo)].tolist(), f"N={hi}": gap[:, -1].tolist()},
      curve=ablation.Curve("best-of-N: RM reward", "N", "RM reward", ns,
                           {"max": c["max"], "median": c["median"]}, "log"),
    ),
    ablation.Finding(
      "best-of-N gold check", "Llama 2, Figure 7 / section 3.2.3",
      "the RM's best of N samples is better than one sample (no over-optimization at this N)",
      f"task accuracy of the RM's pick at N={hi} − of one sample",
      np.subtract(np.array(c["gold_at_max"])[:, -1], np.array(c["gold_at_max"])[:, 0]).tolist(),
      arms={"N=1": [x[0] for x in c["gold_at_max"]], f"N={hi}": [x[-1] for x in c["gold_at_max"]]},
      curve=ablation.Curve("best-of-N: gold check of the RM's pick", "N", "task accuracy", ns,
                           {"RM's pick": c["gold_at_max"]}, "log"),
    ),
  ]  # fmt: skip


def scoring_rm(lab: Lab, rms: dict[str, list], seed: int) -> str:
  """The RM that scores the sampling stages: seed `seed`'s "small"-margin RM (Llama 2's)."""
  margin = "small" if "small" in rms else next(iter(rms))
  return lab.path(f"seed{seed}/rm_margin_{margin}")


# ------------------------------------------------------------------------------ 4: pooling


def pooling(lab: Lab, rms: dict[str, list]) -> ablation.Finding:
  """Two rejection-sampling rounds; round 2's SFT on the pool of both rounds vs on round 2's
  answers only (the same samples: one round-2 sampling run per arm with the same seed)."""
  p = lab.cfg.pooling
  arms: dict[str, list[float]] = {"last round only": [], "pooled": []}
  for s in lab.seeds:
    rm = {"scorer.reward_model": scoring_rm(lab, rms, s)}

    def rs(name, policy, round_index, pool_from, s=s, rm=rm):
      return lab.run(name, f"rejection sampling, round {round_index}", rs_experiment.run,
                     lab.config("rejection_sampling", s, init_from=policy, round=round_index,
                                pool_from=pool_from, **rm, **{
                                  "data.start": (round_index - 1) * p.prompt_stride,
                                  "output.name": f"rs_round{round_index}"}))  # fmt: skip

    r1 = lab.path(f"seed{s}/round1/rejection_sampling")
    rs(f"seed{s}/round1/rejection_sampling", lab.sft, 1, "")
    policy = recipes.sft_on_samples(lab.recipe, 1, lab.sft, r1, p.mix_with, f"seed{s}/",
                                    **{"train.seed": s, "data.seed": s})  # fmt: skip
    for arm, prefix, pool_from in (("pooled", "pooled", r1), ("last round only", "last", "")):
      rd = f"seed{s}/{prefix}/"
      rs(f"{rd}round2/rejection_sampling", policy, 2, pool_from)
      final = recipes.sft_on_samples(
        lab.recipe, 2, policy, lab.path(f"{rd}round2/rejection_sampling"), p.mix_with, rd,
        **{"train.seed": s, "data.seed": s},
      )  # fmt: skip
      arms[arm].append(lab.evaluate(f"seed {s} · round 2 · {arm}", final)["task_accuracy"])
  return ablation.Finding(
    "pooling rejection samples", "Llama 2, section 3.2.3",
    "SFT on the best answers of all rounds beats SFT on the last round's only",
    "held-out task accuracy after round 2, pooled − last round only",
    np.subtract(arms["pooled"], arms["last round only"]).tolist(), arms=arms, negligible=0.01,
  )  # fmt: skip


# --------------------------------------------------------------------------- 5, 6, 7: DPO

DPO_ARMS = {  # name -> the DPO fields it changes from Llama 3's (NLL 0.2, formatting masked)
  "llama3": {},
  "no_nll": {"dpo.nll_coef": 0.0},
  "no_mask": {"dpo.mask_formatting": False},
}


def logps_trajectory(run_dir: str, result: dict[str, Any]) -> list[float]:
  """Held-out mean log p(chosen) at the start and at every evaluation of a DPO run."""
  evals = {r["step"]: r["eval/logps/chosen"] for r in read_metrics(run_dir)
           if "eval/logps/chosen" in r}  # fmt: skip
  return [result["initial"]["logps/chosen"]] + [evals[k] for k in sorted(evals)]


def dpo_findings(lab: Lab) -> list[ablation.Finding]:
  runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in DPO_ARMS}
  for s in lab.seeds:
    for arm, fields in DPO_ARMS.items():
      name = f"seed{s}/dpo_{arm}"
      source = lab.path(f"seed0/dpo_{'no_mask' if arm == 'no_mask' else 'llama3'}")
      recipes.reuse_reference_logps(source, lab.path(name))  # its fingerprint decides
      result = lab.run(name, f"DPO ({arm}), seed {s}", dpo.run,
                       lab.config("dpo", s, init_from=lab.sft, **fields))  # fmt: skip
      metrics = lab.evaluate(f"seed {s} · DPO {arm}", lab.path(name))
      runs[arm].append({"result": result, "eval": metrics, "dir": lab.path(name)})

  def arm_values(arm: str, get: Callable[[dict], float]) -> list[float]:
    return [get(r) for r in runs[arm]]

  def delta_chosen(r):
    return r["result"]["logps/chosen"] - r["result"]["initial"]["logps/chosen"]

  chosen = {a: arm_values(a, delta_chosen) for a in ("no_nll", "llama3")}
  task = {a: arm_values(a, lambda r: r["eval"]["task_accuracy"]) for a in DPO_ARMS}
  malformed = {a: arm_values(a, lambda r: r["eval"]["malformed_rate"]) for a in DPO_ARMS}
  trajectories = {
    {"llama3": "NLL 0.2", "no_nll": "NLL 0"}[a]: [logps_trajectory(r["dir"], r["result"])
                                                   for r in runs[a]]
    for a in ("llama3", "no_nll")
  }  # fmt: skip
  steps = len(next(iter(trajectories.values()))[0])
  start = {a: arm_values(a, lambda r: r["result"]["initial"]["logps/chosen"]) for a in DPO_ARMS}
  formatting_logp = float(np.mean(np.subtract(start["no_mask"], start["llama3"])))
  every = lab.cfg.dpo.train.eval_every

  members = [r["dir"] for r in runs["llama3"]]
  name = f"dpo_average_{len(members)}"  # named by its members: more seeds, a new average
  lab.recipe.stage(name, f"average the weights of the {len(members)} seeds' DPO runs",
                   functools.partial(average.run, members))  # fmt: skip
  averaged = lab.evaluate(f"DPO average of {len(members)} runs", lab.path(name))["task_accuracy"]
  return [
    ablation.Finding(
      "DPO NLL term: log p(chosen)", "Llama 3, section 4.1.4",
      "the NLL term on chosen responses keeps their log-probability from falling",
      "held-out Δ log p(chosen) over the run, NLL 0.2 − NLL 0",
      np.subtract(chosen["llama3"], chosen["no_nll"]).tolist(),
      arms={"NLL 0": chosen["no_nll"], "NLL 0.2": chosen["llama3"]},
      curve=ablation.Curve("DPO: held-out log p(chosen)", "step", "mean log p(chosen)",
                           [i * every for i in range(steps)], trajectories),
    ),
    ablation.Finding(
      "DPO NLL term: task accuracy", "Llama 3, section 4.1.4",
      "the NLL term stabilizes DPO and keeps (or improves) the model's answers",
      "held-out task accuracy, NLL 0.2 − NLL 0",
      np.subtract(task["llama3"], task["no_nll"]).tolist(), negligible=0.01,
      arms={"NLL 0": task["no_nll"], "NLL 0.2": task["llama3"]},
    ),
    ablation.Finding(
      "DPO formatting-token mask", "Llama 3, section 4.1.4",
      "training on header / end-of-turn tokens causes tail repetition and abrupt endings",
      "malformed held-out answers, unmasked − masked",
      np.subtract(malformed["no_mask"], malformed["llama3"]).tolist(), negligible=0.01,
      arms={"masked": malformed["llama3"], "unmasked": malformed["no_mask"]},
      note="malformed: empty, stopped mid-sentence, a repeated sentence or a tail repeated "
           "3 times (`scoring.is_malformed`); task accuracy masked "
           f"{np.mean(task['llama3']):.3f} vs unmasked {np.mean(task['no_mask']):.3f}; the "
           f"formatting targets hold {formatting_logp:.4f} nats of a chosen response's log-prob "
           "under the SFT model (unmasked − masked at the start), what DPO can push on",
    ),
    ablation.Finding(
      "averaging DPO runs", "Llama 3, section 4.1.5",
      "the weight average of DPO runs is at least as good as the runs",
      "held-out task accuracy, average − each seed's run",
      [averaged - t for t in task["llama3"]], negligible=0.01,
      arms={"each run": task["llama3"], "average": [averaged] * len(task["llama3"])},
      note="one average of all seeds' runs, so the per-run differences share its "
           "measurement and the interval is narrower than independent pairs would give",
    ),
  ]  # fmt: skip


# ------------------------------------------------------------------------- 8: Ghost Attention


def follow_rates(lab: Lab, policy: str, out_dir: str) -> dict[str, float]:
  """Per dialogue length in `gatt.turns`: how often the last answer of held-out dialogues
  (the instruction only in the system message) follows the instruction."""
  g, e = lab.cfg.gatt, lab.cfg.eval
  instructions = gatt.get_instructions(g.instructions)
  mesh = sections.build_mesh(e.mesh)
  config, params = workdirs.load_model(policy, mesh, kind="lm")
  rates, samples = {}, []
  for turns in names(g.turns):
    section = ml_collections.ConfigDict(g.to_dict() | {"num_turns": int(turns)})
    chats, chosen = gatt.eval_chats(
      llama2_recipe.dialogues(section, g.eval_split, g.num_eval), instructions
    )
    rates[turns], rows = recipes.follow_instructions(
      config, params, lab.recipe.tokenizer, chats, chosen, e, mesh
    )
    samples += [{"turns": int(turns)} | row for row in rows]
  atomic.write_jsonl(Path(out_dir, recipes.SAMPLES_FILE), samples)
  return rates


def ghost_attention(lab: Lab) -> ablation.Finding:
  g = lab.cfg.gatt
  instructions = gatt.get_instructions(g.instructions)
  turns = names(g.turns)
  rates: dict[str, list[list[float]]] = {"no GAtt": [], "GAtt": []}
  for s in lab.seeds:
    section = ml_collections.ConfigDict(g.to_dict() | {"seed": s})
    data = lab.recipe.stage(
      f"seed{s}/gatt_data", "Ghost Attention dialogues sampled from the SFT model",
      functools.partial(llama2_recipe.gatt_data, lab.recipe, lab.sft, instructions, g=section),
    )  # fmt: skip
    arms = {
      "GAtt": lab.config("gatt_sft", s, init_from=lab.sft, **recipes.tfds_data(data),
                         **{"data.loss_on": "last_assistant"}),
      "no GAtt": lab.config("gatt_sft", s, init_from=lab.sft),  # the same steps, chats only
    }  # fmt: skip
    for arm, cfg in arms.items():
      name = f"seed{s}/gatt_{'on' if arm == 'GAtt' else 'off'}"
      lab.run(name, f"SFT, {arm}, seed {s}", lm.run, cfg)
      r = lab.recipe.stage(f"{name}/follow", f"instruction following, {arm}, seed {s}",
                           functools.partial(follow_rates, lab, lab.path(name)))  # fmt: skip
      rates[arm].append([r[t] for t in turns])
  later = {arm: np.mean(v, axis=1).tolist() for arm, v in rates.items()}
  return ablation.Finding(
    "Ghost Attention", "Llama 2, section 3.3",
    "with GAtt the model keeps following a system instruction at later turns",
    f"follow rate of the last answer, mean over turns {', '.join(turns)}, GAtt − no GAtt",
    np.subtract(later["GAtt"], later["no GAtt"]).tolist(), arms=later, negligible=0.01,
    curve=ablation.Curve("Ghost Attention: instruction following", "turn", "follow rate",
                         [int(t) for t in turns], rates),
    note="the no-GAtt arm trains the same steps on the bundled chats; GAtt trains on "
         f"dialogues sampled from the SFT model (mode {g.mode!r}) mixed with them",
  )  # fmt: skip


# ---------------------------------------------------------------------------- 9: KL penalty


def kl_penalty(lab: Lab, rms: dict[str, list]) -> list[ablation.Finding]:
  betas = [float(b) for b in names(lab.cfg.ppo_betas)]
  reward: dict[float, list[float]] = {b: [] for b in betas}
  task: dict[float, list[float]] = {b: [] for b in betas}
  for s in lab.seeds:
    rm = scoring_rm(lab, rms, s)
    for beta in betas:
      name = f"seed{s}/ppo_beta_{beta:g}"
      result = lab.run(name, f"PPO, β={beta:g}, seed {s}", ppo.run, lab.config(
        "ppo", s, init_from=lab.sft, **{"scorer.reward_model": rm, "value.init_from": rm,
                                        "ppo.kl_coef": beta}))  # fmt: skip
      reward[beta].append(result["end"]["score/mean"] - result["start"]["score/mean"])
      task[beta].append(lab.evaluate(f"seed {s} · PPO β={beta:g}", lab.path(name))["task_accuracy"])
  lo, hi = min(betas), max(betas)
  x = sorted(betas)
  return [
    ablation.Finding(
      "KL penalty: RM reward", "Llama 2, section 3.2.3",
      "a weaker KL penalty lets the policy climb the RM's reward further",
      f"RM reward gain over the run, β={lo:g} − β={hi:g}",
      np.subtract(reward[lo], reward[hi]).tolist(),
      arms={f"β={b:g}": reward[b] for b in x},
      curve=ablation.Curve("PPO: RM reward gain vs β", "β", "RM reward, end − start", x,
                           {"RM reward gain": np.array([reward[b] for b in x]).T.tolist()}),
    ),
    ablation.Finding(
      "KL penalty: task accuracy", "Llama 2, section 3.2.3",
      "the KL penalty guards against reward hacking: the gold metric holds up better",
      f"held-out task accuracy, β={hi:g} − β={lo:g}",
      np.subtract(task[hi], task[lo]).tolist(), negligible=0.01,
      arms={f"β={b:g}": task[b] for b in x},
      curve=ablation.Curve("PPO: held-out task accuracy vs β", "β", "task accuracy", x,
                           {"task accuracy": np.array([task[b] for b in x]).T.tolist()}),
    ),
  ]  # fmt: skip


# ------------------------------------------------------------------------------- the run


def write_findings(workdir: str, title: str, findings: Sequence[ablation.Finding]) -> str:
  """findings.md, findings.png and findings.json in `workdir`; returns the markdown."""
  markdown = ablation.render_markdown(
    title, findings, "Each finding: the same data and seeds in both arms, one switch flipped; "
    "B − A per seed, its mean with a 95% Student-t interval over the seeds, and the verdict "
    "(`llama_jax.evaluation.ablation`). Policies are judged by programs on held-out prompts.",
  )  # fmt: skip
  atomic.write_text(Path(workdir, FINDINGS_MD), markdown)
  atomic.write_json(Path(workdir, FINDINGS_JSON), [f.to_json() for f in findings], indent=2)
  ablation.plot(Path(workdir, FINDINGS_PNG), findings)
  return markdown


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> list[ablation.Finding]:
  """Runs (or resumes) every ablation in `workdir`; returns the findings."""
  sections.check_config(cfg, sections.reference_config("findings"))
  check_values(cfg)
  recipe = recipes.Recipe(cfg, workdir, "Findings: " + cfg.name, safe=("seeds", "ablations"))
  pretrained = cfg.init_from or recipe.path("base/pretrain")
  if not cfg.init_from:
    recipe.experiment("base/pretrain", "pre-training on the bundled corpus", lm.run,
                      recipe.config("pretrain"))  # fmt: skip
  sft = recipe.path("base/sft")
  recipe.experiment("base/sft", "SFT on the human-written chats", lm.run,
                    recipe.config("sft", init_from=pretrained))  # fmt: skip
  lab = Lab(recipe, sft)
  chosen = set(names(cfg.ablations))
  rms = reward_models(lab) if chosen & {"reward_models", *SCORED_BY_REWARD_MODELS} else {}
  ablations = {  # in the papers' order
    "reward_models": lambda: rm_findings(rms),
    "best_of_n": lambda: best_of_n(lab, rms),
    "pooling": lambda: [pooling(lab, rms)],
    "dpo": lambda: dpo_findings(lab),
    "ghost_attention": lambda: [ghost_attention(lab)],
    "kl_penalty": lambda: kl_penalty(lab, rms),
  }
  findings = [f for name, ablation_fn in ablations.items() if name in chosen for f in ablation_fn()]
  recipe.finish()  # report.md: every evaluated policy and the stage times
  if recipe.writer:
    markdown = write_findings(workdir, f"Findings: {cfg.name}", findings)
    print("\n" + markdown, flush=True)
  return findings


def main(argv):
  del argv
  runs.setup_logging()
  with runs.one_line_errors():
    run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  runs.define_flags()
  app.run(main)
