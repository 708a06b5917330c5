"""Masked multi-head attention and pre-LayerNorm transformer blocks.

Masks are boolean, True = "query may attend to this key", broadcastable to
[..., Q, K]. Masked keys get probability exactly 0 (their logits are replaced
before the softmax and the probabilities are multiplied by the mask), so the
contents of masked positions can never leak into an output, not even through
rounding; a query row with no allowed key at all outputs zeros before the
output projection (finite, content-independent). Callers never read such rows
for anything real.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iat_jax.models import layers

Array = jax.Array

_NEG = -1e9
# Attention with Q queries folds its key and value maps into the queries
# when FOLD_QUERIES x Q <= the head width (`MultiHeadAttention`).
FOLD_QUERIES = 4


def key_padding_mask(valid: Array, num_queries: int | None = None) -> Array:
  """[..., K] bool -> [..., Q or 1, K]: every query sees the valid keys."""
  m = valid[..., None, :]
  if num_queries is not None:
    m = jnp.broadcast_to(m, valid.shape[:-1] + (num_queries, valid.shape[-1]))
  return m


def causal_mask(length: int) -> Array:
  """[T, T] bool, oldest first: position t sees positions s <= t."""
  i = np.arange(length)
  return jnp.asarray(i[None, :] <= i[:, None])


def newest_first_causal_mask(length: int) -> Array:
  """[T, T] bool, newest first: position i sees positions j >= i (older).

  This is `causal_mask` for a sequence stored in reverse time order; position 0
  (the newest) sees every position.
  """
  i = np.arange(length)
  return jnp.asarray(i[None, :] >= i[:, None])


def tie_mask(group: Array) -> Array:
  """[..., T] int tie groups -> [..., T, T] bool: query i sees key j iff j == i
  or group[j] != group[i].

  A tie group is the set of one user's instances with the same timestamp
  (ties). With a causal mask over a time-sorted sequence this leaves a query
  exactly itself and the strictly earlier instances.
  """
  t = group.shape[-1]
  return (group[..., :, None] != group[..., None, :]) | jnp.eye(t, dtype=bool)


class MultiHeadAttention(nn.Module):
  """Masked multi-head dot-product attention.

  Shapes: x_q [..., Q, Dq], x_kv [..., K, Dk], mask bool broadcastable to
  [..., Q, K] -> [..., Q, out_features].

  With few queries (FOLD_QUERIES x Q <= the head width dh; the query-only
  last blocks have Q = 1) the key and value maps are folded at compute time
  instead of applied to every key: logits = (q W_k^T) . x_kv, the key bias
  dropped (it adds q . b_k to a whole row of logits, which the softmax
  ignores), and output = (probs @ x_kv) W_v + b_v sum(probs). Per row that
  is Q H Dk (2 K + 2 dh) multiply-adds instead of 2 K Dk H dh for the key
  and value projections (about dh / 2Q times fewer at K >> dh): the same
  parameters and function, up to rounding.
  """
  # Number of attention heads.
  num_heads: int
  # Width of queries/keys/values summed over heads (default: Dq).
  qkv_features: int | None = None
  # Output width (default: Dq).
  out_features: int | None = None
  # Dropout on attention probabilities.
  dropout_rate: float = 0.0
  # Compute dtype; logits and softmax are always float32.
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self,
               x_q: Array,
               x_kv: Array,
               mask: Array,
               *,
               train: bool = False) -> Array:
    qkv = self.qkv_features or x_q.shape[-1]
    out = self.out_features or x_q.shape[-1]
    if qkv % self.num_heads:
      raise ValueError(f"qkv_features {qkv} not divisible by num_heads "
                       f"{self.num_heads}")
    h, dh = self.num_heads, qkv // self.num_heads

    def proj(x, name):
      y = layers.dense(qkv, dtype=self.dtype, axes=("embed", "heads"), name=name)(x)
      return y.reshape(y.shape[:-1] + (h, dh))

    def heads(name):  # the kernel [Dk, H, dh] and bias [H, dh], unapplied
      p = layers.DeferredDense(qkv, axes=("embed", "heads"), name=name)(x_kv)
      return (p.kernel.reshape(-1, h, dh).astype(self.dtype),
              p.bias.reshape(h, dh).astype(self.dtype))

    q = proj(x_q, "query")  # [..., Q, H, dh]
    m = mask[..., None, :, :]  # heads axis
    # Few queries (a query-only last block): fold the key and value maps
    # into the queries instead of projecting every key.
    fold = FOLD_QUERIES * x_q.shape[-2] <= dh
    if fold:
      wk, _ = heads("key")  # q . bias_k shifts a row's logits alike: no effect
      qk = jnp.einsum("...qhd,ehd->...hqe", q, wk)  # [..., H, Q, Dk]
      logits = jnp.einsum("...hqe,...ke->...hqk",
                          qk,
                          x_kv.astype(self.dtype),
                          preferred_element_type=jnp.float32)
    else:
      k = proj(x_kv, "key")  # [..., K, H, dh]
      logits = jnp.einsum("...qhd,...khd->...hqk",
                          q,
                          k,
                          preferred_element_type=jnp.float32)
    logits = logits.astype(jnp.float32) / math.sqrt(dh)
    logits = jnp.where(m, logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1) * m
    probs = nn.Dropout(self.dropout_rate)(probs, deterministic=not train)
    probs = probs.astype(self.dtype)
    if fold:
      wv, bv = heads("value")
      px = jnp.einsum("...hqk,...ke->...qhe", probs, x_kv.astype(self.dtype))
      y = (jnp.einsum("...qhe,ehd->...qhd", px, wv) +
           jnp.swapaxes(probs.sum(-1), -1, -2)[..., None] * bv)
    else:
      v = proj(x_kv, "value")  # [..., K, H, dh]
      y = jnp.einsum("...hqk,...khd->...qhd", probs, v)
    y = y.reshape(y.shape[:-2] + (qkv,))
    return layers.dense(out, dtype=self.dtype, axes=("heads", "embed"), name="out")(y)


class TransformerBlock(nn.Module):
  """Pre-LayerNorm transformer block (self- or cross-attention + FFN).

  x [..., Q, W]; kv [..., K, Wk] or None for self-attention; mask broadcastable
  to [..., Q, K] -> [..., Q, W].

  `num_queries=n` computes only the first n rows of the output ([..., n, W]):
  the same function restricted to those rows, with the same parameters. Every
  token still enters the keys and values; only the query projection, the
  attention rows, the output projection, the residual, the FFN and its
  LayerNorm are limited to the n rows. Encoders whose output is read at token
  0 only use it in their last block (1 row instead of 1+S). Without dropout
  the rows equal the full block's up to float rounding; with dropout in
  training they follow the same distribution but draw different masks.
  """
  # Number of attention heads.
  num_heads: int
  # Hidden width of the feed-forward network.
  ffn_dim: int
  # Activation inside the feed-forward network.
  act: str = "gelu"
  # Dropout on attention probabilities and residual branches.
  dropout_rate: float = 0.0
  # Compute dtype.
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self,
               x: Array,
               mask: Array,
               kv: Array | None = None,
               *,
               train: bool = False,
               num_queries: int | None = None) -> Array:
    width = x.shape[-1]
    n = num_queries
    if kv is None:  # self-attention: every token is a key, rows [:n] query
      kv_in = layers.layer_norm(dtype=self.dtype, name="ln_attn")(x)
      h = kv_in if n is None else kv_in[..., :n, :]  # LayerNorm is per token
    else:
      h = layers.layer_norm(dtype=self.dtype,
                            name="ln_attn")(x if n is None else x[..., :n, :])
      kv_in = layers.layer_norm(dtype=self.dtype, name="ln_kv")(kv)
    if n is not None:
      x = x[..., :n, :]
      mask = mask[..., :n, :]  # a broadcast (size-1) query axis stays 1
    y = MultiHeadAttention(self.num_heads,
                           out_features=width,
                           dropout_rate=self.dropout_rate,
                           dtype=self.dtype,
                           name="attn")(h, kv_in, mask, train=train)
    x = x + nn.Dropout(self.dropout_rate)(y, deterministic=not train)
    h = layers.layer_norm(dtype=self.dtype, name="ln_ffn")(x)
    y = layers.MLP((self.ffn_dim, width), act=self.act, dtype=self.dtype,
                   name="ffn")(h, train=train)
    return x + nn.Dropout(self.dropout_rate)(y, deterministic=not train)
