"""Device mesh and logical-axis-rule mechanism.

Parameters and activations carry logical axis names (see
`iat_jax.models.layers`); the run config's `logical_axis_rules` map them onto
the mesh of `mesh_axes` x `mesh_shape` (see `iat_jax.configs`). This module
holds only the mechanism: building the mesh, turning logical specs into
NamedShardings, and the context the steps are traced in. The sharded state is
built in `iat_jax.train.steps.create_state` (eval_shape -> partition specs ->
shardings -> jit with out_shardings -> unbox).

Activation constraints inside the models (`nn.with_logical_constraint`) only
take effect while a mesh is set with `jax.set_mesh` (the legacy `with mesh:`
does not set it) and the rules are active: trace steps under
`mesh_context(mesh, rules)`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

Rules = Sequence[tuple[str, Any]]


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
  return jax.make_mesh(tuple(shape),
                       tuple(axis_names),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(shape),
                       devices=devices)


@contextlib.contextmanager
def mesh_context(mesh: jax.sharding.Mesh, rules: Rules) -> Iterator[None]:
  """Sets the mesh (`jax.set_mesh`) and the logical axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def param_shardings(abstract_boxed_params: Any, mesh: jax.sharding.Mesh,
                    rules: Rules) -> Any:
  """NamedShardings for a (boxed, usually abstract) variables/params tree.

  Leaves without logical names are replicated. The result has the structure
  of the unboxed tree.
  """
  specs = nn.get_partition_spec(abstract_boxed_params)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Leading axis over 'data', the rest replicated."""
  return NamedSharding(mesh, P("data"))


@functools.lru_cache(maxsize=16)
def _block_layout(mesh: jax.sharding.Mesh) -> tuple[dict, dict]:
  """({process: the blocks it holds}, {process: the blocks it owns}) of a
  `batch_sharding` array over `mesh`: one pass over the devices, once per
  mesh (the batch loop asks for it every step)."""
  axis = mesh.axis_names.index("data")
  held: dict[int, set] = {}
  for i in np.ndindex(mesh.devices.shape):
    held.setdefault(mesh.devices[i].process_index, set()).add(i[axis])
  owned, seen = {}, set()
  for p in sorted(held):
    owned[p] = tuple(sorted(held[p] - seen))
    seen |= held[p]
  return {p: tuple(sorted(b)) for p, b in held.items()}, owned


def process_blocks(mesh: jax.sharding.Mesh,
                   process: int | None = None) -> tuple[int, ...]:
  """The blocks of a `batch_sharding` array's leading axis (of mesh.shape
  ['data'] equal blocks) that `process` (default this one) must supply: the
  distinct 'data' coordinates of its devices, ascending -- the order its
  local data fills them. Processes share a block when a data row of the mesh
  spans them (a model axis across hosts)."""
  here = jax.process_index() if process is None else process
  return _block_layout(mesh)[0].get(here, ())


def owned_blocks(mesh: jax.sharding.Mesh,
                 process: int | None = None) -> tuple[int, ...]:
  """The blocks of `process_blocks` that no lower-numbered process holds:
  each block has one owner, which alone reports, gathers and exports its
  rows."""
  here = jax.process_index() if process is None else process
  return _block_layout(mesh)[1].get(here, ())


def local_batch_shards(mesh: jax.sharding.Mesh) -> int:
  """Blocks of a `batch_sharding` array's leading axis on this process's
  devices (`process_blocks`)."""
  return len(process_blocks(mesh))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Fully replicated sharding."""
  return NamedSharding(mesh, P())
