"""One process of the 2-process localhost test (tests/test_multihost.py); not a test itself.

argv: process_id port hf_checkpoint_dir out_dir
"""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU cross-process collectives

import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from llama_jax import sharding  # noqa: E402
from llama_jax.checkpoint import load_hf_checkpoint, save_hf_checkpoint  # noqa: E402


def main():
  process_id, port, checkpoint, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
  sharding.initialize_distributed(f"localhost:{port}", num_processes=2, process_id=process_id)
  assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 8, 4)
  mesh = sharding.make_mesh(fsdp=4, tensor=2)
  config, params = load_hf_checkpoint(checkpoint, mesh=mesh)
  assert not params["layers_0"]["attn"]["q"].is_fully_addressable  # spans both processes
  local = sum(s.data.nbytes for x in jax.tree_util.tree_leaves(params)
              for s in x.addressable_shards)
  tokens = np.random.RandomState(0).randint(0, config.vocab_size, (8, 16))
  logits = sharding.make_forward(config, mesh)(params, tokens)
  full = np.asarray(multihost_utils.process_allgather(logits, tiled=True))
  save_hf_checkpoint(os.path.join(out, "saved"), config, params)  # every process calls it
  if process_id == 0:
    np.save(os.path.join(out, "logits.npy"), full)
  print(f"process {process_id}: local parameter bytes {local}")


if __name__ == "__main__":
  main()
