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
  3. write the new InsEmb back by store key (and the prediction), so later
     batches see it.

The stage's store is the one of the model it runs as, tables.path(config,
workdir, name) (`source_stream` in the pipeline): a fresh stream (no
checkpoint yet) publishes a copy of `init_from`'s exported table there once
(every process copies its slice, in export chunks), then every step's new
InsEmbs are upserted into it by store key (`tables.store_keys`: InsID and
user; `_Shared` over `tables.Upserts`: buffered in memory, read through the
buffer, flushed as one new version before every checkpoint and whenever the
buffer holds `flush_rows` rows). The progressive predictions go the same way
into a small side table <stage dir>/preds, by store key (they are metrics,
not InsEmbs). A batch never reads rows of its own or later batches, and what a
checkpoint refers to is durable, so a run killed anywhere and resumed
rewrites exactly what the uninterrupted run wrote (rows a killed run flushed
past its last checkpoint are rewritten with the same values before any batch
reads them). Staleness (Method 1) is reported every log step: the mean cosine
similarity between the fetched InsEmbs of a sample and their recomputation
with the current parameters. Downstream models read the store's newest
version, which after the last step holds every streamed instance's InsEmb.

N processes: each process reads its contiguous slice of every time-ordered
global batch (`input_pipeline.stream`), and the write-back is global before
the next batch reads: after each step every process gathers every process's
(InsID, InsEmb, probs) of the batch (`predict.host_gather` of its rows of the
step's outputs, `predict.local_rows`) and puts them all into its own
read-through buffer, so every process's lookups see the whole batch. Buffers
hold the same rows everywhere, so they fill and flush at the same steps: at a
flush process 0 alone upserts the buffer as a new table version, all
processes meet at a barrier, and the others reopen the newest version with an
empty buffer (memory: at most `flush_rows` + a batch of rows per process).
The result (store, predictions, metrics) does not depend on the process count.

`--mode=evaluate` of the stage reports the progressive metrics again from its
predictions table (no model is run: a prediction is only progressive when
made before the instance's own step), and `--mode=export` checks that the
stage finished and its store (flushed at its last step) is published there,
and returns its path: the stream keeps its store up to date itself.
"""

from __future__ import annotations

import functools
import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from iat_jax import checkpointing
from iat_jax import errors
from iat_jax import metrics as metrics_lib
from iat_jax import sharding
from iat_jax import stages
from iat_jax import workdir as workdir_lib
from iat_jax.data import dataset as dataset_lib
from iat_jax.data import input_pipeline
from iat_jax.store import tables
from iat_jax.train import predict
from iat_jax.train import steps
from iat_jax.train import train_lib

_STALENESS_SAMPLE = 256  # past rows per process
_NEVER = np.iinfo(np.int64).max  # `tables.Upserts` flush_rows: `_Shared` flushes


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class _Shared:
  """An upsert table that every process reads through and process 0 writes.

  Every process `put`s the same global rows, so all buffers (and lookups)
  agree and reach `flush_rows` at the same step; `flush` is collective."""

  def __init__(self,
               config: ml_collections.ConfigDict,
               table_path: str,
               flush_rows: int = 1 << 16):
    self.path, self.flush_rows, self._config = table_path, flush_rows, config
    self.placement = config.store.placement  # its keys: `tables.store_keys`
    self._reopen()

  def _reopen(self) -> None:
    self._upserts = tables.Upserts(self._config, self.path, flush_rows=_NEVER)
    self._rows = 0

  @classmethod
  def open_or_create(cls, config: ml_collections.ConfigDict, table_path: str,
                     **create) -> _Shared:
    """Opens `table_path`, process 0 publishing an empty table there first
    (create: keyword arguments of `tables.Upserts.open_or_create`)."""
    if jax.process_index() == 0:
      tables.Upserts.open_or_create(config, table_path, **create)
    _barrier(f"stream-create-{table_path}")
    return cls(config, table_path)

  def put(self, keys: np.ndarray, values: np.ndarray, step: int) -> None:
    """Buffers global uint64 keys [n] -> float32 values [n, d]."""
    self._upserts.put(keys, values)
    self._rows += len(keys)
    if self._rows >= self.flush_rows:
      self.flush(step)

  def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys [n] -> (float32 values [n, d], bool found [n])."""
    return self._upserts.lookup(keys)

  def flush(self, step: int) -> None:
    """Process 0 upserts the buffer as one version; every buffer is emptied."""
    if jax.process_index() == 0:
      self._upserts.flush(step)
    _barrier(f"stream-flush-{self.path}-{step}")
    if jax.process_index() != 0:
      self._reopen()
    self._rows = 0


def _open_store(config, workdir: str, name: str, ds: dataset_lib.Dataset,
                started: bool) -> _Shared:
  """The store of the stream `name`: before the first checkpoint, a copy of
  init_from's table is published there (unless that copy is already there)."""
  path = tables.path(config, workdir, name)
  init_path = tables.path(config, workdir, config.stream.init_from)
  if path == init_path:
    raise errors.ConfigError(
        f"--config.store.path={config.store.path!r}",
        "the streaming stage writes its own store; leave "
        "store.path empty")
  if not started:
    fingerprint = ds.schema.fingerprint
    init = tables.open_checked(config, workdir, config.stream.init_from, fingerprint)
    step = tables.step_of(init)
    if not tables.holds_export(
        config, path, source=name, step=step, fingerprint=fingerprint):
      logging.info("stream: copying %s into %s", init_path, path)
      tables.publish_copy(config,
                          init,
                          ds["ins_id"],
                          ds["uid"],
                          path,
                          source=name,
                          step=step,
                          fingerprint=fingerprint)
  return _Shared(config, path)


def _started(config, directory: str, ds: dataset_lib.Dataset) -> bool:
  """Whether the stage in `directory` has a checkpoint (its store is its own)."""
  ckpts = checkpointing.Checkpoints(directory, config.keep_checkpoints,
                                    f"auc/{ds.schema.tasks[0]}")
  try:
    return ckpts.latest_step() is not None
  finally:
    ckpts.close()


class _Staleness:
  """Cosine(fetched, recomputed-with-current-params) on past InsEmbs, over
  the first `_STALENESS_SAMPLE` visible past rows of each process's batch."""

  def __init__(self, st: train_lib.Run):
    self.ds, self.mesh = st.ds, st.mesh
    self.names = st.ds.feature_columns()

    def embed(params, feats):
      e = st.model.apply({"params": params},
                         feats,
                         train=False,
                         method="embed_instances")
      return e.astype(jnp.float32)

    data = sharding.batch_sharding(st.mesh)
    jitted = jax.jit(embed,
                     in_shardings=(st.shardings.params, data),
                     out_shardings=data)

    def run(params, feats):
      with sharding.mesh_context(st.mesh, st.rules):
        return jitted(params, feats)

    self.embed = run

  def __call__(self, params, batch) -> float:
    pm = batch["past_mask"]
    rows = batch["past_row"][pm][:_STALENESS_SAMPLE]
    padded = np.zeros(_STALENESS_SAMPLE, np.int64)
    padded[:len(rows)] = rows
    feats = steps.to_device(self.ds.read(padded, self.names), self.mesh)
    fresh = predict.local_rows(self.embed(params, feats))[:len(rows)]
    stored = batch["past_insemb"][pm][:len(rows)]
    cos = (fresh * stored).sum(-1) / np.maximum(
        np.linalg.norm(fresh, axis=-1) * np.linalg.norm(stored, axis=-1), 1e-12)
    total, n = np.asarray(
        multihost_utils.process_allgather(np.array([cos.sum(),
                                                    len(rows)]))).reshape(-1, 2).sum(0)
    return float(total / n) if n else float("nan")


def _preds_path(workdir: str, name: str) -> str:
  return os.path.join(workdir_lib.stage_dir(workdir, name), "preds")


def train_stream(stage: stages.Stage,
                 config: ml_collections.ConfigDict,
                 workdir: str,
                 name: str,
                 ds: dataset_lib.Dataset,
                 table=None) -> dict:
  """Runs the streaming stage into <workdir>/<name>; resumable; on every
  process of the job.

  It reads and writes its own table (`table` must be None).

  Returns:
    Results with progressive 'valid' / 'test' metrics (also results.json).
  """
  assert table is None, "the streaming stage reads its own table"
  store, preds = _open_tables(config, workdir, name, ds)
  st = _stage(stage, config, workdir, name, ds, store)
  writer = metrics_lib.Writer(st.dir, active=jax.process_index() == 0)
  with train_lib.closing(st, writer):
    it = input_pipeline.iterate(st.train_data)
    state, start = train_lib.resume(st, writer, it)
    if not start:  # a fresh stream starts from the batch-trained source
      state = _from_batch_trained(config, workdir, ds, state)
    cost = st.cost()
    staleness = None if config.stream.mode == "recompute" else _Staleness(st)
    write_back = _WriteBack(config, st.mesh, writer, store, preds, staleness)
    train_lib.run_loop(st,
                       state,
                       it,
                       start,
                       writer,
                       after_step=write_back,
                       before_checkpoint=write_back.flush,
                       validate=False)
    write_back.flush(st.num_steps)
    results = _results(config, ds, preds)
    return train_lib.finish(st, writer, {**results, "best_step": st.num_steps, **cost})


def _open_tables(config, workdir: str, name: str,
                 ds: dataset_lib.Dataset) -> tuple[_Shared, _Shared]:
  """(the stage's store, its predictions table), both created if missing."""
  started = _started(config, workdir_lib.stage_dir(workdir, name), ds)
  store = _open_store(config, workdir, name, ds, started)
  preds = _Shared.open_or_create(config,
                                 _preds_path(workdir, name),
                                 d=ds.schema.num_tasks,
                                 dtype="float32",
                                 source=f"{name}/preds",
                                 fingerprint=ds.schema.fingerprint)
  return store, preds


def _stage(stage: stages.Stage, config, workdir: str, name: str,
           ds: dataset_lib.Dataset, store: _Shared) -> train_lib.Run:
  """The stage over its order's time-ordered stream of config.stream.splits
  (its training chain), each batch completed with its past's stored InsEmbs
  right before its step (Method 1; Method 2 reads the past's features
  instead)."""
  recompute = config.stream.mode == "recompute"
  return train_lib.Run(stage,
                       config,
                       workdir,
                       name,
                       ds,
                       fill=functools.partial(_fill_past, None if recompute else store),
                       aux=("probs", "insemb"))


def _fill_past(store: _Shared | None, batch: dict) -> dict:
  """`batch` with "past_insemb" looked up in `store` (unless None)."""
  if store is not None:
    batch["past_insemb"] = _past_insembs(store, batch)
  return batch


def _from_batch_trained(config, workdir: str, ds: dataset_lib.Dataset, state):
  """`state` with the parameters of config.stream.init_from's best checkpoint."""
  init = checkpointing.Checkpoints(
      workdir_lib.stage_dir(workdir, config.stream.init_from), 1,
      f"auc/{ds.schema.tasks[0]}")
  try:
    _, params = init.restore_best(checkpointing.abstract(state.params))
  finally:
    init.close()
  return state.replace(params=params)


class _WriteBack:
  """`run_loop`'s after_step, on every process: puts the global batch's new
  InsEmbs and predictions into the store and the predictions table, and logs
  the staleness every log step; `flush` (before_checkpoint) makes everything
  a checkpoint refers to durable."""

  def __init__(self, config, mesh, writer: metrics_lib.Writer, store: _Shared,
               preds: _Shared, staleness: _Staleness | None):
    self.log_every, self.writer, self.mesh = config.log_every, writer, mesh
    self.store, self.preds, self.staleness = store, preds, staleness

  def __call__(self, step: int, state, batch, aux) -> None:
    mask = predict.host_gather(batch["mask"], self.mesh)
    keys = tables.store_keys(self.store.placement,
                             predict.host_gather(batch["ins_id"], self.mesh)[mask],
                             predict.host_gather(batch["uid"], self.mesh)[mask])
    for out, key in ((self.store, "insemb"), (self.preds, "probs")):
      out.put(keys, predict.device_gather(aux[key])[mask], step)
    if self.staleness is not None and step % self.log_every == 0:
      self.writer.write(step, "stream",
                        {"staleness_cosine": self.staleness(state.params, batch)})

  def flush(self, step: int) -> None:
    self.store.flush(step)
    self.preds.flush(step)


def _results(config, ds: dataset_lib.Dataset, preds: _Shared | tables.Table) -> dict:
  """{'valid', 'test'}: the progressive metrics of the streamed splits."""
  return {
      split:
          _progressive(config, ds, preds, split)
          if split in config.stream.splits else {} for split in ("valid", "test")
  }


def _finished(stage: stages.Stage, workdir: str, name: str, mode: str) -> dict:
  """The results of the finished stage in <workdir>/<name>.

  Raises:
    errors.ConfigError: the stage has not finished.
  """
  directory = workdir_lib.stage_dir(workdir, name)
  if not workdir_lib.is_complete(directory):
    raise errors.ConfigError(
        f"--config.stage={stage.name}",
        f"{mode} needs the finished stream in {directory}; run "
        f"--mode=train first (it resumes)")
  return workdir_lib.load_results(directory)


def evaluate_stream(stage: stages.Stage,
                    config: ml_collections.ConfigDict,
                    workdir: str,
                    name: str,
                    ds: dataset_lib.Dataset,
                    table=None) -> dict:
  """The finished stream's progressive valid / test metrics, recomputed from
  its predictions table (made before each instance's own step; no model
  runs, nothing is retrained)."""
  assert table is None, "the streaming stage reads its own table"
  step = _finished(stage, workdir, name, "evaluate")["best_step"]
  preds = tables.open_table(config, _preds_path(workdir, name))
  return {**_results(config, ds, preds), "best_step": step}


def export_stream(stage: stages.Stage, config: ml_collections.ConfigDict, workdir: str,
                  name: str, ds: dataset_lib.Dataset) -> str:
  """The finished stream's store (already up to date: the stream flushed it
  at its last step); checks it is published there and returns its path."""
  step = _finished(stage, workdir, name, "export")["best_step"]
  path = tables.path(config, workdir, name)
  tables.open_checked(config, workdir, name, ds.schema.fingerprint)
  if not tables.is_published(config, path, name, step):
    raise errors.StoreError(f"{path}: not the store of the finished stream (its "
                            f"last step {step}); re-run the stream into a fresh "
                            f"--workdir")
  return path


def _past_insembs(store: _Shared, batch) -> np.ndarray:
  """float32 [b, K, d]: the stored InsEmbs of the visible past (zeros elsewhere)."""
  mask = batch["past_mask"]
  keys = tables.store_keys(store.placement, batch["past_ins_id"],
                           batch["uid"][:, None])  # the past of the row's user
  values, found = store.lookup(keys.reshape(-1))
  missing = mask.reshape(-1) & ~found
  if missing.any():
    raise errors.StoreError(f"{store.path}: {int(missing.sum())} past instances "
                            f"have no stored InsEmb")
  values[~mask.reshape(-1)] = 0.0
  return values.reshape(keys.shape + (-1,))


def _progressive(config, ds: dataset_lib.Dataset, preds: _Shared | tables.Table,
                 split: str) -> dict[str, float]:
  """Metrics of the predictions made before each instance's own step."""
  rows = np.sort(ds.split_rows(split))
  probs, found = preds.lookup(
      tables.store_keys(config.store.placement,
                        np.asarray(ds["ins_id"])[rows],
                        np.asarray(ds["uid"])[rows]))
  if not found.all():
    raise errors.StoreError(f"{preds.path}: {int((~found).sum())} {split} "
                            f"instances have no stream prediction")
  return metrics_lib.task_metrics(ds.schema.tasks, np.asarray(ds["labels"][rows]),
                                  probs)
