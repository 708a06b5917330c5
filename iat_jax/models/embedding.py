"""Feature embedding: ids and dense values -> feature tokens.

Table layout: ONE shared table [V, e] with per-field row offsets, not one table
per field. Field k's id i lives at row `offset[k] + i` (id 0 of each field has
its own row: a learned "missing" embedding for categorical fields, ignored for
multi-hot padding). Blocks, in order: every categorical field, every multi-hot
field, the behaviour-action vocabulary; V is padded up to a multiple of
`vocab_pad_multiple` so the rows split evenly over the `model` mesh axis.
Why: with hundreds or thousands of fields, per-field tables mean that many
gathers, params and sharding annotations; a shared table is a single gather of
all ids of an instance (categorical + multi-hot + sequence) and one row-sharded
array (logical axes ('vocab', 'embed')). The behaviour sequence item/category
ids reuse the rows of `schema.seq_item_field` / `schema.seq_category_field`, so
the candidate and its past behaviours share embeddings.

Outputs for instances with leading dims [N]:
  'fields'    [N, F, e]  F = #categorical + #multi-hot + #dense tokens
  'seq'       [N, S, 3e] behaviour tokens: concat(item, category, action)
  'seq_mask'  [N, S]     bool, seq_item > 0
  'candidate' [N, 2e]    concat(candidate item, candidate category) embeddings
  'item'      [N, e]     candidate item-id embedding (ID-based query ablation)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iat_jax.data import schema as schema_lib
from iat_jax.models import layers

Array = jax.Array


def table_layout(schema: schema_lib.Schema,
                 pad_multiple: int = 1) -> tuple[dict[str, int], int]:
  """Row offsets of every block of the shared table, and its padded size.

  Returns:
    ({'cat:<name>' | 'mh:<name>' | 'action': offset}, rows).
  """
  offsets, n = {}, 0
  for f in schema.categorical:
    offsets[f"cat:{f.name}"] = n
    n += f.vocab_size
  for f in schema.multi_hot:
    offsets[f"mh:{f.name}"] = n
    n += f.vocab_size
  offsets["action"] = n
  n += schema.num_actions
  n = -(-n // pad_multiple) * pad_multiple
  return offsets, n


class FeatureEmbedding(nn.Module):
  """Embeds one instance's features into tokens (see module docstring)."""
  # Feature schema of the dataset.
  schema: schema_lib.Schema
  # Embedding width e.
  embed_dim: int
  # The table's row count is padded to a multiple of this (mesh divisibility).
  vocab_pad_multiple: int = 8
  # Compute dtype of the returned tokens (the table is float32).
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, batch: dict[str, Array]) -> dict[str, Array]:
    s = self.schema
    e = self.embed_dim
    offsets, rows = table_layout(s, self.vocab_pad_multiple)
    table = self.param(
        "embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.05), ("vocab", "embed")),
        (rows, e), jnp.float32)

    all_ids, lo, hi, sizes = _instance_ids(s, batch, offsets)
    rows_idx = jnp.clip(all_ids + lo, lo, hi)
    emb = jnp.take(table, rows_idx, axis=0).astype(self.dtype)
    emb = layers.constrain(emb, "batch", None, "embed")
    parts = jnp.split(emb, np.cumsum(sizes)[:-1], axis=-2)
    id_parts = jnp.split(all_ids, np.cumsum(sizes)[:-1], axis=-1)

    fc, nm = len(s.categorical), len(s.multi_hot)
    tokens = [jnp.concatenate(parts[:fc], axis=-2)]  # [N, Fc, e]
    tokens += [
        _mean_of_non_padding(emb_f, ids_f, self.dtype)
        for emb_f, ids_f in zip(parts[fc:fc + nm], id_parts[fc:fc + nm])
    ]
    if s.dense:
      fd = len(s.dense)
      # Each dense field x_f becomes its own token x_f * w_f + b_f.
      scale = self.param(
          "dense_scale",
          nn.with_logical_partitioning(nn.initializers.normal(1.0), (None, "embed")),
          (fd, e), jnp.float32)
      bias = self.param(
          "dense_bias",
          nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, "embed")),
          (fd, e), jnp.float32)
      x = batch["dense"].astype(self.dtype)[..., None]
      tokens.append(x * scale.astype(self.dtype) + bias.astype(self.dtype))
    fields = jnp.concatenate(tokens, axis=-2)

    seq_item, seq_cat, seq_act = parts[fc + nm:]
    item_col = s.categorical_index(s.seq_item_field)
    cat_col = s.categorical_index(s.seq_category_field)
    return {
        "fields":
            fields,
        "seq":
            jnp.concatenate([seq_item, seq_cat, seq_act], axis=-1),
        "seq_mask":
            batch["seq_item"] > 0,
        "candidate":
            jnp.concatenate([fields[..., item_col, :], fields[..., cat_col, :]],
                            axis=-1),
        "item":
            fields[..., item_col, :],
    }


def _instance_ids(
    s: schema_lib.Schema, batch: dict[str, Array],
    offsets: dict[str, int]) -> tuple[Array, np.ndarray, np.ndarray, list]:
  """Every id of the instance in one array, and where each sits in the table.

  Returns (ids [..., K] int32: categorical fields, multi-hot fields, sequence
  items, categories and actions, in that order; lo, hi [K]: the first and last
  table row of each id's field, so a bad id is clipped into its own field's
  rows; sizes: the ids each of those parts takes).
  """
  ids, lo, hi, sizes = [], [], [], []

  def add(x, offset, vocab):
    ids.append(x.astype(jnp.int32))
    lo.append(np.full(x.shape[-1], offset, np.int32))
    hi.append(np.full(x.shape[-1], offset + vocab - 1, np.int32))
    sizes.append(x.shape[-1])

  cat = batch["cat"]
  for k, f in enumerate(s.categorical):
    add(cat[..., k:k + 1], offsets[f"cat:{f.name}"], f.vocab_size)
  for f in s.multi_hot:
    add(batch[f"mh_{f.name}"], offsets[f"mh:{f.name}"], f.vocab_size)
  add(batch["seq_item"], offsets[f"cat:{s.seq_item_field}"],
      s.vocab_size(s.seq_item_field))
  add(batch["seq_category"], offsets[f"cat:{s.seq_category_field}"],
      s.vocab_size(s.seq_category_field))
  add(batch["seq_action"], offsets["action"], s.num_actions)
  return jnp.concatenate(ids, axis=-1), np.concatenate(lo), np.concatenate(hi), sizes


def _mean_of_non_padding(emb: Array, ids: Array, dtype) -> Array:
  """[..., 1, e]: the mean of a multi-hot field's embeddings [..., n, e] over
  its non-padding ids [..., n] (id 0 is padding)."""
  w = (ids > 0).astype(dtype)[..., None]
  return ((emb * w).sum(-2) / jnp.maximum(w.sum(-2), 1.0))[..., None, :]
