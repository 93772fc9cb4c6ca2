"""Each benchmark script runs end to end at tiny size (no timing is asserted)."""

from benchmarks import forward


def test_forward_benchmark_runs(capsys):
  forward.main(["--preset", "tiny", "--batch", "2", "--seq", "16", "--iters", "1"])
  out = capsys.readouterr().out
  assert "ratio (llama_jax / transformers tokens/s)" in out
  err = float(out.split("max |Δlogit| llama_jax vs transformers: ")[1].split()[0])
  assert err < 1e-4


def test_train_step_benchmark_runs(capsys):
  from benchmarks import train_step

  train_step.main(["--preset", "tiny", "--batch", "2", "--seq", "16", "--iters", "1"])
  out = capsys.readouterr().out
  assert "ratio (llama_jax / transformers tokens/s)" in out
  err = float(out.split("loss difference llama_jax vs transformers: ")[1].split()[0])
  assert err < 1e-4
