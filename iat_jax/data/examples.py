"""Random batches in each batch order's layout, of any leading size.

`iat_jax.data.orders` names one per order (`Order.example`): tests build
their model inputs with them, and a batch's shapes without any data
(`orders.abstract_batch`: ahead-of-time compilation, FLOP counts) come from a
one-row example. Values are valid model inputs (ids inside their
vocabularies, masks with some rows empty, delayed labels unknown), not
realistic data.
"""

from __future__ import annotations

import numpy as np

from iat_jax.data import schema as schema_lib


def instance_features(rng: np.random.Generator,
                      schema: schema_lib.Schema,
                      lead: tuple[int, ...],
                      prefix: str = "") -> dict:
  """Random per-instance features with leading dims `lead`."""
  b = {}
  b[prefix +
    "cat"] = np.stack([rng.integers(0, f.vocab_size, lead) for f in schema.categorical],
                      -1).astype(np.int32)
  for f in schema.multi_hot:
    b[prefix + f"mh_{f.name}"] = rng.integers(0, f.vocab_size,
                                              lead + (f.max_len,)).astype(np.int32)
  b[prefix + "dense"] = rng.normal(size=lead + (len(schema.dense),)).astype(np.float32)
  s = schema.seq_len
  n_valid = rng.integers(0, s + 1, lead)
  valid = np.arange(s) < n_valid[..., None]
  b[prefix + "seq_item"] = np.where(
      valid, rng.integers(1, schema.vocab_size(schema.seq_item_field), lead + (s,)),
      0).astype(np.int32)
  b[prefix + "seq_category"] = np.where(
      valid, rng.integers(1, schema.vocab_size(schema.seq_category_field), lead + (s,)),
      0).astype(np.int32)
  b[prefix + "seq_action"] = np.where(valid,
                                      rng.integers(1, schema.num_actions, lead + (s,)),
                                      0).astype(np.int32)
  return b


def base_batch(schema: schema_lib.Schema, b: int = 4, seed: int = 0) -> dict:
  """Batch for 'base' / 'source_temporal': leading dims [B]."""
  rng = np.random.default_rng(seed)
  batch = instance_features(rng, schema, (b,))
  batch["labels"] = rng.integers(0, 2, (b, schema.num_tasks)).astype(np.float32)
  batch["mask"] = np.ones((b,), bool)
  return batch


def user_batch(schema: schema_lib.Schema,
               bu: int = 2,
               t: int = 4,
               seed: int = 0) -> dict:
  """Batch for 'source_user': leading dims [B_users, T]; last user padded; no
  timestamp ties (tie_group = position)."""
  rng = np.random.default_rng(seed)
  batch = instance_features(rng, schema, (bu, t))
  batch["labels"] = rng.integers(0, 2, (bu, t, schema.num_tasks)).astype(np.float32)
  mask = np.ones((bu, t), bool)
  mask[-1, t - 1:] = False  # a dummy instance at the end of the last chunk
  batch["mask"] = mask
  batch["token_mask"] = mask.copy()  # training chunks: no context rows
  batch["tie_group"] = np.broadcast_to(np.arange(t, dtype=np.int32), (bu, t)).copy()
  return batch


def stream_batch(schema: schema_lib.Schema,
                 d: int,
                 b: int = 4,
                 k: int = 3,
                 seed: int = 0) -> dict:
  """Batch for 'source_stream': [B] + past_insemb [B, K, d] + past_* raw; no
  timestamp ties (past_tie_group K-1..0 newest first, tie_group K)."""
  rng = np.random.default_rng(seed)
  batch = base_batch(schema, b, seed)
  batch["past_insemb"] = rng.normal(size=(b, k, d)).astype(np.float32)
  n_valid = np.arange(b) % (k + 1)  # 0..K valid past entries
  batch["past_mask"] = np.arange(k)[None] < n_valid[:, None]
  batch["tie_group"] = np.full(b, k, np.int32)
  batch["past_tie_group"] = np.broadcast_to(np.arange(k - 1, -1, -1, dtype=np.int32),
                                            (b, k)).copy()
  batch.update(instance_features(rng, schema, (b, k), prefix="past_"))
  return batch


def downstream_batch(schema: schema_lib.Schema,
                     d: int,
                     l: int = 6,
                     b: int = 4,
                     num_gap_buckets: int = 8,
                     seed: int = 0) -> dict:
  """Batch for 'downstream': [B] + hist_* [B, L, ...]; row 0 has no history."""
  rng = np.random.default_rng(seed)
  batch = base_batch(schema, b, seed)
  n_valid = np.arange(b) * l // max(b - 1, 1)  # 0 .. L
  mask = np.arange(l)[None] < n_valid[:, None]
  batch["hist_insemb"] = rng.normal(size=(b, l, d)).astype(np.float32)
  batch["hist_mask"] = mask
  # Some labels not yet known (delayed): they read 0, flagged unknown.
  known = mask[..., None] & (rng.random((b, l, schema.num_tasks)) < 0.8)
  batch["hist_label_known"] = known
  batch["hist_labels"] = (rng.integers(0, 2, known.shape) * known).astype(np.float32)
  batch["hist_gap"] = np.where(mask, rng.integers(1, num_gap_buckets, (b, l)),
                               0).astype(np.int32)
  return batch
