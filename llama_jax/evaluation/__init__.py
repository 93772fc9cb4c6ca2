"""Evaluation: policies judged by programs (no reward model), and paired ablations over seeds."""
