"""Feature interaction: named token groups {g: [N, n_g, w_g]} -> h [N, D].

The groups come in order: the user, item and context field groups
(`schema.Schema.group_fields`), the behaviour-sequence token and, in the
downstream model, the IAT token (`ranker.RankerTrunk.interact`); an empty group
(n_g = 0) is left out.

  'rankmixer' RankMixer (Zhu et al., 2025). Tokenization by semantic groups
              (`GroupTokenizer`): group g gets k_g >= 1 of the T tokens; its
              n_g items (field embeddings, or the one sequence / IAT token) are
              cut into k_g runs of consecutive items, as even as possible, each
              zero-padded to r_g = ceil(n_g / k_g) items, flattened and projected
              by its own weights to `token_dim` -> [N, T, Dt]. No token mixes two groups and no item
              is cut, so the sequence and the IAT token (n_g = 1) reach exactly
              one token each. T (--config.model.mixer_tokens) must be at least
              the number of groups and at most the number of items; the T - G
              tokens beyond one per group go one at a time to the group whose
              runs are widest (r_g * w_g; ties to the earlier group). (The
              paper concatenates the groups in order and cuts the vector into T
              equal chunks, so a chunk can straddle two groups, e.g. the IAT
              token and the last fields; here the cuts follow the groups.) Each layer: token mixing (split every token into T heads,
              new token h = the h-th heads of all tokens concatenated;
              parameter-free), residual + LayerNorm, then per-token FFNs
              (separate weights per token), residual + LayerNorm.
              h = flatten -> D = T * Dt.
  'mlp'       flatten + concat in group order -> MLP with widths `mlp_dims`;
              D = mlp_dims[-1].
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from iat_jax import errors
from iat_jax.models import layers

Array = jax.Array
Groups = Mapping[str, Array]

INTERACTIONS = ("rankmixer", "mlp")

_LECUN = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
_ZEROS = nn.initializers.zeros_init()


def _flat_concat(groups: Groups) -> Array:
  return jnp.concatenate([t.reshape(t.shape[0], -1) for t in groups.values()], axis=-1)


def _param(module: nn.Module, name, shape, axes, init, dtype) -> Array:
  p = module.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
  return p.astype(dtype)


def token_split(sizes: Mapping[str, tuple[int, int]],
                num_tokens: int) -> dict[str, int]:
  """Tokens k_g of each group (see the module docstring).

  Args:
    sizes: {g: (n_g items, item width w_g)} of the non-empty groups, in order.
    num_tokens: T.

  Returns:
    {g: k_g}, same order, summing to T.
  """
  items = sum(n for n, _ in sizes.values())
  if not len(sizes) <= num_tokens <= items:
    raise errors.ConfigError(
        f"model.mixer_tokens={num_tokens}", f"RankMixer gives each of the "
        f"{len(sizes)} feature groups {tuple(sizes)} its own tokens without cutting "
        f"any of their {items} items (fields, sequence token, IAT token), so it "
        f"must be between {len(sizes)} and {items}")
  split = dict.fromkeys(sizes, 1)
  for _ in range(num_tokens - len(sizes)):
    run = {g: -(-n // split[g]) * w for g, (n, w) in sizes.items() if split[g] < n}
    split[max(run, key=run.get)] += 1
  return split


def token_runs(m: int, k: int) -> np.ndarray:
  """Item indices [k, ceil(m / k)] of k runs of consecutive items, sizes as even
  as possible; m (one past the last item) pads the shorter runs."""
  out = np.full((k, -(-m // k)), m)
  for j, part in enumerate(np.array_split(np.arange(m), k)):
    out[j, :len(part)] = part
  return out


class GroupTokenizer(nn.Module):
  """Groups {g: [N, n_g, w_g]} -> tokens [N, T, Dt]; group g fills k_g
  consecutive tokens, in group order (`token_split`)."""
  # Number of tokens T.
  num_tokens: int
  # Width Dt of each token.
  token_dim: int
  # Compute dtype.
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, groups: Groups) -> Array:
    groups = {g: x for g, x in groups.items() if x.shape[1]}
    split = token_split({g: x.shape[1:] for g, x in groups.items()}, self.num_tokens)
    tokens = []
    for g, x in groups.items():
      n, m, w = x.shape
      runs = token_runs(m, split[g])  # [k, r]; m = the zero item
      x = jnp.pad(x.astype(self.dtype), [(0, 0), (0, 1), (0, 0)])[:, runs]
      k, r = runs.shape
      kernel = _param(self, f"{g}_kernel", (k, r * w, self.token_dim),
                      ("tokens", "embed", "mlp"), _LECUN, self.dtype)
      bias = _param(self, f"{g}_bias", (k, self.token_dim), ("tokens", "mlp"), _ZEROS,
                    self.dtype)
      tokens.append(jnp.einsum("ntc,tcd->ntd", x.reshape(n, k, r * w), kernel) + bias)
    return jnp.concatenate(tokens, axis=1)


class RankMixer(nn.Module):
  """RankMixer: groups {g: [N, n_g, w_g]} -> h [N, num_tokens * token_dim]."""
  # Number of tokens T (also the number of mixing heads).
  num_tokens: int = 8
  # Width Dt of each token; must be divisible by num_tokens.
  token_dim: int = 32
  # Number of RankMixer layers.
  num_layers: int = 1
  # Per-token FFN hidden width = ffn_mult * token_dim.
  ffn_mult: int = 2
  # Dropout on the FFN branch.
  dropout_rate: float = 0.0
  # Compute dtype.
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, groups: Groups, *, train: bool = False) -> Array:
    t, dt = self.num_tokens, self.token_dim
    if dt % t:
      raise ValueError(f"token_dim {dt} must be divisible by num_tokens {t}")
    x = GroupTokenizer(t, dt, self.dtype, name="tokenize")(groups)
    n = x.shape[0]
    x = layers.constrain(x, "batch", None, None)
    f = self.ffn_mult * dt
    for i in range(self.num_layers):
      # Token mixing: [N, T, H=T, dt/T] -> heads become tokens.
      y = x.reshape(n, t, t, dt // t).swapaxes(1, 2).reshape(n, t, dt)
      x = layers.layer_norm(dtype=self.dtype, name=f"ln_mix_{i}")(x + y)
      w1 = _param(self, f"ffn_{i}_kernel1", (t, dt, f), ("tokens", "embed", "mlp"),
                  _LECUN, self.dtype)
      b1 = _param(self, f"ffn_{i}_bias1", (t, f), ("tokens", "mlp"), _ZEROS, self.dtype)
      w2 = _param(self, f"ffn_{i}_kernel2", (t, f, dt), ("tokens", "mlp", "embed"),
                  _LECUN, self.dtype)
      b2 = _param(self, f"ffn_{i}_bias2", (t, dt), ("tokens", "embed"), _ZEROS,
                  self.dtype)
      y = nn.gelu(jnp.einsum("ntd,tdf->ntf", x, w1) + b1)
      y = jnp.einsum("ntf,tfd->ntd", y, w2) + b2
      y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
      x = layers.layer_norm(dtype=self.dtype, name=f"ln_ffn_{i}")(x + y)
    return x.reshape(n, t * dt)


class MLPInteraction(nn.Module):
  """Flatten + concat -> MLP: groups {g: [N, n_g, w_g]} -> h [N, mlp_dims[-1]]."""
  # Layer widths; the last is D.
  mlp_dims: Sequence[int] = (256,)
  # Dropout after each layer.
  dropout_rate: float = 0.0
  # Compute dtype.
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, groups: Groups, *, train: bool = False) -> Array:
    x = _flat_concat(groups).astype(self.dtype)
    return layers.MLP(tuple(self.mlp_dims),
                      act="gelu",
                      act_last=True,
                      dropout_rate=self.dropout_rate,
                      dtype=self.dtype,
                      name="mlp")(x, train=train)
