"""IAT model families and their config.

  make_model(config, schema, stage) with stage one of STAGES:
    'base'            ranker.Ranker            batch [B, ...]
    'source_temporal' source.TemporalSource    batch [B, ...]
    'source_user'     source.UserSource        batch [B_users, T, ...]
    'source_stream'   source.StreamSource      batch [B, ...] + past_* [B, K, ...]
    'downstream'      iat.Downstream           batch [B, ...] + hist_* [B, L, ...]

Every model: `model.apply(variables, batch, train=False) -> dict` with
'logits' float32 [..., num_tasks]; sources add 'insemb' float32 [..., d].
Keys of the batch that a model does not use are ignored.
"""

from __future__ import annotations

import flax.linen as nn
import ml_collections

from iat_jax.data import schema as schema_lib
from iat_jax.models import iat
from iat_jax.models import interaction
from iat_jax.models import ranker
from iat_jax.models import sequence
from iat_jax.models import source

STAGES = ("base", "source_temporal", "source_user", "source_stream",
          "downstream")
# Allowed values of the config's name-valued knobs.
SEQ_ENCODERS = sequence.ENCODERS + ("none",)
IAT_ENCODERS = sequence.ENCODERS
INTERACTIONS = interaction.INTERACTIONS
IAT_QUERIES = iat.QUERY_MODES
STREAM_MODES = source.STREAM_MODES
DTYPES = ("float32", "bfloat16")


def default_config() -> ml_collections.ConfigDict:
  """Every model knob, sized for a CPU."""
  c = ml_collections.ConfigDict()
  # --- Feature embedding.
  # Embedding width e of every feature token.
  c.embed_dim = 16
  # Rows of the shared embedding table are padded to a multiple of this.
  c.vocab_pad_multiple = 8
  # --- Hand-crafted behaviour sequence encoder of the base ranker.
  # 'din' | 'transformer' | 'longer' | 'none' (no sequence token).
  c.seq_encoder = "transformer"
  # Width of the behaviour-sequence encoder.
  c.seq_width = 32
  # Attention heads of the behaviour-sequence encoder.
  c.seq_heads = 2
  # Transformer blocks (for 'longer': self-attention blocks after the cross).
  c.seq_layers = 1
  # FFN width = ffn_mult * width, in every transformer block and RankMixer.
  c.ffn_mult = 2
  # Hidden widths of DIN's attention scorer MLP.
  c.din_mlp = (32, 16)
  # LONGER: neighbouring behaviour tokens merged into one.
  c.longer_merge = 2
  # LONGER: most recent merged behaviours used as extra cross-attn queries.
  c.longer_recent_k = 4
  # --- Feature interaction (h has width D).
  # 'rankmixer' (D = mixer_tokens * mixer_token_dim) | 'mlp' (D = mlp_dims[-1]).
  c.interaction = "rankmixer"
  # RankMixer: number of tokens T.
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
  # User-order chunk length T (pipeline knob; the SIT has no T-sized params).
  c.user_chunk_len = 16
  # Streaming: past InsEmbs fetched per instance K (pipeline knob; no params).
  c.stream_k = 16
  # Streaming: 'fetch' stored InsEmbs (Method 1) | 'recompute' (Method 2).
  c.stream_mode = "fetch"
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
  # Query token: 'compress' (MLP of all candidate tokens) | 'id' (item id).
  c.iat_query = "compress"
  # Width of the compressed query token.
  c.iat_query_dim = 64
  # Encoder of the IAT sequence: 'transformer' | 'longer' | 'din'.
  c.iat_encoder = "transformer"
  # Width the query and InsTokens are projected to.
  c.iat_width = 64
  # Attention heads of the IAT encoder.
  c.iat_heads = 2
  # Transformer blocks of the IAT encoder.
  c.iat_layers = 1
  # Put the IAT token after the interaction instead of into it (ablation).
  c.iat_after_interaction = False
  return c


def make_model(config: ml_collections.ConfigDict, schema: schema_lib.Schema,
               stage: str) -> nn.Module:
  """The model of `stage` (one of STAGES) for `schema` under `config`."""
  validate_config(config)
  frozen = ml_collections.FrozenConfigDict(config)
  if stage == "base":
    return ranker.Ranker(frozen, schema)
  if stage == "source_temporal":
    return source.TemporalSource(frozen, schema)
  if stage == "source_user":
    return source.UserSource(frozen, schema)
  if stage == "source_stream":
    return source.StreamSource(frozen, schema)
  if stage == "downstream":
    return iat.Downstream(frozen, schema)
  raise ValueError(f"unknown stage {stage!r}; allowed: {STAGES}")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming a bad name-valued knob or an impossible size."""
  for key, allowed in (("seq_encoder", SEQ_ENCODERS),
                       ("iat_encoder", IAT_ENCODERS),
                       ("interaction", INTERACTIONS),
                       ("iat_query", IAT_QUERIES),
                       ("stream_mode", STREAM_MODES),
                       ("dtype", DTYPES)):
    if config[key] not in allowed:
      raise ValueError(f"config.{key}={config[key]!r}; allowed: {allowed}")
  if (config.interaction == "rankmixer"
      and config.mixer_token_dim % config.mixer_tokens):
    raise ValueError(
        f"config.mixer_token_dim={config.mixer_token_dim} must be divisible "
        f"by config.mixer_tokens={config.mixer_tokens}")
