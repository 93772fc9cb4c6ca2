"""DPO with the Llama 3 recipe: formatting tokens masked, NLL on the chosen responses.

    python -m experiments.dpo --config=experiments/configs/dpo.py:tiny --workdir=DIR \
      --config.init_from=SFT_WORKDIR [--config.dpo.nll_coef=0.0]

Config -> `llama_jax.steps.dpo.build` -> `llama_jax.training.trainer.fit` -> the workdir's
files. The policy starts from `init_from` (an SFT workdir or Hugging Face directory); the
reference is `dpo.reference_from` (default: the same model). With
`dpo.reference="precomputed"` one pass of the reference over the train and eval records fills
`DIR/reference_logps.npz` before training (reused on resume) and the reference is then
dropped from memory; with "in_step" it stays and runs inside each step. Writes
DIR/metrics.jsonl (rewards/*, logps/*, nll and their eval/ versions), metrics.png,
TensorBoard events and Orbax checkpoints; a rerun resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from experiments import data_sources, models, runs, sections
from llama_jax.checkpoint import atomic, workdirs
from llama_jax.data import Indexed, make_pair_pipeline
from llama_jax.parallel import aot, sharding
from llama_jax.steps import common as step_lib
from llama_jax.steps import dpo as dpo_steps
from llama_jax.training.trainer import fit

log = logging.getLogger(__name__)

REFERENCE_FILE = "reference_logps.npz"
INITIAL_EVAL_FILE = "initial_eval.json"  # the eval before the first step (a resume keeps it)
PLOT_PANELS = (
  ("loss", "eval/loss"),
  ("rewards/accuracies", "eval/rewards/accuracies"),
  ("rewards/margins", "eval/rewards/margins"),
  ("logps/chosen", "logps/rejected", "eval/logps/chosen", "eval/logps/rejected"),
  ("nll", "eval/nll"),
  ("learning_rate",),
  ("tokens_per_second",),
)


def dpo_config(cfg: ml_collections.ConfigDict) -> dpo_steps.DPOConfig:
  return sections.from_section(
    dpo_steps.DPOConfig, cfg.dpo, loss_chunk_size=cfg.train.loss_chunk_size
  )


def fingerprint(records: list[dict[str, Any]], reference: str, dpo: dpo_steps.DPOConfig) -> str:
  """What a stored reference table depends on: the records, the reference, the masking."""
  h = hashlib.sha256(f"{reference}|{dpo.mask_formatting}|{len(records)}".encode())
  for r in records:
    h.update(json.dumps([r["prompt"], r["chosen"], r["rejected"]]).encode())
  return h.hexdigest()


def reference_tables(
  cfg, algorithm: dpo_steps.DPO, ref_params, splits: dict[str, list], pipeline, workdir: str
) -> dict[str, np.ndarray]:
  """Per split, the reference log-prob table [N, 2] (`algorithm.reference_step` over one
  evaluation pass): read from DIR/reference_logps.npz when it was made from the same records
  and reference, else computed and stored."""
  path = Path(workdir) / REFERENCE_FILE
  reference = cfg.dpo.reference_from or cfg.init_from
  prints = {s: fingerprint(r, reference, algorithm.config) for s, r in splits.items()}
  if path.exists():
    try:
      stored = atomic.load_npz(path)
    except atomic.DamagedFileError as e:  # e.g. cut off by a full disk: recompute, not block
      log.warning("%s; recomputing the reference log-probs", e)
      stored = None
    if stored is not None and all(
      f"{s}/fingerprint" in stored and str(stored[f"{s}/fingerprint"]) == p and s in stored
      for s, p in prints.items()
    ):
      log.info("Reusing the reference log-probs in %s", path)
      return {s: stored[s] for s in splits}
    if stored is not None:
      log.warning("%s was made from other records or another reference; recomputing", path)
  tables = {}
  for split, records in splits.items():
    with pipeline(records, evaluation=True) as batches:
      tables[split] = dpo_steps.reference_logps_table(
        algorithm.reference_step, ref_params, batches, len(records)
      )
    log.info("Reference log-probs of %d %s pairs: chosen mean %.2f, rejected mean %.2f",
             len(records), split, *tables[split].mean(0))  # fmt: skip
  if jax.process_index() == 0:
    arrays = tables | {f"{s}/fingerprint": np.array(p) for s, p in prints.items()}
    atomic.savez(path, **arrays)  # whole or not at all: a resume never reads half a table
  return tables


def build(
  cfg: ml_collections.ConfigDict, model_cfg, mesh, num_steps: int, reference: str | None = None
) -> dpo_steps.DPO:
  """`cfg`'s DPO on `mesh` (`steps.dpo.build`) in reference mode `reference` (default the
  config's): what `run` trains and `programs` compiles."""
  return dpo_steps.build(
    models.build_model(cfg, model_cfg),  # the policy; the reference is the plain model
    mesh,
    dpo_config(cfg),
    sections.train_optimizer_config(cfg, num_steps),
    reference=reference or cfg.dpo.reference,
    grad_accum_steps=cfg.train.grad_accum_steps,
  )


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """Both reference modes' steps and the reference pass, with abstract arguments (for
  `experiments.compile_check`); the precomputed table has `assumed.num_pairs` rows."""
  sections.check_config(cfg, sections.reference_config("dpo"))
  model_cfg = sections.model_config(cfg)
  models.check_fits(model_cfg, cfg, None, mesh)
  b, t = cfg.data.batch_size, cfg.data.seq_len
  side = aot.rows(step_lib.batch_sharding(mesh), b, t, dpo_steps.ROW_FIELDS, ("valid", "index"))
  batch = {s: side for s in dpo_steps.SIDES}
  forward = model_cfg.flops_per_token(t) / 3 * 2 * b * t  # one pass over both sides
  note = f"{b} pairs × {t}"
  out = []
  for reference in dpo_steps.REFERENCES:
    algorithm = build(cfg, model_cfg, mesh, 1000, reference)
    state = algorithm.abstract_state()
    frozen = algorithm.abstract_reference(assumed.num_pairs)
    if reference == "precomputed":
      out.append(aot.Program(
        "reference_logps", algorithm.reference_step,
        (algorithm.abstract_reference_params(), batch), forward, note=note))  # fmt: skip
      ref_flops = 0.0
    else:
      ref_flops = forward
    out += [
      aot.Program(f"train_step[{reference}]", algorithm.train_step, (state, batch, frozen),
                  3 * forward + ref_flops, note=note),
      aot.Program(f"eval_step[{reference}]", algorithm.eval_step, (state.params, batch, frozen),
                  forward + ref_flops, resident=state.opt_state, note=note),
    ]  # fmt: skip
  return out


def reference_params(cfg: ml_collections.ConfigDict, model_cfg, params, mesh):
  """The reference's parameters: `dpo.reference_from`'s, else the policy's own (the same
  arrays when they are read once before training, else a copy: steps donate the policy's)."""
  if cfg.dpo.reference_from and cfg.dpo.reference_from != cfg.init_from:
    return workdirs.load_model(cfg.dpo.reference_from, mesh, kind="lm", dtype=model_cfg.dtype)[1]
  if cfg.dpo.reference == "precomputed":
    return params  # read once, before the first step donates the policy's arrays
  return jax.tree.map(lambda x: x.copy(), params)


@runs.locked_run
def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (or resumes) DPO in `workdir`; returns the held-out metrics before and after."""
  start = runs.start_run(cfg, workdir, "dpo")
  model_cfg, mesh, tokenizer, params = start.model_config, start.mesh, start.tokenizer, start.params
  if params is None:
    log.warning("init_from is empty: DPO from randomly initialized weights (a smoke test)")
    params = sharding.init_params(model_cfg, jax.random.key(cfg.train.seed), mesh)
  ref_params = reference_params(cfg, model_cfg, params, mesh)

  splits = {
    "train": data_sources.load_preference_records(
      cfg.data, cfg.data.train_split, cfg.data.train_ratings
    )
  }
  if cfg.data.eval_split:
    splits["eval"] = data_sources.load_preference_records(
      cfg.data, cfg.data.eval_split, cfg.data.eval_ratings
    )
  pipeline_cfg = data_sources.pipeline_config(cfg.data)
  pipeline = lambda records, **kw: make_pair_pipeline(
    Indexed(records), tokenizer, pipeline_cfg, mesh=mesh, **kw
  )
  num_steps = cfg.train.num_steps or cfg.train.epochs * math.ceil(
    len(splits["train"]) / cfg.data.batch_size
  )
  algorithm = build(cfg, model_cfg, mesh, num_steps)
  if algorithm.reference == "precomputed":
    tables = reference_tables(cfg, algorithm, ref_params, splits, pipeline, workdir)
    reference = {s: algorithm.place_table(t) for s, t in tables.items()}
    del ref_params  # the reference is no longer needed in memory
  else:
    reference = dict.fromkeys(splits, ref_params)

  results: dict[str, Any] = {}
  eval_fn = None
  if "eval" in splits:

    def eval_fn(state) -> dict[str, float]:
      with pipeline(splits["eval"], evaluation=True) as batches:
        metrics = algorithm.evaluate(state.params, batches, reference["eval"])
      results.update(metrics)
      return metrics

  log.info("DPO: %s parameters on mesh %s, %d steps, %s", f"{model_cfg.num_params():,}",
           dict(mesh.shape), num_steps, algorithm.config)  # fmt: skip

  def init_state():
    state = algorithm.init_state(params, jax.random.PRNGKey(cfg.train.seed))
    if eval_fn is not None:  # the starting point, for the report (the policy is the reference)
      results["initial"] = eval_fn(state)
      if jax.process_index() == 0:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        atomic.write_json(Path(workdir, INITIAL_EVAL_FILE), results["initial"], default=float)
    return state

  train = cfg.train.to_dict() | {"num_steps": num_steps}
  with pipeline(splits["train"]) as train_iter:
    state = fit(
      init_state=init_state,
      abstract_state=algorithm.abstract_state(),
      train_step=lambda state, batch: algorithm.train_step(state, batch, reference["train"]),
      train_iter=train_iter,
      workdir=workdir,
      loop=sections.loop_config(ml_collections.ConfigDict(train)),
      eval_fn=eval_fn,
      flops_per_token=model_cfg.flops_per_token(cfg.data.seq_len),
      peak_flops_per_device=cfg.train.peak_flops or None,
      meta={"model": model_cfg.to_dict(), "dpo": cfg.dpo.to_dict()},
      plot_panels=PLOT_PANELS,
    )
  results = runs.final_results(workdir, results)
  initial = Path(workdir, INITIAL_EVAL_FILE)
  if results and "initial" not in results and initial.exists():  # resumed: measured earlier
    results["initial"] = atomic.read_json(initial)
  log.info("Finished at step %d: %s", int(state.step), results)
  return results


if __name__ == "__main__":
  runs.launch(run)
