"""Stage I source models: compress each instance into an InsEmb (Eq. 4-8).

All three share the submodules 'trunk', 'compress', 'decompress', 'heads' (and
'sit' for the user-order forms), so one parameter tree moves between them:
a user-order model trained in batch continues as the streaming model.

  TemporalSource  (Eq. 4-5) e = act(h W_c + b_c); h' = MLP(e); logits(h').
                  Decompress's last layer (hidden -> D) has no activation and
                  the heads are linear, so W_2 and the heads compose into one
                  hidden -> num_tasks map. It is kept for fidelity with Eq. 5
                  (h' back at width D, as in the paper, and the shared
                  'decompress' parameters that move between the source models):
                  2 B hidden D FLOPs forward, ~3x per train step (50 MFLOPs at
                  the demo config, B=256, hidden=128, D=256).
  UserSource      (Eq. 6)   batch [B_users, T, ...] (each row one user's chunk,
                  oldest first, dummies have token_mask (else mask) False,
                  tie_group [B_users, T]). E = compress(H); E' = SIT(E) with
                  the strictly-earlier AND padding masks; logits(MLP(E')).
  StreamSource    (Eq. 7-8) current instances [B, ...] plus the user's K most
                  recent earlier InsEmbs [B, K, d] (newest first, past_mask;
                  tie groups tie_group [B] and past_tie_group [B, K]).
                  SIT over [current, past_1 (newest), ..., past_K] with
                  stop_gradient on the past; the prediction uses position 0.
                  mode 'fetch' reads 'past_insemb' (Method 1);
                  'recompute' recomputes it from the 'past_*' raw features with
                  the current parameters, forward only (Method 2).

Causality is by timestamp, not by position: a query sees a key iff the key
is valid and either the query itself or strictly earlier in time. Both forms
get it as the position-causal mask AND `attention.tie_mask` of per-token tie
groups (int32, equal exactly for one user's instances with the same
timestamp; the input pipeline derives them from the dataset's hist_end, so no
int64 timestamp reaches the device). Same-timestamp slate-mates therefore
never see each other, in either form.

The SIT has no positional embeddings: order enters only through that mask, so
it is independent of the chunk length T and of K, and the streaming form over
[current, newest..oldest] computes exactly what the user-order form computes
at the last position of [oldest..newest, current] (ties among the past
included: each past entry sees the same strictly-earlier entries in both).

Streaming mask (positions 0 = current, 1..K = past newest..oldest): query i may
attend to key j iff j >= i (the same or an older instance), j == i or the tie
groups differ, and key j is valid. Position 0 therefore sees itself and every
valid fetched entry (all strictly earlier); past entry k sees only itself and
the entries strictly older than it.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from iat_jax.data import schema as schema_lib
from iat_jax.models import attention
from iat_jax.models import layers
from iat_jax.models import ranker

Array = jax.Array
Batch = dict[str, Array]

STREAM_MODES = ("fetch", "recompute")


class Compress(nn.Module):
  """h [..., D] -> InsEmb e = act(h W_c + b_c) [..., d] (Eq. 4)."""
  # InsEmb width d.
  insemb_dim: int
  # Activation name.
  act: str = "gelu"
  # Compute dtype.
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    y = layers.dense(self.insemb_dim,
                     dtype=self.dtype,
                     axes=("mlp", "embed"),
                     name="dense")(h)
    return layers.activation(self.act)(y)


class Decompress(nn.Module):
  """e [..., d] -> h' = W_2 act(e W_1 + b_1) + b_2 [..., D] (Eq. 5)."""
  # Hidden width of the decompression MLP.
  hidden: int
  # Output width D.
  out_dim: int
  # Activation name.
  act: str = "gelu"
  # Compute dtype.
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, e: Array) -> Array:
    return layers.MLP((self.hidden, self.out_dim),
                      act=self.act,
                      dtype=self.dtype,
                      name="mlp")(e)


class SIT(nn.Module):
  """Source Instance Transformer: E [..., T, d], mask [..., T, T] -> [..., T, d].

  Pre-LN blocks at `width` (in/out projections only when width != d), final
  LayerNorm. No positional embeddings (see module docstring).
  """
  # Number of transformer blocks.
  num_layers: int = 2
  # Model width.
  width: int = 64
  # FFN hidden width.
  ffn_dim: int = 128
  # Attention heads.
  num_heads: int = 2
  # Dropout rate.
  dropout_rate: float = 0.0
  # Compute dtype.
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, e: Array, mask: Array, *, train: bool = False) -> Array:
    d = e.shape[-1]
    x = e
    if self.width != d:
      x = layers.dense(self.width, dtype=self.dtype, name="in_proj")(x)
    for i in range(self.num_layers):
      x = attention.TransformerBlock(self.num_heads,
                                     self.ffn_dim,
                                     dropout_rate=self.dropout_rate,
                                     dtype=self.dtype,
                                     name=f"block_{i}")(x, mask, train=train)
    x = layers.layer_norm(dtype=self.dtype, name="ln_out")(x)
    if self.width != d:
      x = layers.dense(d, dtype=self.dtype, name="out_proj")(x)
    return x


class _SourceBase(nn.Module):
  """Shared submodules of the source models."""
  # Model config.
  config: ml_collections.FrozenConfigDict
  # Feature schema.
  schema: schema_lib.Schema
  # Whether the model has a SIT (class constant, not a field).
  uses_sit = False

  def setup(self):
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    self.trunk = ranker.RankerTrunk(c, self.schema)
    self.compress = Compress(c.insemb_dim, c.compress_act, dtype)
    self.decompress = Decompress(c.decompress_hidden, _trunk_width(c), c.compress_act,
                                 dtype)
    self.heads = ranker.Heads(self.schema.num_tasks, dtype)
    if self.uses_sit:
      self.sit = SIT(c.sit_layers, c.sit_width, c.sit_ffn, c.sit_heads, c.dropout_rate,
                     dtype)

  def embed_instances(self,
                      batch: Batch,
                      *,
                      prefix: str = "",
                      n_lead: int = 1,
                      train: bool = False) -> Array:
    """Compressed InsEmb E [N, d] of the instances, leading axes merged."""
    h = self.trunk(ranker.trunk_inputs(batch, self.schema, prefix=prefix,
                                       n_lead=n_lead),
                   train=train)
    return self.compress(h)


def _trunk_width(c: ml_collections.ConfigDict) -> int:
  """D, the width of h."""
  if c.interaction == "rankmixer":
    return c.mixer_tokens * c.mixer_token_dim
  return c.mlp_dims[-1]


class TemporalSource(_SourceBase):
  """Temporal-order source: batch [B, ...] -> {'logits' [B, nt], 'insemb' [B, d]}."""

  def __call__(self, batch: Batch, *, train: bool = False) -> dict[str, Array]:
    e = self.embed_instances(batch, train=train)
    logits = self.heads(self.decompress(e))
    return {"logits": logits, "insemb": e.astype(jnp.float32)}


class UserSource(_SourceBase):
  """User-order source over chunks [B_users, T, ...].

  Tokens are the slots with token_mask (else mask) True: evaluation chunks
  start with context rows (`batching.UserChunks`) that the SIT sees but
  that `mask` (the rows that count) leaves out.

  Returns {'logits': [Bu, T, nt], 'insemb': [Bu, T, d] (E, or E' when
  config.insemb_after_sit), 'compressed': E [Bu, T, d], 'sit_out': E'}.
  """
  uses_sit = True

  def __call__(self, batch: Batch, *, train: bool = False) -> dict[str, Array]:
    bu, t = batch["cat"].shape[:2]
    e = self.embed_instances(batch, n_lead=2, train=train)
    e = layers.constrain(e.reshape(bu, t, -1), "batch", None, None)
    valid = batch.get("token_mask", batch.get("mask"))
    if valid is None:
      valid = jnp.ones((bu, t), bool)
    valid = valid.astype(bool)
    mask = (attention.causal_mask(t)[None] & attention.tie_mask(batch["tie_group"]) &
            valid[:, None, :])
    e2 = self.sit(e, mask, train=train)
    logits = self.heads(self.decompress(e2))
    insemb = e2 if self.config.insemb_after_sit else e
    return {
        "logits": logits,
        "insemb": insemb.astype(jnp.float32),
        "compressed": e.astype(jnp.float32),
        "sit_out": e2.astype(jnp.float32)
    }


class StreamSource(_SourceBase):
  """Streaming user-order source (see module docstring).

  Returns {'logits': [B, nt], 'insemb': [B, d] (e_current, or SIT output at
  position 0 when config.insemb_after_sit), 'compressed': e_current [B, d],
  'sit_out': [B, 1+K, d], 'past_insemb': the past entries used [B, K, d]}.
  """
  uses_sit = True
  # 'fetch' stored past InsEmbs (Method 1) | 'recompute' them (Method 2).
  mode: str = "fetch"

  def __call__(self, batch: Batch, *, train: bool = False) -> dict[str, Array]:
    c = self.config
    e = self.embed_instances(batch, train=train)  # [B, d]
    if self.mode == "fetch":
      past = batch["past_insemb"]
    elif self.mode == "recompute":
      k = batch["past_mask"].shape[1]
      past = self.embed_instances(batch, prefix="past_", n_lead=2, train=False)
      past = past.reshape(e.shape[0], k, -1)
    else:
      raise ValueError(f"unknown stream mode {self.mode!r}; allowed: "
                       f"{STREAM_MODES}")
    past = jax.lax.stop_gradient(past.astype(e.dtype))
    x = jnp.concatenate([e[:, None, :], past], axis=1)  # [B, 1+K, d]
    x = layers.constrain(x, "batch", None, None)
    past_mask = batch["past_mask"].astype(bool)
    valid = jnp.concatenate([jnp.ones_like(past_mask[:, :1]), past_mask], axis=1)
    group = jnp.concatenate([batch["tie_group"][:, None], batch["past_tie_group"]],
                            axis=1)
    mask = (attention.newest_first_causal_mask(x.shape[1])[None] &
            attention.tie_mask(group) & valid[:, None, :])
    y = self.sit(x, mask, train=train)
    logits = self.heads(self.decompress(y[:, 0]))
    insemb = y[:, 0] if c.insemb_after_sit else e
    return {
        "logits": logits,
        "insemb": insemb.astype(jnp.float32),
        "compressed": e.astype(jnp.float32),
        "sit_out": y.astype(jnp.float32),
        "past_insemb": past.astype(jnp.float32)
    }
