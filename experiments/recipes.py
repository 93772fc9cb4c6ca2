"""What the Llama 2 and Llama 3 recipes share: running stages, evaluating, reporting.

A recipe is a sequence of stages, each an existing experiment (`experiments.sft`,
`experiments.reward_model`, ...) run with its section of the recipe config in its own
directory under the recipe's workdir. A finished stage leaves `stage.json` (its result and
time) and is not run again, so an interrupted recipe resumes where it stopped (and a stage
that was interrupted resumes from its own checkpoints). After each policy-changing stage
the policy is evaluated by programs that do not use the reward models (`evaluation.policy`);
everything ends in the report (`experiments.report`).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import ml_collections
from jax.experimental import multihost_utils

from experiments import data_sources, dpo, lm, models, report, runs, sections
from llama_jax.checkpoint import atomic, workdirs
from llama_jax.data import builders, bundled, gatt
from llama_jax.evaluation import policy as evaluation
from llama_jax.generation import GenerationConfig, SamplingConfig
from llama_jax.generation.decode import decode_program, model_stop_ids
from llama_jax.parallel import aot, sharding
from llama_jax.rl import rollouts
from llama_jax.steps import common as step_lib
from llama_jax.training.trainer import read_final

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
SAMPLES_FILE = "samples.jsonl"


def programs(cfg: ml_collections.ConfigDict, mesh, assumed: aot.Assumed) -> list[aot.Program]:
  """An evaluation's compiled functions, for `experiments.compile_check` (`cfg`: a recipe's
  `eval` section plus the policy's `model`): answers to `batch_size` prompts, and the KL
  pass's log-probs of the policy and of the reference, which are on the devices together.
  (The KL's one temperature-1 sample per prompt compiles the same shapes as the answers.)"""
  model_cfg = sections.model_config(cfg)
  sharding.check_fits_mesh(model_cfg, mesh)
  greedy = SamplingConfig(temperature=0.0)
  gen = GenerationConfig(cfg.max_new_tokens, 1, greedy, stop_ids=model_stop_ids(model_cfg))
  ref = sharding.abstract_sharded_params(model_cfg, mesh)
  answers = decode_program(model_cfg, gen, cfg.batch_size, assumed.prompt_len, mesh, resident=ref)
  shards = sharding.batch_shards(mesh)
  n = -(-cfg.batch_size // shards) * shards
  t = rollouts.row_length([[0] * assumed.prompt_len], cfg.max_new_tokens, 64)
  rows = aot.rows(step_lib.batch_sharding(mesh), n, t, ("tokens", "positions", "segment_ids",
                                                        "targets"))  # fmt: skip
  flops = model_cfg.flops_per_token(t) / 3 * n * t
  logps = aot.Program("kl_logps", evaluation.logps_fn(model_cfg, mesh), (ref, rows), flops,
                      resident=ref, note=f"{n} rows × {t}")  # fmt: skip
  return [answers, logps]


def stage_config(section: ml_collections.ConfigDict, **fields: Any) -> ml_collections.ConfigDict:
  """A copy of a stage's config section with `fields` set ("a.b" keys for nested fields)."""
  cfg = ml_collections.ConfigDict(section.to_dict())
  cfg.update_from_flattened_dict(fields)
  return cfg


def _read_stage(done: Path) -> dict[str, Any] | None:
  """A finished stage's record, or None to run the stage (again): absent, or damaged (a
  write cut off before records were atomic), which is said in a WARNING."""
  if not done.exists():
    return None
  try:
    saved = atomic.read_json(done)
    if isinstance(saved, dict) and "result" in saved and "seconds" in saved:
      return saved
    problem = f"{done}: not a stage record ({str(saved)[:80]})"
  except atomic.DamagedFileError as e:
    problem = str(e)
  log.warning("%s; running the stage again", problem)
  return None


class Recipe:
  """Runs stages under `workdir` and collects the report."""

  def __init__(
    self, cfg: ml_collections.ConfigDict, workdir: str, title: str, safe: tuple[str, ...] = ()
  ):
    """`safe`: config keys that may change between runs of this workdir (the stages that
    depend on them are named by their value, so no finished stage is reused wrongly)."""
    self.cfg, self.workdir = cfg, Path(workdir)
    self.workdir.mkdir(parents=True, exist_ok=True)
    config_file = self.workdir / "recipe_config.json"
    config_json = cfg.to_json_best_effort(indent=2)
    saved = json.loads(config_file.read_text()) if config_file.exists() else None
    if saved is not None and (changes := runs.config_changes(saved, cfg, safe=safe)):
      raise runs.ConfigChanged(
        f"{workdir} holds a recipe run with another config ({config_file}); finished stages "
        "would be reused as they are. Changed:\n  " + "\n  ".join(changes)
        + "\nUse a new workdir, or delete this one to start over"
      )
    self.writer = jax.process_index() == 0  # one process writes the shared files
    if self.writer:
      atomic.write_text(config_file, config_json)
    self.report: dict[str, Any] = {"title": title, "stages": []}
    self.tokenizer = models.build_tokenizer(cfg.tokenizer)
    self._eval_records = data_sources.prompt_records(cfg.eval.data)
    self._gatt_eval = None

  def path(self, name: str) -> str:
    return str(self.workdir / name)

  def add(self, section: str, row: dict[str, Any]) -> None:
    self.report.setdefault(section, []).append(row)

  def config(self, section: str, **fields: Any) -> ml_collections.ConfigDict:
    """The stage config of `cfg.<section>` with the recipe's tokenizer and `fields`."""
    return stage_config(self.cfg[section], tokenizer=self.cfg.tokenizer, **fields)

  def stage(self, name: str, what: str, fn: Callable[[str], Any]) -> Any:
    """`fn(stage_dir)`'s result, run now or read from an earlier run's stage.json."""
    done = self.workdir / name / STAGE_FILE
    saved = _read_stage(done)
    if saved is not None:
      print(f"== {name}: done in an earlier run ({saved['seconds']:.0f}s), skipped", flush=True)
    else:
      print(f"\n== {name}: {what}", flush=True)
      t0 = time.perf_counter()
      result = fn(self.path(name))
      if not result and read_final(self.path(name)) is None:
        raise RuntimeError(
          f"stage {name} returned no results and recorded no finished run in "
          f"{self.path(name)}; not marking it done (rerun the recipe to redo it)"
        )
      saved = {"result": result, "seconds": time.perf_counter() - t0}
      if self.writer:
        atomic.write_json(done, saved, indent=2, default=float)
      print(f"== {name}: finished in {saved['seconds']:.0f}s", flush=True)
    self.report["stages"].append({"name": name, "seconds": saved["seconds"]})
    return json.loads(json.dumps(saved["result"], default=float))

  def experiment(self, name: str, what: str, run: Callable, cfg: ml_collections.ConfigDict):
    """A stage that is one experiment: `run(cfg, stage_dir)`."""
    return self.stage(name, what, lambda stage_dir: run(cfg, stage_dir))

  # ------------------------------------------------------------------------ evaluation

  def use_gatt_eval(self, dialogues, instructions) -> None:
    """Also measure, in every later evaluation, how often the last answer of held-out
    multi-turn dialogues follows the system instruction (Ghost Attention's target)."""
    self._gatt_eval = gatt.eval_chats(dialogues, instructions)

  def evaluate(self, label: str, policy_dir: str, reference_dir: str) -> dict[str, float]:
    """Evaluates the LM in `policy_dir` on the held-out prompts (`cfg.eval`), with its KL
    to the model in `reference_dir`; adds a row to the report's policy table."""
    name = "eval/" + re.sub(r"[^a-z0-9]+", "_", label.lower()).strip("_")

    def run(out_dir: str) -> dict[str, float]:
      e = self.cfg.eval
      mesh = sections.build_mesh(e.mesh)
      config, params = workdirs.load_model(policy_dir, mesh, kind="lm")
      ref = None
      if policy_dir != reference_dir:
        ref = workdirs.load_model(reference_dir, mesh, kind="lm", dtype=config.dtype)[1]
      metrics, samples = evaluation.evaluate_policy(
        config, params, self.tokenizer, self._eval_records, ref_params=ref,
        max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, mesh=mesh, seed=e.seed,
      )  # fmt: skip
      if self._gatt_eval is not None:
        rate, rows = follow_instructions(config, params, self.tokenizer, *self._gatt_eval, e, mesh)
        metrics["gatt/follow_rate"] = rate
        samples += rows
      if self.writer:
        atomic.write_jsonl(Path(out_dir, SAMPLES_FILE), samples)
      log.info("%s: %s", label, metrics)
      return metrics

    metrics = self.stage(name, f"evaluate {label} on held-out prompts", run)
    self.add("policy", {"stage": label, "dir": policy_dir, "samples": f"{name}/{SAMPLES_FILE}",
                        "is_reference": policy_dir == reference_dir, **metrics})  # fmt: skip
    return metrics

  def finish(self) -> str:
    """Writes the report into the workdir and returns its markdown."""
    markdown = report.render_markdown(self.report)
    if self.writer:
      report.write_report(self.workdir, self.report)
    print("\n" + markdown, flush=True)
    print(f"\nReport: {self.workdir / report.REPORT_MD} and {self.workdir / report.REPORT_PNG}")
    return markdown


def follow_instructions(config, params, tokenizer, chats, instructions, e, mesh):
  """`(rate, samples)`: how often the greedy last answers to Ghost Attention's held-out
  `chats` (`gatt.eval_chats`) follow their instructions, and a sample row per chat
  (`e`: an `eval` section)."""
  answers = evaluation.answer_prompts(
    config, params, tokenizer, chats,
    max_new_tokens=e.max_new_tokens, batch_size=e.batch_size, mesh=mesh,
  )  # fmt: skip
  samples = [{"prompt": c, "response": a, "follows": i.check(a)}
             for c, a, i in zip(chats, answers, instructions, strict=True)]  # fmt: skip
  return gatt.follow_rate(answers, instructions), samples


# ---------------------------------------------------------------------------- shared stages


def pretrained_model(recipe: Recipe) -> str:
  """The pre-trained model: `init_from` if set, else a pretrain stage on the bundled corpus."""
  if recipe.cfg.init_from:
    return recipe.cfg.init_from
  recipe.experiment("pretrain", "pre-training on the bundled corpus", lm.run,
                    recipe.config("pretrain"))  # fmt: skip
  return recipe.path("pretrain")


def rejection_sampling_config(
  recipe: Recipe, round_index: int, policy: str, previous: str, **fields: Any
) -> ml_collections.ConfigDict:
  """Round `round_index`'s rejection-sampling config: sampling from `policy`, pooling with
  the `previous` round's directory, on the prompts from (round − 1) × `prompt_stride` on."""
  return recipe.config(
    "rejection_sampling", init_from=policy, round=round_index, pool_from=previous,
    **{"data.start": (round_index - 1) * recipe.cfg.prompt_stride,
       "output.name": f"rs_round{round_index}"}, **fields,
  )  # fmt: skip


def sft_on_samples(
  recipe: Recipe, round_index: int, policy: str, rs_dir: str, mix_with: str, prefix: str = "",
  **fields: Any,
):
  """The round's SFT stages: its dataset (the pooled answers of `rs_dir` + `mix_with`),
  then SFT of `policy` on it (section `round_sft` with `fields`), in `<prefix>round<r>/`;
  returns the new model's directory."""
  rd = f"{prefix}round{round_index}"
  data = recipe.stage(
    f"{rd}/sft_data", "the pooled answers (+ human-written chats) as a TFDS dataset",
    functools.partial(sft_mix, mix_with, rs_dir, f"sft_round{round_index}"),
  )  # fmt: skip
  recipe.experiment(
    f"{rd}/sft", "SFT on the rejection-sampled answers", lm.run,
    recipe.config("round_sft", init_from=policy, **tfds_data(data), **fields),
  )  # fmt: skip
  return recipe.path(f"{rd}/sft")


def sft_mix(mix_with: str, rs_dir: str, name: str, out_dir: str) -> dict[str, Any]:
  """Builds the next SFT round's TFDS dataset: the kept rejection-sampling answers
  (`rs_dir/sft.jsonl`) mixed with `mix_with` (see `mixed_splits`)."""
  return build_sft_dataset(name, mixed_splits([str(Path(rs_dir, "sft.jsonl"))], mix_with), out_dir)


def mixed_splits(files: list[str], mix_with: str) -> dict[str, list[str]]:
  """Splits of `files` mixed with `mix_with` ("bundled": the bundled SFT data, whose test
  split becomes the eval split; else comma-separated JSONL files; "": none)."""
  if mix_with == "bundled":
    return {"train": files + bundled.paths("sft")["train"], "test": bundled.paths("sft")["test"]}
  return {"train": files + [p.strip() for p in mix_with.split(",") if p.strip()]}


def build_sft_dataset(name: str, splits: dict[str, list[str]], out_dir: str) -> dict[str, Any]:
  """Builds sft JSONL files into `out_dir/tfds` (one process writes, all wait for it)."""
  data_dir = str(Path(out_dir, "tfds"))
  if jax.process_index() == 0:
    builders.build_dataset("sft", name, splits, data_dir, force=True)
  multihost_utils.sync_global_devices(f"recipe: {name} built")
  return {"name": name, "data_dir": data_dir, "splits": sorted(splits)}


def tfds_data(data: dict[str, Any]) -> dict[str, Any]:
  """Config fields that point an SFT stage at a dataset `sft_mix` built."""
  return {
    "data.source": "tfds",
    "data.name": data["name"],
    "data.data_dir": data["data_dir"],
    "data.eval_split": "test" if "test" in data["splits"] else "",
  }


def reuse_reference_logps(source_dir: str, target_dir: str) -> None:
  """Copies a DPO run's stored reference log-probs to another run of the same reference and
  records (its fingerprint check decides whether they are reused)."""
  source = Path(source_dir, dpo.REFERENCE_FILE)
  if source.exists() and not Path(target_dir, dpo.REFERENCE_FILE).exists():
    Path(target_dir).mkdir(parents=True, exist_ok=True)
    shutil.copy(source, Path(target_dir, dpo.REFERENCE_FILE))
