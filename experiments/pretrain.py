"""Pretraining.

    python -m experiments.pretrain --config=experiments/configs/pretrain.py:tiny --workdir=DIR

The LM training stage (`experiments.lm`) on a pretraining corpus. Writes DIR/metrics.jsonl,
DIR/metrics.png, TensorBoard events and Orbax checkpoints under DIR/checkpoints/; rerunning
with the same workdir resumes.
"""

from experiments import lm, runs

if __name__ == "__main__":
  runs.launch(lm.run)
