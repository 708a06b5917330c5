"""Running an eval step over a whole split, gathered from every process."""

from __future__ import annotations

import jax
from jax.experimental import multihost_utils
import numpy as np

from iat_jax import sharding
from iat_jax.data import input_pipeline
from iat_jax.train import steps


def device_gather(x: jax.Array) -> np.ndarray:
  """A global array -> the whole numpy array on every process."""
  if jax.process_count() == 1:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a global array sharded over its leading axis, in
  the order of the process-local batch it was made from (no communication)."""
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  parts = {}
  for shard in x.addressable_shards:  # replicas over other mesh axes: once
    parts.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(parts[k]) for k in sorted(parts)])


def owned(mesh: jax.sharding.Mesh, n: int) -> np.ndarray:
  """bool [n]: the rows of this process's local batch [n, ...] in the blocks
  it owns (`sharding.owned_blocks`): every row of a global batch is owned by
  one process, which alone exports or reports it."""
  blocks, mine = sharding.process_blocks(mesh), set(sharding.owned_blocks(mesh))
  return np.repeat([b in mine for b in blocks], n // len(blocks))


def host_gather(x: np.ndarray, mesh: jax.sharding.Mesh) -> np.ndarray:
  """Every process's local batch rows [n_p, ...] (its `process_blocks`) ->
  the global batch [B, ...] on every process, each block from its owner
  (uint64 kept exact)."""
  if jax.process_count() == 1:
    return x
  if x.dtype == np.uint64:
    return host_gather(np.ascontiguousarray(x).view(np.uint32), mesh).view(np.uint64)
  blocks, own = sharding.process_blocks(mesh), sharding.owned_blocks(mesh)
  b = len(x) // len(blocks)
  most = max(len(sharding.owned_blocks(mesh, q)) for q in range(jax.process_count()))
  sent = np.zeros((most * b,) + x.shape[1:], x.dtype)
  ids = np.full(most, -1, np.int32)
  for j, blk in enumerate(own):
    k = blocks.index(blk)
    sent[j * b:(j + 1) * b] = x[k * b:(k + 1) * b]
    ids[j] = blk
  got = np.asarray(multihost_utils.process_allgather(sent))  # [P, most * b, ...]
  got_ids = np.asarray(multihost_utils.process_allgather(ids))  # [P, most]
  out = np.zeros((mesh.shape["data"] * b,) + x.shape[1:], x.dtype)
  for p, row in enumerate(got_ids):
    for j, blk in enumerate(row):
      if blk >= 0:
        out[blk * b:(blk + 1) * b] = got[p, j * b:(j + 1) * b]
  return out


def predict(eval_step, params, data, mesh, keys=("probs",)) -> dict[str, np.ndarray]:
  """Runs eval_step over every batch of `data`; keeps the rows its `mask`
  counts (real instances; not the context rows that lead user-order
  evaluation chunks, which count in the chunk that evaluates them).

  Returns:
    {'labels': [n, tasks], 'ins_id': [n], 'row': [n] (dataset rows), <keys>:
    [n, ...]} on every process.
  """
  out: dict[str, list] = {k: [] for k in ("labels", "ins_id", "row", *keys)}
  for batch in input_pipeline.iterate(data):
    res = eval_step(params, steps.to_device(batch, mesh))
    mask = host_gather(batch["mask"], mesh)
    for k in keys:
      out[k].append(device_gather(res[k])[mask])
    for k in ("labels", "ins_id", "row"):
      out[k].append(host_gather(batch[k], mesh)[mask])
  return {k: np.concatenate(v) for k, v in out.items()}
