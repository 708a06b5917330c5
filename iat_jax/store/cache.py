"""The block cache of a table reader: decoded blocks in one slab, evicted least
recently used, and a direct-mapped memo of where recent keys were found.

Shapes: a slab of `slots` blocks; the block in slot s holds its rows at flat
positions s * block_rows + i of `keys` uint64 [slots, block_rows] (padded with
2**64 - 1, never a hit), `vals` [slots * block_rows, d] in the stored dtype and
`scales` float32 [slots * block_rows] (int8 only). Budget (`memory_bytes`):
filled slots, the blocks a fill reads at a time (min(32 MiB, cache_bytes / 8)),
the memo (1/32 of cache_bytes) and the bytes `register` reserves for the
reader's segment indexes stay within cache_bytes. A version is immutable, so
a memo entry is valid while its slot's generation (bumped by every refill)
is the one it recorded. At 1e11 rows a reader of 12 GB holds ~6 GB of
indexes and caches ~3e5 blocks of 256 rows. See docs/store.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from iat_jax.store import rows
from iat_jax.store import segments

# The memo takes at most 1/_MEMO_SHARE of cache_bytes.
_MEMO_SHARE = 32
_MEMO_ENTRY_BYTES = 24  # key uint64 + slab position int64 + slot generation uint64
# A fill reads at most min(_READ_BYTES, cache_bytes / _READ_SHARE) of blocks at
# a time, kept out of the slab's share of the budget.
_READ_BYTES = 32 << 20
_READ_SHARE = 8
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # multiplicative hash of a key
_PAD = np.uint64(2**64 - 1)


@dataclasses.dataclass(eq=False)
class Segment:
  """A segment whose blocks the cache may hold.

  Attributes:
    source: where its index and blocks are read.
    slot_of: int32 [blocks] the slot of each block, -1 = not cached; the
      cache keeps it current (a reader may rebind it to a view of a larger
      array holding the same values).
    id: its number in the cache.
  """
  source: segments.Source
  slot_of: np.ndarray
  id: int


class BlockCache:
  """Decoded blocks of one table version, within `cache_bytes` (see module).

  Not thread-safe: the reader calls it under its lock.

  Attributes:
    keys, count, vals, scales: the slab (see the module docstring); count is
      int64 [slots], the rows of each slot's block.
    capacity_slots: slots allocated (at most `capacity()` are used).
    read_blocks: block reads a fill keeps in flight (at least one).
  """

  def __init__(self, fmt: rows.Format, cache_bytes: int):
    self.fmt, self.cache_bytes = fmt, int(cache_bytes)
    b = fmt.block_rows
    self.slot_bytes = b * fmt.row_bytes + 16
    entries = self.cache_bytes // (_MEMO_SHARE * _MEMO_ENTRY_BYTES)
    self._memo_bits = max(int(entries).bit_length() - 1, 1)
    self.memo_bytes = (1 << self._memo_bits) * _MEMO_ENTRY_BYTES
    share = min(_READ_BYTES, self.cache_bytes // _READ_SHARE)
    self.read_blocks = max(1, share // self.slot_bytes)
    spare = self.cache_bytes - self.memo_bytes - self.read_blocks * self.slot_bytes
    slots = self.capacity_slots = max(spare // self.slot_bytes, 1)
    self.keys = np.empty((slots, b), np.uint64)
    self.vals = np.empty((slots * b, fmt.d), fmt.numpy_dtype)
    self.scales = np.empty(slots * b, np.float32) if fmt.has_scales else None
    self.count = np.zeros(slots, np.int64)
    self._used = np.zeros(slots, np.int64)  # tick of last use
    self._owner = np.full(slots, -1, np.int64)  # segment id, -1 = free
    self._block = np.zeros(slots, np.int64)
    self._gen = np.ones(slots, np.uint64)  # bumped by every refill of the slot
    # The memo: entry h(key) -> (key, slab position, its slot's gen). An entry
    # never written holds gen 0, which no slot ever has.
    self._memo_key = np.zeros(1 << self._memo_bits, np.uint64)
    self._memo_pos = np.zeros(1 << self._memo_bits, np.int64)
    self._memo_gen = np.zeros(1 << self._memo_bits, np.uint64)
    self._segs: list[Segment] = []
    self.reserved = 0  # bytes of the budget held by the registered indexes
    self.blocks_read = 0  # by every fill so far
    self.tick = 0

  def register(self, source: segments.Source) -> Segment:
    """Loads a segment's index (its bytes and slot_of's count against the
    budget) and lets the cache hold its blocks."""
    idx = source.load()
    seg = Segment(source, np.full(len(idx.fences), -1, np.int32), len(self._segs))
    self._segs.append(seg)
    self.reserved += idx.nbytes + seg.slot_of.nbytes
    return seg

  def memory_bytes(self) -> int:
    """Filled slots + the blocks a fill reads at a time + the memo + the
    registered indexes."""
    filled = int((self._owner >= 0).sum()) + self.read_blocks
    return filled * self.slot_bytes + self.reserved + self.memo_bytes

  def capacity(self) -> int:
    """Slots usable now: the budget left by the indexes, the memo and the
    blocks a fill reads at a time (at least one)."""
    free = (self.cache_bytes - self.reserved - self.memo_bytes -
            self.read_blocks * self.slot_bytes)
    return max(1, min(self.capacity_slots, free // self.slot_bytes))

  def advance(self) -> None:
    """Starts a new search pass: blocks touched from now on are its own."""
    self.tick += 1

  def touch(self, slots: np.ndarray) -> None:
    """Marks cached slots [n] used by the current pass."""
    self._used[slots] = self.tick

  def fill(self, wanted: list[tuple[Segment, np.ndarray]]) -> None:
    """Reads the blocks [(segment, block ids)] into free or least recently
    used slots (never ones the current pass touched, if it can be helped),
    with at most `read_blocks` reads in flight across all the segments,
    each block placed as it arrives; updates each segment's slot_of."""
    n = sum(len(b) for _, b in wanted)
    if not n:
      return
    self.blocks_read += n
    owner = self._owner
    live = np.flatnonzero(owner >= 0)
    need = len(live) + n - self.capacity()  # slots to free first
    if need > 0:
      old = live[self._used[live] < self.tick]
      victims = old[np.argsort(self._used[old], kind="stable")[:need]]
      for sid in np.unique(owner[victims]).tolist():
        sel = victims[owner[victims] == sid]
        self._segs[sid].slot_of[self._block[sel]] = -1
      owner[victims] = -1
    free = np.flatnonzero(owner < 0)[:n].tolist()
    items = [(seg, b) for seg, blocks in wanted for b in blocks.tolist()]
    got = segments.stream_blocks([(seg.source, b) for seg, b in items], self.fmt,
                                 self.read_blocks)
    for (seg, blk), block, slot in zip(items, got, free):
      self._place(seg, blk, block, slot)

  def _place(self, seg: Segment, blk: int, block: tuple, slot: int) -> None:
    """Copies a decoded block (keys, stored, scales) of a segment into a free slot."""
    b_rows = self.fmt.block_rows
    k, v, s = block
    r = len(k)
    self.keys[slot, :r] = k
    self.keys[slot, r:] = _PAD
    self.count[slot] = r
    self.vals[slot * b_rows:slot * b_rows + r] = v
    if s is not None:
      self.scales[slot * b_rows:slot * b_rows + r] = s
    self._used[slot] = self.tick
    self._gen[slot] += 1
    self._owner[slot] = seg.id
    self._block[slot] = blk
    seg.slot_of[blk] = slot

  def generation(self, pos: np.ndarray) -> np.ndarray:
    """Flat slab positions [n] -> uint64 [n] the generation of their slots
    (it changes when a slot is refilled)."""
    return self._gen.take(pos // self.fmt.block_rows)

  def _memo_index(self, keys: np.ndarray) -> np.ndarray:
    """uint64 keys [n] -> their memo entries [n] (a multiplicative hash)."""
    return ((keys * _FIBONACCI) >> np.uint64(64 - self._memo_bits)).astype(np.intp)

  def recall(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """keys [n] -> (memoized slab positions [n], valid [n]): valid where the
    entry holds the key and its slot still holds the block it was found in.

    Their slots are marked used by the current pass: the least recently used
    blocks go first when a later pass fills, but these may go too (the
    caller checks `generation`).
    """
    h = self._memo_index(keys)
    pos = self._memo_pos.take(h)
    ok = (self._memo_key.take(h) == keys) & (self._memo_gen.take(h)
                                             == self.generation(pos))
    self._used[pos[ok] // self.fmt.block_rows] = self.tick
    return pos, ok

  def remember(self, keys: np.ndarray, pos: np.ndarray) -> None:
    """Memoizes the slab positions pos [n] of keys [n] (-1: absent, skipped)."""
    hit = pos >= 0
    keys, pos = keys[hit], pos[hit]
    h = self._memo_index(keys)
    self._memo_key[h] = keys
    self._memo_pos[h] = pos
    self._memo_gen[h] = self.generation(pos)
