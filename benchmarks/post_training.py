"""Post-training throughput of llama_jax vs TRL (PyTorch CPU): DPO, reward model, GRPO.

    python -m benchmarks.post_training [--preset small_50m] [--batch 4] [--seq 256] [--iters 3]
        [--prompts 4] [--generations 4] [--prompt-len 16] [--new-tokens 48]
        [--margins small] [--dtype float32] [--json PATH]
        [--workloads dpo_precomputed,dpo_in_step,reward,grpo,lm]

One random-init Llama (`--preset`'s shape, weights drawn by `transformers` with
`--init-range` so that logits are O(1) and the parity checks test something) is saved as a
Hugging Face checkpoint (safetensors) with a word-level tokenizer ("w4 w17 ..." <-> ids 4,
17, ...); TRL loads it with `transformers`, llama_jax with `load_hf_checkpoint`. Workloads,
each on the same weights, data and shapes on both sides:

- `dpo_precomputed` / `dpo_in_step`: one DPO step (sigmoid loss, β `--beta`, no NLL term) on
  `--batch` preference pairs of prompt + response ≤ `--seq` tokens, with the reference
  log-probs precomputed (TRL `precompute_ref_log_probs=True`; llama_jax `reference=
  "precomputed"`) or computed in the step (TRL's `ref_model`; llama_jax `reference="in_step"`).
- `reward`: one reward-model step on the same pairs, pairwise ranking loss with Llama 2's
  `--margins` table (TRL's `margin` column). TRL scores prompt + chosen and prompt +
  rejected as two sequences; llama_jax packs the prompt once with both responses in one row
  (`llama_jax.data.ranking`), which is part of what is measured.
- `grpo`: one GRPO iteration on `--prompts` prompts × `--generations` samples of up to
  `--new-tokens` tokens at temperature 1: generation, a programmatic reward on the decoded
  text, log-prob scoring (the reference; llama_jax also the policy), one update (k3 KL, β
  `--grpo-beta`, ε 0.2, group-std advantages, token-mean loss = TRL `loss_type="dapo"`).
  TRL: `GRPOTrainer` with its default `transformers` generation; llama_jax:
  `llama_jax.rl.online.make_iteration` with the `steps.grpo` pieces and `generation` decoding.
- `lm` (llama_jax only): the LM step on the DPO batch's rows, the yardstick of the DPO step's
  cost (DPO with a precomputed reference should cost about one LM step).

Every update is forward + backward + clipping at norm 1 + AdamW (β 0.9 / 0.95, eps 1e-5,
weight decay 0.1, constant learning rate `--lr`). TRL runs `trainer.train()` for 1 +
`--iters` steps (`gradient_checkpointing=False`, float32 unless `--dtype bfloat16`); a
callback times each step from `on_step_begin` to `on_step_end`, so collating the batch is
outside the timing as it is for llama_jax, whose jitted step (one device, state donated) is
timed call to result. The first step of each side is the warm-up (and, for llama_jax, the
compile) and the parity check: the loss, and per workload the summed log-probs, the reward
margin, the gradient norm before clipping and (GRPO) the reference's per-token log-probs of
the same rollout must agree (float32: 1e-4 relative on losses and log-probs, 1e-3 on the
gradient norm), or the script raises `ParityError` before timing llama_jax. GRPO's rollouts are
random on each side, so its parity check feeds TRL's first rollout and its advantages through
llama_jax's score function and train step.

All TRL runs come first, then all llama_jax runs: torch's OpenMP threads slow down badly when
XLA's threads are still busy on a small CPU (see benchmarks/README.md). tokens/s counts the
non-padding tokens of the pairs (prompt + chosen + prompt + rejected) for DPO, LM and reward
steps alike, and prompt + response tokens for GRPO, so the ratio is the ratio of work done.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

WORKLOADS = ("dpo_precomputed", "dpo_in_step", "reward", "grpo", "lm")
UNK, BOS, EOS, PAD = 0, 1, 2, 3  # the word-level tokenizer's special ids; words from 4 on
FIRST_WORD = 4
GRPO_SPLIT = ("generation", "reward", "scoring", "update")


class ParityError(AssertionError):
  """llama_jax and TRL disagree on the first step beyond the tolerance."""


# --------------------------------------------------------------------------- model and data


def word(i: int) -> str:
  return f"w{i}"


def text_of(ids) -> str:
  """The word-level tokenizer's text of token ids: one word per id."""
  specials = {UNK: "<unk>", BOS: "<s>", EOS: "</s>", PAD: "<pad>"}
  return " ".join(specials.get(int(i), word(int(i))) for i in ids)


def write_tokenizer(path: Path, vocab_size: int):
  """A word-level `tokenizer.json` covering every id of the model (so any sampled id
  decodes), no BOS added: the text "w5 w9" is exactly the ids [5, 9] on both sides."""
  import tokenizers

  from llama_jax.tokenizer.hf import HFTokenizer

  specials = ["<unk>", "<s>", "</s>", "<pad>"]
  vocab = {t: i for i, t in enumerate(specials)} | {
    word(i): i for i in range(FIRST_WORD, vocab_size)
  }
  backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  backend.add_special_tokens(specials)
  tok = HFTokenizer(backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
  tok.save(path)


def write_checkpoint(path: Path, config, init_range: float, seed: int = 0) -> None:
  """A random-init float32 `LlamaForCausalLM` of `config`'s shape + the tokenizer, in `path`."""
  import torch
  import transformers

  from llama_jax.checkpoint import config_to_hf

  hf = {k: v for k, v in config_to_hf(config).items() if k not in ("architectures", "torch_dtype")}
  hf |= dict(initializer_range=init_range, pad_token_id=PAD)
  torch.manual_seed(seed)
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf)).float()
  model.generation_config.pad_token_id = PAD
  model.save_pretrained(path)
  write_tokenizer(path, config.vocab_size)


def make_pairs(vocab_size: int, batch: int, seq: int, seed: int = 0) -> list[dict]:
  """`batch` preference pairs of random words: prompt + either response ≤ `seq` tokens, the
  first pair's chosen exactly `seq` (so TRL's dynamic padding gives llama_jax's [·, seq]),
  responses closed by EOS."""
  from llama_jax.data.records import RATING_CODES

  rng = np.random.RandomState(seed)
  ratings = sorted(RATING_CODES.values())
  pairs = []
  for i in range(batch):
    p = rng.randint(max(seq // 5, 1), max(seq * 2 // 5, 2))
    lo = max(seq // 8, 2)
    c, r = (rng.randint(lo, seq - p + 1) for _ in range(2))
    if i == 0:
      c = seq - p
    ids = lambda n: rng.randint(FIRST_WORD, vocab_size, n).tolist()
    pairs.append(
      {
        "prompt": ids(p),
        "chosen": ids(c - 1) + [EOS],
        "rejected": ids(r - 1) + [EOS],
        "rating": ratings[i % len(ratings)],
      }
    )
  return pairs


def pair_tokens(pairs) -> int:
  """Non-padding tokens of the pairs as two sequences each (prompt + chosen, prompt + rejected)."""
  return sum(2 * len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) for p in pairs)


def make_prompts(vocab_size: int, num: int, length: int, seed: int = 1) -> list[str]:
  """`num` prompts of `length` − 3 … `length` random words (so left padding is exercised)."""
  rng = np.random.RandomState(seed)
  lengths = rng.randint(max(length - 3, 1), length + 1, num)
  return [text_of(rng.randint(FIRST_WORD, vocab_size, n)) for n in lengths]


def reward_of_text(text: str) -> float:
  """The GRPO reward: the fraction of the response's words whose id is a multiple of 3 (a
  programmatic reward of the decoded text, computed the same way on both sides)."""
  ids = [int(w[1:]) for w in text.split() if w[:1] == "w" and w[1:].isdigit()]
  return sum(i % 3 == 0 for i in ids) / max(len(ids), 1)


def margins(pairs, table: str) -> np.ndarray:
  """Llama 2's margin of each pair's rating (float32 [B]; 0 for table "none")."""
  from llama_jax.objectives import reward_model as rm_obj

  codes = np.asarray([p["rating"] for p in pairs], np.int32)
  return np.asarray(rm_obj.margins_for_ratings(codes, table), np.float32)


# --------------------------------------------------------------------------- llama_jax batches


def side_rows(pairs, side: str, seq: int) -> dict[str, np.ndarray]:
  """Pad-mode rows [B, seq] of prompt + response: targets are the next tokens, and the
  target mask selects the response's tokens (EOS included), as TRL's completion mask does."""
  b = len(pairs)
  keys = ("tokens", "positions", "segment_ids", "targets", "target_mask", "format_mask")
  rows = {k: np.zeros((b, seq), np.int32) for k in keys}
  for i, pair in enumerate(pairs):
    ids, p = pair["prompt"] + pair[side], len(pair["prompt"])
    n = len(ids)
    rows["tokens"][i, :n] = ids
    rows["positions"][i, :n] = np.arange(n)
    rows["segment_ids"][i, :n] = 1
    rows["targets"][i, : n - 1] = ids[1:]
    rows["target_mask"][i, p - 1 : n - 1] = 1
  rows["valid"] = np.ones(b, np.int32)
  rows["index"] = np.arange(b, dtype=np.int32)
  return rows


def dpo_batch(pairs, seq: int) -> dict[str, dict[str, np.ndarray]]:
  return {side: side_rows(pairs, side, seq) for side in ("chosen", "rejected")}


def lm_batch(batch) -> dict[str, np.ndarray]:
  """The DPO batch's 2B rows (chosen i, rejected i interleaved, as the DPO step runs them)."""
  keys = ("tokens", "positions", "segment_ids", "targets", "target_mask")
  return {
    k: np.stack([batch["chosen"][k], batch["rejected"][k]], 1).reshape(
      -1, batch["chosen"][k].shape[1]
    )
    for k in keys
  }


def ranking_batch(pairs, multiple: int = 8) -> dict[str, np.ndarray]:
  """Packed ranking rows (`llama_jax.data.ranking`): prompt, chosen, rejected in one row."""
  from llama_jax.data import ranking

  packed = [ranking.pack_ranking_row(np.asarray(p["prompt"]), [np.asarray(p["chosen"]),
            np.asarray(p["rejected"])]) for p in pairs]  # fmt: skip
  seq = -(-max(len(r["tokens"]) for r in packed) // multiple) * multiple
  b = len(pairs)
  out = {k: np.zeros((b, seq), np.int32) for k in ("tokens", "segment_ids", "response_ids")}
  for i, row in enumerate(packed):
    n = len(row["tokens"])
    out["tokens"][i, :n], out["response_ids"][i, :n] = row["tokens"], row["response_ids"]
    out["segment_ids"][i, :n] = 1
  out["rating"] = np.asarray([p["rating"] for p in pairs], np.int32)
  out["valid"] = np.ones(b, np.int32)
  return out


# --------------------------------------------------------------------------- parity


def check(name: str, ours: float, theirs: float, rtol: float, atol: float = 0.0) -> dict:
  """One parity figure; raises `ParityError` if |ours − theirs| > atol + rtol · |theirs|."""
  diff = abs(float(ours) - float(theirs))
  ok = bool(diff <= atol + rtol * abs(float(theirs)))  # NaN fails too
  if not ok:
    raise ParityError(
      f"{name}: llama_jax {float(ours):.7g} vs TRL {float(theirs):.7g}, |Δ| {diff:.2e} > "
      f"{atol:g} + {rtol:g}·|TRL|"
    )
  return {"name": name, "ours": float(ours), "theirs": float(theirs), "abs_diff": diff}


def tolerances(dtype: str) -> dict[str, float]:
  """Relative tolerances of the parity checks: float32 agrees to rounding, bfloat16 (autocast
  on the TRL side) only to ~1e-2."""
  if dtype == "float32":
    return {"loss": 1e-4, "logps": 1e-4, "grad_norm": 1e-3, "token_logp": 1e-3}
  return {"loss": 5e-2, "logps": 5e-2, "grad_norm": 1e-1, "token_logp": 2e-1}


# --------------------------------------------------------------------------- TRL side


def _trl_common(args, out_dir: str, batch_size: int) -> dict:
  """TrainingArguments shared by the three trainers: the optimizer of the llama_jax side."""
  return dict(
    output_dir=out_dir,
    per_device_train_batch_size=batch_size,
    gradient_accumulation_steps=1,
    max_steps=1 + args.iters,
    learning_rate=args.lr,
    lr_scheduler_type="constant",
    warmup_steps=0,
    weight_decay=0.1,
    adam_beta1=0.9,
    adam_beta2=0.95,
    adam_epsilon=1e-5,
    max_grad_norm=1.0,
    bf16=args.dtype == "bfloat16",
    gradient_checkpointing=False,  # llama_jax does not rematerialize here either
    use_cpu=True,
    report_to="none",
    logging_steps=10**6,
    save_strategy="no",
    disable_tqdm=True,
    seed=0,
  )


def _wrap(obj, name: str, sink: dict, keep_first: dict | None = None):
  """Replace the bound method `obj.name` by one adding its wall time to `sink[name]` (and,
  if `keep_first` is given, keeping its first result there)."""
  fn = getattr(obj, name)

  def timed(*a, **k):
    t0 = time.perf_counter()
    try:
      out = fn(*a, **k)
    finally:
      sink[name] = sink.get(name, 0.0) + time.perf_counter() - t0
    if keep_first is not None and name not in keep_first:
      keep_first[name] = out
    return out

  setattr(obj, name, timed)


def _run_trainer(trainer, wrapped: tuple[str, ...] = ()) -> dict:
  """`trainer.train()` with per-step times, the per-step time of the `wrapped` methods, and
  the first step's loss and gradient norm (before clipping)."""
  import transformers

  steps: list[dict] = []
  current: dict = {}
  first: dict = {}

  class StepTimer(transformers.TrainerCallback):
    def on_step_begin(self, *a, **k):
      current.clear()
      current["_start"] = time.perf_counter()

    def on_step_end(self, *a, **k):
      seconds = time.perf_counter() - current.pop("_start")
      steps.append(dict(current, seconds=seconds))
      if len(steps) == 1:  # the trainer's final log clears its metrics; keep the first step's
        first["metrics"] = {k: list(v) for k, v in trainer._metrics["train"].items()}

  for name in ("compute_loss", "_clip_grad_norm", *wrapped):
    _wrap(trainer, name, current, first if name in ("compute_loss", "_clip_grad_norm") else None)
  trainer.add_callback(StepTimer())
  trainer.remove_callback(transformers.PrinterCallback)  # it prints the final summary
  trainer.train()
  loss = first["compute_loss"]
  loss = loss[0] if isinstance(loss, tuple) else loss
  return {
    "steps": steps,
    "loss": float(loss.detach()),
    "grad_norm": float(first["_clip_grad_norm"]),
    "metrics": first["metrics"],
  }


def trl_dpo(args, path: str, pairs, precompute: bool) -> dict:
  """TRL's DPO trainer on the pairs (as text of the word-level tokenizer, tokenized by TRL and
  checked to give the pairs' ids)."""
  import datasets
  import transformers
  from trl import DPOConfig, DPOTrainer

  rows = {
    "prompt": [text_of(p["prompt"]) for p in pairs],
    "chosen": [" " + text_of(p["chosen"]) for p in pairs],
    "rejected": [" " + text_of(p["rejected"]) for p in pairs],
  }
  with tempfile.TemporaryDirectory() as tmp:
    config = DPOConfig(
      **_trl_common(args, tmp, len(pairs)),
      beta=args.beta,
      loss_type=["sigmoid"],
      max_length=None,
      precompute_ref_log_probs=precompute,
    )
    trainer = DPOTrainer(
      model=transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
      args=config,
      train_dataset=datasets.Dataset.from_dict(rows),
      processing_class=transformers.AutoTokenizer.from_pretrained(path),
    )
    for example, pair in zip(trainer.train_dataset, pairs, strict=True):
      for key in ("prompt", "chosen", "rejected"):
        if example[f"{key}_ids"] != pair[key]:
          raise ValueError(f"TRL tokenized the {key} of a pair differently from its ids")
    out = _run_trainer(trainer)
  m = out["metrics"]
  out |= {"logps/chosen": m["logps/chosen"][0], "logps/rejected": m["logps/rejected"][0]}
  return out


def trl_reward(args, path: str, pairs) -> dict:
  """TRL's reward trainer on the pairs, pre-tokenized (prompt + response ids), with margins;
  the score head's initial weights are returned for llama_jax."""
  import datasets
  import torch
  import transformers
  from trl import RewardConfig, RewardTrainer

  rows = {
    "chosen_ids": [p["prompt"] + p["chosen"] for p in pairs],
    "rejected_ids": [p["prompt"] + p["rejected"] for p in pairs],
  }
  if args.margins != "none":
    rows["margin"] = margins(pairs, args.margins).tolist()
  torch.manual_seed(0)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(
    path, num_labels=1, dtype="float32"
  )
  head = model.score.weight.detach().numpy()[0].copy()
  with tempfile.TemporaryDirectory() as tmp:
    config = RewardConfig(**_trl_common(args, tmp, len(pairs)), max_length=None)
    trainer = RewardTrainer(
      model=model,
      args=config,
      train_dataset=datasets.Dataset.from_dict(rows),
      processing_class=transformers.AutoTokenizer.from_pretrained(path),
    )
    out = _run_trainer(trainer)
  out |= {"margin": out["metrics"]["margin"][0], "head": head}
  return out


def trl_grpo(args, path: str, prompts: list[str]) -> dict:
  """TRL's GRPO trainer (default `transformers` generation) on the prompts; per step the
  time of generation, reward and the whole generate-and-score call, and the first rollout."""
  import datasets
  import transformers
  from trl import GRPOConfig, GRPOTrainer

  def reward(prompts, completions, **kwargs):
    return [reward_of_text(c) for c in completions]

  k = args.generations
  with tempfile.TemporaryDirectory() as tmp:
    config = GRPOConfig(
      **_trl_common(args, tmp, len(prompts) * k),
      num_generations=k,
      max_completion_length=args.new_tokens,
      temperature=1.0,
      beta=args.grpo_beta,
      epsilon=0.2,
      loss_type="dapo",  # token mean over the batch = llama_jax aggregation "token_mean"
      scale_rewards="group",
      use_bias_correction_kl=False,  # the plain k3 term, as llama_jax's loss has it
      shuffle_dataset=False,
    )
    trainer = GRPOTrainer(
      model=transformers.AutoModelForCausalLM.from_pretrained(path, dtype="float32"),
      reward_funcs=[reward],
      args=config,
      train_dataset=datasets.Dataset.from_dict({"prompt": prompts}),
      processing_class=transformers.AutoTokenizer.from_pretrained(path),
    )
    rollouts: list[dict] = []
    score_fn = trainer._generate_and_score_completions

    def kept(inputs):
      result = score_fn(inputs)
      rollouts.append({k: v.detach().clone() if hasattr(v, "detach") else v
                       for k, v in result.items()})  # fmt: skip
      return result

    trainer._generate_and_score_completions = kept
    out = _run_trainer(
      trainer, ("_generate", "_calculate_rewards", "_generate_and_score_completions")
    )
  for step, rollout in zip(out["steps"], rollouts, strict=True):
    step["tokens"] = int(rollout["prompt_mask"].sum() + rollout["completion_mask"].sum())
  out["rollout"] = {k: np.asarray(v) for k, v in rollouts[0].items() if hasattr(v, "shape")}
  return out


def trl_grpo_split(step: dict) -> dict[str, float]:
  """A TRL GRPO step's time split (seconds)."""
  prepare = step["_generate_and_score_completions"]
  return {
    "generation": step["_generate"],
    "reward": step["_calculate_rewards"],
    "scoring": prepare - step["_generate"] - step["_calculate_rewards"],
    "update": step["seconds"] - prepare,
  }


# --------------------------------------------------------------------------- llama_jax side


class JaxSide:
  """The checkpoint loaded on a one-device mesh, the optimizer, and fresh copies of the
  initial parameters for each workload (the steps donate their state)."""

  def __init__(self, path: str, args):
    from llama_jax.checkpoint import load_hf_checkpoint
    from llama_jax.parallel import sharding
    from llama_jax.training import train_state as ts

    self.mesh = sharding.make_mesh(devices=jax.devices()[:1])
    self.config, self.params = load_hf_checkpoint(
      path, dtype="float32", compute_dtype=args.dtype, mesh=self.mesh
    )
    opt = ts.OptimizerConfig(
      learning_rate=args.lr, schedule="constant", warmup_steps=0, b1=0.9, b2=0.95, eps=1e-5,
      weight_decay=0.1, grad_clip=1.0,
    )  # fmt: skip
    self.opt, self.tx = opt, ts.make_optimizer(opt)
    self.args = args

  def fresh_params(self):
    return jax.tree.map(lambda x: x.copy(), self.params)

  def state(self, model, params):
    from llama_jax.training import train_state as ts

    return ts.init_train_state(model, self.tx, self.mesh, jax.random.PRNGKey(0), params=params)

  def jit(self, step, model, frozen_shardings=()):
    from llama_jax.steps.common import jit_train_step
    from llama_jax.training import train_state as ts

    shardings = ts.state_shardings(model, self.tx, self.mesh)
    return jit_train_step(step, shardings, self.mesh, frozen_shardings=frozen_shardings)


def time_steps(step, state, batch, frozen, iters: int, parity) -> dict:
  """First step (compile + parity: `parity(metrics)` may raise), then `iters` timed steps."""
  state, metrics = step(state, batch, *frozen)
  metrics = jax.device_get(metrics)
  checks = parity(metrics)
  seconds = []
  for _ in range(iters):
    start = time.perf_counter()
    state, m = step(state, batch, *frozen)
    jax.block_until_ready(m)
    seconds.append(time.perf_counter() - start)
  return {"steps": [{"seconds": s} for s in seconds], "parity": checks, "first": metrics}


def ours_dpo(side: JaxSide, pairs, reference: str, theirs: dict | None) -> dict:
  from llama_jax.parallel import sharding
  from llama_jax.steps import common as step_lib
  from llama_jax.steps import dpo as dpo_steps

  args, config, mesh = side.args, side.config, side.mesh
  dpo = dpo_steps.DPOConfig(beta=args.beta, loss_type="sigmoid", mask_formatting=False)
  batch = jax.device_put(dpo_batch(pairs, args.seq), step_lib.batch_sharding(mesh))
  if reference == "precomputed":
    ref_step = step_lib.jit_eval_step(
      dpo_steps.make_reference_step(config, dpo, mesh=mesh), sharding.param_shardings(config, mesh),
      mesh,
    )  # fmt: skip
    frozen = dpo_steps.reference_logps_table(ref_step, side.params, [batch], len(pairs))
    frozen_sharding = sharding.named_sharding(mesh, ())
  else:
    frozen, frozen_sharding = side.fresh_params(), sharding.param_shardings(config, mesh)
  step = side.jit(
    dpo_steps.make_train_step(config, side.tx, dpo, reference=reference, mesh=mesh),
    config,
    (frozen_sharding,),
  )
  tol = tolerances(args.dtype)

  def parity(m):
    if theirs is None:
      return []
    return [
      check("loss", m["loss"], theirs["loss"], tol["loss"], 1e-6),
      check("logps/chosen", m["logps/chosen"], theirs["logps/chosen"], tol["logps"]),
      check("logps/rejected", m["logps/rejected"], theirs["logps/rejected"], tol["logps"]),
      check("grad_norm", m["grad_norm"], theirs["grad_norm"], tol["grad_norm"]),
    ]

  state = side.state(config, side.fresh_params())
  return time_steps(step, state, batch, (frozen,), args.iters, parity)


def ours_lm(side: JaxSide, pairs) -> dict:
  from llama_jax.steps import common as step_lib
  from llama_jax.steps import lm as lm_steps

  batch = jax.device_put(
    lm_batch(dpo_batch(pairs, side.args.seq)), step_lib.batch_sharding(side.mesh)
  )
  step = side.jit(lm_steps.make_train_step(side.config, side.tx, mesh=side.mesh), side.config)
  state = side.state(side.config, side.fresh_params())
  return time_steps(step, state, batch, (), side.args.iters, lambda m: [])


def ours_reward(side: JaxSide, pairs, theirs: dict | None, head: np.ndarray) -> dict:
  from llama_jax.model import reward_model
  from llama_jax.steps import common as step_lib
  from llama_jax.steps import reward_model as rm_steps

  args, config, mesh = side.args, side.config, side.mesh
  model = reward_model.RewardModel(config)
  params = reward_model.from_lm_params(config, side.fresh_params(), jax.random.PRNGKey(0), mesh)
  # TRL's score layer (no bias) is the head: the same initial reward model on both sides.
  params["head"]["kernel"] = jax.device_put(
    head.astype(np.float32), params["head"]["kernel"].sharding
  )
  step = side.jit(
    rm_steps.make_train_step(model, side.tx, mesh=mesh, margins=args.margins, max_responses=2),
    model,
  )
  batch = jax.device_put(ranking_batch(pairs), step_lib.batch_sharding(mesh))
  tol = tolerances(args.dtype)

  def parity(m):
    if theirs is None:
      return []
    return [
      check("loss", m["loss"], theirs["loss"], tol["loss"], 1e-6),
      check("rewards/margins", m["rewards/margins"], theirs["margin"], tol["logps"], 1e-5),
      check("grad_norm", m["grad_norm"], theirs["grad_norm"], tol["grad_norm"]),
    ]

  return time_steps(step, side.state(model, params), batch, (), args.iters, parity)


def ours_grpo(side: JaxSide, path: str, prompts: list[str], theirs: dict | None) -> dict:
  """llama_jax's GRPO iteration (`online.make_iteration`), after the parity check on TRL's
  first rollout; per iteration the time split and the tokens."""
  from llama_jax.generation import GenerationConfig, SamplingConfig, encode_prompt
  from llama_jax.model.llama import as_model
  from llama_jax.rl import grpo as grpo_lib
  from llama_jax.rl import online, rollouts
  from llama_jax.tokenizer.hf import HFTokenizer

  args, config, mesh = side.args, side.config, side.mesh
  k = args.generations
  tokenizer = HFTokenizer.from_dir(path)
  model = as_model(config)
  grpo = grpo_lib.GRPOConfig(
    group_size=k, beta=args.grpo_beta, clip_eps=0.2, scale="std", aggregation="token_mean"
  )
  algorithm = grpo_lib.build(model, mesh, grpo, side.opt)
  ref_params = side.fresh_params()
  prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
  seq_len = rollouts.row_length(prompt_ids, args.new_tokens, 64)
  checks = [] if theirs is None else grpo_parity(
    side, algorithm, ref_params, theirs, prompt_ids, seq_len, k
  )  # fmt: skip

  reward_seconds: list[float] = []

  def scorer(records, prompts_, responses):
    start = time.perf_counter()
    scores = [reward_of_text(r) for r in responses]
    reward_seconds.append(time.perf_counter() - start)
    return scores

  gen = GenerationConfig(
    max_new_tokens=args.new_tokens, num_samples=k, sampling=SamplingConfig(temperature=1.0),
    stop_ids=tokenizer.stop_ids, pad_id=tokenizer.pad_id,
  )  # fmt: skip
  sampler = online.Sampler(model, tokenizer, gen, chat=False, mesh=mesh)
  iteration = online.make_iteration(algorithm, sampler, scorer, ref_params, num_minibatches=1)
  state = algorithm.init_state(side.fresh_params(), jax.random.PRNGKey(0))
  batch = {"records": [{"prompt": p} for p in prompts]}
  steps = []
  for i in range(1 + args.iters):  # the first compiles the generation (and is not timed)
    start = time.perf_counter()
    state, m = iteration(state, batch)
    seconds = time.perf_counter() - start
    if i == 0:
      continue
    if "time/logps" in m:  # the driver times its phases itself
      split = {
        "generation": m["time/generation"] + m.get("time/weight_sync", 0.0),
        "reward": m["time/reward"],
        "scoring": m["time/logps"],
        "update": m["time/training"],
      }
    else:  # an earlier driver timed the reward and the scoring pass together
      split = {
        "generation": m["time/generation"],
        "reward": reward_seconds[-1],
        "scoring": m["time/scoring"] - reward_seconds[-1],
        "update": m["time/training"],
      }
    tokens = k * sum(len(p) for p in prompt_ids) + m["response/length"] * m["num_responses"]
    steps.append({"seconds": seconds, "split": split, "tokens": int(round(tokens))})
  return {"steps": steps, "parity": checks, "seq_len": seq_len}


def grpo_parity(side, algorithm, ref_params, theirs, prompt_ids, seq_len: int, k: int) -> list:
  """TRL's first rollout (tokens, advantages) through llama_jax's score function and train
  step from the initial weights: the loss, the gradient norm and the reference's per-token
  log-probs must agree with TRL's."""
  from llama_jax.rl import rollouts

  tol = tolerances(side.args.dtype)
  r = theirs["rollout"]
  n = r["completion_ids"].shape[0]
  trl_prompts = [
    ids[mask == 1].tolist() for ids, mask in zip(r["prompt_ids"], r["prompt_mask"], strict=True)
  ]
  if trl_prompts[::k] != prompt_ids:
    raise ParityError("TRL's tokenized prompts differ from llama_jax's")
  c = r["completion_ids"].shape[1]
  rows = rollouts.rollout_rows(
    prompt_ids, r["completion_ids"].reshape(-1, k, c), r["completion_mask"].reshape(-1, k, c),
    seq_len=seq_len,
  )  # fmt: skip
  state = algorithm.init_state(side.fresh_params(), jax.random.PRNGKey(0))
  out, _ = algorithm.advantages(state, ref_params, rows, np.zeros(n, np.float32))
  out = jax.device_get(out)
  mask = rows["response_mask"].astype(np.float32)
  minibatch = rows | {
    "old_logp": out["old_logp"],
    "ref_logp": out["ref_logp"],
    "advantages": r["advantages"].astype(np.float32)[:, None] * mask,
  }
  _, m = algorithm.update(state, minibatch)
  m = jax.device_get(m)
  checks = [
    check("loss", m["loss/policy"], theirs["loss"], tol["loss"], 1e-6),
    check("grad_norm", m["grad_norm"], theirs["grad_norm"], tol["grad_norm"]),
  ]
  if "ref_per_token_logps" in r:
    diff = 0.0
    for i, p in enumerate(rows["response_mask"]):
      start, length = int(np.argmax(p)), int(p.sum())
      ours = out["ref_logp"][i, start : start + length]
      diff = max(diff, float(np.abs(ours - r["ref_per_token_logps"][i, :length]).max(initial=0.0)))
    checks.append(check("max |Δ ref token logp|", diff, 0.0, 0.0, tol["token_logp"]))
  return checks


# --------------------------------------------------------------------------- report


def summarize(steps: list[dict], tokens: int | None = None) -> dict:
  """Mean and best seconds per step and the tokens/s of each (tokens per step from the steps
  when they carry their own count, GRPO's)."""
  seconds = [s["seconds"] for s in steps]
  toks = [s.get("tokens", tokens) for s in steps]
  rates = [t / s for t, s in zip(toks, seconds, strict=True)]
  return {
    "seconds": seconds,
    "mean_s": float(np.mean(seconds)),
    "best_s": float(np.min(seconds)),
    "tokens_per_step": float(np.mean(toks)),
    "tokens_per_s": float(np.sum(toks) / np.sum(seconds)),
    "best_tokens_per_s": float(np.max(rates)),
  }


def mean_split(splits: list[dict]) -> dict[str, float]:
  return {k: float(np.mean([s[k] for s in splits])) for k in GRPO_SPLIT}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small_50m")
  parser.add_argument("--batch", type=int, default=4, help="preference pairs per DPO / RM step")
  parser.add_argument("--seq", type=int, default=256, help="longest prompt + response")
  parser.add_argument("--iters", type=int, default=3, help="timed steps per workload and side")
  parser.add_argument("--prompts", type=int, default=4, help="GRPO prompts per iteration")
  parser.add_argument("--generations", type=int, default=4, help="GRPO samples per prompt")
  parser.add_argument("--prompt-len", type=int, default=16, help="GRPO prompt words (at most)")
  parser.add_argument("--new-tokens", type=int, default=48, help="GRPO max completion length")
  parser.add_argument("--beta", type=float, default=0.1, help="DPO β")
  parser.add_argument("--grpo-beta", type=float, default=0.04, help="GRPO KL coefficient")
  parser.add_argument("--margins", default="small", choices=("none", "small", "large"))
  parser.add_argument("--lr", type=float, default=1e-5, help="constant learning rate")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="compute dtype; parameters and optimizer stay float32")  # fmt: skip
  parser.add_argument("--init-range", type=float, default=0.05,
                      help="std of the random weights (HF initializer_range)")  # fmt: skip
  parser.add_argument("--workloads", default=",".join(WORKLOADS))
  parser.add_argument("--json", default="", help="write the figures to this file")
  args = parser.parse_args(argv)
  workloads = [w for w in args.workloads.split(",") if w]
  if unknown := sorted(set(workloads) - set(WORKLOADS)):
    parser.error(f"--workloads: unknown {unknown}; expected names from {WORKLOADS}")
  if args.iters < 1:
    parser.error(f"--iters={args.iters}; need at least 1 timed step")

  import datasets
  import torch
  import transformers

  from llama_jax import LlamaConfig

  os.environ.setdefault("TQDM_DISABLE", "1")  # TRL's reference precompute draws a bar
  transformers.logging.set_verbosity_error()
  datasets.disable_progress_bars()
  load_before = os.getloadavg()
  config = LlamaConfig.preset(args.preset)
  pairs = make_pairs(config.vocab_size, args.batch, args.seq)
  prompts = make_prompts(config.vocab_size, args.prompts, args.prompt_len)
  tokens = pair_tokens(pairs)
  theirs: dict[str, dict] = {}
  ours: dict[str, dict] = {}
  with tempfile.TemporaryDirectory() as path:
    write_checkpoint(Path(path), config, args.init_range)
    # TRL first, all of it: see the module docstring on torch and XLA threads.
    if "dpo_precomputed" in workloads:
      theirs["dpo_precomputed"] = trl_dpo(args, path, pairs, precompute=True)
    if "dpo_in_step" in workloads:
      theirs["dpo_in_step"] = trl_dpo(args, path, pairs, precompute=False)
    if "reward" in workloads:
      theirs["reward"] = trl_reward(args, path, pairs)
    if "grpo" in workloads:
      theirs["grpo"] = trl_grpo(args, path, prompts)
    side = JaxSide(path, args)
    if "dpo_precomputed" in workloads:
      ours["dpo_precomputed"] = ours_dpo(side, pairs, "precomputed", theirs["dpo_precomputed"])
    if "dpo_in_step" in workloads:
      ours["dpo_in_step"] = ours_dpo(side, pairs, "in_step", theirs["dpo_in_step"])
    if "lm" in workloads:
      ours["lm"] = ours_lm(side, pairs)
    if "reward" in workloads:
      ours["reward"] = ours_reward(side, pairs, theirs["reward"], theirs["reward"]["head"])
    if "grpo" in workloads:
      ours["grpo"] = ours_grpo(side, path, prompts, theirs["grpo"])
  load_after = os.getloadavg()

  cfg = side.config
  device = jax.devices()[0]
  print(
    f"model {args.preset}: {cfg.num_params() / 1e6:.1f}M params (init std {args.init_range}), "
    f"{args.dtype}; {args.batch} pairs ≤ {args.seq} tokens ({tokens} pair tokens); GRPO "
    f"{args.prompts} prompts × {args.generations} samples ≤ {args.new_tokens} new tokens"
  )
  print(
    f"llama_jax on {device.platform} ({device.device_kind}), one-device mesh; torch "
    f"{torch.__version__} threads {torch.get_num_threads()}, trl "
    f"{__import__('trl').__version__}, transformers {transformers.__version__}"
  )
  print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
  results = {"args": vars(args), "load_before": load_before, "load_after": load_after,
             "pair_tokens": tokens, "workloads": {}}  # fmt: skip
  for name in workloads:
    entry = {"ours": summarize(ours[name]["steps"], tokens)}
    if name in theirs:
      entry["theirs"] = summarize(theirs[name]["steps"][1:], tokens)  # step 0: warm-up
      entry["parity"] = ours[name]["parity"]
      entry["ratio"] = entry["ours"]["tokens_per_s"] / entry["theirs"]["tokens_per_s"]
      entry["best_ratio"] = entry["theirs"]["best_s"] / entry["ours"]["best_s"]
      if name == "grpo":
        entry["best_ratio"] = (
          entry["ours"]["best_tokens_per_s"] / entry["theirs"]["best_tokens_per_s"]
        )
    if name == "grpo":
      entry["ours"]["split"] = mean_split([s["split"] for s in ours[name]["steps"]])
      if name in theirs:
        entry["theirs"]["split"] = mean_split(
          [trl_grpo_split(s) for s in theirs[name]["steps"][1:]]
        )
    results["workloads"][name] = entry
    for who, label in (("ours", "llama_jax"), ("theirs", "TRL")):
      if who in entry:
        s = entry[who]
        print(f"{name} {label} seconds per step: {' '.join(f'{x:.3f}' for x in s['seconds'])}")
    for check_ in entry.get("parity", []):
      print(f"{name} parity {check_['name']}: llama_jax {check_['ours']:.7g}, TRL "
            f"{check_['theirs']:.7g}, |Δ| {check_['abs_diff']:.2e}")  # fmt: skip
    if "parity" in entry:
      print(f"{name} parity ok")

  print()
  print("| workload | llama_jax tokens/s | TRL tokens/s | ratio (mean) | ratio (best step) | "
        "parity abs. Δloss |")  # fmt: skip
  print("|---|---|---|---|---|---|")
  for name, e in results["workloads"].items():
    ours_tps = f"{e['ours']['tokens_per_s']:,.0f}"
    if "theirs" not in e:
      print(f"| {name} | {ours_tps} | – | – | – | – |")
      continue
    dloss = next(c["abs_diff"] for c in e["parity"] if c["name"] == "loss")
    print(f"| {name} | {ours_tps} | {e['theirs']['tokens_per_s']:,.0f} | {e['ratio']:.2f} | "
          f"{e['best_ratio']:.2f} | {dloss:.1e} |")  # fmt: skip
  if "grpo" in results["workloads"]:
    print()
    print("| GRPO iteration (mean s) | " + " | ".join(GRPO_SPLIT) + " | total |")
    print("|---|" + "---|" * (len(GRPO_SPLIT) + 1))
    for who, label in (("ours", "llama_jax"), ("theirs", "TRL")):
      e = results["workloads"]["grpo"].get(who)
      if e:
        cells = " | ".join(f"{e['split'][k]:.3f}" for k in GRPO_SPLIT)
        print(f"| {label} | {cells} | {e['mean_s']:.3f} |")
  w = results["workloads"]
  if "dpo_precomputed" in w and "lm" in w:
    cost = w["dpo_precomputed"]["ours"]["mean_s"] / w["lm"]["ours"]["mean_s"]
    best = w["dpo_precomputed"]["ours"]["best_s"] / w["lm"]["ours"]["best_s"]
    results["dpo_over_lm"] = {"mean": cost, "best": best}
    print(f"\nllama_jax DPO step (reference precomputed) / LM step on the same tokens: "
          f"{cost:.2f} (mean), {best:.2f} (best steps)")  # fmt: skip
  if args.json:
    Path(args.json).write_text(json.dumps(results, indent=2, default=_jsonable) + "\n")
  return results


def _jsonable(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x) if not isinstance(x, float) or math.isfinite(x) else None


if __name__ == "__main__":
  main()
