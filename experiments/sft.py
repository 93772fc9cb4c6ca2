"""Supervised fine-tuning.

    python -m experiments.sft --config=experiments/configs/sft.py:tiny --workdir=DIR \
      [--config.init_from=PRETRAIN_WORKDIR_OR_HF_DIR]

The LM training stage (`experiments.lm`), as pretraining runs it, on chat data with the loss
on the assistant tokens; writes and resumes the workdir the same way.
"""

from experiments import lm, runs

if __name__ == "__main__":
  runs.launch(lm.run)
