"""A source's InsEmbs in one table per period and process: what continuous
training writes.

Period p's InsEmbs live in their own tables, <root>/period-<p:05d>/part-<k>,
one per process k of the job (any backend of `tables.BACKENDS`): process k
owns the InsIDs with key % P == k. The source upserts each instance's InsEmb
into the current period's tables as it processes the instance: every process
`put`s the whole global batch (each step's rows are gathered to every
process, which then reads them through its buffer), keeps the rows it owns
in its `tables.Upserts` and the others in a read buffer, and at a flush
(every `flush_rows` rows, and at the period's end; at the same step on every
process) writes its own rows, meets the others at a barrier and empties its
buffers: from then on it reads the other parts' new versions. No process
gathers the store to write it, and one process is simply part 0 of 1.

A period's writes cost O(its rows) whatever the log's length and older
periods are never touched again: retention (`--config.store.retention_periods`)
drops whole tables of periods that left the window, and a run killed in
period p drops its part of p when p starts again. A reader looks a key up
in the table of its instance's period (an index entry's time gives it) and
its owner's part.

At 1e11 rows with daily periods, 90 days kept and 256 processes: ~4e6 rows a
part, one period written at a time, a lookup batch touching the parts of the
days its histories span.
"""

from __future__ import annotations

import collections
import os
import threading

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from iat_jax import errors
from iat_jax.store import tables

# Tables a reader keeps open (least recently used closed first). Each open
# table and the current period's writer get 1 / (MAX_OPEN + 1) of
# --config.store.cache_bytes, so a source's tables hold at most that budget
# however many periods the log has; reopening one costs ~5 ms.
MAX_OPEN = 16


def barrier(name: str) -> None:
  """All processes of the job meet here (nothing with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def owner(keys: np.ndarray, parts: int) -> np.ndarray:
  """The part (process) owning each uint64 key: key % parts."""
  return (np.asarray(keys, np.uint64) % np.uint64(parts)).astype(np.int64)


class _Buffer:
  """Rows put since the last flush that another process owns (latest wins)."""

  def __init__(self):
    self.keys: list[np.ndarray] = []
    self.values: list[np.ndarray] = []
    self._sorted = None

  def put(self, keys: np.ndarray, values: np.ndarray) -> None:
    if len(keys):
      self.keys.append(keys)
      self.values.append(values)
      self._sorted = None

  def lookup(self, keys: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    values, found = np.zeros((len(keys), d), np.float32), np.zeros(len(keys), bool)
    if self.keys and len(keys):
      if self._sorted is None:
        k = np.concatenate(self.keys)[::-1]
        k, first = np.unique(k, return_index=True)
        self._sorted = k, np.concatenate(self.values)[::-1][first]
      sk, sv = self._sorted
      pos = np.minimum(np.searchsorted(sk, keys), len(sk) - 1)
      found = sk[pos] == keys
      values[found] = sv[pos[found]]
    return values, found


class Partitions:
  """The per-period InsEmb tables of one source (see the module docstring).

  Args:
    config: the run config (store backend, dtype, cache).
    root: the directory (or URL) holding period-<p>/part-<k> tables.
    d: InsEmb width.
    source: the model writing them (table metadata).
    fingerprint: the dataset's (table metadata).
    flush_rows: rows of the whole job put between two flushes.
  """

  def __init__(self, config: ml_collections.ConfigDict, root: str, *, d: int,
               source: str, fingerprint: str, flush_rows: int):
    self.config, self.root, self.d = config, root.rstrip("/"), d
    self.source, self.fingerprint, self.flush_rows = source, fingerprint, flush_rows
    self.part, self.parts = jax.process_index(), jax.process_count()
    self._share = ml_collections.ConfigDict(config.to_dict())
    self._share.store.cache_bytes = config.store.cache_bytes // (MAX_OPEN + 1)
    self._period: int | None = None  # the period being written
    self._writer: tables.Upserts | None = None
    self._foreign = _Buffer()
    self._rows = 0
    self._open: collections.OrderedDict = collections.OrderedDict()  # (p, k) -> Table
    self._dropped = 0  # periods below this one were dropped by this process
    self._lock = threading.Lock()

  def path(self, p: int, k: int | None = None) -> str:
    """Period p's part k (default this process's) of the store."""
    return f"{self.root}/period-{p:05d}/part-{self.part if k is None else k:03d}"

  def begin(self, p: int) -> None:
    """Starts writing period p: this process's part of it is created empty
    (a half-written part of a killed run is dropped first)."""
    tables.drop(self.config, self.path(p))
    self._forget(p)
    self._writer = tables.Upserts.open_or_create(self._share,
                                                 self.path(p),
                                                 d=self.d,
                                                 dtype=self.config.store.dtype,
                                                 source=f"{self.source}/period-{p}",
                                                 fingerprint=self.fingerprint,
                                                 flush_rows=np.iinfo(np.int64).max)
    self._period, self._foreign, self._rows = p, _Buffer(), 0
    barrier(f"{self.root}-begin-{p}")  # every part exists before anyone reads

  def put(self, keys: np.ndarray, values: np.ndarray) -> None:
    """Adds the InsEmbs of uint64 keys [n] (the whole job's rows, the same on
    every process) to the period being written; flushes every flush_rows."""
    keys = np.asarray(keys, np.uint64)
    values = np.asarray(values, np.float32)
    mine = owner(keys, self.parts) == self.part
    self._writer.put(keys[mine], values[mine])
    self._foreign.put(keys[~mine], values[~mine])
    self._rows += len(keys)
    if self._rows >= self.flush_rows:
      self._flush()

  def _flush(self) -> None:
    self._writer.flush(self._period)
    barrier(f"{self.root}-flush-{self._period}")
    self._forget(self._period)  # the other parts have new versions
    self._foreign, self._rows = _Buffer(), 0

  def end(self) -> None:
    """Flushes the period being written; its tables are final from now on."""
    self._flush()
    self._remember((self._period, self.part), self._writer.table)
    self._period = self._writer = None

  def _forget(self, p: int) -> None:
    with self._lock:
      for key in [key for key in self._open if key[0] == p]:
        del self._open[key]

  def _remember(self, key: tuple[int, int], table) -> None:
    self._open[key] = table
    self._open.move_to_end(key)
    while len(self._open) > MAX_OPEN:
      self._open.popitem(last=False)

  def _table(self, p: int, k: int):
    """Period p's part k (the writer while this process writes it); callers
    may be the input pipeline's threads."""
    if p == self._period and k == self.part:
      return self._writer  # reads through its buffer
    with self._lock:
      if (p, k) in self._open:
        self._open.move_to_end((p, k))
        return self._open[(p, k)]
      try:
        table = tables.open_table(self._share, self.path(p, k))
      except errors.StoreError as e:
        raise errors.StoreError(f"{self.path(p, k)}: the InsEmbs of period {p} are "
                                f"missing (dropped by retention, or deleted)") from e
      self._remember((p, k), table)
      return table

  def lookup(self, keys: np.ndarray,
             periods: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys [n] of instances of periods [n] -> (float32 [n, d], found [n])."""
    keys = np.asarray(keys, np.uint64).reshape(-1)
    periods = np.asarray(periods).reshape(-1)
    values = np.zeros((len(keys), self.d), np.float32)
    found = np.zeros(len(keys), bool)
    parts = owner(keys, self.parts)
    for p in np.unique(periods):
      for k in np.unique(parts[periods == p]):
        sel = np.flatnonzero((periods == p) & (parts == k))
        if p == self._period and k != self.part:  # rows since the last flush
          v, f = self._foreign.lookup(keys[sel], self.d)
          values[sel[f]], found[sel[f]] = v[f], True
          sel = sel[~f]
        if len(sel):
          values[sel], found[sel] = self._table(int(p), int(k)).lookup(keys[sel])
    return values, found

  def memory_bytes(self) -> int:
    """Bytes the open period tables' readers (and the writer's) hold by their
    own accounting: at most `store.cache_bytes`, MAX_OPEN + 1 shares of it."""
    with self._lock:
      held = [t.memory_bytes() for t in self._open.values()]
    return sum(held) + (self._writer.table.memory_bytes() if self._writer else 0)

  def drop_before(self, p: int) -> None:
    """Drops this process's parts of periods < p (retention; idempotent: the
    first call of a process drops every earlier period, later ones only the
    periods since the previous call)."""
    for q in range(self._dropped, p):
      self._forget(q)
      tables.drop(self.config, self.path(q))
      if "://" not in self.root:  # the period's directory, once all parts left
        try:
          os.rmdir(os.path.dirname(self.path(q)))
        except OSError:
          pass
    self._dropped = max(self._dropped, p)

  def close(self) -> None:
    self._open.clear()
    self._period = self._writer = None
