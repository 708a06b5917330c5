"""The read side of an OCDBT table: one pinned version, lookups within a budget.

`Table(path, version, cache_bytes)` reads the version it opened however many
commits follow. `lookup`: uint64 keys [n] (any shape, order, repeats) ->
(float32 [n, d], found bool [n]), vectorized numpy with no loop over shards:
memoized keys (`cache.BlockCache.recall`) skip the search, the rest are
sorted and placed by `levels.Levels`, and one gather reads the slab. A batch
whose blocks do not fit the cache is served in pieces. At 1e11 rows a reader
holds its segment indexes (16 B per block, ~6 GB once every shard is read)
plus its cache, all within cache_bytes (`memory_bytes`). See docs/store.md.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import numpy as np
import tensorstore as ts

from iat_jax import errors
from iat_jax.store import backend
from iat_jax.store import cache as cache_lib
from iat_jax.store import database
from iat_jax.store import levels as levels_lib
from iat_jax.store import rows
from iat_jax.store import segments

# emit(idx, pos): rows keys[idx] (all keys in order if idx is None) are at
# flat slab positions pos (-1: absent).
Emit = Callable[[np.ndarray | None, np.ndarray], None]


class Table:
  """One pinned version of an OCDBT table; `lookup` is vectorized, memory bounded.

  Attributes:
    path: the table directory or URL.
    version: the OCDBT generation this object reads; it stays the same while
      writers publish newer ones.
    metadata: the version's metadata (`database`).
    cache_bytes: the reader's memory budget (block cache + segment indexes;
      TensorStore's own cache pool holds `database.ts_cache_bytes` of it
      more, at most 32 MiB).
  """

  def __init__(self,
               path: str,
               version: int | None = None,
               cache_bytes: int = backend.DEFAULT_CACHE_BYTES):
    self.path = path
    self.cache_bytes = int(cache_bytes)
    if version is None:
      version = database.latest_generation(path)
      if version is None:
        raise errors.StoreError(f"no InsEmb table at {path} (no OCDBT database); "
                                f"run --mode=export first")
    self.version = int(version)
    ctx = ts.Context({
        "cache_pool": {
            "total_bytes_limit": database.ts_cache_bytes(self.cache_bytes)
        }
    })
    self._kv = database.open_kv(path, self.version, context=ctx)
    meta, self.meta_generation = database.read_meta(self._kv, path)
    if meta is None:
      raise errors.StoreError(f"InsEmb store {path}: version {self.version} has no "
                              f"published table (missing metadata); run --mode=export")
    self.metadata: dict[str, Any] = meta
    self.format = database.layout_format(meta)
    self._levels = levels_lib.Levels(path, self._kv, meta)
    self._cache: cache_lib.BlockCache | None = None  # made by the first lookup
    self._keys = self._missed = 0
    self._lock = threading.Lock()

  def __getstate__(self):  # TensorStore handles are re-opened in workers
    return {"path": self.path, "version": self.version, "cache_bytes": self.cache_bytes}

  def __setstate__(self, state):
    self.__init__(state["path"], state["version"], state["cache_bytes"])

  @property
  def dim(self) -> int:
    return self.metadata["d"]

  def __len__(self) -> int:
    return self.metadata["num_rows"]

  def verify(self) -> None:
    """Re-reads every segment and checks the version's row count and checksum.

    Streams the whole table (memory ~DEFAULT_CHUNK_ROWS rows); use it after a
    copy or in a test, not per step.

    Raises:
      errors.StoreError: the content differs from what the writers hashed.
    """
    total, n = (0, 0), 0
    for shard in self.metadata["shards"]:  # oldest first: the newest wins
      sources = [segments.Source(self._kv, s, self.path) for s in shard]
      for keys, stored, scales, _ in segments.merged(sources, self.format):
        total = rows.add_checksums(total, rows.row_checksum(keys, stored, scales))
        n += len(keys)
    want = self.metadata["checksum"]
    if n != len(self) or rows.checksum_hex(total) != want:
      raise errors.StoreError(f"InsEmb store {self.path} (version {self.version}): "
                              f"content checksum {rows.checksum_hex(total)} of "
                              f"{n:,} rows does not match the metadata ({want}, "
                              f"{len(self):,} rows)")

  def full_index_bytes(self) -> int:
    """Bytes of the segment indexes a reader holds once it has read every
    shard (16 per block: fence, row count, cache slot)."""
    return 16 * sum(s["blocks"] for shard in self.metadata["shards"] for s in shard)

  def bytes_on_disk(self) -> int:
    """Bytes of the database's files (all kept versions; local tables), or
    the bytes of this version's segments for URLs."""
    if "://" in self.path:
      return sum(s["rows"] * self.format.row_bytes + 16 * s["blocks"]
                 for shard in self.metadata["shards"]
                 for s in shard)
    total = 0
    for root, dirs, files in os.walk(self.path):
      if root == self.path:
        dirs[:] = [x for x in dirs if x != "staging"]
      total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total

  def counters(self) -> dict[str, int]:
    """What this reader did so far: keys looked up, keys missed (absent from
    the version: zeros, found=False), blocks read from storage and their
    rows."""
    blocks = 0 if self._cache is None else self._cache.blocks_read
    return {
        "keys": self._keys,
        "missed": self._missed,
        "blocks_read": blocks,
        "rows_read": blocks * self.format.block_rows
    }

  def memory_bytes(self) -> int:
    """The reader's own accounting: cached blocks + loaded segment indexes +
    the position memo + the blocks a fill reads at a time."""
    return 0 if self._cache is None else self._cache.memory_bytes()

  def _unsorted(self, keys: np.ndarray, order: np.ndarray,
                pos: np.ndarray) -> np.ndarray:
    """Positions pos [n] of the sorted keys[order] -> in the keys' own order
    [n] (-1: absent), memoized."""
    unsorted = np.empty(len(keys), np.int64)
    unsorted[order] = pos
    self._cache.remember(keys, unsorted)
    return unsorted

  def _find(self, keys: np.ndarray) -> np.ndarray | None:
    """Slab positions of keys [n] (-1: absent, memoized otherwise), valid
    until the next fill; None if their blocks do not fit the cache at once."""
    order = np.argsort(keys)
    _, pos = next(self._levels.pieces(keys[order], self._cache))
    return self._unsorted(keys, order, pos) if len(pos) == len(keys) else None

  def _gather(self, keys: np.ndarray, emit: Emit) -> np.ndarray:
    """Finds keys [n] (call with the lock); -> found bool [n].

    Calls emit(idx, pos) while the positions are valid: once with idx=None
    when the blocks of the batch fit the cache, else once per piece of the
    batch. Memoized keys skip the search; the others are sorted and searched,
    unless that evicts a memoized key's block (then all are).
    """
    if self._cache is None:
      self._cache = cache_lib.BlockCache(self.format, self.cache_bytes)
    pos, ok = self._cache.recall(keys)
    if not ok.all():
      before = self._cache.generation(pos[ok])
      miss = np.flatnonzero(~ok)
      found = self._find(keys[miss])
      if found is None or (self._cache.generation(pos[ok]) != before).any():
        return self._gather_sorted(keys, emit)
      pos[miss] = found
    emit(None, pos)
    return pos >= 0

  def _gather_sorted(self, keys: np.ndarray, emit: Emit) -> np.ndarray:
    """`_gather` without the memo: every key sorted and searched."""
    order = np.argsort(keys)
    found = np.zeros(len(keys), bool)
    for start, pos in self._levels.pieces(keys[order], self._cache):
      if start == 0 and len(pos) == len(keys):
        unsorted = self._unsorted(keys, order, pos)
        emit(None, unsorted)
        return unsorted >= 0
      idx = order[start:start + len(pos)]
      hit = pos >= 0
      found[idx[hit]] = True
      emit(idx[hit], pos[hit])
    return found

  def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys [n] (any shape, order, repeats) -> (float32 [n, d], bool [n]).

    Missing keys give zero rows and found=False, and count in `counters`.
    """
    keys = np.asarray(keys).astype(np.uint64, copy=False).reshape(-1)
    if not len(self) or not len(keys):
      self._keys += len(keys)
      self._missed += len(keys)
      return np.zeros((len(keys), self.dim), np.float32), np.zeros(len(keys), bool)
    out = np.empty((len(keys), self.dim), np.float32)

    # Positions are in the slab by construction: take's mode="clip" skips
    # the bounds check, and with out= the copy that mode="raise" makes of
    # the output (2-3x the time of the gather itself).
    def emit(idx, pos):
      vals, scales = self._cache.vals, self._cache.scales
      if idx is None and (pos >= 0).all():  # the common case: one gather
        if vals.dtype == np.float32:
          np.take(vals, pos, axis=0, out=out, mode="clip")
        else:
          np.copyto(out, vals.take(pos, axis=0, mode="clip"), casting="unsafe")
        if scales is not None:
          np.multiply(out, scales.take(pos, mode="clip")[:, None], out=out)
        return
      if idx is None:
        idx = np.flatnonzero(pos >= 0)
        pos = pos[idx]
      got = vals.take(pos, axis=0, mode="clip").astype(np.float32)
      if scales is not None:
        got *= scales.take(pos, mode="clip")[:, None]
      out[idx] = got

    with self._lock:
      found = self._gather(keys, emit)
      self._keys += len(keys)
      self._missed += int(len(keys) - found.sum())
    out[~found] = 0
    return out, found

  def lookup_stored(
      self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """uint64 keys [n] -> (stored [n, d], scales [n] or None, found [n]); rows
    of missing keys are zero. What upserts need to update the checksum."""
    keys = np.asarray(keys).astype(np.uint64, copy=False).reshape(-1)
    stored = np.zeros((len(keys), self.dim), self.format.numpy_dtype)
    scales = np.zeros(len(keys), np.float32) if self.format.has_scales else None
    if not len(self) or not len(keys):
      return stored, scales, np.zeros(len(keys), bool)

    def emit(idx, pos):
      if idx is None:
        idx = np.flatnonzero(pos >= 0)
        pos = pos[idx]
      stored[idx] = self._cache.vals[pos]
      if scales is not None:
        scales[idx] = self._cache.scales[pos]

    with self._lock:
      found = self._gather(keys, emit)
    return stored, scales, found
