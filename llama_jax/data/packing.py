"""Array-level pieces of the input pipeline: checking, truncating, padding and finishing rows.

Everything here is a pure numpy function of one example or one batch, so it can run in grain
worker threads/processes and be unit-tested without a pipeline. `llama_jax.data.pipeline`
wires these into grain datasets.

Vocabulary: B batch (rows), T sequence length (`seq_len`).

An *example* is what the user's tokenize function returns for one record: a dict of numpy
arrays with `"tokens"` (1-D, integer) plus any number of

  * per-token fields: 1-D arrays as long as `tokens` (`loss_mask`, `format_mask`, ...),
  * per-example scalars: 0-d values (`rating`, `is_unsafe`, ...).

A *schema* (`dict[str, FieldSpec]`) fixes, for the whole pipeline, which fields exist, whether
each is per-token and its dtype; every example is checked against it, so one malformed record
is reported by name instead of breaking batching several stages later.

Next-token convention (the one place it is defined; the losses rely on it):

  * `tokens[b, t]` are the model inputs; field `f` from the tokenize function stays
    *token-aligned*: `f[b, t]` describes `tokens[b, t]`.
  * `targets[b, t] = tokens[b, t + 1]` when positions t and t + 1 belong to the same document
    (same non-zero segment id), else 0. So `logits[b, t]` predicts `targets[b, t]`.
  * `target_mask[b, t]` is 1 exactly where `targets[b, t]` is a real next token of the same
    document **and**, if the example has a `loss_mask` field, `loss_mask[b, t + 1] == 1`
    (token-aligned `loss_mask[i] = 1` means "token i is trained on"). The last token of every
    document has `target_mask == 0`: no prediction crosses a document boundary or reaches
    padding. An LM loss is `sum(ce(logits, targets) * target_mask) / sum(target_mask)`.
  * Other stages that need a token-aligned field in prediction alignment use `shift_left`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

# Fields the pipeline itself writes; a tokenize function may not return them.
RESERVED_FIELDS = ("segment_ids", "positions", "targets", "target_mask", "valid")

# JAX computes in 32 bits unless x64 is enabled; converting here keeps the dtype of a batch
# independent of whether a tokenize function used Python ints or np.int32.
_CANONICAL_DTYPES = {
  np.dtype(np.int64): np.dtype(np.int32),
  np.dtype(np.uint64): np.dtype(np.uint32),
  np.dtype(np.float64): np.dtype(np.float32),
}

Example = dict[str, np.ndarray]
Batch = dict[str, np.ndarray]


class MalformedExample(ValueError):
  """The tokenize function's output does not match the pipeline's schema."""


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  """How one field of an example is laid out.

  Attributes:
    per_token: True for 1-D fields aligned with `tokens`; False for per-example scalars.
    dtype: the dtype every example's value is cast to.
  """

  per_token: bool
  dtype: np.dtype


Schema = dict[str, FieldSpec]


def _canonical(dtype: np.dtype) -> np.dtype:
  return _CANONICAL_DTYPES.get(np.dtype(dtype), np.dtype(dtype))


def infer_schema(example: Any) -> Schema:
  """Derives the schema from one tokenize output (scalars vs per-token arrays, dtypes)."""
  if not isinstance(example, Mapping):
    raise MalformedExample(
      f"tokenize_fn must return a dict of arrays, got {type(example).__name__}"
    )
  if "tokens" not in example:
    raise MalformedExample(f"tokenize_fn output has no 'tokens' field (keys: {sorted(example)})")
  reserved = sorted(set(example) & set(RESERVED_FIELDS))
  if reserved:
    raise MalformedExample(f"tokenize_fn output uses reserved field names {reserved}")
  tokens = np.asarray(example["tokens"])
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise MalformedExample(
      f"'tokens' must be a 1-D integer array, got shape {tokens.shape} dtype {tokens.dtype}"
    )
  schema = {}
  for name, value in example.items():
    value = np.asarray(value)
    if value.ndim == 0:
      schema[name] = FieldSpec(per_token=False, dtype=_canonical(value.dtype))
    elif value.ndim == 1 and len(value) == len(tokens):
      schema[name] = FieldSpec(per_token=True, dtype=_canonical(value.dtype))
    else:
      raise MalformedExample(
        f"field {name!r} has shape {value.shape}; expected a scalar or a 1-D array as long "
        f"as 'tokens' ({len(tokens)})"
      )
  schema["tokens"] = FieldSpec(per_token=True, dtype=np.dtype(np.int32))
  return schema


def conform(example: Any, schema: Schema) -> Example:
  """Checks one tokenize output against `schema` and casts it; raises `MalformedExample`."""
  if not isinstance(example, Mapping):
    raise MalformedExample(
      f"tokenize_fn must return a dict of arrays, got {type(example).__name__}"
    )
  missing, extra = sorted(set(schema) - set(example)), sorted(set(example) - set(schema))
  if missing or extra:
    raise MalformedExample(
      f"fields differ from the pipeline schema: missing {missing}, unexpected {extra}"
    )
  length = np.shape(example["tokens"])[0] if np.ndim(example["tokens"]) == 1 else None
  if not length:
    raise MalformedExample(
      f"'tokens' must be a non-empty 1-D array, got shape {np.shape(example['tokens'])}"
    )
  out = {}
  for name, spec in schema.items():
    value = np.asarray(example[name])
    want = (length,) if spec.per_token else ()
    if value.shape != want:
      raise MalformedExample(f"field {name!r} has shape {value.shape}, expected {want}")
    if not np.can_cast(value.dtype, spec.dtype, casting="same_kind"):
      raise MalformedExample(f"field {name!r} has dtype {value.dtype}, expected {spec.dtype}")
    out[name] = value.astype(spec.dtype, copy=False)
  return out


def example_length(example: Example) -> int:
  """Number of tokens in an example."""
  return len(example["tokens"])


def truncate(example: Example, schema: Schema, seq_len: int) -> Example:
  """Cuts every per-token field to its first `seq_len` entries."""
  return {k: v[:seq_len] if schema[k].per_token else v for k, v in example.items()}


def broadcast_scalars(example: Example, schema: Schema) -> Example:
  """Turns per-example scalars into per-token arrays, for packing several documents a row.

  In a packed row each document keeps its own value on its own tokens, so a scalar field
  comes out as a [B, T] array read through `segment_ids` (0 on padding).
  """
  n = example_length(example)
  return {
    k: v if schema[k].per_token else np.full((n,), v, dtype=schema[k].dtype)
    for k, v in example.items()
  }


def pad_example(example: Example, schema: Schema, seq_len: int) -> Example:
  """One example in a row of length T: zeros after the document, segment id 1 on it."""
  n = example_length(example)
  row = {}
  for name, value in example.items():
    if schema[name].per_token:
      padded = np.zeros((seq_len,), dtype=schema[name].dtype)
      padded[:n] = value
      row[name] = padded
    else:
      row[name] = value
  row["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
  row["positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32)
  return row


def next_token_targets(
  tokens: np.ndarray, segment_ids: np.ndarray, loss_mask: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """`targets[B, T]` and `target_mask[B, T]` under the convention in the module docstring."""
  same_doc = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
  if loss_mask is not None:
    same_doc &= loss_mask[:, 1:] != 0
  targets = np.zeros_like(tokens, dtype=np.int32)
  targets[:, :-1] = np.where(same_doc, tokens[:, 1:], 0)
  target_mask = np.zeros(tokens.shape, dtype=np.int32)
  target_mask[:, :-1] = same_doc
  return targets, target_mask


def shift_left(x: np.ndarray, segment_ids: np.ndarray) -> np.ndarray:
  """A token-aligned [B, T] field in prediction alignment: `out[:, t] = x[:, t + 1]`.

  Zero where t + 1 is in another document or padding, as for `targets`.
  """
  same_doc = (segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, :-1] != 0)
  out = np.zeros_like(x)
  out[:, :-1] = np.where(same_doc, x[:, 1:], 0)
  return out


def blank_rows(schema: Schema, rows: int, seq_len: int, packed: bool) -> Batch:
  """All-zero rows (segment ids 0, `valid` 0) in the layout `finish_batch` returns."""
  batch = {
    name: np.zeros((rows, seq_len) if spec.per_token or packed else (rows,), spec.dtype)
    for name, spec in schema.items()
  }
  for name in ("segment_ids", "positions", "targets", "target_mask"):
    batch[name] = np.zeros((rows, seq_len), np.int32)
  batch["valid"] = np.zeros((rows,), np.int32)
  return batch


def finish_batch(
  rows: Batch,
  *,
  schema: Schema,
  batch_size: int,
  seq_len: int,
  packed: bool,
  loss_mask_field: str | None,
) -> Batch:
  """Final layout of a local batch: rename packer fields, add targets, pad to `batch_size` rows.

  `rows` comes from grain's `batch` over pad-mode rows or packed rows (whose per-field
  `<name>_segment_ids` / `<name>_positions` are identical because all per-token fields have the
  tokens' length; the tokens' copy is kept). Missing rows (a final partial batch) are all-zero
  with `valid == 0`.
  """
  if packed:
    batch = {name: rows[name] for name in schema}
    batch["segment_ids"] = rows["tokens_segment_ids"].astype(np.int32)
    batch["positions"] = rows["tokens_positions"].astype(np.int32)
  else:
    batch = dict(rows)
  mask = batch.get(loss_mask_field) if loss_mask_field else None
  batch["targets"], batch["target_mask"] = next_token_targets(
    batch["tokens"], batch["segment_ids"], mask
  )
  n = len(batch["tokens"])
  batch["valid"] = np.ones((n,), np.int32)
  if n < batch_size:
    blank = blank_rows(schema, batch_size - n, seq_len, packed)
    batch = {k: np.concatenate([v, blank[k]]) for k, v in batch.items()}
  return batch
