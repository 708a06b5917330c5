"""Small building blocks shared by every model family.

Every parameter is created float32 (`param_dtype`) and carries logical axis
names through `nn.with_logical_partitioning`, so `iat_jax.sharding` can map it
onto a mesh. Computation runs in the module's `dtype` (float32 or bfloat16).

Logical axis names used by the models:
  'vocab'  rows of an embedding table (sharded over the `model` mesh axis)
  'embed'  the model width of a layer input
  'mlp'    a hidden / output width of a dense layer
  'heads'  attention heads x head width
  'tokens' a per-token parameter axis (RankMixer per-token FFNs)
  'batch'  the leading axis of activations (sharded over the `data` axis)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any

_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "tanh": jnp.tanh,
    "sigmoid": nn.sigmoid,
    "identity": lambda x: x,
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def activation(name: str) -> Callable[[Array], Array]:
  """Activation function by name."""
  try:
    return _ACTIVATIONS[name]
  except KeyError:
    raise ValueError(
        f"unknown activation {name!r}; allowed: {sorted(_ACTIVATIONS)}") from None


def compute_dtype(name: str) -> Dtype:
  """Compute dtype from its config name ('float32' or 'bfloat16')."""
  try:
    return _DTYPES[name]
  except KeyError:
    raise ValueError(
        f"unknown compute dtype {name!r}; allowed: {sorted(_DTYPES)}") from None


def dense(
    features: int,
    *,
    dtype: Dtype = jnp.float32,
    axes: tuple[str | None, str | None] = ("embed", "mlp"),
    use_bias: bool = True,
    name: str | None = None,
) -> nn.Dense:
  """A `nn.Dense` whose kernel [in, out] and bias [out] carry logical axes."""
  kernel_init, bias_init = _dense_inits(axes)
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      use_bias=use_bias,
      kernel_init=kernel_init,
      bias_init=bias_init,
      name=name,
  )


def _dense_inits(axes: tuple[str | None, str | None]) -> tuple[Callable, Callable]:
  """`dense`'s kernel and bias initializers, with their logical axes."""
  return (nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
          nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


@dataclasses.dataclass(frozen=True)
class Linear:
  """A feature part given as the affine map still to apply: x @ kernel + bias.

  x [..., w_in], kernel [w_in, w] and bias [w] (float32 parameters); the part
  is [..., w]. `ConcatDense` folds the map into its own kernel slice, so the
  product of the two maps costs w_in x w per row instead of w_in x w + w x
  features. Made by `DeferredDense` (and `MLP(defer_last=True)`).
  """
  x: Array
  kernel: Array
  bias: Array

  @property
  def width(self) -> int:
    return self.kernel.shape[-1]


@dataclasses.dataclass(frozen=True)
class Gathered:
  """A [B, ...] feature part given as distinct rows and an index into them.

  rows [G, U, w] (an array or a `Linear`): the distinct rows of each of G
  blocks of B / G consecutive leading rows (G sharded like the batch; G = 1
  for a table every row reads); index int [B, ...]: row b reads
  rows[b // (B / G)][index[b, ...]]. The part is that gather, [B, ..., w].
  """
  rows: Array | Linear
  index: Array

  @property
  def width(self) -> int:
    return self.rows.width if isinstance(self.rows, Linear) else self.rows.shape[-1]

  def take(self, rows: Array) -> Array:
    """Gathers [G, U, f] rows (a function of `self.rows`) -> [B, ..., f]; each
    block reads its own rows, so nothing crosses devices."""
    g = rows.shape[0]
    b = self.index.shape[0]
    index = self.index.reshape((g, b // g) + self.index.shape[1:])
    out = jax.vmap(functools.partial(jnp.take, axis=0))(rows, index)
    return out.reshape((b,) + out.shape[2:])


class DeferredDense(nn.Module):
  """`dense`'s parameters (names, init, logical axes), unapplied: x [..., in]
  -> `Linear`(x, kernel [in, features], bias [features]) for `ConcatDense` to
  fold. The parameter tree is `dense`'s, so the two are interchangeable."""
  # Output width.
  features: int
  # Logical axes of the kernel [in, out].
  axes: tuple[str | None, str | None] = ("embed", "mlp")

  @nn.compact
  def __call__(self, x: Array) -> Linear:
    kernel_init, bias_init = _dense_inits(self.axes)
    kernel = self.param("kernel", kernel_init, (x.shape[-1], self.features),
                        jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    return Linear(x, kernel, bias)


class ConcatDense(nn.Module):
  """`dense` of concat(parts, axis=-1), without building the concatenation.

  parts: an array [..., w], or a sequence of parts of one leading shape
  (once gathered), each an array [..., w_i], a `Linear` or a `Gathered`. The
  kernel [sum w_i, features] and bias [features] are `dense`'s (names, init,
  logical axes), so the parameter tree is the same as for the concatenated
  input; the output [..., features] is the same function, up to the float
  rounding of a sum of per-part products:
    array    part @ k_i  (k_i: the kernel's rows of part i);
    Linear   x @ (kernel @ k_i) + bias @ k_i, the two maps folded at compute
             time (in float32, once per call): the parameters, their
             gradients (through the product) and the optimizer are unchanged;
    Gathered its rows projected, then gathered: G U rows instead of B x ....
  """
  # Output width.
  features: int
  # Compute dtype.
  dtype: Dtype = jnp.float32
  # Logical axes of the kernel [in, out].
  axes: tuple[str | None, str | None] = ("embed", "mlp")

  @nn.compact
  def __call__(self, parts) -> Array:
    if not isinstance(parts, (list, tuple)):
      parts = [parts]
    widths = [
        p.width if isinstance(p, (Linear, Gathered)) else p.shape[-1] for p in parts
    ]
    kernel_init, bias_init = _dense_inits(self.axes)
    kernel = self.param("kernel", kernel_init, (sum(widths), self.features),
                        jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    out, start = None, 0
    for part, w in zip(parts, widths):
      y = self._project(part, kernel[start:start + w])
      out = y if out is None else out + y
      start += w
    return out + bias.astype(self.dtype)

  def _project(self, part, k: Array) -> Array:
    """part [..., w] @ k [w, features] (float32) -> [..., features]."""
    if isinstance(part, Gathered):
      return part.take(self._project(part.rows, k))
    if isinstance(part, Linear):
      w = jnp.dot(part.kernel, k).astype(self.dtype)
      return jnp.dot(part.x.astype(self.dtype), w) + jnp.dot(part.bias, k).astype(
          self.dtype)
    return jnp.dot(part.astype(self.dtype), k.astype(self.dtype))


def layer_norm(*, dtype: Dtype = jnp.float32, name: str | None = None) -> nn.LayerNorm:
  """A `nn.LayerNorm` over the last axis with logically named scale/bias."""
  return nn.LayerNorm(
      dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
      name=name,
  )


def constrain(x: Array, *names: str | None) -> Array:
  """Logical sharding constraint on an activation; no-op without rules/mesh."""
  return nn.with_logical_constraint(x, names)


def flatten_leading(x: Array, n: int) -> Array:
  """Merges the first `n` axes: [d0, ..., d(n-1), ...] -> [d0*...*d(n-1), ...]."""
  return x.reshape((-1,) + x.shape[n:])


class MLP(nn.Module):
  """Stack of dense layers: [..., in] -> [..., features[-1]]."""
  # Widths of the layers; the last entry is the output width.
  features: Sequence[int]
  # Activation between layers (see `activation`).
  act: str = "gelu"
  # Whether the activation also follows the last layer.
  act_last: bool = False
  # Dropout after each activation (needs a 'dropout' rng when training).
  dropout_rate: float = 0.0
  # Compute dtype.
  dtype: Dtype = jnp.float32
  # Return the last layer unapplied, a `Linear` for `ConcatDense` to fold
  # (needs act_last False); the parameter tree is the same.
  defer_last: bool = False

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array | Linear:
    fn = activation(self.act)
    for i, f in enumerate(self.features):
      if self.defer_last and i == len(self.features) - 1 and not self.act_last:
        return DeferredDense(f, name=f"dense_{i}")(x)
      x = dense(f, dtype=self.dtype, name=f"dense_{i}")(x)
      if i < len(self.features) - 1 or self.act_last:
        x = fn(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return x
