"""Base ranking model (paper Eq. 1-3).

  tokens(X) = FeatureEmbedding(batch)                      [N, F, e]
  seq token = SeqEncoder(candidate, behaviours S)          [N, 1, w]
  h         = FeatureInteraction(groups)                   [N, D]
              groups: the user / item / context field tokens, the seq token
              (and the IAT token in the downstream model)
  logits    = Heads(h)                                     [N, num_tasks]

`RankerTrunk` is shared by every model family (same submodule names, so a base
checkpoint's 'trunk' and 'heads' fit the source and downstream models). It
works on instances with one leading axis [N]; callers with [B_users, T] flatten
first.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from iat_jax.data import schema as schema_lib
from iat_jax.models import embedding
from iat_jax.models import interaction
from iat_jax.models import layers
from iat_jax.models import sequence

Array = jax.Array
Batch = dict[str, Array]

# Batch keys the trunk reads (plus f'mh_{name}' for each multi-hot field).
_TRUNK_KEYS = ("cat", "dense", "seq_item", "seq_category", "seq_action")


def trunk_inputs(batch: Batch,
                 schema: schema_lib.Schema,
                 *,
                 prefix: str = "",
                 n_lead: int = 1) -> Batch:
  """The trunk's features of `batch` (keys `prefix + name`), leading axes merged.

  Args:
    batch: a batch dict; other keys are ignored.
    schema: the feature schema.
    prefix: '' for the instance itself, 'past_' for past instances.
    n_lead: number of leading axes merged into one ([B, K] -> [B*K]).

  Returns:
    {'cat', 'dense', 'mh_<name>', 'seq_*'} with one leading axis.
  """
  keys = list(_TRUNK_KEYS) + [f"mh_{f.name}" for f in schema.multi_hot]
  out = {}
  for k in keys:
    if k == "dense" and not schema.dense:
      continue
    out[k] = layers.flatten_leading(batch[prefix + k], n_lead)
  return out


class RankerTrunk(nn.Module):
  """Embedding + sequence encoder + interaction -> h [N, D]."""
  # Model config (see `iat_jax.models.default_config`).
  config: ml_collections.FrozenConfigDict
  # Feature schema.
  schema: schema_lib.Schema

  def setup(self):
    c = self.config
    dtype = layers.compute_dtype(c.dtype)
    self.embed = embedding.FeatureEmbedding(self.schema,
                                            c.embed_dim,
                                            vocab_pad_multiple=c.vocab_pad_multiple,
                                            dtype=dtype)
    if c.seq.encoder == "none":
      self.seq_encoder = None
    else:
      self.seq_encoder = sequence.make_encoder(c.seq,
                                               max_len=self.schema.seq_len,
                                               dropout_rate=c.dropout_rate,
                                               dtype=dtype)
    if c.interaction == "rankmixer":
      self.interaction = interaction.RankMixer(c.mixer_tokens,
                                               c.mixer_token_dim,
                                               c.mixer_layers,
                                               c.ffn_mult,
                                               dropout_rate=c.dropout_rate,
                                               dtype=dtype)
    elif c.interaction == "mlp":
      self.interaction = interaction.MLPInteraction(tuple(c.mlp_dims),
                                                    dropout_rate=c.dropout_rate,
                                                    dtype=dtype)
    else:
      raise ValueError(f"unknown interaction {c.interaction!r}; allowed: "
                       f"{interaction.INTERACTIONS}")

  def tokens(self, batch: Batch, *, train: bool = False) -> dict[str, Array]:
    """Input tokens of the interaction.

    Args:
      batch: trunk features with leading axis [N].
      train: training mode (dropout).

    Returns:
      {'fields': [N, F, e], 'seq': [N, 1, w] or [N, 0, e] without an encoder,
       'item': [N, e] candidate item-id embedding}.
    """
    emb = self.embed(batch)
    fields = emb["fields"]
    n = fields.shape[0]
    if self.seq_encoder is None:
      seq = jnp.zeros((n, 0, fields.shape[-1]), fields.dtype)
    else:
      # LONGER's user-profile global token: all non-sequential tokens.
      profile = fields.reshape(n, 1, -1)
      seq = self.seq_encoder(emb["candidate"],
                             emb["seq"],
                             emb["seq_mask"],
                             profile,
                             train=train)[:, None, :]
    return {"fields": fields, "seq": seq, "item": emb["item"]}

  def interact(self,
               tokens: dict[str, Array],
               iat_token: Array | None = None,
               *,
               train: bool = False) -> Array:
    """`tokens()`'s output (+ the IAT token [N, w]) -> h [N, D].

    The interaction sees them as feature groups, in order: the schema's user,
    item and context fields (`Schema.group_fields`, each [N, n_g, e]), 'seq'
    [N, 1, w] (or [N, 0, e]) and 'iat' [N, 1, w_iat] when given.
    """
    fields = tokens["fields"]
    groups = {
        g: jnp.take(fields, np.array(idx), axis=1)
        for g, idx in self.schema.group_fields().items()
    }
    groups["seq"] = tokens["seq"]
    if iat_token is not None:
      groups["iat"] = iat_token[:, None, :]
    h = self.interaction(groups, train=train)
    return layers.constrain(h, "batch", None)

  def __call__(self, batch: Batch, *, train: bool = False) -> Array:
    """Trunk features [N, ...] -> h [N, D]."""
    return self.interact(self.tokens(batch, train=train), train=train)


class Heads(nn.Module):
  """One logit per task: h [..., D] -> float32 [..., num_tasks]."""
  # Number of tasks.
  num_tasks: int
  # Compute dtype.
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, h: Array) -> Array:
    y = layers.dense(self.num_tasks,
                     dtype=self.dtype,
                     axes=("mlp", None),
                     name="logits")(h)
    return y.astype(jnp.float32)


class Ranker(nn.Module):
  """Base ranker: batch [B, ...] -> {'logits': float32 [B, num_tasks]}."""
  # Model config.
  config: ml_collections.FrozenConfigDict
  # Feature schema.
  schema: schema_lib.Schema

  @nn.compact
  def __call__(self, batch: Batch, *, train: bool = False) -> dict[str, Array]:
    dtype = layers.compute_dtype(self.config.dtype)
    h = RankerTrunk(self.config, self.schema,
                    name="trunk")(trunk_inputs(batch, self.schema), train=train)
    return {"logits": Heads(self.schema.num_tasks, dtype, name="heads")(h)}
