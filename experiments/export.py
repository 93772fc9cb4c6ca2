"""A run's model as a Hugging Face directory that `transformers` loads.

    python -m experiments.export --workdir=runs/sft_lora --hf_out=runs/sft_lora_hf

`--workdir` is an experiment workdir holding an LM (pretrain, SFT, DPO, the policy of PPO or
GRPO, an average); its newest checkpoint is exported, LoRA adapters merged into the weights
(`llama_jax.model.lora.merge`), in the checkpoint's parameter dtype unless `--dtype` says otherwise.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from absl import app, flags

import llama_jax
from experiments import models, runs
from llama_jax.checkpoint import save_hf_checkpoint, workdirs
from llama_jax.parallel import sharding
from llama_jax.tokenizer.loading import TINY_TOKENIZERS

log = logging.getLogger(__name__)


def run(workdir: str, hf_out: str) -> None:
  """Writes the LM of `workdir` to `hf_out` (config.json + safetensors)."""
  sharding.initialize_distributed()
  config, params = workdirs.load_model(workdir, sharding.make_mesh(), kind="lm")
  save_hf_checkpoint(hf_out, config, params)
  copy_tokenizer(workdirs.tokenizer_source(workdir), Path(hf_out))
  generation = Path(hf_out) / "generation_config.json"
  if not generation.exists():  # the copied one (the checkpoint's own) wins
    ids = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    generation.write_text(json.dumps({k: v for k, v in ids.items() if v is not None}, indent=2))
  log.info("Exported %s to %s%s", workdir, hf_out,
           " (LoRA adapters merged)" if workdirs.read_lora_config(workdir) else "")  # fmt: skip


def copy_tokenizer(source: str, out: Path) -> None:
  """The tokenizer files of `source` (a kept tokenizer directory or file, a bundled "tiny:"
  tokenizer, a GGUF file's tokenizer) into the export directory."""
  if source.startswith("tiny:"):  # the bundled file (a SentencePiece or tiktoken model)
    assets = Path(llama_jax.__file__).parent / "assets" / "tokenizers"
    source = str(assets / TINY_TOKENIZERS[source.removeprefix("tiny:")])
  path = Path(source)
  if workdirs.is_gguf(path):
    models.build_tokenizer(source).save(out)
  elif path.is_file():
    shutil.copy(path, out / ("tokenizer.json" if path.suffix == ".json" else "tokenizer.model"))
  else:
    for name in workdirs.TOKENIZER_FILES:
      if (path / name).is_file():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path / name, out / name)


def main(argv):
  del argv
  runs.setup_logging()
  run(flags.FLAGS.workdir, flags.FLAGS.hf_out)


if __name__ == "__main__":
  flags.DEFINE_string("workdir", None, "The experiment workdir whose newest model to export.")
  flags.DEFINE_string("hf_out", None, "The Hugging Face directory to write.")
  flags.mark_flags_as_required(["workdir", "hf_out"])
  app.run(main)
