"""The store contract the rest of the package uses: where a source's InsEmb
table lives, opening it checked against the run, publishing a new version,
the parallel resumable export (`export_writer` / `finish_export`,
`publish_copy`), and tables that a training loop writes by upserts keyed by
InsID (`Upserts`: the streaming stage's store and predictions, the two-pass
tables).

Every function reaches its storage engine through `BACKENDS`, by
--config.store.backend (`backend.Backend`: "ocdbt" for real runs, "memory"
for tests and baselines); only this module reads the metadata keys the
backends share. Callers outside `iat_jax/store/` use only this module (and
errors.StoreError). At 1e11 rows the "ocdbt" backend's readers need
--config.store.cache_bytes >= ~12 GB (`open_checked` refuses less). See
docs/store.md.
"""

from __future__ import annotations

import hashlib
import json
import os

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from iat_jax import errors
from iat_jax.store import backend as backend_lib
from iat_jax.store import insemb_table
from iat_jax.store import memory_table
from iat_jax.store import placement
from iat_jax.store import rows

DTYPES = tuple(rows.DTYPES)
DEFAULT_SHARD_BITS = backend_lib.DEFAULT_SHARD_BITS
DEFAULT_BLOCK_ROWS = backend_lib.DEFAULT_BLOCK_ROWS
DEFAULT_CACHE_BYTES = backend_lib.DEFAULT_CACHE_BYTES
Backend = backend_lib.Backend
Lookup = backend_lib.Lookup
Table = backend_lib.Table

# The storage engines, by --config.store.backend.
BACKENDS: dict[str, Backend] = {
    "ocdbt": insemb_table.Backend(),
    "memory": memory_table.MemoryBackend(),
}


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises errors.ConfigError naming the --config.store.* flag of a store
  block that cannot run."""
  store = config.store
  get_backend(store.backend)
  if store.dtype not in DTYPES:
    raise errors.ConfigError("store.dtype", f"{store.dtype!r} is not one of {DTYPES}")
  if not 1 <= store.shard_bits <= 16:
    raise errors.ConfigError("store.shard_bits", f"{store.shard_bits} must be in 1..16")
  b = store.block_rows
  if b < 2 or b & (b - 1):
    raise errors.ConfigError("store.block_rows", f"{b} must be a power of two >= 2")
  if store.cache_bytes <= 0:
    raise errors.ConfigError("store.cache_bytes",
                             f"must be > 0, got {store.cache_bytes}")
  if store.placement not in placement.PLACEMENTS:
    raise errors.ConfigError(
        "store.placement", f"{store.placement!r} is not one of {placement.PLACEMENTS}")


def store_keys(how: str, ins_id: np.ndarray, uid: np.ndarray) -> np.ndarray:
  """The keys (uint64, ins_id's shape) under which tables placed `how`
  (--config.store.placement, see `placement`) hold the instances with InsIDs
  ins_id of users uid (int64, broadcast to ins_id's shape); InsID 0 stays 0.
  Every lookup, put and export of an instance's InsEmb goes through it."""
  return placement.keys(how, ins_id, uid)


def key_space(config: ml_collections.ConfigDict, fingerprint: str) -> str:
  """What a table's keys are: the dataset (its fingerprint) and, unless
  "insid", the placement; recorded as the table's "dataset" and checked when
  a run opens it, so a table keyed another way is refused, not read as all
  missing."""
  p = config.store.placement
  return fingerprint if p == "insid" else f"{fingerprint}/{p}"


def get_backend(name: str) -> Backend:
  """BACKENDS[name]; errors.ConfigError naming --config.store.backend if none."""
  if name not in BACKENDS:
    raise errors.ConfigError("store.backend",
                             f"{name!r} is not one of {tuple(BACKENDS)}")
  return BACKENDS[name]


def path(config: ml_collections.ConfigDict, workdir: str, model: str) -> str:
  """Directory of the store of model `model`: --config.store.path, or
  <workdir>/stores/<model>.

  The one rule naming a store: it is named by the model that writes it (a
  pipeline model, or a single run's stage) and read under that name
  (--config.store.source, --config.stream.init_from), so two models over one
  stage never share a store."""
  return config.store.path or os.path.join(workdir, "stores", model)


def layout(config: ml_collections.ConfigDict) -> dict:
  """How the tables this run writes are laid out: --config.store.shard_bits
  and --config.store.block_rows (see docs/store.md)."""
  return {"shard_bits": config.store.shard_bits, "block_rows": config.store.block_rows}


def open_table(config: ml_collections.ConfigDict, table_path: str) -> Table:
  """The newest version at `table_path`, read within --config.store.cache_bytes."""
  return get_backend(config.store.backend).open(table_path,
                                                cache_bytes=config.store.cache_bytes)


def open_checked(config: ml_collections.ConfigDict, workdir: str, source: str,
                 fingerprint: str) -> Table:
  """The published table of `source`, checked to hold config.model.insemb_dim
  wide InsEmbs from `source` of the dataset with `fingerprint`; its reader
  holds at most --config.store.cache_bytes, of which the segment indexes of
  every shard may take at most half.

  Raises:
    errors.StoreError: missing, corrupt, or not the table this run expects, or
      its indexes too big for the budget.
  """
  table = open_table(config, path(config, workdir, source))
  index = table.full_index_bytes()
  if 2 * index > config.store.cache_bytes:
    raise errors.StoreError(
        f"--config.store.cache_bytes={config.store.cache_bytes}: the segment "
        f"indexes of {table.path} take {index:,} B once every shard is read, "
        f"more than half the reader's budget (the rest caches blocks); pass at "
        f"least --config.store.cache_bytes={2 * index}")
  check(table,
        d=config.model.insemb_dim,
        source=source,
        dataset=key_space(config, fingerprint))
  return table


def check(table: Table, *, d: int, source: str, dataset: str | None = None) -> None:
  """Raises errors.StoreError unless the table has width d, came from `source`
  and (if given) holds the key space `dataset` (`key_space`: the dataset's
  fingerprint and the placement)."""
  m = table.metadata
  if dataset is not None and m.get("dataset") != dataset:
    raise errors.StoreError(
        f"InsEmb store {table.path} was exported from dataset / placement "
        f"{m.get('dataset')!r}, not the one this run reads ({dataset!r}, "
        f"--config.store.placement): its keys would all be missing; re-export "
        f"it (--mode=export)")
  if m["d"] != d or m["source"] != source:
    raise errors.StoreError(
        f"InsEmb store {table.path} holds d={m['d']} from {m['source']!r}, but "
        f"the downstream config expects d={d} (--config.model.insemb_dim) from "
        f"{source!r} (--config.store.source)")


def step_of(table: Table) -> int:
  """The checkpoint step of the source model whose InsEmbs `table` holds."""
  return table.metadata["source_step"]


def _newest(config: ml_collections.ConfigDict, table_path: str) -> Table | None:
  """The newest version at `table_path` (opened to read its metadata), or
  None if there is no readable table there."""
  try:
    return get_backend(config.store.backend).open(table_path, cache_bytes=1 << 20)
  except errors.StoreError:
    return None


def is_published(config: ml_collections.ConfigDict, table_path: str, source: str,
                 step: int) -> bool:
  """Whether `table_path` holds a version exported from `source` at `step`."""
  table = _newest(config, table_path)
  return (table is not None and table.metadata["source"] == source and
          step_of(table) == step)


def exists(config: ml_collections.ConfigDict, table_path: str) -> bool:
  """Whether `table_path` holds a published table (any version)."""
  return _newest(config, table_path) is not None


def drop(config: ml_collections.ConfigDict, table_path: str) -> None:
  """Deletes the table at `table_path`, every version (none there: no-op)."""
  get_backend(config.store.backend).drop(table_path)


def publish(config: ml_collections.ConfigDict, table_path: str, keys: np.ndarray,
            values: np.ndarray, *, source: str, step: int, fingerprint: str) -> int:
  """Writes InsEmbs (uint64 keys [n], float32 values [n, d]) of `source` at
  checkpoint `step` as a new version, in --config.store.dtype and `layout`;
  returns its number."""
  return get_backend(config.store.backend).publish(table_path,
                                                   keys,
                                                   values,
                                                   source=source,
                                                   source_step=step,
                                                   source_config=config.model,
                                                   dtype=config.store.dtype,
                                                   dataset=key_space(
                                                       config, fingerprint),
                                                   **layout(config))


# ---------------------------------------------------------------------------
# Parallel, streaming, resumable export (every process writes its own slice).


def export_id(config: ml_collections.ConfigDict, source: str, step: int,
              fingerprint: str, d: int, process_count: int) -> str:
  """A deterministic id of the export of `source` at checkpoint `step`, so a
  rerun of a killed export finds its staging and resumes it (and a rerun with
  another --config.store.dtype or `layout` starts its own)."""
  tag = hashlib.sha256(
      json.dumps([
          key_space(config, fingerprint), config.store.dtype,
          int(d),
          int(process_count),
          layout(config)
      ]).encode()).hexdigest()[:12]
  return f"{source}-s{int(step)}-p{int(process_count)}-{tag}"


def holds_export(config: ml_collections.ConfigDict, table_path: str, *, source: str,
                 step: int, fingerprint: str) -> bool:
  """Whether the newest version at `table_path` is this run's export (same
  dtype, layout, width and process count) of `source` at `step`."""
  want = export_id(config, source, step, fingerprint, config.model.insemb_dim,
                   jax.process_count())
  table = _newest(config, table_path)
  return table is not None and table.metadata.get("export_id") == want


def _barrier(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


class Export:
  """This process's part of one export of `source` at checkpoint `step`.

    w = tables.export_writer(config, table_path, source=..., step=...,
                             fingerprint=...)
    # feed this process's rows in a deterministic order, dropping or skipping
    # the first w.done_rows (durable from a killed run) ...
    w.add(keys, values)
    tables.finish_export(w)   # every process: close, merge, publish (process 0)

  Rows are written as they come in chunks of --config.store.export_chunk_rows
  (no process holds more than a chunk); the published content depends only on
  the rows, not on the process count, chunking or restarts.
  """

  def __init__(self,
               config: ml_collections.ConfigDict,
               table_path: str,
               *,
               source: str,
               step: int,
               fingerprint: str,
               process_index: int | None = None,
               process_count: int | None = None):
    self.path, self.source, self.step = table_path, source, int(step)
    self.key_space, self.source_config = key_space(config, fingerprint), config.model
    self.process_index = jax.process_index() if process_index is None else process_index
    self.process_count = jax.process_count() if process_count is None else process_count
    d = config.model.insemb_dim
    self.id = export_id(config, source, step, fingerprint, d, self.process_count)
    self.slice = get_backend(config.store.backend).export(
        table_path,
        self.id,
        process_index=self.process_index,
        process_count=self.process_count,
        d=d,
        dtype=config.store.dtype,
        chunk_rows=config.store.export_chunk_rows,
        **layout(config))

  @property
  def done_rows(self) -> int:
    """Rows of this process's stream already durable (from a killed run)."""
    return self.slice.done_rows

  def skip(self, n: int) -> None:
    """The caller starts feeding at row n (<= done_rows) of its stream."""
    self.slice.skip(n)

  def add(self, keys: np.ndarray, values: np.ndarray) -> None:
    """Appends uint64 keys [n] -> float32 values [n, d] (durable rows dropped)."""
    self.slice.add(keys, values)


def export_writer(config: ml_collections.ConfigDict, table_path: str, *, source: str,
                  step: int, fingerprint: str, **kw) -> Export:
  """Starts (or resumes) this process's part of an export; see `Export`."""
  return Export(config,
                table_path,
                source=source,
                step=step,
                fingerprint=fingerprint,
                **kw)


def finish_export(export: Export) -> None:
  """On every process: closes its slice, barrier, merges its shards, barrier,
  process 0 publishes one new version, barrier. Resumable at every point."""
  export.slice.close()
  _barrier(f"export-{export.id}-closed")
  export.slice.merge()
  _barrier(f"export-{export.id}-merged")
  if export.process_index == 0:
    export.slice.publish(source=export.source,
                         source_step=export.step,
                         source_config=export.source_config,
                         dataset=export.key_space)
  _barrier(f"export-{export.id}-published")


def publish_copy(config: ml_collections.ConfigDict, src: Table, ins_id: np.ndarray,
                 uid: np.ndarray, table_path: str, *, source: str, step: int,
                 fingerprint: str) -> None:
  """Publishes the rows of the instances ins_id [N] of users uid [N] (a
  dataset's columns, read a chunk at a time) found in `src` at `table_path`
  as `source` at `step`. Call it on every process: each copies its contiguous
  slice of the instances, streamed in export chunks (see `Export`)."""
  w = export_writer(config,
                    table_path,
                    source=source,
                    step=step,
                    fingerprint=fingerprint)
  lo, hi = (len(ins_id) * i // w.process_count
            for i in (w.process_index, w.process_index + 1))
  chunk = config.store.export_chunk_rows
  start = min(w.done_rows, hi - lo)  # every key found: rows = key positions
  w.skip(start)
  for at in range(lo + start, hi, chunk):
    end = min(at + chunk, hi)
    part = store_keys(config.store.placement, np.asarray(ins_id[at:end]),
                      np.asarray(uid[at:end]))
    values, found = src.lookup(part)
    if not found.all():
      raise errors.StoreError(f"{src.path}: {int((~found).sum())} of the InsIDs to "
                              f"copy are missing")
    w.add(part, values)
  finish_export(w)


# ---------------------------------------------------------------------------
# Tables written while training (streaming, two-pass): upserts by store key.


class Upserts:
  """A table that a training loop adds rows to, by store key (`store_keys`).

  `put` buffers rows in memory; `flush` upserts the buffer as one new version
  (`Backend.upsert`): call it before every checkpoint, so what a checkpoint
  refers to is durable. `lookup` sees every row put so far (the buffer first,
  then the newest version this writer published). Its reader holds at most
  --config.store.cache_bytes.

  Attributes:
    table: the newest version this writer published or found (without the
      buffer).
  """

  def __init__(self,
               config: ml_collections.ConfigDict,
               table_path: str,
               *,
               flush_rows: int = 1 << 16):
    self.path = table_path
    self.flush_rows = flush_rows
    self._backend = get_backend(config.store.backend)
    self.table = self._backend.open(table_path, cache_bytes=config.store.cache_bytes)
    self._keys: list[np.ndarray] = []
    self._values: list[np.ndarray] = []
    self._rows = 0
    self._sorted = None

  @classmethod
  def open_or_create(cls,
                     config: ml_collections.ConfigDict,
                     table_path: str,
                     *,
                     d: int,
                     dtype: str,
                     source: str,
                     fingerprint: str,
                     source_config=None,
                     **kw) -> Upserts:
    """Opens `table_path`, or publishes an empty table there first."""
    if not exists(config, table_path):
      get_backend(config.store.backend).publish(table_path,
                                                np.zeros(0, np.uint64),
                                                np.zeros((0, d), np.float32),
                                                source=source,
                                                source_step=0,
                                                source_config=source_config,
                                                dtype=dtype,
                                                dataset=key_space(config, fingerprint))
    return cls(config, table_path, **kw)

  def put(self,
          keys: np.ndarray,
          values: np.ndarray,
          *,
          step: int | None = None) -> None:
    """Buffers uint64 keys [n] -> float32 values [n, d] (later puts win);
    flushes when the buffer holds flush_rows rows."""
    keys = np.asarray(keys).astype(np.uint64, copy=False).reshape(-1)
    if not len(keys):
      return
    self._keys.append(keys)
    self._values.append(np.asarray(values, np.float32).reshape(len(keys), -1))
    self._rows += len(keys)
    self._sorted = None
    if self._rows >= self.flush_rows:
      self.flush(step)

  def _pending(self) -> tuple[np.ndarray, np.ndarray]:
    """The buffer as (sorted unique keys, values), the latest put of a key."""
    if self._sorted is None:
      keys = np.concatenate(self._keys)[::-1]
      values = np.concatenate(self._values)[::-1]
      keys, first = np.unique(keys, return_index=True)
      self._sorted = keys, values[first]
    return self._sorted

  def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys [n] -> (float32 values [n, d], bool found [n])."""
    keys = np.asarray(keys).astype(np.uint64, copy=False).reshape(-1)
    values, found = self.table.lookup(keys)
    if self._rows and len(keys):
      pk, pv = self._pending()
      pos = np.minimum(np.searchsorted(pk, keys), len(pk) - 1)
      hit = pk[pos] == keys
      values[hit] = pv[pos[hit]]
      found = found | hit
    return values, found

  def flush(self, step: int | None = None) -> None:
    """Upserts the buffer as one new version (its source step = step if given)."""
    if not self._rows:
      return
    keys, values = self._pending()
    self.table = self._backend.upsert(self.table, keys, values, source_step=step)
    self._keys, self._values, self._rows, self._sorted = [], [], 0, None
