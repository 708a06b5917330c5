"""`levels.Levels`: sorted keys -> slab positions, newest segment first, in
pieces when a batch's blocks do not fit the cache."""

from absl.testing import absltest
import numpy as np
import tensorstore as ts

from iat_jax import errors
from iat_jax.store import cache as cache_lib
from iat_jax.store import levels
from iat_jax.store import rows
from iat_jax.store import segments

_FMT = rows.Format(d=1, dtype="float32", block_rows=4)
_HALF = 2**63  # shard_bits=1: shard 1 holds the keys >= 2**63


def _segment(kv, name, keys, value) -> dict:
  batch = segments.Batch(kv)
  b = segments.SegmentBuilder(batch, name, _FMT)
  keys = np.asarray(keys, np.uint64)
  b.add(keys, np.full((len(keys), 1), value, np.float32), None)
  seg = b.finish()
  batch.flush()
  return seg


class LevelsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    kv = ts.KvStore.open("memory://").result()
    self.old = np.arange(0, 400, 2, dtype=np.uint64)  # shard 0, 50 blocks
    self.new = np.arange(0, 40, 4, dtype=np.uint64)  # newer rows of some of them
    self.high = np.uint64(_HALF) + np.arange(0, 60, 3, dtype=np.uint64)  # shard 1
    meta = {
        "shard_bits":
            1,
        "shards": [[_segment(kv, "a", self.old, 1.0),
                    _segment(kv, "b", self.new, 2.0)],
                   [_segment(kv, "c", self.high, 3.0)]]
    }
    self.levels = levels.Levels("t", kv, meta)
    self.query = np.sort(
        np.concatenate([self.old, self.high, [1, 3, 401]]).astype(np.uint64))

  def _values(self, cache, piece):
    start, pos = piece
    flat = cache.vals[:, 0]
    return start, np.where(pos >= 0, flat[np.maximum(pos, 0)], 0)

  def test_newest_row_of_each_key(self):
    cache = cache_lib.BlockCache(_FMT, 1 << 20)
    (start, pos), = list(self.levels.pieces(self.query, cache))
    self.assertEqual(start, 0)
    hit = pos >= 0
    np.testing.assert_array_equal(self.query[~hit], [1, 3, 401])
    np.testing.assert_array_equal(cache.keys.reshape(-1)[pos[hit]], self.query[hit])
    _, values = self._values(cache, (start, pos))
    want = np.where(np.isin(self.query, self.new), 2.0,
                    np.where(self.query >= np.uint64(_HALF), 3.0, 1.0))
    np.testing.assert_array_equal(values[hit], want[hit])

  def test_a_batch_bigger_than_the_cache_comes_in_pieces(self):
    cache = cache_lib.BlockCache(_FMT, 4 << 10)
    got, starts = np.zeros(len(self.query)), []
    for start, pos in self.levels.pieces(self.query, cache):
      starts.append(start)
      _, values = self._values(cache, (start, pos))
      got[start:start + len(pos)] = values
    self.assertLess(cache.capacity(), 58)  # the query needs 3 + 5 + 50 blocks
    self.assertGreater(len(starts), 1)
    want = np.where(np.isin(self.query, self.new), 2.0,
                    np.where(self.query >= np.uint64(_HALF), 3.0, 1.0))
    want[np.isin(self.query, [1, 3, 401])] = 0
    np.testing.assert_array_equal(got, want)

  def test_a_cache_without_room_for_one_block_per_segment(self):
    cache = cache_lib.BlockCache(_FMT, 1 << 20)
    cache.capacity = lambda: 1  # two levels: a key may need two blocks
    with self.assertRaisesRegex(errors.StoreError, "cannot hold one block per"):
      list(self.levels.pieces(np.array([4], np.uint64), cache))

  def test_sorted_distinct(self):
    np.testing.assert_array_equal(levels.sorted_distinct(np.array([1, 1, 2, 5, 5])),
                                  [1, 2, 5])


if __name__ == "__main__":
  absltest.main()
