"""Device mesh, logical axis rules and sharded initialization.

Parameters and activations carry logical axis names (see
`iat_jax.models.layers`); `LOGICAL_AXIS_RULES` maps them onto a
('data', 'model') mesh: the batch over 'data', embedding-table rows ('vocab')
over 'model', everything else replicated.

Building a sharded state (house order):
  1. `jax.eval_shape(init_fn)`               abstract boxed variables
  2. `nn.get_partition_spec`                 logical PartitionSpecs
  3. `nn.logical_to_mesh_sharding(.., rules)` NamedShardings
  4. `jax.jit(init_fn, out_shardings=...)`   params created in place
  5. unbox                                    plain arrays
`init_sharded` does all five. Activation constraints inside the models
(`nn.with_logical_constraint`) only take effect while a mesh is set with
`jax.set_mesh` (the legacy `with mesh:` does not set it) and the rules are
active: trace steps under `mesh_context(mesh, rules)`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

# Logical axis -> mesh axis (None = replicated). Names not listed are
# replicated as well.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("vocab", "model"),
    ("embed", None),
    ("mlp", None),
    ("heads", None),
    ("tokens", None),
)


def make_mesh(mesh_shape: Sequence[int] = (-1, 1),
              axis_names: Sequence[str] = ("data", "model"),
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """A mesh over `devices` (default: all); one -1 entry is filled in.

  Axes are `Auto` (GSPMD propagation), like lm1b's meshes.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = list(mesh_shape)
  if len(shape) != len(axis_names):
    raise ValueError(f"mesh_shape {tuple(mesh_shape)} and axis_names "
                     f"{tuple(axis_names)} differ in length")
  if shape.count(-1) > 1:
    raise ValueError(f"at most one -1 in mesh_shape, got {tuple(mesh_shape)}")
  known = int(np.prod([s for s in shape if s != -1]))
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not fill mesh_shape "
                       f"{tuple(mesh_shape)}")
    shape[shape.index(-1)] = len(devices) // known
  if int(np.prod(shape)) != len(devices):
    raise ValueError(f"mesh_shape {tuple(shape)} needs {int(np.prod(shape))} "
                     f"devices, have {len(devices)}")
  return jax.make_mesh(
      tuple(shape), tuple(axis_names),
      axis_types=(jax.sharding.AxisType.Auto,) * len(shape), devices=devices)


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh,
                 rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
                 ) -> Iterator[None]:
  """Sets the mesh (`jax.set_mesh`) and the logical axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def param_shardings(abstract_boxed_params: Any, mesh: jax.sharding.Mesh,
                     rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
                     ) -> Any:
  """NamedShardings for a (boxed, usually abstract) variables/params tree.

  Leaves without logical names are replicated. The result has the structure
  of the unboxed tree.
  """
  specs = nn.get_partition_spec(abstract_boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading axis over 'data', the rest replicated."""
  return NamedSharding(mesh, P("data"))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Fully replicated sharding."""
  return NamedSharding(mesh, P())


def shard_batch(batch: dict[str, Any], mesh: jax.sharding.Mesh
                ) -> dict[str, jax.Array]:
  """Places a (single-process) host batch with `batch_sharding`."""
  s = batch_sharding(mesh)
  return {k: jax.device_put(np.asarray(v), s) for k, v in batch.items()}


def init_sharded(model: nn.Module, batch: dict[str, Any], rng: jax.Array,
                 mesh: jax.sharding.Mesh,
                 rules: Sequence[tuple[str, Any]] = LOGICAL_AXIS_RULES
                 ) -> tuple[Any, Any]:
  """Initializes `model`'s params directly in their shardings.

  Args:
    model: a Flax module whose params carry logical axis names.
    batch: an example batch (arrays or ShapeDtypeStructs) with real shapes.
    rng: PRNG key for the parameters.
    mesh: the device mesh.
    rules: logical axis rules.

  Returns:
    (params, shardings): unboxed params (plain jax.Arrays, placed on their
    shardings) and the matching tree of NamedShardings.
  """

  def init_fn(rng, batch):
    return model.init({"params": rng, "dropout": rng}, batch,
                      train=False)["params"]

  with mesh_context(mesh, rules):
    abstract = jax.eval_shape(init_fn, rng, batch)
    shardings = param_shardings(abstract, mesh, rules)
    batch_s = jax.tree_util.tree_map(lambda _: batch_sharding(mesh), batch)
    params = jax.jit(lambda r, b: nn.meta.unbox(init_fn(r, b)),
                     in_shardings=(replicated(mesh), batch_s),
                     out_shardings=shardings)(rng, batch)
  return params, shardings
