"""Data: JSONL records, TFDS builders, tokenize functions and grain pipelines.

    builders.build_dataset("sft", "my_sft", {"train": ["a.jsonl"]}, data_dir)
    source = load_source("my_sft", "train", data_dir)          # normalized records
    tokenize = make_tokenize_fn("sft", tiny_tokenizer("llama3"))
    it = make_pipeline(source, tokenize, PipelineConfig(seq_len=2048, batch_size=32),
                       mesh=mesh)                               # global batches

Record kinds and their schemas: `records`; the bundled data: `bundled`; batch layout:
`pipeline` and `packing`; preference pairs: `tokenize.make_pair_pipeline`. TFDS is imported
(TensorFlow is not); `pipeline.build_dataset` (the grain dataset) is reachable as such, as
the name `build_dataset` here is the TFDS builder's.
"""

from llama_jax.data import builders, bundled, packing, pipeline, records, scoring, tokenize
from llama_jax.data.builders import RecordSource, build_dataset, dataset_builder, load_source
from llama_jax.data.pipeline import (
  PipelineConfig,
  PipelineIterator,
  make_eval_pipeline,
  make_pipeline,
)
from llama_jax.data.records import (
  CONCERNS,
  KINDS,
  RATINGS,
  KindMismatchError,
  Record,
  RecordError,
  ValidationReport,
  iter_jsonl,
  read_jsonl,
  validate_record,
)
from llama_jax.data.scoring import check_answer, evaluate, is_refusal
from llama_jax.data.tokenize import Indexed, PairIterator, make_pair_pipeline, make_tokenize_fn

__all__ = [
  "Indexed",
  "CONCERNS",
  "KINDS",
  "KindMismatchError",
  "RATINGS",
  "PairIterator",
  "PipelineConfig",
  "PipelineIterator",
  "Record",
  "RecordError",
  "RecordSource",
  "ValidationReport",
  "build_dataset",
  "builders",
  "bundled",
  "check_answer",
  "dataset_builder",
  "evaluate",
  "is_refusal",
  "iter_jsonl",
  "load_source",
  "make_eval_pipeline",
  "make_pair_pipeline",
  "make_pipeline",
  "make_tokenize_fn",
  "packing",
  "pipeline",
  "read_jsonl",
  "records",
  "scoring",
  "tokenize",
  "validate_record",
]
