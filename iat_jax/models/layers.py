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
  return nn.Dense(
      features,
      dtype=dtype,
      param_dtype=jnp.float32,
      use_bias=use_bias,
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
      name=name,
  )


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

  @nn.compact
  def __call__(self, x: Array, *, train: bool = False) -> Array:
    fn = activation(self.act)
    for i, f in enumerate(self.features):
      x = dense(f, dtype=self.dtype, name=f"dense_{i}")(x)
      if i < len(self.features) - 1 or self.act_last:
        x = fn(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    return x
