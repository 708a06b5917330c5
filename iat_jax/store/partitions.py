"""A source's InsEmbs in one table per period: what continuous training writes.

Period p's InsEmbs live in their own table, <root>/period-<p:05d> (any
backend of `tables.BACKENDS`): the source upserts each instance's InsEmb
into the current period's table as it processes the instance
(`tables.Upserts`, flushed every `flush_rows` rows and at the period's
end), and never rewrites an older period. So a period's writes cost
O(its rows) whatever the log's length, retention
(`--config.store.retention_periods`) drops whole tables of periods that
left the window, by event time, and a run killed in period p resumes by
dropping the half-written table of p: nothing a checkpoint refers to is
ever touched again. A reader asks for keys with the period of each (an
index entry's time gives it) and each period's table answers its own.

At 1e11 rows with daily periods and 90 days kept: ~1e9 rows a table (the
OCDBT engine's 256 shards of ~4e6 rows each), one table written at a time,
a lookup batch touches the tables of the days its histories span.
"""

from __future__ import annotations

import collections
import threading

import ml_collections
import numpy as np

from iat_jax import errors
from iat_jax.store import tables

# Period tables a reader keeps open (least recently used closed first). Each
# open table and the current period's writer get 1 / (MAX_OPEN + 1) of
# --config.store.cache_bytes, so a source's tables hold at most that budget
# however many periods the log has; reopening one costs ~5 ms.
MAX_OPEN = 16


class Partitions:
  """The per-period InsEmb tables of one source (see the module docstring).

  Args:
    config: the run config (store backend, dtype, cache).
    root: the directory (or URL) holding period-<p> tables.
    d: InsEmb width.
    source: the model writing them (table metadata).
    fingerprint: the dataset's (table metadata).
    flush_rows: rows the current period buffers before a flush.
  """

  def __init__(self, config: ml_collections.ConfigDict, root: str, *, d: int,
               source: str, fingerprint: str, flush_rows: int):
    self.config, self.root, self.d = config, root.rstrip("/"), d
    self.source, self.fingerprint, self.flush_rows = source, fingerprint, flush_rows
    self._share = ml_collections.ConfigDict(config.to_dict())
    self._share.store.cache_bytes = config.store.cache_bytes // (MAX_OPEN + 1)
    self._writer: tuple[int, tables.Upserts] | None = None  # (period, writer)
    self._open: collections.OrderedDict = collections.OrderedDict()  # period -> Table
    self._lock = threading.Lock()

  def path(self, p: int) -> str:
    return f"{self.root}/period-{p:05d}"

  def begin(self, p: int) -> tables.Upserts:
    """The writer of period p's table, created empty (a half-written table of
    a killed run is dropped first)."""
    tables.drop(self.config, self.path(p))
    self._open.pop(p, None)
    w = tables.Upserts.open_or_create(self._share,
                                      self.path(p),
                                      d=self.d,
                                      dtype=self.config.store.dtype,
                                      source=f"{self.source}/period-{p}",
                                      fingerprint=self.fingerprint,
                                      flush_rows=self.flush_rows)
    self._writer = (p, w)
    return w

  def end(self, p: int) -> None:
    """Flushes period p's writer; its table is final (read-only from now)."""
    _, w = self._writer
    w.flush(p)
    self._writer = None
    self._remember(p, w.table)

  def _remember(self, p: int, table) -> None:
    self._open[p] = table
    self._open.move_to_end(p)
    while len(self._open) > MAX_OPEN:
      self._open.popitem(last=False)

  def _table(self, p: int):
    """Period p's table (the writer while p is being written); callers may be
    the input pipeline's threads."""
    if self._writer is not None and self._writer[0] == p:
      return self._writer[1]  # reads through its buffer
    with self._lock:
      if p in self._open:
        self._open.move_to_end(p)
        return self._open[p]
      try:
        table = tables.open_table(self._share, self.path(p))
      except errors.StoreError as e:
        raise errors.StoreError(f"{self.path(p)}: the InsEmbs of period {p} are "
                                f"missing (dropped by retention, or deleted)") from e
      self._remember(p, table)
      return table

  def lookup(self, keys: np.ndarray,
             periods: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys [n] of instances of periods [n] -> (float32 [n, d], found [n])."""
    keys, periods = np.asarray(keys).reshape(-1), np.asarray(periods).reshape(-1)
    values = np.zeros((len(keys), self.d), np.float32)
    found = np.zeros(len(keys), bool)
    for p in np.unique(periods):
      sel = periods == p
      values[sel], found[sel] = self._table(int(p)).lookup(keys[sel])
    return values, found

  def drop_before(self, p: int) -> None:
    """Drops the tables of periods < p (retention; idempotent)."""
    for q in [q for q in self._open if q < p]:
      del self._open[q]
    for q in range(p):
      tables.drop(self.config, self.path(q))

  def close(self) -> None:
    self._open.clear()
    self._writer = None
