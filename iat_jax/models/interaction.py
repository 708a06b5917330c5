"""Feature interaction: a list of token groups -> h [N, D].

  'rankmixer' RankMixer (Zhu et al., 2025). Tokenization: all input tokens are
              flattened and concatenated ([N, C]), zero-padded to T equal
              chunks and each chunk gets its own projection to `token_dim`
              (semantic-group tokenization) -> [N, T, Dt]. Each layer: token
              mixing (split every token into T heads, new token h = the h-th
              heads of all tokens concatenated; parameter-free), residual +
              LayerNorm, then per-token FFNs (separate weights per token),
              residual + LayerNorm. h = flatten -> D = T * Dt.
  'mlp'       flatten + concat -> MLP with widths `mlp_dims`; D = mlp_dims[-1].

The input groups may have different widths ([N, n_i, w_i]); extra tokens (the
IAT token) are simply one more group.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from iat_jax.models import layers

Array = jax.Array

INTERACTIONS = ("rankmixer", "mlp")


def _flat_concat(tokens: Sequence[Array]) -> Array:
  return jnp.concatenate([t.reshape(t.shape[0], -1) for t in tokens], axis=-1)


class RankMixer(nn.Module):
  """RankMixer: [N, n_i, w_i] groups -> h [N, num_tokens * token_dim]."""
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

  def _param(self, name, shape, axes, init):
    p = self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
    return p.astype(self.dtype)

  @nn.compact
  def __call__(self, tokens: Sequence[Array], *, train: bool = False) -> Array:
    t, dt = self.num_tokens, self.token_dim
    if dt % t:
      raise ValueError(f"token_dim {dt} must be divisible by num_tokens {t}")
    x = _flat_concat(tokens).astype(self.dtype)  # [N, C]
    n, c = x.shape
    chunk = -(-c // t)
    x = jnp.pad(x, [(0, 0), (0, chunk * t - c)]).reshape(n, t, chunk)
    lecun = nn.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
    zeros = nn.initializers.zeros_init()
    w_tok = self._param("tokenize_kernel", (t, chunk, dt), ("tokens", "embed", "mlp"),
                        lecun)
    b_tok = self._param("tokenize_bias", (t, dt), ("tokens", "mlp"), zeros)
    x = jnp.einsum("ntc,tcd->ntd", x, w_tok) + b_tok
    x = layers.constrain(x, "batch", None, None)
    f = self.ffn_mult * dt
    for i in range(self.num_layers):
      # Token mixing: [N, T, H=T, dt/T] -> heads become tokens.
      y = x.reshape(n, t, t, dt // t).swapaxes(1, 2).reshape(n, t, dt)
      x = layers.layer_norm(dtype=self.dtype, name=f"ln_mix_{i}")(x + y)
      w1 = self._param(f"ffn_{i}_kernel1", (t, dt, f), ("tokens", "embed", "mlp"),
                       lecun)
      b1 = self._param(f"ffn_{i}_bias1", (t, f), ("tokens", "mlp"), zeros)
      w2 = self._param(f"ffn_{i}_kernel2", (t, f, dt), ("tokens", "mlp", "embed"),
                       lecun)
      b2 = self._param(f"ffn_{i}_bias2", (t, dt), ("tokens", "embed"), zeros)
      y = nn.gelu(jnp.einsum("ntd,tdf->ntf", x, w1) + b1)
      y = jnp.einsum("ntf,tfd->ntd", y, w2) + b2
      y = nn.Dropout(self.dropout_rate)(y, deterministic=not train)
      x = layers.layer_norm(dtype=self.dtype, name=f"ln_ffn_{i}")(x + y)
    return x.reshape(n, t * dt)


class MLPInteraction(nn.Module):
  """Flatten + concat -> MLP: [N, n_i, w_i] groups -> h [N, mlp_dims[-1]]."""
  # Layer widths; the last is D.
  mlp_dims: Sequence[int] = (256,)
  # Dropout after each layer.
  dropout_rate: float = 0.0
  # Compute dtype.
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Sequence[Array], *, train: bool = False) -> Array:
    x = _flat_concat(tokens).astype(self.dtype)
    return layers.MLP(tuple(self.mlp_dims),
                      act="gelu",
                      act_last=True,
                      dropout_rate=self.dropout_rate,
                      dtype=self.dtype,
                      name="mlp")(x, train=train)
