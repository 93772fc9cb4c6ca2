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


def test_generate_benchmark_runs(capsys):
  import torch

  from benchmarks import generate

  args = ["--preset", "tiny", "--batches", "2", "--prompt-len", "8", "--new-tokens", "4"]
  threads = torch.get_num_threads()
  try:  # one torch thread: see the README on torch and XLA threads sharing two cores
    generate.main([*args, "--iters", "1", "--torch-threads", "1"])
  finally:
    torch.set_num_threads(threads)
  out = capsys.readouterr().out
  assert "ratio (llama_jax / transformers decode tokens/s)" in out
  assert "greedy tokens identical" in out
  generate.main([*args, "--iters", "1", "--no-baseline"])
  out = capsys.readouterr().out
  assert "transformers" not in out and "roofline: no known HBM bandwidth for cpu" in out
  assert generate.hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
  assert generate.hbm_bandwidth("NVIDIA H200") == 4.8e12
  assert generate.hbm_bandwidth("cpu") is None


def test_engine_benchmark_runs(capsys):
  import torch

  from benchmarks import engine

  threads = torch.get_num_threads()
  try:
    engine.main(["--preset", "tiny", "--prompts", "8", "--batch", "4", "--prompt-len", "8",
                 "--median", "4", "--longest", "16", "--iters", "1"])  # fmt: skip
  finally:
    torch.set_num_threads(threads)
  out = capsys.readouterr().out
  rows = [line.split(" | ") for line in out.splitlines()
          if line.startswith("| ") and "tok/s" not in line]  # fmt: skip
  assert [r[0].split(" (")[0] for r in rows] == ["| long-tailed", "| uniform"]
  assert rows[1][1] == "32"  # 8 prompts × 4 tokens: every useful token counted
  assert all(float(r[-1].rstrip(" |×")) > 0 and float(r[-2].rstrip("×")) > 0 for r in rows)
  assert "greedy tokens identical: engine, static decoder, transformers" in out
