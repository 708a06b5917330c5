"""A period's batches for each kind of continuous model, as Grain datasets.

A period's rows in time order are cut into global batches of
`config.batch_size` (the last one padded, `mask` False); each process reads
the blocks of each its devices compute (`batching.ProcessSlice.of_mesh`,
`input_pipeline.read_rows`) and completes it by its kind:

  instances  nothing more (base, temporal source);
  stream     past_ins_id / past_mask / tie groups [b, K] (`Timeline.stream_past`);
             the InsEmbs, past_insemb [b, K, d], are looked up right before
             the step (`fill_past`), after the previous step's were put;
  history    hist_* [b, L] (`Timeline.downstream`) and hist_insemb
             [b, L, d] from the source's period tables: its whole period is
             written before a downstream reads it, so the lookup runs in the
             prefetching pipeline.

Host-only keys (`HOST`) are dropped before a batch goes to the devices.
"""

from __future__ import annotations

import grain
import ml_collections
import numpy as np

from iat_jax import errors
from iat_jax import sharding
from iat_jax.continuous import history as history_lib
from iat_jax.data import batching
from iat_jax.data import history
from iat_jax.data import input_pipeline
from iat_jax.data import periods as periods_lib
from iat_jax.store import partitions as partitions_lib
from iat_jax.store import tables

KINDS = ("instances", "stream", "history")
HOST = ("past_ts", "past_period")


def _insembs(table: partitions_lib.Partitions, periods: periods_lib.Periods,
             ins_id: np.ndarray, uid: np.ndarray, ts: np.ndarray, mask: np.ndarray,
             what: str) -> np.ndarray:
  """float32 [..., d]: the stored InsEmbs of the masked slots (zeros elsewhere)
  of InsIDs ins_id [..., n] of users uid [..., 1] (each row's own user)."""
  out = np.zeros(mask.shape + (table.d,), np.float32)
  users = np.broadcast_to(uid, mask.shape)[mask]
  keys, where = np.unique(tables.store_keys(table.config.store.placement, ins_id[mask],
                                            users),
                          return_inverse=True)
  if len(keys):
    first = np.zeros(len(keys), np.int64)
    first[where] = np.arange(len(where))
    values, found = table.lookup(keys, periods.of_time(ts[mask][first]))
    if not found.all():
      raise errors.StoreError(f"{table.root}: {int((~found).sum())} {what} instances "
                              f"have no stored InsEmb")
    out[mask] = values[where]
  return out


class Assemble(grain.transforms.Map):
  """Batch index i of period p -> the batch dict of `kind` (see the module)."""

  def __init__(self, config: ml_collections.ConfigDict, ds, periods, p: int,
               timeline: history_lib.Timeline, kind: str, *, cutoff: int, sync_lag: int,
               table: partitions_lib.Partitions | None):
    self.ds, self.periods, self.kind, self.timeline = ds, periods, kind, timeline
    self.rows = periods.rows(p)
    self.b, self.cutoff, self.sync_lag, self.table = (config.batch_size, cutoff,
                                                      sync_lag, table)
    self.k, self.l = config.stream.k, config.model.hist_len
    self.gap_buckets = config.model.num_gap_buckets
    self.uid = ds["uid"]
    self.part = batching.ProcessSlice.of_mesh(
        sharding.make_mesh(tuple(config.mesh_shape), tuple(config.mesh_axes)))

  def __len__(self) -> int:
    return -(-len(self.rows) // self.b)

  def map(self, i: int) -> dict[str, np.ndarray]:
    rows = np.full(self.b, -1, np.int64)
    part = self.rows[i * self.b:(i + 1) * self.b]
    rows[:len(part)] = part
    rows = self.part(rows)  # this process's slice of the global batch
    valid = rows >= 0
    batch = input_pipeline.read_rows(self.ds, np.maximum(rows, 0), valid)
    uid = np.asarray(self.uid).take(np.maximum(rows, 0))
    ts = batch["ts"]
    if self.kind == "stream":
      past = self.timeline.stream_past(uid, ts, valid, self.k, i * self.b, self.cutoff)
      batch.update(past)
      batch["tie_group"], batch["past_tie_group"] = history_lib.tie_groups(
          past["past_ts"], past["past_mask"])
      batch["past_period"] = self.periods.of_time(past["past_ts"])
    elif self.kind == "history":
      hist = self.timeline.downstream(uid, ts, valid, self.l, self.sync_lag,
                                      self.cutoff, self.ds.schema.label_delays)
      batch.update(hist)
      batch["hist_gap"] = history.gap_bucket(ts, hist["hist_ts"], hist["hist_mask"],
                                             self.gap_buckets)
      batch["hist_insemb"] = _insembs(self.table, self.periods, hist["hist_ins_id"],
                                      uid[:, None], hist["hist_ts"], hist["hist_mask"],
                                      "history")
    return batch


def period_batches(config,
                   ds,
                   periods,
                   p: int,
                   timeline,
                   kind: str,
                   *,
                   cutoff: int,
                   sync_lag: int,
                   table=None) -> grain.MapDataset:
  """The batches of period p for a model of `kind` (see the module)."""
  assemble = Assemble(config,
                      ds,
                      periods,
                      p,
                      timeline,
                      kind,
                      cutoff=cutoff,
                      sync_lag=sync_lag,
                      table=table)
  return grain.MapDataset.range(len(assemble)).map(assemble)


def fill_past(batch: dict, table: partitions_lib.Partitions,
              periods: periods_lib.Periods) -> dict:
  """A stream batch with past_insemb [b, K, d] looked up now."""
  batch["past_insemb"] = _insembs(table, periods, batch["past_ins_id"],
                                  batch["uid"][:, None], batch["past_ts"],
                                  batch["past_mask"], "past")
  return batch


def device_keys(batch: dict) -> dict:
  """`batch` without the keys only the host uses."""
  return {k: v for k, v in batch.items() if k not in HOST}
