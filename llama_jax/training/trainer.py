"""The training loop every stage shares: resume, step, check, log, evaluate, checkpoint.

    state = fit(
      init_state=lambda: init_train_state(...),     # only called when there is no checkpoint
      abstract_state=abstract_train_state(...),     # restore target (shapes + shardings)
      train_step=jitted_step, train_iter=pipeline, workdir=workdir,
      loop=LoopConfig(num_steps=1000), flops_per_token=cfg.flops_per_token(T),
    )

A rerun with the same workdir resumes from the newest complete checkpoint: parameters,
optimizer state, step, RNG key and the data iterator's position, so a run stopped and
resumed ends bit-identical to an uninterrupted one.

A run is finished when its end is recorded: the last checkpoint, the final evaluation and
`metrics.png` are written, then `final.json` (`read_final`). A rerun of a finished run
changes nothing; a rerun of a run killed after its last step but before that record redoes
the end (evaluation, plot) from the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import jax
import numpy as np

from llama_jax.checkpoint import atomic
from llama_jax.checkpoint import orbax as ckpt_lib
from llama_jax.training import metrics as metrics_lib
from llama_jax.training.train_state import TrainState

log = logging.getLogger(__name__)

StepFn = Callable[[TrainState, Mapping[str, jax.Array]], tuple[TrainState, dict[str, jax.Array]]]


# What `metrics.png` shows: train and eval curves of a metric share a panel.
PLOT_PANELS = (
  ("loss", "eval/loss"),
  ("accuracy", "eval/accuracy"),
  ("grad_norm",),
  ("learning_rate",),
  ("tokens_per_second",),
)


FINAL_FILE = "final.json"


def read_final(workdir: str | os.PathLike) -> dict[str, Any] | None:
  """What a finished run recorded at its end, `{"step": N, "eval": {...}}` (the final
  evaluation's metrics, without the `eval/` prefix), or None if the run has not finished
  (or its record is damaged: the end is then redone)."""
  path = os.path.join(workdir, FINAL_FILE)
  if not os.path.exists(path):
    return None
  try:
    return atomic.read_json(path)
  except atomic.DamagedFileError as e:
    log.warning("%s; the run's end will be redone", e)
    return None


def _write_final(workdir: str, step: int, final_eval: Mapping[str, float]) -> None:
  atomic.write_json(os.path.join(workdir, FINAL_FILE), {"step": step, "eval": dict(final_eval)})


class NonFiniteError(FloatingPointError):
  """A step produced a non-finite loss or gradient and the run is set to stop."""


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """How long to train and how often to log, evaluate and checkpoint.

  Attributes:
    num_steps: the step at which training stops (total, counting resumed steps).
    log_every: write metrics (jsonl, TensorBoard) every this many steps.
    eval_every: run `eval_fn` every this many steps (0: only at the end).
    checkpoint_every: save every this many steps (and always at the end).
    keep_checkpoints: how many recent checkpoints to keep.
    async_checkpoint: write checkpoints in the background.
    on_nonfinite: "skip" (the update is dropped by the step and counted) or "raise" (stop
      with `NonFiniteError` naming the step).
    max_skipped: with "skip", stop anyway after this many skipped steps in one run.
    plot: draw `metrics.png` at the end (matplotlib takes about a second per plot; the smoke
      configs, whose many short stages nobody looks at, turn it off).
  """

  num_steps: int
  log_every: int = 10
  eval_every: int = 0
  checkpoint_every: int = 1000
  keep_checkpoints: int = 3
  async_checkpoint: bool = True
  on_nonfinite: Literal["skip", "raise"] = "skip"
  max_skipped: int = 100
  plot: bool = True

  def __post_init__(self):
    if self.on_nonfinite not in ("skip", "raise"):
      raise ValueError(f"on_nonfinite={self.on_nonfinite!r}; expected 'skip' or 'raise'")
    for name in ("num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
      if getattr(self, name) < 1:
        raise ValueError(f"LoopConfig.{name}={getattr(self, name)} must be at least 1")


def _scalars(tree: Mapping[str, Any]) -> dict[str, float]:
  return {k: float(np.asarray(v)) for k, v in jax.device_get(dict(tree)).items()}


def restore_or_init(
  manager: ckpt_lib.CheckpointManager,
  init_state: Callable[[], TrainState],
  abstract_state: TrainState,
  train_iter: Any,
) -> TrainState:
  """The newest verified checkpoint (and its data position), or a fresh state.

  Newer checkpoints that fail verification (an item or file missing, a file truncated or
  changed, no manifest) are named in WARNINGs and moved aside to `<step>.damaged`: the run
  resumes from the step before them and saves those steps anew. Raises `CheckpointError`
  when checkpoints exist but none is intact (never a silent fresh start).
  """
  step = manager.latest_verified_step()
  if step is None:
    return init_state()
  if damaged := [s for s in manager.all_steps() if s > step]:
    manager.set_aside(damaged)
  state, data_state, _ = manager.restore(step, abstract_state=abstract_state)
  if data_state is not None:
    train_iter.set_state(data_state)
  elif hasattr(train_iter, "get_state") and hasattr(train_iter, "set_state"):
    # `fit` saves such an iterator's position with every checkpoint: resuming without it
    # would restart the data at record 0 with no sign of it.
    raise ckpt_lib.CheckpointError(
      f"{manager.directory} step {step}: no data-iterator state ({ckpt_lib.DATA}/) to resume "
      "the input pipeline from"
    )
  if damaged:
    log.warning(
      "Resumed from the checkpoint of step %d in %s, not from the damaged newer steps %s",
      step,
      manager.directory,
      damaged,
    )
  else:
    log.info("Resumed from the checkpoint of step %d in %s", step, manager.directory)
  return state


class _NonFiniteGuard:
  """Checks each step's `finite` flag one step late, so the host never waits on the step
  it just dispatched (the device keeps working while the previous flag is read)."""

  def __init__(self, policy: str, max_skipped: int):
    self.policy, self.max_skipped, self.skipped = policy, max_skipped, 0
    self._pending: tuple[int, dict[str, jax.Array]] | None = None

  def push(self, step: int, metrics: dict[str, jax.Array]) -> None:
    previous, self._pending = self._pending, (step, metrics)
    if previous is not None:
      self._check(*previous)

  def flush(self) -> None:
    if self._pending is not None:
      self._check(*self._pending)
      self._pending = None

  def _check(self, step: int, metrics: dict[str, jax.Array]) -> None:
    if bool(metrics["finite"]):
      return
    values = {k: float(metrics[k]) for k in ("loss", "grad_norm") if k in metrics}
    what = ", ".join(f"{k}={v}" for k, v in values.items())
    if self.policy == "raise":
      raise NonFiniteError(
        f"step {step}: non-finite {what}; the update was not applied and the run stops "
        "(on_nonfinite='raise'; set it to 'skip' to drop such steps and continue)"
      )
    self.skipped += 1
    log.warning("step %d: non-finite %s; update skipped (%d so far)", step, what, self.skipped)
    if self.skipped > self.max_skipped:
      raise NonFiniteError(
        f"step {step}: {self.skipped} non-finite steps skipped in this run, more than "
        f"max_skipped={self.max_skipped}"
      )


def batch_tokens(batch: Mapping[str, Any]) -> int:
  """Token slots in a batch: its `tokens` field, or those of its parts (DPO's chosen and
  rejected sides)."""
  if "tokens" in batch:
    return int(np.prod(batch["tokens"].shape))
  return sum(batch_tokens(part) for part in batch.values() if isinstance(part, Mapping))


def fit(
  *,
  init_state: Callable[[], TrainState],
  abstract_state: TrainState,
  train_step: StepFn,
  train_iter: Iterator[Mapping[str, Any]],
  workdir: str,
  loop: LoopConfig,
  eval_fn: Callable[[TrainState], Mapping[str, float]] | None = None,
  flops_per_token: float | None = None,
  peak_flops_per_device: float | None = None,
  meta: Mapping[str, Any] | None = None,
  plot_panels: Sequence[Sequence[str]] = PLOT_PANELS,
) -> TrainState:
  """Trains until step `loop.num_steps`, resuming from `workdir` if it has checkpoints.

  Args:
    init_state: builds the starting state; not called when resuming.
    abstract_state: the state's `ShapeDtypeStruct`s with target shardings (restore target;
      the saved run may have used another mesh).
    train_step: jitted `(state, batch) -> (state, metrics)`; metrics must include `finite`.
    train_iter: batches; `get_state()` / `set_state()` are saved with the checkpoints.
    workdir: gets `metrics.jsonl`, `metrics.png`, TensorBoard events and `checkpoints/`.
    loop: see `LoopConfig`.
    eval_fn: `state -> metrics`, logged with an `eval/` prefix.
    flops_per_token: training FLOPs per token, for the MFU estimate.
    peak_flops_per_device: device peak; default: detected from the device kind.
    meta: JSON-serializable facts saved with every checkpoint (e.g. the model config).
    plot_panels: the panels of `metrics.png` (see `metrics.plot_metrics`).

  Returns:
    The final state (also saved as the last checkpoint).
  """
  if peak_flops_per_device is None:
    peak_flops_per_device = metrics_lib.device_peak_flops(jax.devices()[0])
  manager = ckpt_lib.CheckpointManager(
    ckpt_lib.checkpoint_dir(workdir),
    save_interval_steps=loop.checkpoint_every,
    max_to_keep=loop.keep_checkpoints,
    async_save=loop.async_checkpoint,
  )
  state = restore_or_init(manager, init_state, abstract_state, train_iter)
  start = int(state.step)
  final = read_final(workdir)
  if start == loop.num_steps and final is not None and final["step"] == start:
    manager.close()
    log.info("%s: finished at step %d by an earlier run", workdir, start)
    return state
  # At num_steps with no record of the end: the last run was stopped during it; redo it.
  redo_end = start == loop.num_steps
  writer = metrics_lib.MetricsWriter(workdir, resume_step=start, redo_eval=redo_end)
  progress = metrics_lib.Progress(
    loop.num_steps,
    initial_step=start,
    flops_per_token=flops_per_token,
    num_devices=jax.device_count(),
    peak_flops_per_device=peak_flops_per_device,
  )
  guard = _NonFiniteGuard(loop.on_nonfinite, loop.max_skipped)

  final_eval: dict[str, float] = {}

  def evaluate(step: int) -> None:
    if eval_fn is not None:
      final_eval.clear()
      final_eval.update(_scalars(eval_fn(state)))
      writer.write(step, {f"eval/{k}": v for k, v in final_eval.items()})

  def save(step: int, force: bool = False) -> None:
    data_state = train_iter.get_state() if hasattr(train_iter, "get_state") else None
    manager.save(step, state, data_state=data_state, meta=meta, force=force)

  try:
    for step in range(start + 1, loop.num_steps + 1):
      batch = next(train_iter)
      state, step_metrics = train_step(state, batch)
      guard.push(step, step_metrics)
      tokens = batch_tokens(batch)
      if step % loop.log_every == 0 or step == loop.num_steps:
        guard.flush()
        scalars = _scalars(step_metrics)
        scalars |= progress.update(step, tokens=tokens, metrics=scalars)
        writer.write(step, scalars)
      else:
        progress.update(step, tokens=tokens, metrics=None)
      if loop.eval_every and step % loop.eval_every == 0 and step != loop.num_steps:
        evaluate(step)
      save(step)
    guard.flush()
    evaluate(int(state.step))
    save(int(state.step), force=True)
    manager.wait_until_finished()
  finally:
    progress.close()
    writer.close()
    manager.close()
  if jax.process_index() == 0:
    if loop.plot:
      metrics_lib.plot_metrics(workdir, plot_panels, skip_missing=True)
    _write_final(workdir, int(state.step), final_eval)
  return state
