"""Stage II downstream model: base ranker + IAT sequence branch (Eq. 9-11).

  E^        = MLP_adapt(hist_insemb)                     [B, L, d_a]   (Eq. 9)
  InsTokens = concat(E^, label_emb, gap_emb)             [B, L, .]     (Eq. 10)
  query     = MLP(concat(all candidate tokens))           [B, q]       (Eq. 11)
              (or the candidate item-id embedding, config.iat_query='id')
  iat token = SeqEncoder(query, InsTokens, hist_mask)     [B, w_iat]
  h         = Interaction(fields, seq token, iat token)   [B, D]
              (or concat(Interaction(fields, seq token), iat token) when
               config.iat_after_interaction)

The InsEmbs come either as 'hist_insemb' [B, L, d] or, deduplicated, as
'hist_insemb_unique' [G, U, d] + 'hist_index' [B, L] (`LookupInsEmb(compact)`:
the U distinct rows of each of the G batch shards, G sharded like the batch):
MLP_adapt and the encoder's input projection of E^ are per token, so running
them on the distinct rows and gathering each shard's from its own block
(`layers.Gathered`) is the same function at G U/(B L) of their cost, with no
data crossing devices. The concatenation of Eq. 10 is never built: the
encoder projects its parts (`layers.ConcatDense`, the parameters of one
dense layer on the concatenation).

Side information: concat('hist_labels', 'hist_label_known') [B, L, 2 num_tasks]
-> a linear embedding (equal to summing one learned vector per positive task,
one per known label, plus a bias; works for soft labels too), so a label not
yet known at the request's time (delayed, `data.history.label_known`; it reads
0) embeds apart from a known negative; 'hist_gap' [B, L] -> a table of
num_gap_buckets rows. The
encoder is one of `sequence.ENCODERS`, built by `sequence.make_encoder`.

Linear chains folded at compute time (config.fold_linear, default True):
MLP_adapt's second layer (d_a -> d_a) has no activation after it, and the
encoder's input projection ('seq_proj', linear) follows, so the step forms
their product (d_a x width) once and applies it to the rows
(`layers.Linear`, folded by `layers.ConcatDense`); likewise the label
embedding and its slice of the projection (2 nt -> side_dim -> width), and
the gap table is projected (num_gap_buckets rows) before it is gathered at
the B x L slots. The parameters stay as Eq. 9-10 write them (the same tree,
old checkpoints restore), their gradients flow through the products, and
AdamW acts on them as before: only float rounding differs. Per distinct
InsEmb that saves d_a^2 of the d_a^2 + d_a x width multiply-adds of the two
maps (2/3 at d_a = 128, width 64). fold_linear=False applies each map in
turn (the reference the equality tests compare with).
Masked history slots never influence the output; an all-masked history
(no real past) gives a finite output.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from iat_jax.data import schema as schema_lib
from iat_jax.models import layers
from iat_jax.models import ranker
from iat_jax.models import sequence

Array = jax.Array
Batch = dict[str, Array]

QUERY_MODES = ("compress", "id")


class IATBranch(nn.Module):
  """Candidate tokens + history batch -> IAT output token [B, iat_width]."""
  # Model config.
  config: ml_collections.FrozenConfigDict
  # Feature schema.
  schema: schema_lib.Schema

  @nn.compact
  def __call__(self,
               tokens: dict[str, Array],
               batch: Batch,
               *,
               train: bool = False) -> Array:
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    fold = c.fold_linear
    adapt = layers.MLP((c.adapt_dim, c.adapt_dim),
                       act="gelu",
                       dtype=dtype,
                       defer_last=fold,
                       name="adapt")
    b = batch["hist_mask"].shape[0]
    if "hist_insemb_unique" in batch:  # per batch shard [G, U, d] + index [B, L]
      # The same per-token MLP, once per distinct InsEmb of each shard; the
      # encoder's input projection too (`layers.ConcatDense`), then each
      # shard's rows gathered from its own block (no cross-device data).
      unique = layers.constrain(batch["hist_insemb_unique"], "batch", None, None)
      adapted = adapt(unique.astype(dtype), train=train)  # [G, U, d_a]
      parts = [layers.Gathered(adapted, batch["hist_index"])]
    else:
      parts = [adapt(batch["hist_insemb"].astype(dtype), train=train)]  # [B, L, d]
    if c.use_label_side:
      labels = jnp.concatenate([batch["hist_labels"], batch["hist_label_known"]],
                               axis=-1).astype(dtype)  # [B, L, 2 nt]
      embed = layers.DeferredDense if fold else functools.partial(layers.dense,
                                                                  dtype=dtype)
      parts.append(embed(c.side_dim, name="label_embed")(labels))
    if c.use_other_side:
      table = self.param(
          "embedding",
          nn.with_logical_partitioning(nn.initializers.normal(0.05), (None, "embed")),
          (c.num_gap_buckets, c.side_dim), jnp.float32)
      gap = jnp.clip(batch["hist_gap"], 0, c.num_gap_buckets - 1)
      if fold:  # the 32-row table projected, then gathered at the B x L slots
        parts.append(layers.Gathered(table[None], gap))
      else:
        parts.append(jnp.take(table, gap, axis=0).astype(dtype))
    # InsTokens = concat(parts) [B, L, .], handed to the encoder as its parts.

    if c.iat_query == "compress":
      cand = jnp.concatenate(
          [tokens["fields"].reshape(b, -1), tokens["seq"].reshape(b, -1)], axis=-1)
      query = layers.MLP((c.iat_query_dim, c.iat_query_dim),
                         act="gelu",
                         dtype=dtype,
                         name="query")(cand, train=train)
    elif c.iat_query == "id":
      query = tokens["item"]
    else:
      raise ValueError(f"unknown iat_query {c.iat_query!r}; allowed: {QUERY_MODES}")

    encoder = sequence.make_encoder(c.iat,
                                    max_len=c.hist_len,
                                    dropout_rate=c.dropout_rate,
                                    dtype=dtype,
                                    module_name="encoder")
    mask = batch["hist_mask"].astype(bool)
    return encoder(query, parts, mask, None, train=train)


class Downstream(nn.Module):
  """Downstream IAT ranker: batch [B, ...] -> {'logits': float32 [B, nt]}.

  Also returns 'iat_token' [B, iat_width] (float32) for inspection.
  """
  # Model config.
  config: ml_collections.FrozenConfigDict
  # Feature schema.
  schema: schema_lib.Schema

  @nn.compact
  def __call__(self, batch: Batch, *, train: bool = False) -> dict[str, Array]:
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    trunk = ranker.RankerTrunk(c, self.schema, name="trunk")
    tokens = trunk.tokens(ranker.trunk_inputs(batch, self.schema), train=train)
    iat_token = IATBranch(c, self.schema, name="iat")(tokens, batch, train=train)
    if c.iat_after_interaction:
      h = trunk.interact(tokens, train=train)
      h = jnp.concatenate([h, iat_token.astype(h.dtype)], axis=-1)
    else:
      h = trunk.interact(tokens, iat_token, train=train)
    logits = ranker.Heads(self.schema.num_tasks, dtype, name="heads")(h)
    return {"logits": logits, "iat_token": iat_token.astype(jnp.float32)}
