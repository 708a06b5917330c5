"""Streaming user-order source training (paper Appendix A.2, Eq. 7-8).

Starting from the best checkpoint of the batch-trained user-order source
(`config.stream.init_from`), the stage walks the instances of
`config.stream.splits` (by default valid then test: the period after batch
training) in timestamp order, batches mixing users. For each instance:

  1. fetch the InsEmbs of its user's K newest strictly-earlier instances
     that were processed in an earlier batch (or precede the stream) --
     Method 1 looks them up by InsID in the stage's store, Method 2
     (`stream.mode='recompute'`) recomputes them from raw features
     with the current parameters, forward only;
  2. run the SIT over [current, past...] (stop-gradient on the past), predict
     from position 0 and take one optimizer step -- the predictions, made
     before the step, are the stream's progressive evaluation;
  3. write the new InsEmb back keyed by InsID (and the prediction), so later
     batches see it.

The stage's store is the OCDBT table at tables.path(config, workdir,
"source_stream"): a fresh stream publishes a copy of `init_from`'s exported
table there once (streamed in chunks, source "source_stream"), then every
step's new InsEmbs are upserted into it keyed by InsID (`tables.Upserts`:
buffered in memory, read through the buffer, and flushed as one new version
before every checkpoint). The progressive predictions go the same way into a
small side table <stage dir>/preds keyed by InsID (they are metrics, not
InsEmbs). A batch never reads rows of its own or later batches, and what a
checkpoint refers to is durable, so a run killed anywhere and resumed
rewrites exactly what the uninterrupted run wrote (rows a killed run flushed
past its last checkpoint are rewritten with the same values before any batch
reads them). Staleness (Method 1) is reported every log step: the mean cosine
similarity between the fetched InsEmbs of a sample and their recomputation
with the current parameters. Downstream models read the store's newest
version, which after the last step holds every streamed instance's InsEmb.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from iat_jax import checkpointing
from iat_jax import metrics as metrics_lib
from iat_jax import workdir as workdir_lib
from iat_jax.data import dataset as dataset_lib
from iat_jax.data import input_pipeline
from iat_jax.store import tables
from iat_jax.train import train_lib

_STALENESS_SAMPLE = 256


def _open_store(config, workdir: str, ds: dataset_lib.Dataset) -> tables.Upserts:
  """The stage's store: on a fresh stream, a copy of init_from's table."""
  path = tables.path(config, workdir, config.stage)
  init_path = tables.path(config, workdir, config.stream.init_from)
  if path == init_path:
    raise ValueError(f"--config.store.path={config.store.path!r}: the streaming "
                     f"stage writes its own store; leave store.path empty")
  init = tables.open_checked(config, workdir, config.stream.init_from,
                             ds.schema.fingerprint)
  copy_id = tables.export_id(config.stage, init.metadata["source_step"],
                             ds.schema.fingerprint, config.store.dtype, init.dim, 1)
  if not (tables.exists(path) and
          tables.Table(path).metadata.get("export_id") == copy_id):
    logging.info("stream: copying %s into %s", init_path, path)
    tables.publish_copy(config,
                        init,
                        np.asarray(ds["ins_id"]),
                        path,
                        source=config.stage,
                        step=init.metadata["source_step"],
                        fingerprint=ds.schema.fingerprint)
  return tables.Upserts(path)


class _Staleness:
  """Cosine(fetched, recomputed-with-current-params) on past InsEmbs."""

  def __init__(self, st: train_lib.Run):
    self.ds = st.ds
    self.names = st.ds.feature_columns()

    def embed(params, feats):
      e = st.model.apply({"params": params},
                         feats,
                         train=False,
                         method="embed_instances")
      return e.astype(jnp.float32)

    self.embed = jax.jit(embed)

  def __call__(self, params, batch) -> float:
    rows = batch["past_row"][batch["past_mask"]][:_STALENESS_SAMPLE]
    if not len(rows):
      return float("nan")
    padded = np.zeros(_STALENESS_SAMPLE, np.int64)
    padded[:len(rows)] = rows
    feats = self.ds.read(padded, self.names)
    fresh = np.asarray(self.embed(params, feats))[:len(rows)]
    stored = batch["past_insemb"][batch["past_mask"]][:len(rows)]
    cos = (fresh * stored).sum(-1) / np.maximum(
        np.linalg.norm(fresh, axis=-1) * np.linalg.norm(stored, axis=-1), 1e-12)
    return float(cos.mean())


def train_stream(config: ml_collections.ConfigDict,
                 workdir: str,
                 name: str,
                 ds: dataset_lib.Dataset,
                 table=None) -> dict:
  """Runs the streaming stage into <workdir>/<name>; resumable.

  It reads and writes its own table (`table` must be None).

  Returns:
    Results with progressive 'valid' / 'test' metrics (also results.json).
  """
  assert table is None, "the streaming stage reads its own table"
  if jax.process_count() > 1:
    raise NotImplementedError("streaming training runs in one process (it may "
                              "use all of that host's devices)")
  recompute = config.stream.mode == "recompute"
  store = _open_store(config, workdir, ds)
  preds = tables.Upserts.open_or_create(os.path.join(
      workdir_lib.stage_dir(workdir, name), "preds"),
                                        d=ds.schema.num_tasks,
                                        dtype="float32",
                                        source=f"{config.stage}/preds",
                                        fingerprint=ds.schema.fingerprint)
  data = input_pipeline.stream(ds,
                               tuple(config.stream.splits),
                               config.batch_size,
                               config.stream.k,
                               features=recompute)

  def fill(batch):
    if not recompute:
      batch["past_insemb"] = _past_insembs(store, batch)
    return batch

  st = train_lib.Run(config,
                     workdir,
                     name,
                     ds,
                     train_data=data,
                     fill=fill,
                     aux=("probs", "insemb"))
  writer = metrics_lib.Writer(st.dir)
  with train_lib.closing(st, writer):
    it = input_pipeline.iterate(data)
    state, start = train_lib.resume(st, writer, it)
    if not start:  # a fresh stream starts from the batch-trained source
      init = checkpointing.Checkpoints(
          workdir_lib.stage_dir(workdir, config.stream.init_from), 1,
          f"auc/{ds.schema.tasks[0]}")
      try:
        _, params = init.restore_best(checkpointing.abstract(state.params))
      finally:
        init.close()
      state = state.replace(params=params)
    cost = st.cost()
    staleness = None if recompute else _Staleness(st)

    def write_back(step, state, batch, aux):
      mask = batch["mask"]
      store.put(batch["ins_id"][mask], np.asarray(aux["insemb"])[mask], step=step)
      preds.put(batch["ins_id"][mask], np.asarray(aux["probs"])[mask], step=step)
      if staleness is not None and step % config.log_every == 0:
        writer.write(step, "stream",
                     {"staleness_cosine": staleness(state.params, batch)})

    def flush(step):  # everything the checkpoint refers to is durable
      store.flush(step)
      preds.flush(step)

    state = train_lib.run_loop(st,
                               state,
                               it,
                               start,
                               writer,
                               after_step=write_back,
                               before_checkpoint=flush,
                               validate=False)
    flush(st.num_steps)
    results = {
        split: _progressive(ds, preds, split) if split in config.stream.splits else {}
        for split in ("valid", "test")
    }
    return train_lib.finish(st, writer, {**results, "best_step": st.num_steps, **cost})


def _past_insembs(store: tables.Upserts, batch) -> np.ndarray:
  """float32 [b, K, d]: the stored InsEmbs of the visible past (zeros elsewhere)."""
  keys, mask = batch["past_ins_id"], batch["past_mask"]
  values, found = store.lookup(keys.reshape(-1))
  missing = mask.reshape(-1) & ~found
  if missing.any():
    raise tables.StoreError(f"{store.path}: {int(missing.sum())} past instances "
                            f"have no stored InsEmb")
  values[~mask.reshape(-1)] = 0.0
  return values.reshape(keys.shape + (-1,))


def _progressive(ds: dataset_lib.Dataset, preds: tables.Upserts,
                 split: str) -> dict[str, float]:
  """Metrics of the predictions made before each instance's own step."""
  rows = np.sort(ds.split_rows(split))
  probs, found = preds.lookup(np.asarray(ds["ins_id"])[rows])
  if not found.all():
    raise tables.StoreError(f"{preds.path}: {int((~found).sum())} {split} "
                            f"instances have no stream prediction")
  return metrics_lib.task_metrics(ds.schema.tasks, np.asarray(ds["labels"][rows]),
                                  probs)
