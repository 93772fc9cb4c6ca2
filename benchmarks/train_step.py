"""Train-step throughput of llama_jax vs `transformers` + `torch.optim.AdamW`, same run.

    python -m benchmarks.train_step [--preset small_50m] [--batch 8] [--seq 256] [--iters 5]
        [--dtype float32|bfloat16] [--remat none|dots|full] [--scan] [--loss-chunk 0]
        [--mesh single|fsdp] [--no-baseline]

One step is forward + backward + clipping at global norm 1.0 + AdamW (β 0.9 / 0.95, eps 1e-5,
weight decay 0.1 except on the RMSNorm scales, constant learning rate). llama_jax runs
`steps.lm.make_train_step` jitted with the state donated; the baseline runs
`transformers.LlamaForCausalLM` with `torch.optim.AdamW` and `clip_grad_norm_` on the same
initial weights (llama_jax loads the HF checkpoint `transformers` wrote) and the same batch.

Before timing, one step of each from the same weights checks that the losses agree and
reports max |Δparam| after the update (it doubles as the warm-up / compile step). Then each
runs `--iters` timed steps, alternating one step of each so that other load on a shared
machine hits both sides alike. Printed: tokens/s,
achieved model FLOP/s (`LlamaConfig.flops_per_token` × tokens/s), MFU where the device has a
published peak (GPU / TPU), the FLOP/s XLA reaches on one matmul of the model's MLP shape
[B·T, D] @ [D, F] (the practical ceiling on a CPU), and the ratios between them.

`--no-baseline` skips PyTorch entirely (nothing imports torch or transformers), for GPU / TPU
hosts; parameters then come from `llama_jax.parallel.sharding.init_params`. E.g. on an H100:

    python -m benchmarks.train_step --preset llama3p2_1b --batch 8 --seq 2048 \\
        --dtype bfloat16 --remat dots_no_batch --attention cudnn --loss-chunk 512 --no-baseline

`--dtype bfloat16` means bfloat16 compute with float32 master parameters and optimizer state
(and, for the baseline, `torch.autocast` to bfloat16, so the losses then agree only to ~1e-3).
`--loss-chunk C` computes the LM head and cross entropy C positions at a time, so a 128k
vocabulary never holds all [B, T, V] float32 logits at once.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np

from llama_jax.model.config import AttentionImpl, RematPolicy


def _make_batch(vocab_size: int, batch: int, seq: int) -> dict[str, np.ndarray]:
  """One document per row, no padding: targets are the next tokens, all of them scored."""
  ids = np.random.RandomState(0).randint(0, vocab_size, (batch, seq + 1)).astype(np.int32)
  ones = np.ones((batch, seq), np.int32)
  return {
    "tokens": ids[:, :-1],
    "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
    "segment_ids": ones,
    "targets": ids[:, 1:],
    "target_mask": ones,
  }


def _si(x: float, unit: str) -> str:
  """1.23e12 -> '1.23 TFLOP/s'-style, with G below a tera."""
  scale, prefix = (1e12, "T") if x >= 1e12 else (1e9, "G")
  return f"{x / scale:,.2f} {prefix}{unit}"


def _matmul_flops(m: int, k: int, n: int, dtype: str, iters: int = 10, repeats: int = 3) -> float:
  """FLOP/s of [m, k] @ [k, n] matmuls in `dtype` on the default device, best of `repeats`.

  One jitted loop of `iters` dependent pairs x <- (x @ b) @ c, so buffers are reused (a fresh
  output per call costs page faults on a CPU) and nothing is hoisted out of the loop; b and
  c are scaled by 1/sqrt(fan-in) so the values stay O(1). The best repeat is the machine's
  capability, least disturbed by other processes.
  """
  rng = np.random.RandomState(1)
  x, b, c = (
    jax.device_put(a.astype(np.float32)).astype(dtype)
    for a in (
      rng.standard_normal((m, k)),
      rng.standard_normal((k, n)) / np.sqrt(k),
      rng.standard_normal((n, k)) / np.sqrt(n),
    )
  )
  loop = jax.jit(lambda x, b, c: jax.lax.fori_loop(0, iters, lambda _, x: (x @ b) @ c, x))
  jax.block_until_ready(loop(x, b, c))  # compile
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(loop(x, b, c))
    best = min(best, time.perf_counter() - start)
  return 4.0 * m * k * n * iters / best


class _TorchBaseline:
  """`transformers.LlamaForCausalLM` + `torch.optim.AdamW` with the optimizer settings of
  `opt`; the loss is the masked token mean of float32 cross entropy on `targets`, computed
  here from the logits rather than by `transformers` (which shifts `labels` itself)."""

  def __init__(self, model, opt, batch: dict[str, np.ndarray], bfloat16: bool):
    import torch

    self.torch = torch
    self.model = model.train()
    # Same decay mask as `train_state.weight_decay_mask`: none on the norm scales.
    decay = [p for name, p in model.named_parameters() if "norm" not in name]
    no_decay = [p for name, p in model.named_parameters() if "norm" in name]
    self.optimizer = torch.optim.AdamW(
      [
        {"params": decay, "weight_decay": opt.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
      ],
      lr=opt.learning_rate,
      betas=(opt.b1, opt.b2),
      eps=opt.eps,
    )
    self.grad_clip = opt.grad_clip
    self.batch = {k: torch.as_tensor(v).long() for k, v in batch.items()}
    self.bfloat16 = bfloat16

  def step(self) -> tuple[float, float]:
    """One update; returns (loss, gradient norm before clipping)."""
    torch, b = self.torch, self.batch
    self.optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bfloat16):
      logits = self.model(input_ids=b["tokens"], position_ids=b["positions"]).logits
    nll = torch.nn.functional.cross_entropy(
      logits.float().flatten(0, 1), b["targets"].flatten(), reduction="none"
    )
    mask = b["target_mask"].flatten().float()
    loss = (nll * mask).sum() / mask.sum().clamp(min=1.0)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.optimizer.step()
    return loss.item(), grad_norm.item()


def _hf_model(config):
  """A randomly initialized float32 `LlamaForCausalLM` of `config`'s architecture."""
  import torch
  import transformers

  from llama_jax.checkpoint import config_to_hf

  hf = config_to_hf(config)
  hf_config = transformers.LlamaConfig(
    **{k: v for k, v in hf.items() if k not in ("architectures", "torch_dtype")}
  )
  torch.manual_seed(0)
  return transformers.LlamaForCausalLM(hf_config).float()


def main(argv=None):
  from llama_jax import LlamaConfig
  from llama_jax.parallel import sharding
  from llama_jax.steps.common import batch_sharding, jit_train_step
  from llama_jax.steps.lm import make_train_step
  from llama_jax.training.metrics import device_peak_flops, mfu
  from llama_jax.training.train_state import (
    OptimizerConfig,
    init_train_state,
    make_optimizer,
    state_shardings,
  )

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--preset", default="small_50m")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--iters", type=int, default=5)
  parser.add_argument(
    "--dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="compute dtype; parameters and optimizer state stay float32",
  )
  parser.add_argument("--remat", choices=RematPolicy.__args__, default="none")
  parser.add_argument("--scan", action="store_true", help="scan over layers (scan_layers)")
  parser.add_argument(
    "--attention",
    choices=AttentionImpl.__args__,
    default="xla",
    help="attention implementation; `cudnn` is flash attention on NVIDIA GPUs",
  )
  parser.add_argument(
    "--loss-chunk",
    type=int,
    default=0,
    help="sequence chunk of the LM-head + cross entropy; 0: all at once",
  )
  parser.add_argument("--lr", type=float, default=3e-4, help="constant learning rate")
  parser.add_argument(
    "--mesh",
    choices=("single", "fsdp"),
    default="single",
    help="one device, or an fsdp mesh over all local devices",
  )
  parser.add_argument(
    "--no-baseline", action="store_true", help="skip transformers / PyTorch (not imported at all)"
  )
  args = parser.parse_args(argv)
  if args.iters < 1:
    parser.error(f"--iters={args.iters}; need at least 1 timed step")

  devices = jax.local_devices() if args.mesh == "fsdp" else jax.devices()[:1]
  mesh = sharding.make_mesh(devices=devices)
  sharding.check_batch_fits_mesh(args.batch, mesh, "--batch")
  numerics = dict(
    dtype=args.dtype,
    param_dtype="float32",
    remat_policy=args.remat,
    scan_layers=args.scan,
    attention_impl=args.attention,
  )
  opt = OptimizerConfig(learning_rate=args.lr, schedule="constant", warmup_steps=0)
  tx = make_optimizer(opt)
  rng = jax.random.PRNGKey(0)

  baseline = None
  if args.no_baseline:
    config = LlamaConfig.preset(args.preset, **numerics)
    state = init_train_state(config, tx, mesh, rng)
  else:
    from llama_jax.checkpoint import load_hf_checkpoint

    hf_model = _hf_model(LlamaConfig.preset(args.preset))
    with tempfile.TemporaryDirectory() as path:
      hf_model.save_pretrained(path)
      config, params = load_hf_checkpoint(
        path,
        dtype="float32",
        compute_dtype=args.dtype,
        mesh=mesh,
        remat_policy=args.remat,
        scan_layers=args.scan,
        attention_impl=args.attention,
      )
    state = init_train_state(config, tx, mesh, rng, params=params)
    del params  # the state holds them now, and the step donates it

  host_batch = _make_batch(config.vocab_size, args.batch, args.seq)
  batch = jax.device_put(host_batch, batch_sharding(mesh))
  step = jit_train_step(
    make_train_step(config, tx, mesh=mesh, loss_chunk_size=args.loss_chunk),
    state_shardings(config, tx, mesh),
    mesh,
  )

  # The first step compiles; in baseline mode it is also the parity check.
  state, metrics = step(state, batch)
  metrics = jax.device_get(metrics)
  if not args.no_baseline:
    import torch

    from llama_jax.checkpoint.params import iter_hf_tensors

    baseline = _TorchBaseline(hf_model, opt, host_batch, bfloat16=args.dtype == "bfloat16")
    hf_loss, hf_grad_norm = baseline.step()
    torch_params = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    d_param = max(
      float(np.abs(value - torch_params[name]).max())
      for name, value in iter_hf_tensors(config, state.params)
    )

  def run_ours(iters: int) -> float:
    """Seconds per step over `iters` steps, dispatched back to back and waited for once."""
    nonlocal state
    start = time.perf_counter()
    for _ in range(iters):
      state, out = step(state, batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters

  n_tok = args.batch * args.seq
  mm_shape = (n_tok, config.d_model, config.mlp_dim)
  mm_flops = _matmul_flops(*mm_shape, args.dtype)

  per_step = {}  # name -> seconds of each timed step, when timed one by one
  if baseline is None:
    t_jax = run_ours(args.iters)
  else:
    # Alternate single steps, so load from other processes on a shared machine hits both
    # sides alike and the ratio stays meaningful.
    per_step = {"llama_jax": [], "transformers": []}
    for _ in range(args.iters):
      per_step["llama_jax"].append(run_ours(1))
      start = time.perf_counter()
      baseline.step()
      per_step["transformers"].append(time.perf_counter() - start)
    t_jax, t_hf = (float(np.mean(per_step[k])) for k in ("llama_jax", "transformers"))

  # Measured on both sides of the timed steps and the better kept: the machine's capability
  # even if another process was busy during one of them.
  mm_flops = max(mm_flops, _matmul_flops(*mm_shape, args.dtype))
  flops_per_token = config.flops_per_token(args.seq)
  device = jax.devices()[0]
  peak = device_peak_flops(device, args.dtype)

  threads = f", torch threads {torch.get_num_threads()}" if baseline is not None else ""
  print(
    f"model {args.preset}: {config.num_params() / 1e6:.1f}M params, batch {args.batch} × "
    f"{args.seq} tokens, {args.dtype} compute / float32 params, remat {args.remat}, "
    f"attention {args.attention}, "
    f"scan {args.scan}, loss chunk {args.loss_chunk or 'none'}"
  )
  print(
    f"devices: {mesh.size} × {device.device_kind} ({device.platform}), mesh "
    f"{dict(mesh.shape)}{threads}"
  )
  print(f"training FLOPs/token (6·params + attention): {flops_per_token:.3e}")
  if baseline is not None:
    print("one step from the same weights on the same batch:")
    print(f"  loss llama_jax {float(metrics['loss']):.7f}, transformers {hf_loss:.7f}")
    print(
      f"  grad norm llama_jax {float(metrics['grad_norm']):.6f}, transformers {hf_grad_norm:.6f}"
    )
    print(f"loss difference llama_jax vs transformers: {abs(float(metrics['loss']) - hf_loss):.2e}")
    print(f"max |Δparam| after one step: {d_param:.2e} (learning rate {args.lr:g})")

  rows = [("llama_jax", t_jax)] + ([("transformers", t_hf)] if baseline is not None else [])
  print(f"{'':14}{'s/step':>10}{'tokens/s':>12}{'model FLOP/s':>18}{'MFU':>8}")
  achieved = {}
  for name, seconds in rows:
    tps = n_tok / seconds
    achieved[name] = flops_per_token * tps
    utilization = mfu(flops_per_token, tps, mesh.size, peak) if name == "llama_jax" else None
    mfu_text = f"{utilization:.1%}" if utilization is not None else "n/a"
    print(f"{name:14}{seconds:>10.3f}{tps:>12,.0f}{_si(achieved[name], 'FLOP/s'):>18}{mfu_text:>8}")
  for name, seconds in per_step.items():
    best = min(seconds)
    print(
      f"{name} seconds per step: {' '.join(f'{x:.3f}' for x in seconds)} (best {best:.3f} s = "
      f"{n_tok / best:,.0f} tokens/s, {_si(flops_per_token * n_tok / best, 'FLOP/s')})"
    )
  if peak is None:
    print(f"MFU: no published {args.dtype} peak for {device.device_kind!r}")
  else:
    print(f"MFU against {_si(peak, 'FLOP/s')} per device ({args.dtype} dense peak)")
  m, k, n = mm_shape
  print(f"XLA matmul [{m}×{k}]@[{k}×{n}] {args.dtype}: {_si(mm_flops, 'FLOP/s')} (one device)")
  stats = device.memory_stats()
  if stats and "peak_bytes_in_use" in stats:
    print(f"peak device memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")
  per_device = achieved["llama_jax"] / mesh.size
  print(f"llama_jax achieved / XLA matmul FLOP/s: {per_device / mm_flops:.2f}")
  if baseline is not None:
    print(f"transformers achieved / XLA matmul FLOP/s: {achieved['transformers'] / mm_flops:.2f}")
    best_ratio = min(per_step["transformers"]) / min(per_step["llama_jax"])
    print(
      f"ratio (llama_jax / transformers tokens/s): {t_hf / t_jax:.2f} (mean), "
      f"{best_ratio:.2f} (best steps)"
    )


if __name__ == "__main__":
  main()
