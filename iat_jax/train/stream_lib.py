"""Streaming user-order source training (paper Appendix A.2, Eq. 7-8).

Starting from the best checkpoint of the batch-trained user-order source
(`config.stream.init_from`), the stage walks the instances of
`config.stream.splits` (by default valid then test: the period after batch
training) in timestamp order, batches mixing users. For each instance:

  1. fetch the InsEmbs of its user's K newest strictly-earlier instances
     that were processed in an earlier batch (or precede the stream) --
     Method 1 reads them from the stream table, Method 2
     (`stream.mode='recompute'`) recomputes them from raw features
     with the current parameters, forward only;
  2. run the SIT over [current, past...] (stop-gradient on the past), predict
     from position 0 and take one optimizer step -- the predictions, made
     before the step, are the stream's progressive evaluation;
  3. write the new InsEmb and the prediction back, so later batches see it.

Rows start from the user-order source's exported table. Every step's writes
land before its checkpoint, and a batch never reads rows of its own or later
batches, so a run killed anywhere and resumed rewrites exactly what the
uninterrupted run wrote. Staleness (Method 1) is reported every log step: the
mean cosine similarity between the fetched InsEmbs of a sample and their
recomputation with the current parameters. At the end the table is published
as an `insemb_table` version (source "source_stream") for downstream models.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from iat_jax import checkpointing
from iat_jax import metrics as metrics_lib
from iat_jax import workdir as workdir_lib
from iat_jax.data import dataset as dataset_lib
from iat_jax.data import input_pipeline
from iat_jax.store import stream_table
from iat_jax.store import tables
from iat_jax.train import train_lib

_STALENESS_SAMPLE = 256


def _initial_values(config, workdir: str, ds: dataset_lib.Dataset) -> np.ndarray:
  """InsEmbs [N, d] of every row from the batch-trained source's store."""
  table = tables.open_checked(config, workdir, config.stream.init_from,
                              ds.schema.fingerprint)
  values, _ = table.lookup(np.asarray(ds["ins_id"]))
  return values


class _Staleness:
  """Cosine(fetched, recomputed-with-current-params) on past InsEmbs."""

  def __init__(self, st: train_lib.Run):
    self.ds = st.ds
    self.names = st.ds.feature_columns()

    def embed(params, feats):
      e = st.model.apply({"params": params}, feats, train=False,
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


def train_stream(config: ml_collections.ConfigDict, workdir: str, name: str,
                 ds: dataset_lib.Dataset, table=None) -> dict:
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
  table = stream_table.StreamTable.open_or_create(
      os.path.join(workdir_lib.stage_dir(workdir, name), "stream_table"),
      _initial_values(config, workdir, ds), ds.schema.num_tasks)
  data = input_pipeline.stream(ds, tuple(config.stream.splits), config.batch_size,
                               config.stream.k, features=recompute)

  def fill(batch):
    if not recompute:
      batch["past_insemb"] = table.read(batch["past_row"])
    return batch

  st = train_lib.Run(config, workdir, name, ds, train_data=data, fill=fill,
                       aux=("probs", "insemb"))
  writer = metrics_lib.Writer(st.dir)
  it = input_pipeline.iterate(data)
  state, start = train_lib.resume(st, writer, it)
  if not start:  # a fresh stream starts from the batch-trained source
    init = checkpointing.Checkpoints(workdir_lib.stage_dir(workdir, config.stream.init_from),
                                     1, f"auc/{ds.schema.tasks[0]}")
    _, params = init.restore_best(checkpointing.abstract(state.params))
    init.close()
    state = state.replace(params=params)
  cost = st.cost()
  staleness = None if recompute else _Staleness(st)

  def write_back(step, state, batch, aux):
    mask = batch["mask"]
    table.write(batch["row"][mask], np.asarray(aux["insemb"])[mask],
                np.asarray(aux["probs"])[mask])
    if staleness is not None and step % config.log_every == 0:
      writer.write(step, "stream", {"staleness_cosine": staleness(state.params, batch)})

  state = train_lib.run_loop(st, state, it, start, writer, after_step=write_back,
                             validate=False)
  results = {split: _progressive(ds, table, split) if split in config.stream.splits
             else {} for split in ("valid", "test")}
  tables.publish(config, tables.path(config, workdir, config.stage),
                 np.asarray(ds["ins_id"]), table.read_all(), source=config.stage,
                 step=st.num_steps, fingerprint=ds.schema.fingerprint)
  return train_lib.finish(st, writer, {**results, "best_step": st.num_steps, **cost})


def _progressive(ds: dataset_lib.Dataset, table: stream_table.StreamTable,
                 split: str) -> dict[str, float]:
  """Metrics of the predictions made before each instance's own step."""
  rows = np.sort(ds.split_rows(split))
  return metrics_lib.task_metrics(ds.schema.tasks, np.asarray(ds["labels"][rows]),
                                  table.read_preds(rows))
