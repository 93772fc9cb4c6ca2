"""Training metrics: a JSONL + TensorBoard writer, plots, MFU and a console progress bar.

Every training loop (LM pretraining/SFT, reward, DPO, PPO, GRPO) logs through this module:

```
with MetricsWriter(workdir, resume_step=start_step) as writer, \\
     Progress(num_steps, initial_step=start_step, flops_per_token=6 * num_params,
              peak_flops_per_device=device_peak_flops(dtype="bfloat16")) as progress:
  for step in range(start_step + 1, num_steps + 1):
    state, metrics = train_step(state, batch)
    if step % log_every == 0:
      metrics = jax.device_get(metrics)
      metrics |= progress.update(step, tokens=global_batch_tokens, metrics=metrics)
      writer.write(step, metrics)
    else:
      progress.update(step, tokens=global_batch_tokens)
```

`workdir/metrics.jsonl` holds one JSON object per logged step (`{"step": 10, "loss": 2.31}`),
`workdir/tensorboard/` the same scalars as TensorBoard event files (written with the
`tensorboard` package's pure-Python writer, no TensorFlow). Only the primary process writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
PLOT_FILE = "metrics.png"

# ---------------------------------------------------------------------------------------------
# Writing and reading metrics.
# ---------------------------------------------------------------------------------------------


def _is_primary() -> bool:
  return jax.process_index() == 0


def _to_scalar(name: str, value: Any) -> int | float:
  """A Python int (integer and bool values) or float; anything else is an error."""
  array = np.asarray(value)
  if array.size != 1:
    raise ValueError(f"metric {name!r} has shape {array.shape}; only scalars can be logged")
  if array.dtype == bool or np.issubdtype(array.dtype, np.integer):
    return int(array.reshape(()))
  if jnp.issubdtype(array.dtype, jnp.floating):  # unlike np.issubdtype, knows bfloat16
    return float(array.reshape(()).astype(np.float64))
  raise ValueError(f"metric {name!r} = {value!r} is not a number")


def _read_records(path: Path) -> list[dict]:
  """The records of a metrics.jsonl file, without a torn last line left by a crash.

  A line is complete once its newline is written, so a final line without one is a record
  that was cut off (or is being written right now) and is skipped; a complete line that
  does not parse means the file is corrupt, which is an error.
  """
  text = path.read_text()
  lines = text.split("\n")
  if lines[-1]:
    logging.warning("%s: ignoring an incomplete last line: %r", path, lines[-1][:80])
  records = []
  for number, line in enumerate(lines[:-1], start=1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{number}: not a JSON object: {line[:80]!r}") from e
  return records


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """The logged records of a run, `[{"step": 10, "loss": 2.31, ...}, ...]`, in file order.

  Reads `workdir/metrics.jsonl`; safe to call while the run is still writing it.
  """
  return _read_records(Path(workdir) / METRICS_FILE)


def _rewrite_atomically(path: Path, records: Iterable[Mapping]) -> None:
  # Write-then-rename, so a crash leaves either the old file or the new one, never half.
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(json.dumps(dict(r)) + "\n" for r in records))
  os.replace(tmp, path)


def _truncate_for_resume(path: Path, resume_step: int | None, redo_eval: bool = False) -> None:
  """Drops a torn last line and, when resuming, records logged after `resume_step` (and
  with `redo_eval` the evaluation records at `resume_step`).

  Records after the checkpoint were written by the interrupted run and are about to be
  recomputed; keeping them would describe two runs in one file.
  """
  if not path.exists():
    return
  text = path.read_text()
  torn = bool(text) and not text.endswith("\n")
  records = _read_records(path)
  def kept_record(r) -> bool:
    if resume_step is None:
      return True
    redone = redo_eval and r["step"] == resume_step and any(k.startswith("eval/") for k in r)
    return r["step"] <= resume_step and not redone

  kept = [r for r in records if kept_record(r)]
  if torn or len(kept) < len(records):
    _rewrite_atomically(path, kept)


def _open_tensorboard(logdir: Path, resume_step: int | None):
  """A TensorBoard event-file writer; on resume, tells TensorBoard to hide stale steps."""
  # Imported here so that reading metrics does not need the tensorboard package.
  from tensorboard.compat.proto import event_pb2
  from tensorboard.summary.writer.event_file_writer import EventFileWriter

  # Each writer opens a new, uniquely named events file (timestamp, host, pid, counter).
  writer = EventFileWriter(str(logdir), flush_secs=30)
  if resume_step is not None:
    # A SessionLog.START at step s makes TensorBoard drop the events with step >= s read
    # so far, i.e. those the interrupted run logged after its last checkpoint.
    start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
    writer.add_event(
      event_pb2.Event(step=resume_step + 1, wall_time=time.time(), session_log=start)
    )
  return writer


def _scalar_event(step: int, scalars: Mapping[str, float]):
  from tensorboard.compat.proto import event_pb2, summary_pb2

  values = [summary_pb2.Summary.Value(tag=k, simple_value=v) for k, v in scalars.items()]
  return event_pb2.Event(
    step=step, wall_time=time.time(), summary=summary_pb2.Summary(value=values)
  )


class MetricsWriter:
  """Appends scalar metrics to `workdir/metrics.jsonl` and TensorBoard events.

  Args:
    workdir: the run's directory (local path); created if missing.
    resume_step: the step of the checkpoint a resumed run starts from. Records with a larger
      step, logged by the interrupted run after that checkpoint, are dropped from
      metrics.jsonl (atomically) and hidden in TensorBoard. None keeps every record.
    redo_eval: also drop the evaluation records at `resume_step` (a finished run's final
      evaluation that is about to be redone because the run did not record its end).
    enabled: whether this process writes; defaults to `jax.process_index() == 0`, so only
      the primary process of a multi-host run writes. When disabled every method is a no-op.

  Use as a context manager, or call `close()`.
  """

  def __init__(
    self,
    workdir: str | os.PathLike,
    *,
    resume_step: int | None = None,
    redo_eval: bool = False,
    enabled: bool | None = None,
  ):
    self.workdir = Path(workdir)
    self.path = self.workdir / METRICS_FILE
    self.enabled = _is_primary() if enabled is None else enabled
    self._file = None
    self._tensorboard = None
    if not self.enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    _truncate_for_resume(self.path, resume_step, redo_eval)
    self._file = self.path.open("a")
    self._tensorboard = _open_tensorboard(self.workdir / TENSORBOARD_DIR, resume_step)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Logs `{"step": step, **metrics}`; values are Python, NumPy or JAX scalars.

    NaN and infinities are kept (JSON `NaN`/`Infinity`, which `json.loads` reads back).
    """
    if not self.enabled:
      return
    if self._file is None:
      raise RuntimeError("MetricsWriter.write after close()")
    if "step" in metrics:
      raise ValueError("metrics must not contain a 'step' key; pass the step separately")
    # One device_get for all values rather than one blocking transfer per metric.
    host = jax.device_get(dict(metrics))
    scalars = {name: _to_scalar(name, value) for name, value in host.items()}
    record = {"step": int(step), **scalars}
    # One write per complete line, flushed, so a reader or a crash never sees half a record.
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    self._tensorboard.add_event(_scalar_event(int(step), {k: float(v) for k, v in scalars.items()}))

  def flush(self) -> None:
    """Forces buffered TensorBoard events (and the JSONL file) to disk."""
    if self._file is not None:
      self._file.flush()
      self._tensorboard.flush()

  def close(self) -> None:
    """Flushes and closes the files; further writes are errors. Safe to call twice."""
    if self._file is not None:
      self._file.close()
      self._tensorboard.close()
      self._file = self._tensorboard = None

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


# ---------------------------------------------------------------------------------------------
# Plotting.
# ---------------------------------------------------------------------------------------------


def _numeric_keys(records: Sequence[Mapping]) -> list[str]:
  """Keys with a number value in some record, in order of first appearance, minus step."""
  keys = {}
  for record in records:
    for key, value in record.items():
      if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
        keys[key] = None
  return list(keys)


def plot_metrics(
  workdir: str | os.PathLike,
  keys: Sequence[str | Sequence[str]] | None = None,
  path: str | os.PathLike | None = None,
  *,
  skip_missing: bool = False,
) -> Path:
  """Plots metric curves against step from `workdir/metrics.jsonl` into a PNG.

  Args:
    workdir: the run's directory.
    keys: the metrics to plot, one subplot each, or a tuple of metrics sharing a subplot
      (e.g. `("loss", "eval/loss")`); default: every numeric metric.
    path: the PNG to write; default `workdir/metrics.png`.
    skip_missing: leave out requested metrics the file does not have instead of raising.

  Returns:
    The path of the PNG.
  """
  # Imported lazily (it is slow) and without pyplot, so neither the global backend nor a
  # notebook's inline figures are touched: the Agg canvas renders this one figure.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  records = read_metrics(workdir)
  available = _numeric_keys(records)
  panels = [(k,) if isinstance(k, str) else tuple(k) for k in (keys or available)]
  unknown = [k for panel in panels for k in panel if k not in available]
  if unknown and not skip_missing:
    raise ValueError(f"no numeric metric named {unknown}; available: {available}")
  panels = [p for p in (tuple(k for k in panel if k in available) for panel in panels) if p]
  if not panels:
    raise ValueError(f"{Path(workdir) / METRICS_FILE} has no numeric metrics to plot")
  keys = panels

  ncols = min(3, len(keys))
  nrows = math.ceil(len(keys) / ncols)
  fig = Figure(figsize=(4.5 * ncols, 3 * nrows), layout="constrained")
  FigureCanvasAgg(fig)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax, panel in zip(axes, keys, strict=False):
    for key in panel:
      points = [(r["step"], r[key]) for r in records if key in r]
      ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None, label=key)
    ax.set_title(" / ".join(panel))
    if len(panel) > 1:
      ax.legend()
    ax.grid(alpha=0.3)
  for ax in axes[len(keys) - ncols : len(keys)]:  # the bottom plot of each column
    ax.set_xlabel("step")
  for ax in axes[len(keys) :]:
    ax.set_visible(False)

  path = Path(workdir) / PLOT_FILE if path is None else Path(path)
  fig.savefig(path, dpi=100)
  return path


# ---------------------------------------------------------------------------------------------
# Model FLOPs utilization.
# ---------------------------------------------------------------------------------------------

# Dense (no structured sparsity) peak FLOP/s of one JAX device, by a name that occurs in
# `device.device_kind` and by matmul dtype. Keys are matched case-insensitively as whole
# tokens ("L4" does not match "L40S", "H200" does not match "GH200") in this order, so more
# specific names come first ("H100 PCIe" before "H100", "TPU v5 lite" before "TPU v5").
#
# TPUs — Cloud TPU system-architecture pages (cloud.google.com/tpu/docs/v2, v3, v4, v5e, v5p,
# v6e), bf16 per chip. v2 and v3 chips have two TensorCores, each its own JAX device, so a
# device gets half the chip; from v4 on, one chip is one device (megacore). The MXUs take
# bf16 inputs and there is no published f32 peak, so TPUs have no float32 entry.
# "TPU v4 lite" is the v4i inference chip: 138 TFLOPS (Jouppi et al., ISCA 2021).
#
# NVIDIA — product datasheets, which list tensor-core rates "with sparsity": the dense rate
# is half of that. float32 is the non-tensor-core FP32 rate (what Precision.HIGHEST gets);
# tfloat32 is the TF32 tensor-core rate that JAX's default precision may use for f32 matmuls.
# The H100 SXM ("NVIDIA H100 80GB HBM3"), H200 SXM and GH200 share one compute die and clock.
_H100_SXM = {"bfloat16": 989.5e12, "tfloat32": 494.5e12, "float32": 67e12}
_H100_NVL = {"bfloat16": 835.5e12, "tfloat32": 417.5e12, "float32": 60e12}
PEAK_FLOPS: Mapping[str, Mapping[str, float]] = {
  # Google TPUs.
  "TPU v2": {"bfloat16": 45e12 / 2},
  "TPU v3": {"bfloat16": 123e12 / 2},
  "TPU v4 lite": {"bfloat16": 138e12},
  "TPU v4": {"bfloat16": 275e12},
  "TPU v5 lite": {"bfloat16": 197e12},
  "TPU v5e": {"bfloat16": 197e12},
  "TPU v5p": {"bfloat16": 459e12},
  "TPU v5": {"bfloat16": 459e12},  # v5p reports its device_kind as "TPU v5"
  "TPU v6 lite": {"bfloat16": 918e12},
  "TPU v6e": {"bfloat16": 918e12},
  # NVIDIA GPUs.
  "B200": {"bfloat16": 2.25e15},  # HGX B200: 4.5 PFLOPS sparse BF16 per GPU
  "GH200": _H100_SXM,
  "H200 NVL": _H100_NVL,
  "H200": _H100_SXM,
  "H100 NVL": _H100_NVL,
  "H100 PCIe": {"bfloat16": 756.5e12, "tfloat32": 378e12, "float32": 51e12},
  "H100": _H100_SXM,
  "A100": {"bfloat16": 312e12, "tfloat32": 156e12, "float32": 19.5e12},  # SXM and PCIe
  "L4": {"bfloat16": 121e12, "tfloat32": 60e12, "float32": 30.3e12},
}

_DTYPE_ALIASES = {"bf16": "bfloat16", "f32": "float32", "fp32": "float32", "tf32": "tfloat32"}
_DTYPES = ("bfloat16", "float32", "tfloat32")


def _dtype_name(dtype: Any) -> str:
  if isinstance(dtype, str):
    name = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
  else:
    name = np.dtype(dtype).name  # jnp.bfloat16, np.float32, ...
  if name not in _DTYPES:
    raise ValueError(f"no peak FLOP/s table for dtype {dtype!r}; expected one of {_DTYPES}")
  return name


def _matches(name: str, device_kind: str) -> bool:
  """Whether `name` occurs in `device_kind` as whole tokens (not inside a longer word)."""
  pattern = rf"(?<![a-z0-9]){re.escape(name.lower())}(?![a-z0-9])"
  return re.search(pattern, device_kind.lower()) is not None


def peak_flops_for_kind(device_kind: str, dtype: Any = "bfloat16") -> float | None:
  """Dense peak FLOP/s of a device with this `device_kind`, or None if not in `PEAK_FLOPS`."""
  dtype = _dtype_name(dtype)
  for name, peaks in PEAK_FLOPS.items():
    if _matches(name, device_kind):
      return peaks.get(dtype)
  return None


def device_peak_flops(device: Any = None, dtype: Any = "bfloat16") -> float | None:
  """Dense peak FLOP/s of one device for matmuls in `dtype` ("bfloat16", "float32", "tfloat32").

  `device` defaults to `jax.devices()[0]`. Returns None for CPUs, for device kinds missing
  from `PEAK_FLOPS`, and for dtypes without a published peak on that device.
  """
  device = jax.devices()[0] if device is None else device
  if device.platform == "cpu":
    return None
  return peak_flops_for_kind(device.device_kind, dtype)


def mfu(
  flops_per_token: float | None,
  tokens_per_second: float,
  num_devices: int,
  peak_flops_per_device: float | None,
) -> float | None:
  """Model FLOPs utilization: achieved model FLOP/s over the devices' combined peak.

  Args:
    flops_per_token: training FLOPs per token counted from the model (forward + backward,
      about 6 × parameters + attention), not counting rematerialization.
    tokens_per_second: tokens processed per second by all `num_devices` together.
    num_devices: devices working on those tokens.
    peak_flops_per_device: dense peak FLOP/s of one device, e.g. from `device_peak_flops`.

  Returns:
    A fraction in [0, 1] for a plausible measurement; None if a FLOP count is unknown.
  """
  if flops_per_token is None or peak_flops_per_device is None:
    return None
  if num_devices < 1 or peak_flops_per_device <= 0:
    raise ValueError(
      f"need num_devices >= 1 and a positive peak, got {num_devices}, {peak_flops_per_device}"
    )
  return flops_per_token * tokens_per_second / (num_devices * peak_flops_per_device)


# ---------------------------------------------------------------------------------------------
# Console progress.
# ---------------------------------------------------------------------------------------------


class Progress:
  """A tqdm progress bar for a training loop showing loss, learning rate, tokens/s and MFU.

  Call `update` after every step (cheap: it only moves the bar) and pass `metrics` at the
  steps the loop logs. Throughput is measured between logging updates and is a windowed
  average: the tokens of all steps since the previous logging update divided by the wall
  time since then, so the value returned at a logging step describes exactly the steps
  since the last one (no smoothing across windows). The first logging update only starts
  the clock, which keeps compilation out of the measurement.

  Args:
    total_steps: the step the run ends at.
    initial_step: the step the run starts from (a resumed run's checkpoint step).
    flops_per_token: training FLOPs per token for MFU (see `mfu`); None hides MFU.
    num_devices: devices sharing the tokens; defaults to `jax.device_count()`.
    peak_flops_per_device: dense peak of one device (see `device_peak_flops`); None hides MFU.
    enabled: show the bar; defaults to `jax.process_index() == 0`. The returned numbers are
      computed either way.
    desc: the bar's label.
    clock: a monotonic clock in seconds (injectable for tests).
  """

  def __init__(
    self,
    total_steps: int,
    *,
    initial_step: int = 0,
    flops_per_token: float | None = None,
    num_devices: int | None = None,
    peak_flops_per_device: float | None = None,
    enabled: bool | None = None,
    desc: str = "train",
    clock: Callable[[], float] = time.perf_counter,
  ):
    self.flops_per_token = flops_per_token
    self.num_devices = jax.device_count() if num_devices is None else num_devices
    self.peak_flops_per_device = peak_flops_per_device
    self.enabled = _is_primary() if enabled is None else enabled
    self._clock = clock
    self._window_start = None  # clock time of the previous logging update
    self._window_tokens = 0
    self._bar = tqdm.tqdm(
      total=total_steps,
      initial=initial_step,
      desc=desc,
      disable=not self.enabled,
      dynamic_ncols=True,
    )

  def update(
    self, step: int, *, tokens: int, metrics: Mapping[str, Any] | None = None
  ) -> dict[str, float]:
    """Moves the bar to `step`; with `metrics`, also measures and shows throughput.

    Args:
      step: the step just completed.
      tokens: tokens processed (by all processes together) since the previous `update`,
        e.g. one step's global batch when called every step.
      metrics: the step's metrics at logging steps, else None; "loss" and "learning_rate"
        are shown when present.

    Returns:
      At a logging update after the first: `{"tokens_per_second": ..., "mfu": ...}` for the
      window since the previous logging update ("mfu" only when the FLOP counts are known).
      Otherwise an empty dict.
    """
    self._window_tokens += tokens
    self._bar.update(step - self._bar.n)
    if metrics is None:
      return {}
    # Fetching the metrics waits for the step that produced them, so the window ends when
    # the device work is done rather than when the step was dispatched.
    metrics = jax.device_get(dict(metrics))
    now = self._clock()
    rates = {}
    if self._window_start is not None and self._window_tokens:  # 0: a step of no batch tokens
      rates["tokens_per_second"] = self._window_tokens / max(now - self._window_start, 1e-9)
      utilization = mfu(
        self.flops_per_token,
        rates["tokens_per_second"],
        self.num_devices,
        self.peak_flops_per_device,
      )
      if utilization is not None:
        rates["mfu"] = utilization
    self._window_start, self._window_tokens = now, 0
    self._bar.set_postfix_str(_postfix(metrics, rates))
    return rates

  def close(self) -> None:
    """Closes the bar."""
    self._bar.close()

  def __enter__(self) -> Progress:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _postfix(metrics: Mapping[str, Any], rates: Mapping[str, float]) -> str:
  parts = []
  if "loss" in metrics:
    parts.append(f"loss={float(metrics['loss']):.4f}")
  if "learning_rate" in metrics:
    parts.append(f"lr={float(metrics['learning_rate']):.2e}")
  if "tokens_per_second" in rates:
    parts.append(f"tok/s={rates['tokens_per_second']:,.0f}")
  if "mfu" in rates:
    parts.append(f"mfu={rates['mfu']:.1%}")
  return ", ".join(parts)


def plot_score_distribution(path: str | Path, rows: Mapping[str, np.ndarray]) -> Path:
  """PNG of the reward distribution: chosen vs rejected (and edited) scores, and the
  chosen − rejected margin per rating bucket."""
  # Agg canvas without pyplot, as `plot_metrics` (no global backend); the ranking layout and
  # rating names only here, so importing metrics stays light.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  from llama_jax.data import ranking
  from llama_jax.objectives import reward_model as rm_obj

  rewards, present = rows["rewards"], rows["present"].astype(bool)
  chosen, rejected = ranking.chosen_rejected(rewards, present)
  edited = rewards[present.sum(axis=1) == 3, 0]
  fig = Figure(figsize=(10, 3.5), layout="constrained")
  FigureCanvasAgg(fig)
  left, right = fig.subplots(1, 2)
  bins = np.linspace(rewards[present].min(), rewards[present].max() + 1e-6, 40)
  for values, label in ((chosen, "chosen"), (rejected, "rejected"), (edited, "edited")):
    if len(values):
      left.hist(values, bins=bins, alpha=0.5, label=f"{label} ({len(values)})")
  left.set_title("reward per response")
  left.legend()
  margins = chosen - rejected
  bins = np.linspace(margins.min(), margins.max() + 1e-6, 30)
  for code, name in reversed(list(enumerate(rm_obj.RATING_NAMES))):
    bucket = rows["rating"] == code
    if bucket.any():
      right.hist(margins[bucket], bins=bins, alpha=0.5, label=f"{name} ({bucket.sum()})")
  right.axvline(0.0, color="black", lw=0.8)
  right.set_title("chosen − rejected per rating")
  right.legend(fontsize="small")
  fig.savefig(path, dpi=100)
  return Path(path)
