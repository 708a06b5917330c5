"""A PyTorch-eager twin of the train steps of the stages base, source_temporal
and downstream, for `experiments/bench_twin.py` and tests/twin_test.py.

Built layer by layer from iat_jax/models and iat_jax/train/steps.py: the same
parameter tree (flax 'a/b/kernel' [in, out] is torch 'a.b.weight' [out, in],
a LayerNorm's 'scale' is its 'weight', everything else keeps its name), widths,
activations (GELU in flax's default tanh approximation), LayerNorm epsilon
1e-6, masks, loss (sum over tasks of sigmoid BCE, mean over real instances)
and optimizer (global-norm clipping, then AdamW with a linear warm-up and a
cosine decay of the learning rate, stepped per train step).

Two algorithms, the same function:
  'full'  every encoder block computes every token and the adapt MLP runs on
          every history slot: 'hist_insemb' [B, L, d], each linear map
          applied in turn (bench_train's `before`; the reference);
  'same'  what today's JAX step computes (bench_train's `after`): the last
          encoder block computes only the candidate token, which is the one
          read (`attention.TransformerBlock(num_queries=1)`); the history
          InsEmbs come as the batch has them, deduplicated (the distinct
          rows [G U, d] + an index [B, L] into them, so the adapt MLP and its
          slice of the encoder's input projection run once per distinct row:
          `layers.Gathered`, `layers.ConcatDense`) or dense ('hist_insemb'
          [B, L, d], the pipeline's layout past `input_pipeline.DENSE_ABOVE`
          of the slots); and, with config.model.fold_linear (the default),
          the IAT branch's linear chains folded at compute time
          (`layers.Linear`): adapt's last layer (W2, b2) and the label
          embedding (W_l, b_l) into their slices k of 'seq_proj', x @ (W k) +
          b k, and the gap table projected by its slice (32 rows) before it
          is gathered at the B x L slots; the query-only last block's key
          and value maps folded into its query (`attention.FOLD_QUERIES`).

Only the model knobs of experiments/configs/{demo,movielens}.py are
implemented (`SUPPORTED`); `build` raises ValueError for any other.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import ml_collections
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from iat_jax.data import schema as schema_lib
from iat_jax.models import attention as attention_lib
from iat_jax.models import embedding as embedding_lib
from iat_jax.models import interaction as interaction_lib
from iat_jax.train import steps

Tensor = torch.Tensor
Batch = dict[str, Tensor]

ALGORITHMS = ("full", "same")
# config.model knob -> the only value the twin implements.
SUPPORTED = {
    "seq.encoder": "transformer",
    "iat.encoder": "transformer",
    "interaction": "rankmixer",
    "iat_query": "compress",
    "compress_act": "gelu",
    "dropout_rate": 0.0,
    "dtype": "float32",
    "iat_after_interaction": False,
    "use_label_side": True,
    "use_other_side": True,
}


def gelu(x: Tensor) -> Tensor:
  """flax.linen.gelu (approximate=True)."""
  return F.gelu(x, approximate="tanh")


def layer_norm(width: int) -> nn.LayerNorm:
  """flax.linen.LayerNorm over the last axis (epsilon 1e-6)."""
  return nn.LayerNorm(width, eps=1e-6)


def _param(*shape: int) -> nn.Parameter:
  return nn.Parameter(torch.zeros(shape))


def take(table: Tensor, index: Tensor) -> Tensor:
  """table [R, w] rows at int64 index [...] -> [..., w]. index_select: its
  backward (index_add_) is ~3x F.embedding's on CPU."""
  return table.index_select(0, index.reshape(-1)).view(*index.shape, table.shape[-1])


def _cat(xs, dim: int = -1) -> Tensor:
  return xs[0] if len(xs) == 1 else torch.cat(list(xs), dim)


class MLP(nn.Module):
  """Linear layers dense_0, dense_1, ... with GELU between: [..., in] ->
  [..., widths[-1]] (`layers.MLP`, act_last=False)."""

  def __init__(self, in_dim: int, widths: tuple[int, ...]):
    super().__init__()
    dims = (in_dim, *widths)
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
      self.add_module(f"dense_{i}", nn.Linear(a, b))

  def forward(self, x: Tensor, defer_last: bool = False) -> Tensor | Linear:
    """defer_last: the last layer unapplied, `Linear` (`layers.MLP`)."""
    layers = list(self.children())
    for i, layer in enumerate(layers):
      x = gelu(x) if i else x
      if defer_last and i == len(layers) - 1:
        return Linear(x, layer)
      x = layer(x)
    return x


@dataclasses.dataclass(frozen=True)
class Linear:
  """A part given as the linear layer still to apply: layer(x) [..., w]
  (`layers.Linear`), for `ConcatDense` to fold into its kernel slice."""
  x: Tensor
  layer: nn.Linear


@dataclasses.dataclass(frozen=True)
class Gathered:
  """A [B, L, w] part as distinct rows [R, w] (a tensor or a `Linear`) + a
  flat index int64 [B, L] (`layers.Gathered`)."""
  rows: Tensor | Linear
  index: Tensor

  def take(self, rows: Tensor) -> Tensor:
    """[R, f] rows (a function of `self.rows`) -> [B, L, f]."""
    return take(rows, self.index)


class ConcatDense(nn.Linear):
  """nn.Linear of concat(parts, -1) ([..., sum w_i] -> [..., out]), without
  the concatenation where a part is not a plain tensor (`layers.ConcatDense`):
  a `Linear` part layer(x) is folded, x @ (W k_i) + b k_i with k_i the
  kernel's slice of part i (the products formed once per call, float32); a
  `Gathered` part is projected on its distinct rows, then gathered."""

  def __init__(self, widths: tuple[int, ...], features: int):
    super().__init__(sum(widths), features)
    self.widths = tuple(widths)

  def forward(self, parts: list) -> Tensor:
    if all(isinstance(p, Tensor) for p in parts):
      return F.linear(_cat(parts), self.weight, self.bias)
    weights = self.weight.split(self.widths, dim=1)
    plain = [(p, w) for p, w in zip(parts, weights) if isinstance(p, Tensor)]
    out, bias = None, self.bias  # the bias joins the first [B, L]-shaped term
    if plain:
      out = F.linear(_cat([p for p, _ in plain]), _cat([w for _, w in plain], 1), bias)
      bias = None
    for p, w in zip(parts, weights):
      if isinstance(p, Gathered):
        y = p.take(_project(p.rows, w))
      elif isinstance(p, Linear):
        y, bias = _project(p, w, bias), None
      else:
        continue
      out = y if out is None else out + y
    return out if bias is None else out + bias


def _project(part: Tensor | Linear, w: Tensor, bias: Tensor | None = None) -> Tensor:
  """part [..., w_i] times the kernel slice w [out, w_i] (+ bias [out]); a
  `Linear` part folded: F.linear(x, w W, w b (+ bias))."""
  if isinstance(part, Linear):
    folded = w @ part.layer.bias
    return F.linear(part.x, w @ part.layer.weight,
                    folded if bias is None else folded + bias)
  return F.linear(part, w, bias)


class PositionEmbedding(nn.Module):
  """Learned positions, newest = 0: [N, S, W] -> [N, S, W]."""

  def __init__(self, max_len: int, width: int):
    super().__init__()
    self.pos_embedding = _param(max_len, width)

  def forward(self, x: Tensor) -> Tensor:
    return x + self.pos_embedding[:x.shape[-2]]


class Attention(nn.Module):
  """Masked multi-head self-attention (`attention.MultiHeadAttention`):
  x_q [N, Q, W], x_kv [N, K, W], mask bool [N, 1 or Q, K] -> [N, Q, W].

  The core is F.scaled_dot_product_attention with the boolean mask (torch's
  fastest eager kernel here, ~3x the explicit ops fwd + bwd at these shapes):
  the JAX softmax of the masked logits times the mask, for every query with
  a valid key (the encoders' candidate token is valid for every query).
  With `fold` and few queries, the key and value maps are folded into the
  queries instead (`attention.MultiHeadAttention`, FOLD_QUERIES).
  """

  def __init__(self, width: int, heads: int):
    super().__init__()
    self.heads = heads
    self.query = nn.Linear(width, width)
    self.key = nn.Linear(width, width)
    self.value = nn.Linear(width, width)
    self.out = nn.Linear(width, width)

  def _split(self, x: Tensor) -> Tensor:  # [N, T, W] -> [N, H, T, W / H]
    n, t, w = x.shape
    return x.view(n, t, self.heads, w // self.heads).transpose(1, 2)

  def forward(self,
              x_q: Tensor,
              x_kv: Tensor,
              mask: Tensor,
              fold: bool = False) -> Tensor:
    q = self._split(self.query(x_q))  # [N, H, Q, dh]
    h, dh = self.heads, q.shape[-1]
    if fold and attention_lib.FOLD_QUERIES * x_q.shape[1] <= dh:
      # The key and value maps folded into the few queries, as the JAX block
      # does: logits = (q W_k) . x_kv; out = (probs @ x_kv) W_v^T + b_v sum(probs).
      wk = self.key.weight.view(h, dh, -1)
      wv = self.value.weight.view(h, dh, -1)
      logits = torch.einsum("nhqd,hde,nke->nhqk", q, wk, x_kv) / math.sqrt(dh)
      m = mask[:, None]
      probs = torch.softmax(logits.masked_fill(~m, -1e9), -1) * m
      y = (torch.einsum("nhqk,nke,hde->nhqd", probs, x_kv, wv) +
           probs.sum(-1, keepdim=True) * self.value.bias.view(1, h, 1, dh))
    else:
      y = F.scaled_dot_product_attention(q,
                                         self._split(self.key(x_kv)),
                                         self._split(self.value(x_kv)),
                                         attn_mask=mask[:, None])  # [N, H, Q, dh]
    return self.out(y.transpose(1, 2).reshape(x_q.shape))


class TransformerBlock(nn.Module):
  """Pre-LN self-attention + FFN block: x [N, T, W], mask [N, 1, T] ->
  [N, T, W], or its first `num_queries` rows [N, n, W] (every token still a
  key and value)."""

  def __init__(self, width: int, heads: int, ffn_dim: int):
    super().__init__()
    self.ln_attn = layer_norm(width)
    self.attn = Attention(width, heads)
    self.ln_ffn = layer_norm(width)
    self.ffn = MLP(width, (ffn_dim, width))

  def forward(self, x: Tensor, mask: Tensor, num_queries: int | None = None) -> Tensor:
    kv = self.ln_attn(x)
    h = kv
    if num_queries is not None:
      h, x = kv[:, :num_queries], x[:, :num_queries]
    x = x + self.attn(h, kv, mask, fold=num_queries is not None)
    return x + self.ffn(self.ln_ffn(x))


class TransformerEncoder(nn.Module):
  """`sequence.TransformerEncoder`: query [N, Dq], seq parts ([N, S, w_i] or
  `Gathered`), mask bool [N, S] -> the candidate token [N, width]."""

  def __init__(self, c: ml_collections.ConfigDict, query_dim: int,
               part_widths: tuple[int, ...], max_len: int, query_only: bool):
    super().__init__()
    w = c.width
    self.query_proj = nn.Linear(query_dim, w)
    self.seq_proj = ConcatDense(part_widths, w)
    self.pos = PositionEmbedding(max_len, w)
    self.blocks = [f"block_{i}" for i in range(c.layers)]
    for name in self.blocks:
      self.add_module(name, TransformerBlock(w, c.heads, c.ffn_mult * w))
    self.ln_out = layer_norm(w)
    self.query_only = query_only

  def forward(self, query: Tensor, parts: list, mask: Tensor) -> Tensor:
    x = self.pos(self.seq_proj(parts))
    x = torch.cat([self.query_proj(query)[:, None], x], 1)  # [N, 1+S, W]
    m = torch.cat([torch.ones_like(mask[:, :1]), mask], 1)[:, None]  # [N, 1, 1+S]
    for i, name in enumerate(self.blocks):
      last = self.query_only and i == len(self.blocks) - 1
      x = getattr(self, name)(x, m, 1 if last else None)
    return self.ln_out(x[:, 0])


class FeatureEmbedding(nn.Module):
  """`embedding.FeatureEmbedding`, one shared table: batch -> {'fields'
  [N, F, e], 'seq' [N, S, 3e], 'seq_mask' [N, S], 'candidate' [N, 2e]}."""

  def __init__(self, schema: schema_lib.Schema, e: int, pad_multiple: int):
    super().__init__()
    s = schema
    offsets, rows = embedding_lib.table_layout(s, pad_multiple)
    self.embedding = _param(rows, e)
    if s.dense:
      self.dense_scale = _param(len(s.dense), e)
      self.dense_bias = _param(len(s.dense), e)
    # Each id column's rows of the table: [lo, hi] (ids are clipped into it).
    lo, hi = [], []

    def add(offset: int, vocab: int, n: int) -> None:
      lo.append(np.full(n, offset))
      hi.append(np.full(n, offset + vocab - 1))

    for f in s.categorical:
      add(offsets[f"cat:{f.name}"], f.vocab_size, 1)
    for f in s.multi_hot:
      add(offsets[f"mh:{f.name}"], f.vocab_size, f.max_len)
    add(offsets[f"cat:{s.seq_item_field}"], s.vocab_size(s.seq_item_field), s.seq_len)
    add(offsets[f"cat:{s.seq_category_field}"], s.vocab_size(s.seq_category_field),
        s.seq_len)
    add(offsets["action"], s.num_actions, s.seq_len)
    self.register_buffer("lo", torch.as_tensor(np.concatenate(lo)), persistent=False)
    self.register_buffer("hi", torch.as_tensor(np.concatenate(hi)), persistent=False)
    self.keys = [
        "cat", *(f"mh_{f.name}" for f in s.multi_hot), "seq_item", "seq_category",
        "seq_action"
    ]
    self.sizes = [
        len(s.categorical), *(f.max_len for f in s.multi_hot), s.seq_len, s.seq_len,
        s.seq_len
    ]
    self.num_multi_hot = len(s.multi_hot)
    self.has_dense = bool(s.dense)
    self.item_col = s.categorical_index(s.seq_item_field)
    self.cat_col = s.categorical_index(s.seq_category_field)

  def forward(self, batch: Batch) -> Batch:
    ids = torch.cat([batch[k] for k in self.keys], -1)
    emb = take(self.embedding, torch.clamp(ids + self.lo, self.lo, self.hi))
    parts = emb.split(self.sizes, dim=-2)
    id_parts = ids.split(self.sizes, dim=-1)
    tokens = [parts[0]]  # [N, Fc, e]
    for emb_f, ids_f in zip(parts[1:1 + self.num_multi_hot],
                            id_parts[1:1 + self.num_multi_hot]):
      w = (ids_f > 0).to(emb_f.dtype)[..., None]  # mean over non-padding ids
      tokens.append(((emb_f * w).sum(-2) / w.sum(-2).clamp(min=1.0))[:, None])
    if self.has_dense:
      tokens.append(batch["dense"][..., None] * self.dense_scale + self.dense_bias)
    fields = _cat(tokens, -2)
    return {
        "fields": fields,
        "seq": torch.cat(parts[-3:], -1),
        "seq_mask": batch["seq_item"] > 0,
        "candidate": torch.cat([fields[:, self.item_col], fields[:, self.cat_col]], -1),
    }


def _index(idx: np.ndarray) -> slice | Tensor:
  """A slice when the indices are consecutive (a view, no gather)."""
  idx = np.asarray(idx)
  if (np.diff(idx) == 1).all():
    return slice(int(idx[0]), int(idx[-1]) + 1)
  return torch.as_tensor(idx)


class GroupTokenizer(nn.Module):
  """`interaction.GroupTokenizer`: groups {g: [N, n_g, w_g]} -> [N, T, Dt]."""

  def __init__(self, sizes: dict[str, tuple[int, int]], num_tokens: int,
               token_dim: int):
    super().__init__()
    split = interaction_lib.token_split(sizes, num_tokens)
    self.runs = {}
    for g, (n, w) in sizes.items():
      runs = interaction_lib.token_runs(n, split[g])
      k, r = runs.shape
      self.register_parameter(f"{g}_kernel", _param(k, r * w, token_dim))
      self.register_parameter(f"{g}_bias", _param(k, token_dim))
      # Even runs of consecutive items are a reshape; others gather a zero item.
      self.runs[g] = None if n == k * r else torch.as_tensor(runs)

  def forward(self, groups: Batch) -> Tensor:
    tokens = []
    for g, x in groups.items():
      kernel = getattr(self, f"{g}_kernel")
      n, k = x.shape[0], kernel.shape[0]
      if self.runs[g] is not None:
        x = F.pad(x, (0, 0, 0, 1))[:, self.runs[g]]
      x = x.reshape(n, k, -1)
      tokens.append(
          torch.einsum("ntc,tcd->ntd", x, kernel) + getattr(self, f"{g}_bias"))
    return _cat(tokens, 1)


class RankMixer(nn.Module):
  """`interaction.RankMixer`: groups {g: [N, n_g, w_g]} -> h [N, T Dt]."""

  def __init__(self, sizes: dict[str, tuple[int, int]], c: ml_collections.ConfigDict):
    super().__init__()
    t, dt, f = c.mixer_tokens, c.mixer_token_dim, c.ffn_mult * c.mixer_token_dim
    self.t, self.dt, self.num_layers = t, dt, c.mixer_layers
    self.tokenize = GroupTokenizer(sizes, t, dt)
    for i in range(c.mixer_layers):
      self.add_module(f"ln_mix_{i}", layer_norm(dt))
      self.add_module(f"ln_ffn_{i}", layer_norm(dt))
      self.register_parameter(f"ffn_{i}_kernel1", _param(t, dt, f))
      self.register_parameter(f"ffn_{i}_bias1", _param(t, f))
      self.register_parameter(f"ffn_{i}_kernel2", _param(t, f, dt))
      self.register_parameter(f"ffn_{i}_bias2", _param(t, dt))

  def forward(self, groups: Batch) -> Tensor:
    t, dt = self.t, self.dt
    x = self.tokenize(groups)
    n = x.shape[0]
    for i in range(self.num_layers):
      w1, b1, w2, b2 = (getattr(self, f"ffn_{i}_{p}")
                        for p in ("kernel1", "bias1", "kernel2", "bias2"))
      # Token mixing: [N, T, H=T, Dt/T] -> heads become tokens.
      y = x.reshape(n, t, t, dt // t).transpose(1, 2).reshape(n, t, dt)
      x = getattr(self, f"ln_mix_{i}")(x + y)
      y = gelu(torch.einsum("ntd,tdf->ntf", x, w1) + b1)
      y = torch.einsum("ntf,tfd->ntd", y, w2) + b2
      x = getattr(self, f"ln_ffn_{i}")(x + y)
    return x.reshape(n, t * dt)


class RankerTrunk(nn.Module):
  """`ranker.RankerTrunk`: embedding + sequence encoder + RankMixer."""

  def __init__(self,
               c: ml_collections.ConfigDict,
               schema: schema_lib.Schema,
               query_only: bool,
               iat_width: int | None = None):
    super().__init__()
    e = c.embed_dim
    self.embed = FeatureEmbedding(schema, e, c.vocab_pad_multiple)
    self.seq_encoder = TransformerEncoder(c.seq, 2 * e, (3 * e,), schema.seq_len,
                                          query_only)
    self.groups = {g: _index(idx) for g, idx in schema.group_fields().items()}
    sizes = {g: (len(idx), e) for g, idx in schema.group_fields().items()}
    sizes["seq"] = (1, c.seq.width)
    if iat_width is not None:
      sizes["iat"] = (1, iat_width)
    self.interaction = RankMixer(sizes, c)

  def tokens(self, batch: Batch) -> Batch:
    """batch -> {'fields' [N, F, e], 'seq' [N, 1, w]}."""
    emb = self.embed(batch)
    seq = self.seq_encoder(emb["candidate"], [emb["seq"]], emb["seq_mask"])
    return {"fields": emb["fields"], "seq": seq[:, None]}

  def interact(self, tokens: Batch, iat_token: Tensor | None = None) -> Tensor:
    """tokens (+ the IAT token [N, w_iat]) -> h [N, D]."""
    groups = {g: tokens["fields"][:, idx] for g, idx in self.groups.items()}
    groups["seq"] = tokens["seq"]
    if iat_token is not None:
      groups["iat"] = iat_token[:, None]
    return self.interaction(groups)

  def forward(self, batch: Batch) -> Tensor:
    return self.interact(self.tokens(batch))


class Heads(nn.Module):
  """h [N, D] -> logits [N, num_tasks]."""

  def __init__(self, d: int, num_tasks: int):
    super().__init__()
    self.logits = nn.Linear(d, num_tasks)

  def forward(self, h: Tensor) -> Tensor:
    return self.logits(h)


def _width(c: ml_collections.ConfigDict) -> int:
  """D, the width of h (RankMixer)."""
  return c.mixer_tokens * c.mixer_token_dim


class Ranker(nn.Module):
  """`ranker.Ranker`: batch [B, ...] -> logits [B, num_tasks]."""

  def __init__(self, c, schema, query_only: bool):
    super().__init__()
    self.trunk = RankerTrunk(c, schema, query_only)
    self.heads = Heads(_width(c), schema.num_tasks)

  def forward(self, batch: Batch) -> Tensor:
    return self.heads(self.trunk(batch))


class TemporalSource(nn.Module):
  """`source.TemporalSource`: batch [B, ...] -> logits of the decompressed
  InsEmb [B, num_tasks]."""

  def __init__(self, c, schema, query_only: bool):
    super().__init__()
    self.trunk = RankerTrunk(c, schema, query_only)
    # e = gelu(h W_c + b_c) (`source.Compress`); h' = MLP(e) (`source.Decompress`).
    self.compress = nn.ModuleDict({"dense": nn.Linear(_width(c), c.insemb_dim)})
    self.decompress = nn.ModuleDict(
        {"mlp": MLP(c.insemb_dim, (c.decompress_hidden, _width(c)))})
    self.heads = Heads(_width(c), schema.num_tasks)

  def forward(self, batch: Batch) -> Tensor:
    e = gelu(self.compress["dense"](self.trunk(batch)))
    return self.heads(self.decompress["mlp"](e))


class IATBranch(nn.Module):
  """`iat.IATBranch`: candidate tokens + history -> IAT token [B, w_iat].

  fold: `layers.Linear` parts (config.model.fold_linear): adapt's last layer
  and the label embedding folded into 'seq_proj', the gap table projected
  before its gather; else each map applied in turn.
  """

  def __init__(self, c, schema, query_only: bool, fold: bool):
    super().__init__()
    e, n_fields = c.embed_dim, len(schema.field_names())
    self.num_gaps = c.num_gap_buckets
    self.fold = fold
    self.adapt = MLP(c.insemb_dim, (c.adapt_dim, c.adapt_dim))
    self.label_embed = nn.Linear(2 * schema.num_tasks, c.side_dim)
    self.embedding = _param(c.num_gap_buckets, c.side_dim)
    self.query = MLP(n_fields * e + c.seq.width, (c.iat_query_dim, c.iat_query_dim))
    self.encoder = TransformerEncoder(c.iat, c.iat_query_dim,
                                      (c.adapt_dim, c.side_dim, c.side_dim), c.hist_len,
                                      query_only)

  def forward(self, tokens: Batch, batch: Batch) -> Tensor:
    fold = self.fold
    if "hist_insemb_unique" in batch:  # distinct rows [R, d] + index [B, L]
      parts = [
          Gathered(self.adapt(batch["hist_insemb_unique"], fold), batch["hist_index"])
      ]
    else:  # [B, L, d]
      parts = [self.adapt(batch["hist_insemb"], fold)]
    labels = batch["hist_labels"]
    labels = torch.cat([labels, batch["hist_label_known"].to(labels.dtype)], -1)
    parts.append(Linear(labels, self.label_embed) if fold else self.label_embed(labels))
    gap = batch["hist_gap"].clamp(0, self.num_gaps - 1)
    parts.append(Gathered(self.embedding, gap) if fold else take(self.embedding, gap))
    b = labels.shape[0]
    cand = torch.cat([tokens["fields"].reshape(b, -1), tokens["seq"].reshape(b, -1)],
                     -1)
    return self.encoder(self.query(cand), parts, batch["hist_mask"])


class Downstream(nn.Module):
  """`iat.Downstream`: batch [B, ...] + hist_* -> logits [B, num_tasks]."""

  def __init__(self, c, schema, query_only: bool, fold: bool = False):
    super().__init__()
    self.trunk = RankerTrunk(c, schema, query_only, iat_width=c.iat.width)
    self.iat = IATBranch(c, schema, query_only, fold)
    self.heads = Heads(_width(c), schema.num_tasks)

  def forward(self, batch: Batch) -> Tensor:
    tokens = self.trunk.tokens(batch)
    return self.heads(self.trunk.interact(tokens, self.iat(tokens, batch)))


MODELS = {"base": Ranker, "source_temporal": TemporalSource, "downstream": Downstream}


def _get(c: ml_collections.ConfigDict, key: str) -> Any:
  for part in key.split("."):
    c = c[part]
  return c


def build(stage: str, config: ml_collections.ConfigDict, schema: schema_lib.Schema,
          algorithm: str) -> nn.Module:
  """The twin of `stage`'s model; its parameters are the JAX model's only
  after `load_flax_params`."""
  for key, want in SUPPORTED.items():
    if _get(config.model, key) != want:
      raise ValueError(f"--config.model.{key}={_get(config.model, key)!r}: the "
                       f"twin implements only {want!r}")
  if stage not in MODELS or algorithm not in ALGORITHMS:
    raise ValueError(f"stage {stage!r}, algorithm {algorithm!r}: the twin has "
                     f"{tuple(MODELS)} x {ALGORITHMS}")
  same = algorithm == "same"
  if stage == "downstream":  # the only stage with linear chains to fold
    return Downstream(config.model,
                      schema,
                      query_only=same,
                      fold=same and config.model.fold_linear)
  return MODELS[stage](config.model, schema, query_only=same)


def torch_name(path: tuple[str, ...]) -> tuple[str, bool]:
  """Flax param path -> (torch parameter name, whether it is transposed)."""
  *head, leaf = path
  if leaf in ("kernel", "scale"):
    return ".".join([*head, "weight"]), leaf == "kernel"
  return ".".join(path), False


def _flat(params) -> list[tuple[tuple[str, ...], Any]]:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return [(tuple(k.key for k in path), x) for path, x in leaves]


def load_flax_params(model: nn.Module, params) -> None:
  """Copies a flax params tree (`train_lib.Run(...).state.params`) into the
  twin; raises if any name or shape differs."""
  state = {}
  for path, x in _flat(jax.device_get(params)):
    name, transposed = torch_name(path)
    x = np.asarray(x, np.float32)
    state[name] = torch.from_numpy(np.array(x.T if transposed else x, order="C"))
  model.load_state_dict(state, strict=True)


def to_flax(model: nn.Module, like, grad: bool = False):
  """The twin's parameters (or their gradients) as a tree shaped like the
  flax params tree `like` (numpy float32). A parameter the step did not use
  (a folded attention's key bias) has a zero gradient, as in JAX."""

  def value(path, _):
    name, transposed = torch_name(tuple(k.key for k in path))
    p = model.get_parameter(name)
    x = p if not grad else torch.zeros_like(p) if p.grad is None else p.grad
    x = x.detach().numpy()
    return x.T if transposed else x

  return jax.tree_util.tree_map_with_path(value, like)


def torch_batch(batch: dict, algorithm: str) -> Batch:
  """A host batch (numpy, as the JAX step's) -> the twin's inputs.

  Integer arrays become int64. History InsEmbs come in either layout of
  `input_pipeline.LookupInsEmb`: dense (hist_insemb [B, L, d], kept as it
  is) or deduplicated (hist_insemb_unique [G, U, d], hist_index [B, L] into
  block b // (B / G)), which becomes for 'full' hist_insemb [B, L, d]; for
  'same' hist_insemb_unique [G U, d] + hist_index [B, L] into it.
  """
  batch = steps.model_inputs(batch)
  if "hist_insemb_unique" in batch:
    rows, index = batch.pop("hist_insemb_unique"), batch.pop("hist_index")
    g, u, d = rows.shape
    block = np.arange(len(index)) // (len(index) // g)
    flat, rows = index + u * block[:, None], rows.reshape(g * u, d)
    if algorithm == "full":
      batch["hist_insemb"] = rows[flat]
    else:
      batch.update(hist_insemb_unique=rows, hist_index=flat)
  return {k: _tensor(np.asarray(v)) for k, v in batch.items()}


def _tensor(x: np.ndarray) -> Tensor:
  return torch.as_tensor(x.astype(np.int64) if x.dtype.kind in "iu" else x)


def task_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
  """Sum over tasks of sigmoid BCE, mean over real instances: scalar."""
  bce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").sum(-1)
  m = mask.to(bce.dtype)
  return (bce * m).sum() / m.sum().clamp(min=1.0)


def lr_factor(warmup: int, decay_steps: int, step: int) -> float:
  """optax.warmup_cosine_decay_schedule(0, 1, warmup, decay_steps) at `step`."""
  if step < warmup:
    return step / warmup
  t = min(step - warmup, decay_steps - warmup)
  return 0.5 * (1.0 + math.cos(math.pi * t / (decay_steps - warmup)))


class TrainStep:
  """`steps.make_train_step` + `steps.make_optimizer` in eager PyTorch:
  step(batch) -> loss (a scalar tensor), updating the model in place.

  clip_grad_norm_ scales by max_norm / (norm + 1e-6), optax by max_norm / norm.
  """

  def __init__(self, model: nn.Module, config: ml_collections.ConfigDict,
               num_steps: int):
    opt = config.optimizer
    self.model = model
    self.params = list(model.parameters())
    self.clip = opt.grad_clip_norm
    # optax.adamw's defaults; the fused CPU kernel is torch's fastest here.
    self.opt = torch.optim.AdamW(self.params,
                                 lr=opt.learning_rate,
                                 betas=(0.9, 0.999),
                                 eps=1e-8,
                                 weight_decay=opt.weight_decay,
                                 fused=True)
    warmup = min(opt.warmup_steps, max(num_steps - 1, 0))
    self.schedule = torch.optim.lr_scheduler.LambdaLR(
        self.opt, functools.partial(lr_factor, warmup, max(num_steps, warmup + 1)))

  def __call__(self, batch: Batch) -> Tensor:
    self.opt.zero_grad(set_to_none=True)
    loss = task_loss(self.model(batch), batch["labels"], batch["mask"])
    loss.backward()
    if self.clip > 0:
      torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()
    self.schedule.step()
    return loss.detach()
