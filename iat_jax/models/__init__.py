"""IAT model families and their config.

  ranker.Ranker            base ranker, batch [B, ...]
  source.TemporalSource    temporal-order source, batch [B, ...]
  source.UserSource        user-order source + SIT, batch [B_users, T, ...]
  source.StreamSource      streaming source, batch [B, ...] + past_* [B, K, ...]
  iat.Downstream           downstream IAT ranker, batch [B, ...] + hist_* [B, L, ...]

Which stage uses which is `iat_jax.stages.STAGES`. Every model:
`model.apply(variables, batch, train=False) -> dict` with 'logits' float32
[..., num_tasks]; sources add 'insemb' float32 [..., d]. Keys of the batch
that a model does not use are ignored.

This module holds only the config block `config.model` (`default_config`) and
imports no Flax, so that config files stay light (`iat_jax.configs`); the
allowed values of its name-valued knobs are checked with the modules that
define them, by `iat_jax.validation.validate`.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections


def encoder_config(encoder: str,
                   *,
                   width: int,
                   heads: int,
                   layers: int = 1,
                   ffn_mult: int = 2,
                   din_mlp: Sequence[int] = (32, 16),
                   longer_merge: int = 2,
                   longer_recent_k: int = 4) -> ml_collections.ConfigDict:
  """The config block of one use of a sequence encoder (`sequence.make_encoder`)."""
  c = ml_collections.ConfigDict()
  # 'din' | 'transformer' | 'longer' (the behaviour sequence also allows 'none').
  c.encoder = encoder
  # Width of the encoder (tokens are projected to it).
  c.width = width
  # Attention heads.
  c.heads = heads
  # Transformer blocks (for 'longer': self-attention blocks after the cross).
  c.layers = layers
  # FFN width = ffn_mult * width in every transformer block.
  c.ffn_mult = ffn_mult
  # Hidden widths of DIN's attention scorer MLP.
  c.din_mlp = tuple(din_mlp)
  # LONGER: neighbouring tokens merged into one.
  c.longer_merge = longer_merge
  # LONGER: most recent merged tokens used as extra cross-attention queries.
  c.longer_recent_k = longer_recent_k
  return c


def default_config() -> ml_collections.ConfigDict:
  """Every model knob, sized for a CPU."""
  c = ml_collections.ConfigDict()
  # --- Feature embedding.
  # Embedding width e of every feature token.
  c.embed_dim = 16
  # Rows of the shared embedding table are padded to a multiple of this.
  c.vocab_pad_multiple = 8
  # --- Hand-crafted behaviour sequence encoder of the base ranker
  # ('none' = no sequence token).
  c.seq = encoder_config("transformer", width=32, heads=2)
  # FFN width = ffn_mult * width, in RankMixer.
  c.ffn_mult = 2
  # --- Feature interaction (h has width D).
  # 'rankmixer' (D = mixer_tokens * mixer_token_dim) | 'mlp' (D = mlp_dims[-1]).
  c.interaction = "rankmixer"
  # RankMixer: number of tokens T; each feature group (user, item, context
  # fields, the sequence token, the IAT token) gets its own, the extra ones
  # split the widest field groups (see iat_jax.models.interaction).
  c.mixer_tokens = 8
  # RankMixer: width of each token (divisible by mixer_tokens).
  c.mixer_token_dim = 32
  # RankMixer: number of layers.
  c.mixer_layers = 1
  # 'mlp' interaction: layer widths.
  c.mlp_dims = (256, 256)
  # Dropout rate everywhere (0 = no 'dropout' rng needed).
  c.dropout_rate = 0.0
  # Compute dtype: 'float32' (CPU) or 'bfloat16' (GPU/TPU); params stay fp32.
  c.dtype = "float32"
  # --- Stage I: compression.
  # InsEmb width d.
  c.insemb_dim = 64
  # Activation of the compression and decompression layers.
  c.compress_act = "gelu"
  # Hidden width of the decompression MLP d -> hidden -> D.
  c.decompress_hidden = 128
  # SIT: number of transformer blocks.
  c.sit_layers = 2
  # SIT: model width (in/out projections when != insemb_dim).
  c.sit_width = 64
  # SIT: FFN hidden width.
  c.sit_ffn = 128
  # SIT: attention heads.
  c.sit_heads = 2
  # Store the SIT output instead of the pre-SIT compression (ablation).
  c.insemb_after_sit = False
  # --- Stage II: downstream IAT branch.
  # Max IAT history length L (size of the IAT encoder's position table).
  c.hist_len = 64
  # Adapted InsEmb width d_a.
  c.adapt_dim = 128
  # Width of each side-information embedding (labels, gap bucket).
  c.side_dim = 16
  # Vocabulary of the time-gap bucket ids (0 = padding).
  c.num_gap_buckets = 32
  # Use the past instances' labels as side information.
  c.use_label_side = True
  # Use the other side information (time-gap bucket).
  c.use_other_side = True
  # Fold linear chains at compute time (adapt's last layer and the label
  # embedding into the encoder's input projection; the gap table projected
  # before its gather): the same parameters and function, fewer FLOPs.
  c.fold_linear = True
  # Query token: 'compress' (MLP of all candidate tokens) | 'id' (item id).
  c.iat_query = "compress"
  # Width of the compressed query token.
  c.iat_query_dim = 64
  # Encoder of the IAT sequence ('transformer' | 'longer' | 'din'); its width
  # is what the query and InsTokens are projected to.
  c.iat = encoder_config("transformer", width=64, heads=2)
  # Put the IAT token after the interaction instead of into it (ablation).
  c.iat_after_interaction = False
  return c
