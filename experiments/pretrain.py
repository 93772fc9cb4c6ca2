"""Pretraining.

    python -m experiments.pretrain --config=experiments/configs/pretrain.py:tiny --workdir=DIR

Writes DIR/metrics.jsonl, DIR/metrics.png, TensorBoard events and Orbax checkpoints under
DIR/checkpoints/; rerunning with the same workdir resumes.
"""

from absl import app, flags

from experiments import lm, runs

runs.define_flags()


def main(argv):
  del argv
  runs.setup_logging()
  with runs.one_line_errors():
    lm.run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
