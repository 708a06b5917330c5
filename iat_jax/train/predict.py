"""Running an eval step over a whole split, gathered from every process."""

from __future__ import annotations

import jax
from jax.experimental import multihost_utils
import numpy as np

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


def host_gather(x: np.ndarray) -> np.ndarray:
  """Concatenates every process's numpy slice [n_p, ...] (uint64 kept exact)."""
  if jax.process_count() == 1:
    return x
  if x.dtype == np.uint64:
    return host_gather(np.ascontiguousarray(x).view(np.uint32)).view(np.uint64)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def predict(eval_step, params, data, mesh, keys=("probs",)) -> dict[str, np.ndarray]:
  """Runs eval_step over every batch of `data`; keeps the rows its `mask`
  counts (real instances; not the context rows that lead user-order
  evaluation chunks, which count in the chunk that evaluates them).

  Returns:
    {'labels': [n, tasks], 'ins_id': [n], <keys>: [n, ...]} on every process.
  """
  out: dict[str, list] = {k: [] for k in ("labels", "ins_id", *keys)}
  for batch in input_pipeline.iterate(data):
    res = eval_step(params, steps.to_device(batch, mesh))
    mask = host_gather(batch["mask"])
    for k in keys:
      out[k].append(device_gather(res[k])[mask])
    for k in ("labels", "ins_id"):
      out[k].append(host_gather(batch[k])[mask])
  return {k: np.concatenate(v) for k, v in out.items()}
