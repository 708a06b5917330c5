"""`cache.BlockCache`: slots, LRU eviction, the memo, the budget."""

from unittest import mock

from absl.testing import absltest
import numpy as np
import tensorstore as ts

from iat_jax.store import cache as cache_lib
from iat_jax.store import rows
from iat_jax.store import segments

_FMT = rows.Format(d=2, dtype="float32", block_rows=4)  # 80 B a slot


def _source(n_blocks: int) -> segments.Source:
  """A segment of n_blocks full blocks in a memory kvstore: key i -> [i, -i]."""
  kv = ts.KvStore.open("memory://").result()
  keys = np.arange(1, 4 * n_blocks + 1, dtype=np.uint64) * np.uint64(10)
  values = np.stack([keys, -keys.astype(np.float64)], 1).astype(np.float32)
  batch = segments.Batch(kv)
  b = segments.SegmentBuilder(batch, "seg", _FMT)
  b.add(keys, values, None)
  seg = b.finish()
  batch.flush()
  return segments.Source(kv, seg, "memory://")


class BlockCacheTest(absltest.TestCase):

  def test_fill_places_blocks_within_the_budget(self):
    cache = cache_lib.BlockCache(_FMT, 4096)
    seg = cache.register(_source(10))
    self.assertEqual(cache.reserved, 10 * 12 + 10 * 4)  # index + slot_of
    np.testing.assert_array_equal(seg.slot_of, -1)
    cache.advance()
    cache.fill([(seg, np.array([0, 3]))])
    for block in (0, 3):
      slot = seg.slot_of[block]
      self.assertGreaterEqual(slot, 0)
      np.testing.assert_array_equal(cache.keys[slot],
                                    (np.arange(4) + 4 * block + 1) * 10)
      self.assertEqual(cache.count[slot], 4)
      np.testing.assert_array_equal(cache.vals[slot * 4:slot * 4 + 4, 0],
                                    cache.keys[slot])
    self.assertEqual(cache.memory_bytes(), (2 + cache.read_blocks) * cache.slot_bytes +
                     cache.reserved + cache.memo_bytes)
    self.assertLessEqual(cache.memory_bytes(), 4096)
    self.assertEqual(cache.capacity(),
                     (4096 - cache.reserved - cache.memo_bytes -
                      cache.read_blocks * cache.slot_bytes) // cache.slot_bytes)

  def test_evicts_the_least_recently_used_blocks(self):
    cache = cache_lib.BlockCache(_FMT, 2048)
    seg = cache.register(_source(30))
    self.assertEqual(cache.capacity(), 16)
    cache.advance()
    cache.fill([(seg, np.arange(16))])
    cache.advance()
    cache.touch(seg.slot_of[:4])  # blocks 0..3 used again
    cache.advance()
    cache.fill([(seg, np.arange(16, 20))])
    cached = np.flatnonzero(seg.slot_of >= 0)
    np.testing.assert_array_equal(cached, [0, 1, 2, 3, *range(8, 20)])
    self.assertLessEqual(cache.memory_bytes(), 2048)

  def test_fills_keep_a_bounded_number_of_reads_in_flight(self):
    cache = cache_lib.BlockCache(_FMT, 2048)
    segs = [cache.register(_source(30)) for _ in range(2)]
    with mock.patch.object(segments, "stream_blocks",
                           wraps=segments.stream_blocks) as stream:
      cache.advance()
      cache.fill([(segs[0], np.arange(3)), (segs[1], np.arange(5, 8))])
    (items, _, window), _ = stream.call_args
    self.assertEqual(window, cache.read_blocks)  # one stream across both segments
    self.assertLess(cache.read_blocks, 6)
    self.assertEqual([(s.seg["name"], b) for s, b in items],
                     [("seg", b) for b in (0, 1, 2, 5, 6, 7)])
    for seg, blocks in ((segs[0], range(3)), (segs[1], range(5, 8))):
      for b in blocks:  # key i -> [i, -i], block b holds keys 10 * (4b + 1..4)
        slot = seg.slot_of[b]
        want = np.arange(4 * b + 1, 4 * b + 5) * 10
        np.testing.assert_array_equal(cache.keys[slot], want)
        np.testing.assert_array_equal(cache.vals[4 * slot:4 * slot + 4, 1], -want)

  def test_stream_reads_ahead_at_most_a_window(self):

    class CountingKv:  # the real memory kvstore, counting the reads issued

      def __init__(self, kv):
        self.kv, self.issued = kv, 0

      def read(self, key):
        self.issued += 1
        return self.kv.read(key)

    src = _source(30)
    src.load()  # the index read is not a block read
    src.kv = CountingKv(src.kv)
    ahead = []
    for i, (k, _, _) in enumerate(
        segments.stream_blocks([(src, b) for b in range(20)], _FMT, 4)):
      ahead.append(src.kv.issued - (i + 1))
      np.testing.assert_array_equal(k, np.arange(4 * i + 1, 4 * i + 5) * 10)
    self.assertEqual(len(ahead), 20)
    self.assertEqual(max(ahead), 4)  # read ahead, but never more than the window

  def test_memo_entries_are_valid_until_their_slot_is_refilled(self):
    cache = cache_lib.BlockCache(_FMT, 2048)
    seg = cache.register(_source(30))
    cache.advance()
    cache.fill([(seg, np.array([0]))])
    slot = seg.slot_of[0]
    keys = cache.keys[slot, :2].copy()
    pos = slot * 4 + np.arange(2)
    _, ok = cache.recall(keys)
    self.assertFalse(ok.any())  # never remembered
    cache.remember(keys, np.array([pos[0], -1]))  # -1: absent, not memoized
    got, ok = cache.recall(keys)
    np.testing.assert_array_equal(ok, [True, False])
    self.assertEqual(got[0], pos[0])
    before = cache.generation(pos[:1])
    for b in range(1, 30):  # every other block, one pass each: block 0 goes
      cache.advance()
      cache.fill([(seg, np.array([b]))])
    self.assertEqual(seg.slot_of[0], -1)
    self.assertFalse(cache.recall(keys)[1].any())
    self.assertNotEqual(cache.generation(pos[:1])[0], before[0])  # refilled


if __name__ == "__main__":
  absltest.main()
