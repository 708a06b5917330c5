"""Continuous training: both models learn period after period (`--mode=continuous`).

The paper's streaming stage (Sec. 3.2.2, 3.4, Fig. 4) on a log cut into
periods (`--config.data.period`, `iat_jax.data.periods`). For each period p,
in time order, every model of `--config.continuous.models` (`MODELS`, the
batch pipeline's comparison: base, the temporal and user-order sources and
their downstreams) makes one pass over p's rows in time order, batch by
batch: the step's forward pass predicts the batch before its update (the
progressive predictions, the metrics of record) and, for a source, computes
each instance's InsEmb, which is upserted into the source's table of period
p as it is produced (`store.partitions`, flushed every `store.flush_every`
steps) and never re-exported. Sources run before the models that read them:

  source_user   Eq. 8's streaming form (`models.source.StreamSource`): the
                SIT sees each instance's K = stream.k newest earlier InsEmbs
                from the store, those the source processed in an earlier
                batch;
  *_iat         read the newest L = model.hist_len entries of the user's
                history strictly before the request whose InsEmb is visible
                (`continuous.sync_lag` after the instance), labels only once
                known (`continuous.history`).

Then p's rows are appended to the user-history index (`store.user_index`,
one commit), and ONE Orbax checkpoint publishes the period: every model's
train state (optimizer state carried across periods, never reset), the
metric accumulators, the period's per-model metrics and the index generation
the next period reads at. Retention (`store.retention_periods` = R) keeps the
R periods before the current one: older index entries and InsEmb tables are
dropped, by event time, after the checkpoint.

Warm-up: the first `continuous.warmup_periods` periods are trained
`continuous.warmup_epochs` passes each (their first pass's predictions are
reported, marked warm-up, and left out of the summary); or
`continuous.init_from` names a finished batch pipeline on the same data,
whose models and exported InsEmbs stand for the periods inside its train
split (`warm_start.from_batch`).

Several processes: each reads its slice of every global batch
(`batches.Assemble`); after each step the batch's predictions and InsEmbs
are gathered to every process (`predict.host_gather`), so all hold the same
metrics and read-through buffers; each writes its own part of the InsEmb
tables and of the index; Orbax saves the job's one checkpoint.

Exact resume: a run killed anywhere restarts from its last period checkpoint:
the index is rewritten as of the checkpoint's generation for every user the
killed period could have touched, the killed period's half-written InsEmb
tables are dropped, metric lines past the checkpoint are cut, and the period
is redone; every step is deterministic, so the results, stores and metrics
equal an uninterrupted run's. `continuous.through` stops after a given
period (a daily job runs the periods the log has so far; the next run
continues), after checking that the periods already trained on are unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import time

from absl import logging
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from iat_jax import checkpointing
from iat_jax import errors
from iat_jax import metrics as metrics_lib
from iat_jax import sharding
from iat_jax import stages
from iat_jax import validation
from iat_jax import workdir as workdir_lib
from iat_jax.continuous import batches as batches_lib
from iat_jax.continuous import cost
from iat_jax.continuous import history as history_lib
from iat_jax.continuous import report
from iat_jax.continuous import warm_start
from iat_jax.data import input_pipeline
from iat_jax.data import periods as periods_lib
from iat_jax.store import partitions as partitions_lib
from iat_jax.store import tables
from iat_jax.store import user_index
from iat_jax.train import predict
from iat_jax.train import steps
from iat_jax.train import train_lib


@dataclasses.dataclass(frozen=True)
class Model:
  """A model of a continuous run: `stage` (a key of stages.STAGES) trained on
  batches of `kind` (`batches.KINDS`), reading the InsEmbs of `source`."""
  name: str
  stage: str
  kind: str
  source: str | None = None


# In the order a period runs them: each source before its readers.
MODELS: dict[str, Model] = {
    m.name: m for m in (
        Model("base", "base", "instances"),
        Model("source_temporal", "source_temporal", "instances"),
        Model("source_user", "source_stream", "stream", "source_user"),
        Model("temporal_iat", "downstream", "history", "source_temporal"),
        Model("user_iat", "downstream", "history", "source_user"),
    )
}

# Run knobs a resumed run must share with the run it resumes (they change
# what the periods already trained on mean).
RUN_KNOBS = ("data.period", "continuous.models", "continuous.sync_lag",
             "continuous.init_from", "continuous.warmup_periods",
             "continuous.warmup_epochs", "store.retention_periods", "batch_size",
             "seed")


def _knob(config, key: str):
  value = validation.flag_value(config, key)
  return list(value) if isinstance(value, tuple) else value


class Learner:
  """One model's mesh, train state and compiled train step."""

  def __init__(self, model: Model, config: ml_collections.ConfigDict, ds, sample: dict):
    self.model, self.stage = model, stages.STAGES[model.stage]
    cfg = ml_collections.ConfigDict(config.to_dict())
    cfg.stream.mode = "fetch"
    self.net = self.stage.model(cfg, ds.schema)
    self.mesh = sharding.make_mesh(tuple(config.mesh_shape), tuple(config.mesh_axes))
    rules = tuple(tuple(r) for r in config.logical_axis_rules)
    dev = steps.to_device(batches_lib.device_keys(sample), self.mesh)
    self.state, shardings = steps.create_state(self.net, steps.make_optimizer(config),
                                               dev, config.seed, self.mesh, rules)
    self.aux = ("probs", "insemb") if self.stage.exports else ("probs",)
    self.step = train_lib.PerShape(
        steps.make_train_step(self.net, shardings, self.mesh, rules, self.aux),
        self.state, dev)


class Run:
  """A continuous run in <workdir>/continuous (see the module docstring)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, ds):
    self.config, self.ds, self.tasks = config, ds, ds.schema.tasks
    self.dir = os.path.join(workdir, "continuous")
    self.periods = periods_lib.of_dataset(ds, config.data.period)
    last = len(self.periods) - 1
    through = config.continuous.through
    if through >= len(self.periods):
      raise errors.ConfigError(
          "continuous.through", f"{through} is past the last of the "
          f"{len(self.periods)} periods of {ds.path} (0..{last})")
    self.through = last if through < 0 else through
    self.names = [n for n in MODELS if n in config.continuous.models]
    self.sync_lag = periods_lib.duration(config.continuous.sync_lag,
                                         "continuous.sync_lag")
    self.retention = config.store.retention_periods
    self.uid = np.asarray(ds["uid"])
    os.makedirs(self.dir, exist_ok=True)
    self.index = user_index.UserIndex(os.path.join(self.dir, "index"),
                                      ds.schema.num_tasks,
                                      max(config.model.hist_len, config.stream.k))
    self.tables = {
        n:
            partitions_lib.Partitions(config,
                                      os.path.join(self.dir, "stores", n),
                                      d=config.model.insemb_dim,
                                      source=n,
                                      fingerprint=ds.schema.fingerprint,
                                      flush_rows=config.store.flush_every *
                                      config.batch_size)
        for n in self.names
        if stages.STAGES[MODELS[n].stage].exports
    }
    self.learners = {
        n: Learner(MODELS[n], config, ds, self._sample(n)) for n in self.names
    }
    self.hists = {n: report.empty_hist(len(self.tasks)) for n in self.names}
    self.ckpt = ocp.CheckpointManager(os.path.join(self.dir, "ckpt"),
                                      options=ocp.CheckpointManagerOptions(
                                          max_to_keep=2, create=True),
                                      item_handlers={
                                          "state": ocp.StandardCheckpointHandler(),
                                          "meta": ocp.JsonCheckpointHandler()
                                      })
    self.writer = metrics_lib.Writer(self.dir, active=jax.process_index() == 0)
    self.meta = {"generations": self.index.generations(), "digests": [], "periods": []}

  def _sample(self, name: str) -> dict:
    """A batch of period 0 with empty histories: the shapes the step compiles for."""
    empty = history_lib.Timeline.build([], np.zeros(0, np.int64), np.zeros(0, np.int64),
                                       history_lib.entries(self.ds,
                                                           np.zeros(0, np.int64)))
    model = MODELS[name]
    data = batches_lib.period_batches(self.config,
                                      self.ds,
                                      self.periods,
                                      0,
                                      empty,
                                      model.kind,
                                      cutoff=0,
                                      sync_lag=0,
                                      table=self.tables.get(model.source))
    batch = data[0]
    if model.kind == "stream":
      batch = batches_lib.fill_past(batch, self.tables[name], self.periods)
    return batch

  # --- resume -------------------------------------------------------------

  def _state_tree(self) -> dict:
    return {
        "models": {
            n: lr.state for n, lr in self.learners.items()
        },
        "hist": self.hists
    }

  def resume(self) -> int:
    """Restores the last period checkpoint; returns the next period to run.
    A fresh run with continuous.init_from starts from that batch pipeline."""
    step = self.ckpt.latest_step()
    if step is None:
      self.writer.truncate(0)
      init = self.config.continuous.init_from
      return warm_start.from_batch(self, init) if init else 0
    target = {
        "models": {
            n: checkpointing.abstract(lr.state) for n, lr in self.learners.items()
        },
        "hist": self.hists
    }
    try:
      out = self.ckpt.restore(step,
                              args=ocp.args.Composite(
                                  state=ocp.args.StandardRestore(target),
                                  meta=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except
      raise errors.CheckpointError(
          f"period checkpoint {self.dir}/ckpt/{step} does not restore ({e}); if "
          f"the model flags changed, re-run with the original ones or another "
          f"--workdir") from None
    self._check_same_run(out["meta"])
    for n, lr in self.learners.items():
      lr.state = out["state"]["models"][n]
    self.hists = {n: np.asarray(h) for n, h in out["state"]["hist"].items()}
    self.meta = out["meta"]
    done = step  # periods 0..step-1 are committed
    self._undo_period(done)
    self.writer.truncate(done)
    logging.info("continuous: resumed after period %d", done - 1)
    return done

  def _check_same_run(self, meta: dict) -> None:
    for key in RUN_KNOBS:
      was, now = meta["run"][key], _knob(self.config, key)
      if was != now:
        raise errors.ConfigError(
            key, f"is {now!r}, but the continuous run in {self.dir} was "
            f"started with {was!r}; re-run with {was!r} or use a fresh --workdir")
    for p, digest in enumerate(meta["digests"]):
      if p >= len(self.periods) or self.periods.digest(self.ds["ins_id"], p) != digest:
        raise errors.DataError(
            f"{self.ds.path}: period {p}'s instances differ from those the run "
            f"in {self.dir} trained on (a log may only grow by new periods at "
            f"its end; data that goes back in time needs a fresh --workdir)")

  def _undo_period(self, p: int) -> None:
    """Drops what a run killed in period p wrote past the checkpoint."""
    if p < len(self.periods) and self.index.generations() != self.meta["generations"]:
      users = np.union1d(self.uid[self.periods.rows(p)], self.expired_users(p))
      self.index.restore(users, self.meta["generations"])
    # Its half-written InsEmb tables are dropped when the period starts again
    # (`Partitions.begin`); nothing reads them before.

  # --- one period -----------------------------------------------------------

  def cutoff(self, p: int) -> int:
    """The oldest event time period p's requests may see (retention)."""
    if self.retention and p - self.retention >= 0:
      return int(self.periods.start[p - self.retention])
    return -(1 << 62)

  def expired_users(self, p: int) -> np.ndarray:
    """Users whose entries of period p - R leave the window after period p."""
    q = p - self.retention
    if not self.retention or q < 0:
      return np.zeros(0, np.int64)
    return np.unique(self.uid[self.periods.rows(q)])

  def run_period(self, p: int, progress) -> dict:
    rows = self.periods.rows(p)
    uid = self.uid[rows]
    users = np.unique(uid)
    entries = history_lib.entries(self.ds, rows)
    old = self.index.read(users, self.meta["generations"])
    timeline = history_lib.Timeline.build(old, users, uid, entries)
    warmup = p < self.config.continuous.warmup_periods
    epochs = self.config.continuous.warmup_epochs if warmup else 1
    labels = np.asarray(self.ds["labels"])[rows]
    metrics = {}
    for name in self.names:
      model, own = MODELS[name], self.tables.get(name)
      if own is not None:
        own.begin(p)
      for epoch in range(epochs):
        data = batches_lib.period_batches(self.config,
                                          self.ds,
                                          self.periods,
                                          p,
                                          timeline,
                                          model.kind,
                                          cutoff=self.cutoff(p),
                                          sync_lag=self.sync_lag,
                                          table=self.tables.get(model.source))
        probs = self._pass(self.learners[name], data, p, len(rows), own, progress)
        if epoch == 0:
          metrics[name] = metrics_lib.task_metrics(self.tasks, labels, probs)
          if not warmup:
            report.add_hist(self.hists[name], labels, probs)
      if own is not None:
        own.end()
    generations = self.index.append(uid, entries, self.cutoff(p + 1),
                                    self.expired_users(p))
    row = report.period_row(p, int(self.periods.start[p]), len(rows), warmup, metrics)
    return self.commit(p, row, generations)

  def _pass(self, lr: Learner, data, p: int, n: int, table, progress) -> np.ndarray:
    """One pass of `lr` over a period's batches (a source writing its InsEmbs
    to `table`); float32 [n, T] predictions made before each batch's step,
    on every process."""
    probs = np.zeros((n, len(self.tasks)), np.float32)
    it = input_pipeline.iterate(data)
    b = self.config.batch_size
    for i in range(len(data)):
      batch = next(it)
      if lr.model.kind == "stream":
        batch = batches_lib.fill_past(batch, self.tables[lr.model.name], self.periods)
      lr.state, out, aux = lr.step(
          lr.state, steps.to_device(batches_lib.device_keys(batch), lr.mesh))
      loss = train_lib.finite_loss(out, lr.model.name, f"in period {p}",
                                   f"the last period checkpoint is in {self.dir}/ckpt")
      # Every process gets the whole batch's rows: its predictions, and the
      # InsEmbs every process reads through (a source's write-back).
      mask = predict.host_gather(batch["mask"], lr.mesh)
      probs[i * b:i * b + int(mask.sum())] = predict.device_gather(aux["probs"])[mask]
      if table is not None:
        table.put(
            tables.store_keys(self.config.store.placement,
                              predict.host_gather(batch["ins_id"], lr.mesh)[mask],
                              predict.host_gather(batch["uid"], lr.mesh)[mask]),
            predict.device_gather(aux["insemb"])[mask])
      progress(lr.model.name, p, loss)
    return probs

  def commit(self, p: int, row: dict, generations: list[int]) -> dict:
    """Publishes period p: metric lines, then one checkpoint, then retention."""
    for name, values in row["models"].items():
      self.writer.write(p + 1, f"period/{name}", values)
    self.meta = {
        "generations": generations,
        "digests": self.meta["digests"] + [self.periods.digest(self.ds["ins_id"], p)],
        "periods": self.meta["periods"] + [row],
        "run": {
            k: _knob(self.config, k) for k in RUN_KNOBS
        }
    }
    self.ckpt.save(p + 1,
                   args=ocp.args.Composite(state=ocp.args.StandardSave(
                       self._state_tree()),
                                           meta=ocp.args.JsonSave(self.meta)))
    self.ckpt.wait_until_finished()
    if self.retention:
      for table in self.tables.values():
        table.drop_before(p + 1 - self.retention)
    return row

  def close(self) -> None:
    self.ckpt.close()
    self.writer.close()
    for table in self.tables.values():
      table.close()


def check_workdir(workdir: str) -> None:
  """ConfigError if `workdir` holds a batch pipeline (its stage directories)."""
  batch = [
      n for n in stages.PIPELINE if os.path.isdir(workdir_lib.stage_dir(workdir, n))
  ]
  if batch:
    raise errors.ConfigError(
        "--workdir", f"{workdir} holds a batch pipeline ({', '.join(batch)}); a "
        f"continuous run needs a workdir of its own")


def run(config: ml_collections.ConfigDict, workdir: str, ds) -> dict:
  """Runs (or resumes) the continuous run in <workdir>/continuous through
  period `continuous.through`; writes and returns its results. The caller
  checks the workdir first (`check_workdir`, before building the dataset)."""
  st = Run(config, workdir, ds)
  try:
    start = st.resume()
    todo = range(start, st.through + 1)
    total = sum(
        -(-len(st.periods.rows(p)) // config.batch_size) * len(st.names) *
        (config.continuous.warmup_epochs if p < config.continuous.warmup_periods else 1)
        for p in todo)
    progress = cost.Progress(total, config.batch_size, config.log_every)
    for p in todo:
      t0, before = time.time(), cost.tree_bytes(st.dir)
      row = st.run_period(p, progress)
      cost.log(st.dir, p, len(st.periods.rows(p)),
               time.time() - t0,
               cost.tree_bytes(st.dir) - before,
               sum(t.memory_bytes() for t in st.tables.values()))
      logging.info("period %d/%d done: %s", p,
                   len(st.periods) - 1, report.brief(row, st.tasks[0]))
    results = report.summarize(st.meta["periods"], st.hists, st.tasks, st.names,
                               len(st.periods))
  finally:
    st.close()
  workdir_lib.write_json(os.path.join(st.dir, "results.json"), results)
  if jax.process_index() == 0:
    report.plot(results, st.dir)
    print(report.table(results))
  return results
