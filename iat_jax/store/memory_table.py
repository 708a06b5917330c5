"""In-memory InsEmb tables: `MemoryTable` and the "memory" backend.

A `MemoryTable` holds one version's rows sorted in this process's memory:
keys uint64 [N], stored values [N, d] in its dtype (and int8 scales [N]),
quantized and hashed as the OCDBT engine does (`rows`), so the two backends
give the same lookups and checksums for the same rows. `lookup` is a binary
search of the distinct query keys. `MemoryBackend` (tables.BACKENDS
["memory"]) keeps the versions of each path in this process only, and exports
in one process. For tests and benchmark baselines: at 1e11 rows it would
need 7.6 TB of RAM in one process. See docs/store.md.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np

from iat_jax import errors
from iat_jax.store import backend
from iat_jax.store import rows


class MemoryTable:
  """One version of a table, held sorted by key.

  `MemoryTable(keys, values)` holds uint64 keys [N] (unique, any order) ->
  float32 values [N, d]; a backend's tables hold rows it quantized
  (`rows.quantize`: stored [N, d] and int8 scales [N]) and carry their
  `metadata` (provenance and checksum).
  """

  def __init__(self,
               keys: np.ndarray,
               stored: np.ndarray,
               scales: np.ndarray | None = None,
               *,
               metadata: dict[str, Any] | None = None,
               path: str = "<memory>",
               version: int = 0):
    keys = np.asarray(keys).astype(np.uint64, copy=False).reshape(-1)
    order = np.argsort(keys, kind="stable")  # a sorted table's keys: O(N)
    self.keys, self.stored = keys[order], np.asarray(stored)[order]
    self.scales = None if scales is None else np.asarray(scales, np.float32)[order]
    self.path, self.version = path, version
    self.metadata = metadata or {
        "d": self.stored.shape[1],
        "dtype": str(self.stored.dtype)
    }
    self.metadata["num_rows"] = len(keys)

  @property
  def dim(self) -> int:
    return self.stored.shape[1]

  def __len__(self) -> int:
    return len(self.keys)

  def _find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer keys [n] (any shape) -> (row of each [n], 0 if absent; found [n])."""
    keys = np.asarray(keys).astype(np.uint64, copy=False).reshape(-1)
    if not len(self.keys):
      return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
    uniq, inv = np.unique(keys, return_inverse=True)  # sorted: a faster search
    pos = np.minimum(np.searchsorted(self.keys, uniq), len(self.keys) - 1)[inv]
    return pos, self.keys[pos] == keys

  def _rows(self, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows [n] -> (stored [n, d], scales [n] or None); a row of an empty
    table is zeros."""
    if not len(self.keys):
      scales = None if self.scales is None else np.zeros(len(pos), np.float32)
      return np.zeros((len(pos), self.dim), self.stored.dtype), scales
    scales = None if self.scales is None else self.scales.take(pos)
    return self.stored.take(pos, axis=0), scales

  def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys [n] -> (float32 values [n, d], bool found [n]); missing
    keys give zero rows."""
    pos, found = self._find(keys)
    stored, scales = self._rows(pos)
    out = stored.astype(np.float32, copy=False)
    if scales is not None:
      out *= scales[:, None]
    out *= found[:, None]
    return out, found

  def lookup_stored(
      self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """uint64 keys [n] -> (stored [n, d], scales [n] or None, found [n]);
    rows of missing keys are zero."""
    pos, found = self._find(keys)
    stored, scales = self._rows(pos)
    stored[~found] = 0
    if scales is not None:
      scales[~found] = 0
    return stored, scales, found

  def verify(self) -> None:
    """Checks the row count, and the checksum if the metadata has one."""
    got = rows.checksum_hex(rows.row_checksum(self.keys, self.stored, self.scales))
    want = self.metadata.get("checksum", got)
    if got != want or len(self) != self.metadata["num_rows"]:
      raise errors.StoreError(f"InsEmb store {self.path} (version {self.version}): "
                              f"content checksum {got} of {len(self):,} rows does "
                              f"not match the metadata ({want})")

  def memory_bytes(self) -> int:
    """Bytes of the rows held."""
    scales = 0 if self.scales is None else self.scales.nbytes
    return self.keys.nbytes + self.stored.nbytes + scales

  def full_index_bytes(self) -> int:
    """0: no index outside what memory_bytes counts, and no cache budget."""
    return 0


class MemoryBackend:
  """tables.BACKENDS["memory"]: every version of each path, in this process."""

  def __init__(self):
    self._versions: dict[str, list[MemoryTable]] = {}

  @staticmethod
  def _key(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)

  def open(self,
           path: str,
           *,
           version: int | None = None,
           cache_bytes: int = backend.DEFAULT_CACHE_BYTES) -> MemoryTable:
    """Version `version` (1, 2, ...; default the newest) of the table at path."""
    del cache_bytes  # every row is in memory
    versions = self._versions.get(self._key(path), [])
    if not versions:
      raise errors.StoreError(f"no InsEmb table at {path} (none in this process's "
                              f"memory store); run --mode=export first")
    if version is None:
      return versions[-1]
    if not 1 <= version <= len(versions):
      raise errors.StoreError(f"InsEmb store {path}: no version {version} (the "
                              f"memory store holds 1..{len(versions)})")
    return versions[version - 1]

  def drop(self, path: str) -> None:
    """Forgets every version at `path`."""
    self._versions.pop(self._key(path), None)

  def _commit(self, path: str, keys: np.ndarray, stored: np.ndarray,
              scales: np.ndarray | None, meta: dict[str, Any]) -> MemoryTable:
    """Publishes sorted rows with metadata `meta` as the next version."""
    versions = self._versions.setdefault(self._key(path), [])
    meta["checksum"] = rows.checksum_hex(rows.row_checksum(keys, stored, scales))
    table = MemoryTable(keys,
                        stored,
                        scales,
                        metadata=meta,
                        path=path,
                        version=len(versions) + 1)
    versions.append(table)
    return table

  def publish(self,
              path: str,
              keys: np.ndarray,
              values: np.ndarray,
              *,
              source: str,
              source_step: int,
              source_config: Any,
              dtype: str = "float32",
              dataset: str = "",
              export_id: str | None = None,
              **layout) -> int:
    """Publishes rows as a whole new version (layout: ignored, none in
    memory); returns its number."""
    del layout
    rows.check_dtype(dtype)
    values = np.asarray(values, np.float32)
    keys, values = rows.check_rows(path, keys, values)
    meta = backend.base_metadata(d=values.shape[1],
                                 dtype=dtype,
                                 source=source,
                                 source_step=source_step,
                                 source_config=source_config,
                                 dataset=dataset)
    if export_id is not None:
      meta["export_id"] = export_id
    stored, scales = rows.quantize(values, dtype)
    return self._commit(path, keys, stored, scales, meta).version

  def upsert(self,
             table: MemoryTable,
             keys: np.ndarray,
             values: np.ndarray,
             *,
             source_step: int | None = None) -> MemoryTable:
    """Writes rows over `table`'s version as a new version; opens it."""
    if table.version != len(self._versions.get(self._key(table.path), [])):
      raise errors.StoreError(f"InsEmb store {table.path}: another writer published "
                              f"a version meanwhile; redo this write on top of it")
    keys, values = rows.check_rows(table.path, keys, values, d=table.dim)
    stored, scales = rows.quantize(values, table.metadata["dtype"])
    meta = copy.deepcopy(table.metadata)
    if source_step is not None:
      meta["source_step"] = int(source_step)
    keep = ~np.isin(table.keys, keys)
    order = np.argsort(np.concatenate([table.keys[keep], keys]))

    def merged(old, new):  # the kept old rows and the new ones, by key
      return None if old is None else np.concatenate([old[keep], new])[order]

    return self._commit(table.path, merged(table.keys, keys),
                        merged(table.stored, stored), merged(table.scales, scales),
                        meta)

  def export(self,
             path: str,
             export_id: str,
             *,
             process_index: int = 0,
             process_count: int = 1,
             d: int,
             dtype: str = "float32",
             **layout) -> MemoryExport:
    """This (only) process's slice of an export; nothing is durable, so a
    rerun starts it afresh (layout and chunk_rows: ignored)."""
    del layout
    if process_count != 1 or process_index != 0:
      raise errors.StoreError(f"InsEmb export {export_id} at {path}: the memory "
                              f"store keeps tables in one process; export with one "
                              f"process or --config.store.backend=ocdbt")
    rows.check_dtype(dtype)
    return MemoryExport(self, path, export_id, d, dtype)


class MemoryExport:
  """An export into the memory backend: rows buffered until `publish`."""

  def __init__(self, store: MemoryBackend, path: str, export_id: str, d: int,
               dtype: str):
    self._store, self.path, self.export_id = store, path, export_id
    self._d, self._dtype = d, dtype
    self._keys: list[np.ndarray] = []
    self._values: list[np.ndarray] = []
    self.done_rows = 0
    self.closed = False

  def skip(self, n: int) -> None:
    if n:
      raise errors.StoreError(f"skip({n}): only 0 rows are durable")

  def add(self, keys: np.ndarray, values: np.ndarray) -> None:
    """Buffers uint64 keys [n] -> float32 values [n, d]."""
    keys = np.asarray(keys).astype(np.uint64, copy=False).reshape(-1)
    values = np.asarray(values, np.float32)
    if values.shape != (len(keys), self._d):
      raise errors.StoreError(f"{self.path}: values {values.shape} do not match "
                              f"keys [{len(keys)}] x d={self._d}")
    self._keys.append(keys)
    self._values.append(values)

  def close(self) -> None:
    self.closed = True

  def merge(self) -> None:
    """Nothing to merge: one process holds every row."""

  def publish(self,
              *,
              source: str,
              source_step: int,
              source_config: Any,
              dataset: str = "") -> int:
    """Publishes the rows as one new version, once (idempotent)."""
    try:
      newest = self._store.open(self.path)
      if newest.metadata.get("export_id") == self.export_id:
        return newest.version
    except errors.StoreError:
      pass
    return self._store.publish(self.path,
                               np.concatenate(self._keys or [np.zeros(0, np.uint64)]),
                               np.concatenate(self._values or
                                              [np.zeros((0, self._d), np.float32)]),
                               source=source,
                               source_step=source_step,
                               source_config=source_config,
                               dtype=self._dtype,
                               dataset=dataset,
                               export_id=self.export_id)
