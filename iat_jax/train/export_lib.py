"""Export: a trained source model's InsEmbs of every instance -> the store.

Parallel, streaming and resumable: every process runs the eval step over the
batches of every split (sharded by process, as in evaluation) and writes the
InsEmbs of its own slice of each batch, taken from the host-side batch it read
and the addressable part of the step's output (no gather), into its part of
the export (`tables.export_writer`) in durable chunks; then all processes
merge and process 0 publishes one new table version (`tables.finish_export`).
Only the rows a batch's mask counts are written: the context rows leading a
user-order chunk (`batching.UserChunks`) are written by the chunk that
evaluates them, so every instance once, its SIT (and an insemb_after_sit
InsEmb) having seen its user's earlier rows of any split.

The batch order is deterministic, so a killed export, rerun, finds the rows
each process already made durable and skips the batches they cover (every
process skips the same leading batches, so the collectives of the eval step
still match); the published content is the same as an uninterrupted export's.
An export whose version is published (`tables.is_published`) is a no-op.
"""

from __future__ import annotations

from typing import Protocol

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from iat_jax import errors
from iat_jax import stages
from iat_jax.data import dataset as dataset_lib
from iat_jax.data import input_pipeline
from iat_jax.data import orders
from iat_jax.data import schema as schema_lib
from iat_jax.store import tables
from iat_jax.train import predict
from iat_jax.train import steps
from iat_jax.train import train_lib


class StoredInsEmbs(Protocol):
  """InsEmbs stored while training, for train instances."""

  def lookup(self, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 [n, d] of the instances with store keys [n] at dataset rows [n]."""


def export(stage: stages.Stage,
           config: ml_collections.ConfigDict,
           workdir: str,
           name: str,
           ds: dataset_lib.Dataset,
           *,
           model_dir: str | None = None,
           stored: StoredInsEmbs | None = None) -> str:
  """Writes the InsEmb of every instance (train, valid, test) of `ds`.

  Runs the best checkpoint of source stage `stage` in <workdir>/<model_dir>
  (default `name`) forward over all splits and publishes one new version of
  the store of model `name` (`tables.path`: a store is named by the model
  that writes it). `stored` gives the train instances' InsEmbs instead (the
  two-pass source's, see `two_pass_lib`). Returns the store path.
  """
  if not stage.exports:
    raise errors.ConfigError(f"stage={stage.name!r}",
                             f"export needs a source stage (one of {stages.SOURCES})")
  st, step, params = train_lib.load_best(stage, config, workdir, model_dir or name, ds)
  path = tables.path(config, workdir, name)
  if tables.is_published(config, path, name, step):
    logging.info("export %s: already done (step %d)", path, step)
    return path
  out = tables.export_writer(config,
                             path,
                             source=name,
                             step=step,
                             fingerprint=ds.schema.fingerprint)
  seq = [(split, i, data)
         for split in schema_lib.SPLITS
         for data in [orders.batches(config, ds, stage.order, split, train=False)]
         for i in range(len(data))]
  first, rows = _durable_batches(out.done_rows, seq, st.mesh)
  if first:
    logging.info("export %s: resuming at batch %d of %d (%d rows durable here)", path,
                 first, len(seq), out.done_rows)
  out.skip(rows)
  for split in schema_lib.SPLITS:
    todo = [i for s, i, _ in seq[first:] if s == split]
    if not todo:
      continue
    data = [d for s, _, d in seq if s == split][0]
    it = input_pipeline.iterate(data[todo[0]:])
    for _ in todo:
      batch = next(it)
      mask = _exported(batch, st.mesh)
      keys = tables.store_keys(config.store.placement,
                               np.asarray(batch["ins_id"]).reshape(-1)[mask],
                               np.asarray(batch["uid"]).reshape(-1)[mask])
      if stored is not None and split == "train":
        values = stored.lookup(keys, np.asarray(batch["row"]).reshape(-1)[mask])
      else:
        res = st.eval_step(params, steps.to_device(batch, st.mesh))
        values = predict.local_rows(res["insemb"])
        values = values.reshape(-1, values.shape[-1])[mask]
      out.add(keys, values)
    logging.info("export %s: %s split done", name, split)
  tables.finish_export(out)
  return path


def _exported(batch: dict, mesh) -> np.ndarray:
  """bool [rows of the local batch, flattened]: the instances this process
  exports -- counted by the mask, in the blocks it owns (`predict.owned`: a
  block two processes hold is exported once)."""
  mask = np.asarray(batch["mask"])
  own = predict.owned(mesh, len(mask)).reshape((-1,) + (1,) * (mask.ndim - 1))
  return (mask & own).reshape(-1)


def _durable_batches(done_rows: int, seq, mesh) -> tuple[int, int]:
  """(first batch to compute, rows of this process before it): the leading
  batches whose rows every process has durable."""
  first, rows = 0, 0
  for _, i, data in seq:
    n = int(_exported(data[i], mesh).sum())
    if rows + n > done_rows:
      break
    first, rows = first + 1, rows + n
  if jax.process_count() > 1:
    firsts = multihost_utils.process_allgather(np.int64(first))
    common = int(np.min(firsts))
    if common < first:
      rows = sum(int(_exported(d[i], mesh).sum()) for _, i, d in seq[:common])
      first = common
  return first, rows
