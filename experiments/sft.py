"""Supervised fine-tuning.

    python -m experiments.sft --config=experiments/configs/sft.py:tiny --workdir=DIR \
      [--config.init_from=PRETRAIN_WORKDIR_OR_HF_DIR]

The same LM training run as `experiments.pretrain` (see `experiments.lm`), on chat data with
the loss on the assistant tokens; writes and resumes the workdir the same way.
"""

from absl import app

from experiments.pretrain import main

if __name__ == "__main__":
  app.run(main)
