"""Tests for llama_jax.training.metrics: JSONL/TensorBoard logging, resume, plots, MFU, progress."""

import json
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from llama_jax.training import metrics as M


def _tensorboard_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  """Reads the scalars back the way TensorBoard does (including purges after a resume)."""
  from tensorboard.backend.event_processing import event_accumulator

  accumulator = event_accumulator.EventAccumulator(str(workdir / M.TENSORBOARD_DIR))
  accumulator.Reload()
  return {
    tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
    for tag in accumulator.Tags()["scalars"]
  }


def test_jsonl_round_trip_with_numpy_jax_nan_and_inf(tmp_path):
  with M.MetricsWriter(tmp_path, enabled=True) as writer:
    writer.write(1, {"loss": jnp.float32(2.5), "learning_rate": np.float64(1e-3), "tokens": 64})
    writer.write(2, {"loss": jnp.array(float("nan"), jnp.bfloat16), "grad_norm": float("inf")})
  records = M.read_metrics(tmp_path)
  assert records[0] == {"step": 1, "loss": 2.5, "learning_rate": 1e-3, "tokens": 64}
  assert type(records[0]["tokens"]) is int and type(records[0]["loss"]) is float
  assert records[1]["step"] == 2 and math.isnan(records[1]["loss"])
  assert records[1]["grad_norm"] == math.inf


def test_write_rejects_non_scalars_and_a_step_key(tmp_path):
  with M.MetricsWriter(tmp_path, enabled=True) as writer:
    with pytest.raises(ValueError, match="'loss' has shape"):
      writer.write(1, {"loss": np.zeros(3)})
    with pytest.raises(ValueError, match="'step'"):
      writer.write(1, {"step": 3})
    with pytest.raises(ValueError, match="not a number"):
      writer.write(1, {"name": "x"})


def test_resume_drops_records_after_the_checkpoint_and_a_torn_line(tmp_path):
  with M.MetricsWriter(tmp_path, enabled=True) as writer:
    for step in range(1, 6):
      writer.write(step, {"loss": float(step)})
  with open(tmp_path / M.METRICS_FILE, "a") as f:
    f.write('{"step": 6, "lo')  # the interrupted run died mid-line

  with M.MetricsWriter(tmp_path, resume_step=3, enabled=True) as writer:
    writer.write(4, {"loss": 40.0})
  assert [(r["step"], r["loss"]) for r in M.read_metrics(tmp_path)] == [
    (1, 1.0),
    (2, 2.0),
    (3, 3.0),
    (4, 40.0),
  ]
  assert not (tmp_path / (M.METRICS_FILE + ".tmp")).exists()

  # Without resume_step records are kept and new ones appended.
  with M.MetricsWriter(tmp_path, enabled=True) as writer:
    writer.write(5, {"loss": 50.0})
  assert [r["step"] for r in M.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]


def test_read_metrics_rejects_a_corrupt_complete_line(tmp_path):
  (tmp_path / M.METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=":2: not a JSON object"):
    M.read_metrics(tmp_path)


def test_tensorboard_events_hold_the_scalars_and_hide_stale_steps_on_resume(tmp_path):
  with M.MetricsWriter(tmp_path, enabled=True) as writer:
    for step in range(1, 6):
      writer.write(step, {"loss": float(step), "rewards/chosen": -float(step)})
  assert _tensorboard_scalars(tmp_path) == {
    "loss": [(s, float(s)) for s in range(1, 6)],
    "rewards/chosen": [(s, -float(s)) for s in range(1, 6)],
  }
  with M.MetricsWriter(tmp_path, resume_step=3, enabled=True) as writer:
    writer.write(4, {"loss": 40.0})
  assert _tensorboard_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_disabled_writer_writes_nothing(tmp_path):
  with M.MetricsWriter(tmp_path / "run", enabled=False) as writer:
    writer.write(1, {"loss": 1.0})
  assert not (tmp_path / "run").exists()


def test_plot_metrics_writes_a_png(tmp_path):
  with M.MetricsWriter(tmp_path, enabled=True) as writer:
    for step in range(1, 5):
      extra = {"eval_loss": 3.0} if step % 2 == 0 else {}
      writer.write(step, {"loss": 1.0 / step, "learning_rate": 1e-3, "tag": True, **extra})
  path = M.plot_metrics(tmp_path)
  assert path == tmp_path / M.PLOT_FILE
  png = path.read_bytes()
  assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000

  custom = M.plot_metrics(tmp_path, keys=["eval_loss"], path=tmp_path / "eval.png")
  assert custom.read_bytes().startswith(b"\x89PNG")
  with pytest.raises(ValueError, match="no numeric metric named"):
    M.plot_metrics(tmp_path, keys=["nope"])
  shared = M.plot_metrics(tmp_path, keys=[("loss", "eval_loss"), ("nope",)],
                          path=tmp_path / "shared.png", skip_missing=True)
  assert shared.read_bytes().startswith(b"\x89PNG")


def _device(kind, platform="gpu"):
  return types.SimpleNamespace(device_kind=kind, platform=platform)


@pytest.mark.parametrize(
  "kind, dtype, expected",
  [
    ("TPU v4", "bfloat16", 275e12),
    ("TPU v5 lite", "bfloat16", 197e12),
    ("TPU v5", jnp.bfloat16, 459e12),
    ("TPU v6 lite", "bf16", 918e12),
    ("TPU v3", "bfloat16", 61.5e12),
    ("TPU v4", "float32", None),
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989.5e12),
    ("NVIDIA H100 PCIe", "bfloat16", 756.5e12),
    ("NVIDIA H100 NVL", "bfloat16", 835.5e12),
    ("NVIDIA H200", "bfloat16", 989.5e12),
    ("NVIDIA GH200 480GB", "bfloat16", 989.5e12),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12),
    ("NVIDIA A100 80GB PCIe", np.float32, 19.5e12),
    ("NVIDIA A100-SXM4-40GB", "tf32", 156e12),
    ("NVIDIA L4", "bfloat16", 121e12),
    ("NVIDIA L40S", "bfloat16", None),  # not the L4
    ("NVIDIA GeForce RTX 4090", "bfloat16", None),
  ],
)
def test_device_peak_flops(kind, dtype, expected):
  assert M.device_peak_flops(_device(kind, "tpu" if "TPU" in kind else "gpu"), dtype) == expected


def test_device_peak_flops_is_none_on_cpu_and_rejects_unknown_dtypes():
  assert M.device_peak_flops() is None  # the test devices are CPUs
  assert M.device_peak_flops(jax.devices()[0], "float32") is None
  with pytest.raises(ValueError, match="dtype"):
    M.device_peak_flops(_device("NVIDIA H100 80GB HBM3"), "int8")


def test_peak_flops_table_order_lets_every_entry_match():
  names = list(M.PEAK_FLOPS)
  for i, name in enumerate(names):
    shadowing = [earlier for earlier in names[:i] if M._matches(earlier, name)]
    assert not shadowing, f"{shadowing} listed before {name!r} would match it first"


def test_mfu_by_hand():
  # 6e9 FLOPs/token × 100k tokens/s = 6e14 FLOP/s over 4 × 1e15 peak = 15 %.
  assert M.mfu(6e9, 1e5, 4, 1e15) == pytest.approx(0.15)
  assert M.mfu(None, 1e5, 4, 1e15) is None
  assert M.mfu(6e9, 1e5, 4, None) is None


class _FakeClock:
  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_measures_tokens_per_second_between_logging_updates(capsys):
  clock = _FakeClock()
  progress = M.Progress(
    10, flops_per_token=1e6, num_devices=2, peak_flops_per_device=1e9, enabled=True, clock=clock
  )
  clock.now += 30.0  # compilation: not measured
  assert progress.update(1, tokens=999, metrics={"loss": jnp.float32(2.0)}) == {}
  clock.now += 2.0
  rates = progress.update(2, tokens=1000, metrics={"loss": 1.5, "learning_rate": 3e-4})
  assert rates == pytest.approx({"tokens_per_second": 500.0, "mfu": 500 * 1e6 / (2 * 1e9)})
  # Steps without metrics only add their tokens to the window of the next logging update.
  for step in (3, 4):
    clock.now += 1.0
    assert progress.update(step, tokens=500, metrics=None) == {}
  clock.now += 2.0
  rates = progress.update(5, tokens=1000, metrics={"loss": 1.25, "learning_rate": 3e-4})
  assert rates["tokens_per_second"] == 2000 / 4.0
  progress.close()
  # tqdm may skip redrawing intermediate updates; the final state is always drawn.
  final = capsys.readouterr().err.rstrip().split("\r")[-1]
  assert "5/10" in final
  assert "loss=1.2500, lr=3.00e-04, tok/s=500, mfu=25.0%" in final


def test_progress_without_peak_omits_mfu_and_disabled_is_silent(capsys):
  clock = _FakeClock()
  with M.Progress(4, initial_step=2, enabled=False, clock=clock) as progress:
    progress.update(3, tokens=10, metrics={"loss": 1.0})
    clock.now += 1.0
    assert progress.update(4, tokens=10, metrics={"loss": 1.0}) == {"tokens_per_second": 10.0}
  assert capsys.readouterr() == ("", "")


def test_jsonl_lines_are_plain_json(tmp_path):
  with M.MetricsWriter(tmp_path, enabled=True) as writer:
    writer.write(np.int64(7), {"loss": 1.25})
  assert (tmp_path / M.METRICS_FILE).read_text() == json.dumps({"step": 7, "loss": 1.25}) + "\n"
