"""Sequence encoders: a query (the candidate) against a masked sequence.

Every encoder has the same call signature, so the base ranker's behaviour
sequence and the downstream IAT sequence use the same code:

  encoder(query [N, Dq], seq [N, S, Ds], mask [N, S] bool,
          profile [N, P, Dp] | None = None, *, train) -> [N, width]

Both query and sequence are projected to `width` inside the encoder; seq may
also come as its feature parts, some of them deduplicated
(`layers.ConcatDense`: the projection of the concatenation, never built).
Sequences are newest first. Padded positions (mask False) never influence
the output (attention probabilities exactly 0 and, for LONGER's token merge,
padded tokens zeroed before merging), and an all-masked sequence gives a
finite output.

  'din'         target attention with an MLP scorer (DIN).
  'transformer' pre-LN transformer over [candidate token, behaviours]; the
                output is the candidate token.
  'longer'      LONGER: global tokens (candidate + user profile), token merge
                of neighbouring behaviours (InnerTrans), one cross-attention
                layer whose queries are the global tokens plus the most recent
                k merged behaviours, then self-attention layers over those
                queries; output = the candidate global token.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from iat_jax.models import attention
from iat_jax.models import layers

Array = jax.Array

ENCODERS = ("din", "transformer", "longer")


class _PositionEmbedding(nn.Module):
  """Learned positions (newest = 0): [N, S, W] -> [N, S, W], S <= max_len."""
  # Size of the table.
  max_len: int

  @nn.compact
  def __call__(self, x: Array) -> Array:
    s = x.shape[-2]
    if s > self.max_len:
      raise ValueError(f"sequence length {s} exceeds max_len {self.max_len}")
    pos = self.param(
        "pos_embedding",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), (None, "embed")),
        (self.max_len, x.shape[-1]), jnp.float32)
    return x + pos[:s].astype(x.dtype)


class DINEncoder(nn.Module):
  """Target attention with an MLP scorer (Zhou et al., 2018).

  score_s = MLP([q, k_s, q - k_s, q * k_s]); output = sum_s softmax(score)_s k_s
  over valid s (zeros if none is valid).
  """
  # Output / projection width.
  width: int
  # Hidden widths of the scorer MLP (a final width-1 layer is added).
  mlp_dims: Sequence[int] = (32, 16)
  # Activation of the scorer.
  act: str = "gelu"
  # Compute dtype.
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self,
               query: Array,
               seq: Array,
               mask: Array,
               profile: Array | None = None,
               *,
               train: bool = False) -> Array:
    del profile  # DIN attends with the candidate only.
    q = layers.dense(self.width, dtype=self.dtype, name="query_proj")(query)
    k = layers.ConcatDense(self.width, dtype=self.dtype, name="seq_proj")(seq)
    qb = jnp.broadcast_to(q[..., None, :], k.shape)
    feats = jnp.concatenate([qb, k, qb - k, qb * k], axis=-1)
    score = layers.MLP(tuple(self.mlp_dims) + (1,),
                       act=self.act,
                       dtype=self.dtype,
                       name="scorer")(feats, train=train)
    score = jnp.where(mask, score[..., 0].astype(jnp.float32), -1e9)
    w = jax.nn.softmax(score, axis=-1) * mask
    return jnp.einsum("...s,...sw->...w", w.astype(self.dtype), k)


class TransformerEncoder(nn.Module):
  """Pre-LN transformer over [candidate, behaviours]; returns the candidate."""
  # Model width.
  width: int
  # Attention heads.
  num_heads: int = 2
  # Number of transformer blocks.
  num_layers: int = 1
  # FFN width = ffn_mult * width.
  ffn_mult: int = 2
  # Size of the positional table (>= sequence length).
  max_len: int = 64
  # Dropout rate.
  dropout_rate: float = 0.0
  # Compute dtype.
  dtype: layers.Dtype = jnp.float32
  # Last block computes the candidate row only (the one read); False = every
  # row, the same function at (1+S)x the cost there (a reference for tests).
  query_only: bool = True

  @nn.compact
  def __call__(self,
               query: Array,
               seq: Array,
               mask: Array,
               profile: Array | None = None,
               *,
               train: bool = False) -> Array:
    del profile
    q = layers.dense(self.width, dtype=self.dtype, name="query_proj")(query)
    x = layers.ConcatDense(self.width, dtype=self.dtype, name="seq_proj")(seq)
    x = _PositionEmbedding(self.max_len, name="pos")(x)
    x = jnp.concatenate([q[..., None, :], x], axis=-2)  # [N, 1+S, W]
    valid = jnp.concatenate([jnp.ones_like(mask[..., :1]), mask], axis=-1)
    m = attention.key_padding_mask(valid)
    for i in range(self.num_layers):
      last = self.query_only and i == self.num_layers - 1
      x = attention.TransformerBlock(self.num_heads,
                                     self.ffn_mult * self.width,
                                     dropout_rate=self.dropout_rate,
                                     dtype=self.dtype,
                                     name=f"block_{i}")(x,
                                                        m,
                                                        train=train,
                                                        num_queries=1 if last else None)
    return layers.layer_norm(dtype=self.dtype, name="ln_out")(x[..., 0, :])


class LongerEncoder(nn.Module):
  """LONGER (Chai et al., 2025) for a newest-first behaviour sequence.

  1. Behaviours -> width, + positions. 2. Token merge: groups of `merge`
  neighbouring tokens run one InnerTrans block (masked), padded tokens are
  zeroed, the group is concatenated and projected to one token; a merged token
  is valid if any member is. 3. Global tokens: the candidate and each profile
  token. 4. Cross-attention: queries = global tokens + the `recent_k` newest
  merged tokens; keys = global tokens + all merged tokens; global queries see
  every valid key, a behaviour query sees the global keys and merged tokens as
  old or older than itself (causal in time). 5. `num_layers` self-attention
  blocks over the queries with the same causal rule. Output: the candidate
  global token.
  """
  # Model width.
  width: int
  # Attention heads.
  num_heads: int = 2
  # Self-attention blocks after the cross-attention block.
  num_layers: int = 1
  # FFN width = ffn_mult * width.
  ffn_mult: int = 2
  # Neighbouring behaviour tokens merged into one (1 = no merge).
  merge: int = 2
  # Most recent merged behaviours used as extra queries.
  recent_k: int = 4
  # Size of the positional table (>= sequence length before merging).
  max_len: int = 64
  # Dropout rate.
  dropout_rate: float = 0.0
  # Compute dtype.
  dtype: layers.Dtype = jnp.float32
  # Last block (the cross block when num_layers = 0) computes the candidate
  # query only (the one read); False = every query (a reference for tests).
  query_only: bool = True

  def _block(self, name: str) -> attention.TransformerBlock:
    return attention.TransformerBlock(self.num_heads,
                                      self.ffn_mult * self.width,
                                      dropout_rate=self.dropout_rate,
                                      dtype=self.dtype,
                                      name=name)

  def _merge_tokens(self, x: Array, mask: Array, *, train: bool) -> tuple[Array, Array]:
    """Runs of `merge` neighbouring tokens x [..., S, W] (mask [..., S]) ->
    one token each [..., ceil(S / merge), W]: an inner self-attention block
    over the run, then a projection of its concatenation; a merged token is
    valid when any of its members is."""
    lead, s, w, m = x.shape[:-2], x.shape[-2], self.width, self.merge
    pad = (-s) % m
    x = jnp.pad(x, [(0, 0)] * len(lead) + [(0, pad), (0, 0)])
    mask = jnp.pad(mask, [(0, 0)] * len(lead) + [(0, pad)])
    g = (s + pad) // m
    xg = x.reshape(lead + (g, m, w))
    mg = mask.reshape(lead + (g, m))
    xg = self._block("inner")(xg, attention.key_padding_mask(mg), train=train)
    xg = xg * mg[..., None].astype(xg.dtype)  # padded members contribute 0
    x = layers.dense(w, dtype=self.dtype,
                     name="merge_proj")(xg.reshape(lead + (g, m * w)))
    return x, mg.any(-1)

  @nn.compact
  def __call__(self,
               query: Array,
               seq: Array,
               mask: Array,
               profile: Array | None = None,
               *,
               train: bool = False) -> Array:
    w = self.width
    x = layers.ConcatDense(w, dtype=self.dtype, name="seq_proj")(seq)
    x = _PositionEmbedding(self.max_len, name="pos")(x)
    lead = x.shape[:-2]

    if self.merge > 1:
      x, mask = self._merge_tokens(x, mask, train=train)

    glob = [layers.dense(w, dtype=self.dtype, name="query_proj")(query)[..., None, :]]
    if profile is not None:
      glob.append(layers.dense(w, dtype=self.dtype, name="profile_proj")(profile))
    glob = jnp.concatenate(glob, axis=-2)  # [N, G, W]
    ng, nb = glob.shape[-2], x.shape[-2]
    k = min(self.recent_k, nb)

    kv = jnp.concatenate([glob, x], axis=-2)
    kv_valid = jnp.concatenate([jnp.ones(lead + (ng,), bool), mask], axis=-1)
    q = jnp.concatenate([glob, x[..., :k, :]], axis=-2)
    q_valid = jnp.concatenate([jnp.ones(lead + (ng,), bool), mask[..., :k]], axis=-1)

    # Behaviour index of each query / key (-1 = global token); newest first,
    # so "as old or older" is index_key >= index_query.
    qi = np.concatenate([-np.ones(ng, int), np.arange(k)])
    ki = np.concatenate([-np.ones(ng, int), np.arange(nb)])

    def rule(qidx, kidx):
      return ((qidx[:, None] < 0) | (kidx[None, :] < 0) |
              (kidx[None, :] >= qidx[:, None]))

    def rows(last):  # the candidate global token is query 0
      return 1 if self.query_only and last else None

    cross_mask = jnp.asarray(rule(qi, ki)) & kv_valid[..., None, :]
    y = self._block("cross")(q,
                             cross_mask,
                             kv,
                             train=train,
                             num_queries=rows(self.num_layers == 0))
    self_mask = jnp.asarray(rule(qi, qi)) & q_valid[..., None, :]
    for i in range(self.num_layers):
      y = self._block(f"self_{i}")(y,
                                   self_mask,
                                   train=train,
                                   num_queries=rows(i == self.num_layers - 1))
    return layers.layer_norm(dtype=self.dtype, name="ln_out")(y[..., 0, :])


def make_encoder(c: ml_collections.ConfigDict,
                 *,
                 max_len: int,
                 dropout_rate: float,
                 dtype: layers.Dtype,
                 module_name: str | None = None) -> nn.Module:
  """The encoder of config block `c` (see `iat_jax.models.encoder_config`) over
  <= max_len tokens."""
  if c.encoder == "din":
    return DINEncoder(c.width, mlp_dims=tuple(c.din_mlp), dtype=dtype, name=module_name)
  if c.encoder == "transformer":
    return TransformerEncoder(c.width,
                              num_heads=c.heads,
                              num_layers=c.layers,
                              ffn_mult=c.ffn_mult,
                              max_len=max_len,
                              dropout_rate=dropout_rate,
                              dtype=dtype,
                              name=module_name)
  if c.encoder == "longer":
    return LongerEncoder(c.width,
                         num_heads=c.heads,
                         num_layers=c.layers,
                         ffn_mult=c.ffn_mult,
                         merge=c.longer_merge,
                         recent_k=c.longer_recent_k,
                         max_len=max_len,
                         dropout_rate=dropout_rate,
                         dtype=dtype,
                         name=module_name)
  raise ValueError(f"unknown sequence encoder {c.encoder!r}; allowed: {ENCODERS}")
