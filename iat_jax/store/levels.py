"""The search of a table reader: where sorted query keys are in the cache.

The segment indexes a reader loaded are held as levels: level j is the j-th
newest segment of every loaded shard, fences concatenated in shard order (so
sorted, shards partitioning the key space in order). A batch of sorted keys
is placed by one searchsorted per level, whatever the number of shards, its
missing blocks read into the `cache.BlockCache`, then a branchless binary
search inside each cached block finds each key's row: query uint64 [m] ->
flat slab positions int64 [m]. InsIDs are hashes, so a batch of a few
thousand keys touches every shard: at 1e11 rows the first lookup loads every
index (~6 GB, copied once into the levels) and later ones load nothing. See
docs/store.md.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np
import tensorstore as ts

from iat_jax import errors
from iat_jax.store import cache as cache_lib
from iat_jax.store import segments


def sorted_distinct(x: np.ndarray) -> np.ndarray:
  """The distinct values of a sorted array (np.unique without its sort)."""
  keep = np.ones(len(x), bool)
  keep[1:] = x[1:] != x[:-1]
  return x[keep]


@dataclasses.dataclass
class _Level:
  """The j-th newest segment of every loaded shard that has one, in shard
  order. A key's block is valid only inside its own shard's range
  [base[s], base[s + 1]). Each segment's fences and slot_of are views into
  `fences` / `slot_of` (held once, as the index's memory accounting assumes).

  Attributes:
    fences: uint64 [blocks] first key of each block.
    slot_of: int32 [blocks] cache slot of each block, -1 = not cached.
    base: int64 [shards + 1] global block range of each shard's segment.
    segs: the segments, in shard order; starts: int64 [len(segs)] the first
      global block of each.
  """
  fences: np.ndarray
  slot_of: np.ndarray
  base: np.ndarray
  segs: list[cache_lib.Segment]
  starts: np.ndarray

  @classmethod
  def of(cls, shards: list[list[cache_lib.Segment]], j: int) -> _Level:
    have = [s for s, shard in enumerate(shards) if len(shard) > j]
    segs = [shards[s][j] for s in have]
    sizes = np.zeros(len(shards), np.int64)
    sizes[have] = [len(g.slot_of) for g in segs]
    base = np.concatenate([[0], np.cumsum(sizes)])
    starts = base[have]
    fences = np.concatenate([g.source.index.fences for g in segs] or
                            [np.zeros(0, np.uint64)])
    slot_of = np.concatenate([g.slot_of for g in segs] or [np.zeros(0, np.int32)])
    for g, lo in zip(segs, starts.tolist()):
      hi = lo + len(g.slot_of)
      g.source.index.fences, g.slot_of = fences[lo:hi], slot_of[lo:hi]
    return cls(fences, slot_of, base, segs, starts)


class Levels:
  """The segments of one version, their indexes loaded shard by shard."""

  def __init__(self, path: str, kv: ts.KvStore, meta: dict):
    self.path = path
    self._shift = np.uint64(64 - meta["shard_bits"])
    # Per shard, its segments newest first; registered with the cache once
    # the shard is loaded.
    self._sources = [[segments.Source(kv, s, path)
                      for s in reversed(shard)]
                     for shard in meta["shards"]]
    self._segs: list[list[cache_lib.Segment]] = [[] for _ in self._sources]
    self._loaded = np.zeros(len(self._sources), bool)
    self._levels: list[_Level] = []

  def _load(self, shards: np.ndarray, cache: cache_lib.BlockCache) -> None:
    """Loads the indexes of every segment of `shards` not loaded yet, then
    rebuilds the levels (a copy of the loaded indexes, once per call that
    loaded any)."""
    new = shards[~self._loaded[shards]]
    if not len(new):
      return
    for s in new.tolist():
      self._segs[s] = [cache.register(src) for src in self._sources[s]]
      self._loaded[s] = True
    self._levels = [
        _Level.of(self._segs, j)
        for j in range(max(len(shard) for shard in self._sources))
    ]

  def pieces(self,
             sk: np.ndarray,
             cache: cache_lib.BlockCache,
             start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Sorted query keys [m] -> yields (start, pos) for consecutive pieces
    sk[start:start + len(pos)]: pos is the int64 flat slab position of each
    key (-1 where absent), valid until the next piece is asked for (it may
    evict the blocks). One piece when the blocks of all the keys fit the
    cache at once, else halves in turn.

    Raises:
      errors.StoreError: the cache cannot hold one block per segment.
    """
    cache.advance()
    shard = (sk >> self._shift).astype(np.int64)
    self._load(sorted_distinct(shard), cache)
    runs, wanted, total = self._place(sk, shard, cache)
    if total > cache.capacity():  # more blocks than fit: two halves in turn
      if len(sk) == 1:
        raise errors.StoreError(f"InsEmb store {self.path}: cache_bytes="
                                f"{cache.cache_bytes} cannot hold one block per "
                                f"segment")
      half = len(sk) // 2
      yield from self.pieces(sk[:half], cache, start)
      yield from self.pieces(sk[half:], cache, start + half)
      return
    cache.fill(wanted)
    yield start, self._search(sk, runs, cache)

  def _place(self, sk: np.ndarray, shard: np.ndarray, cache: cache_lib.BlockCache):
    """-> (per level (level, query rows, global block of each), the missing
    blocks [(segment, block ids)], the number of distinct blocks needed);
    touches the cached ones."""
    runs, wanted, total = [], [], 0
    for lev in self._levels:
      g = np.searchsorted(lev.fences, sk, "right") - 1
      qrows = np.flatnonzero((g >= lev.base[shard]) & (g < lev.base[shard + 1]))
      g = g[qrows]  # ascending, as sk is
      runs.append((lev, qrows, g))
      b = sorted_distinct(g)
      slots = lev.slot_of[b]
      cache.touch(slots[slots >= 0])
      miss = b[slots < 0]
      total += len(b)
      if len(miss):
        e = np.searchsorted(lev.starts, miss, "right") - 1
        for i in np.unique(e).tolist():
          wanted.append((lev.segs[i], miss[e == i] - lev.starts[i]))
    return runs, wanted, total

  @staticmethod
  def _search(sk: np.ndarray, runs: list, cache: cache_lib.BlockCache) -> np.ndarray:
    """The flat slab positions of sorted keys sk [m] (-1: absent), once every
    block `runs` names is cached; newest level first: a key takes its newest
    row."""
    b_rows = cache.fmt.block_rows
    flat_keys = cache.keys.reshape(-1)
    pos = np.full(len(sk), -1, np.int64)
    for j, (lev, qrows, g) in enumerate(runs):
      slots = lev.slot_of[g]
      if j:
        keep = pos[qrows] < 0
        qrows, slots = qrows[keep], slots[keep]
      q = sk[qrows]
      base = slots.astype(np.int64) * b_rows
      off = np.zeros(len(q), np.int64)
      step = b_rows >> 1
      while step:  # branchless binary search in each (padded) block
        off += step * (flat_keys[base + off + (step - 1)] < q)
        step >>= 1
      at = base + off
      hit = (flat_keys[at] == q) & (off < cache.count[slots])
      pos[qrows[hit]] = at[hit]
    return pos
