"""A run's model as a Hugging Face directory that `transformers` loads.

    python -m experiments.export --workdir=runs/sft_lora --hf_out=runs/sft_lora_hf

`--workdir` is an experiment workdir holding an LM (pretrain, SFT, DPO, the policy of PPO or
GRPO, an average); its newest checkpoint is exported, LoRA adapters merged into the weights
(`llama_jax.lora.merge`), in the checkpoint's parameter dtype unless `--dtype` says otherwise.
"""

from __future__ import annotations

import logging

from absl import app, flags

from experiments import common
from llama_jax import sharding, workdirs
from llama_jax.checkpoint import save_hf_checkpoint

log = logging.getLogger(__name__)


def run(workdir: str, hf_out: str) -> None:
  """Writes the LM of `workdir` to `hf_out` (config.json + safetensors)."""
  sharding.initialize_distributed()
  config, params = workdirs.load_model(workdir, sharding.make_mesh(), kind="lm")
  save_hf_checkpoint(hf_out, config, params)
  log.info("Exported %s to %s%s", workdir, hf_out,
           " (LoRA adapters merged)" if workdirs.read_lora_config(workdir) else "")  # fmt: skip


def main(argv):
  del argv
  common.setup_logging()
  run(flags.FLAGS.workdir, flags.FLAGS.hf_out)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "The experiment workdir whose newest model to export.")
  flags.DEFINE_string("hf_out", None, "The Hugging Face directory to write.")
  flags.mark_flags_as_required(["workdir", "hf_out"])
  app.run(main)
