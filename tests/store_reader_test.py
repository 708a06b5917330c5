"""`reader.Table`: lookups within cache_bytes (eviction, pieces, threads, the
position memo), reader memory independent of the table size."""

from concurrent import futures
import os
import tracemalloc

from absl.testing import absltest
import numpy as np

from iat_jax.store import reader
from iat_jax.store import rows
from iat_jax.store import writer
from tests import store_fixtures as sf


class ReaderTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path

  def test_cache_budget_eviction_and_threads(self):
    keys, values = sf.data(20_000, 16, seed=11)  # 79 blocks of 256 rows
    sf.write(self.dir, keys, values, dtype="bfloat16", shard_bits=2)
    want = values.astype(rows.DTYPES["bfloat16"].numpy_dtype).astype(np.float32)
    budget = 64 << 10  # ~7 blocks of 8.2 KB, plus the 4 indexes
    table = reader.Table(self.dir, cache_bytes=budget)
    rng = np.random.default_rng(12)
    first = np.flatnonzero(keys >> np.uint64(62) == 0)[:2_000]  # one shard's keys:
    np.testing.assert_array_equal(table.lookup(keys[first])[0], want[first])
    for _ in range(4):  # then all four are loaded, and every batch needs every
      # block: served in pieces, evicting blocks cached before the others loaded
      idx = rng.integers(0, len(keys), 3_000)
      np.testing.assert_array_equal(table.lookup(keys[idx])[0], want[idx])
      self.assertLessEqual(table.memory_bytes(), budget)
    # Absent keys among the pieces read zero rows (the output starts empty).
    absent = rng.integers(0, 2**64 - 1, 500, dtype=np.uint64)
    absent = absent[~np.isin(absent, keys)]
    got, found = table.lookup(np.concatenate([keys[idx], absent]))
    np.testing.assert_array_equal(found, np.arange(len(idx) + len(absent)) < len(idx))
    np.testing.assert_array_equal(got[:len(idx)], want[idx])
    np.testing.assert_array_equal(got[len(idx):], 0)

    def worker(seed):
      r = np.random.default_rng(seed)
      for _ in range(10):
        idx = r.integers(0, len(keys), 500)
        np.testing.assert_array_equal(table.lookup(keys[idx])[0], want[idx])

    with futures.ThreadPoolExecutor(4) as pool:
      list(pool.map(worker, range(4)))
    self.assertLessEqual(table.memory_bytes(), budget)

  def test_memoized_positions_survive_eviction_and_new_versions(self):
    keys, values = sf.data(20_000, 16, seed=15)
    sf.write(self.dir, keys, values, shard_bits=2)
    table = reader.Table(self.dir, cache_bytes=96 << 10)
    # One key of each block of shard 0 (its sorted keys, 256 per block).
    shard = np.sort(keys[keys >> np.uint64(62) == 0])
    first = shard[::256]
    where = {k: i for i, k in enumerate(keys.tolist())}
    rows_of = lambda q: values[[where[k] for k in q.tolist()]]
    table.lookup(first[:3])  # memoized ...
    cache = table._cache  # pylint: disable=protected-access
    self.assertTrue(cache.recall(first[:3])[1].all())
    # ... then as many other blocks as the cache holds: reading them evicts
    # the memoized keys' blocks in the same lookup.
    query = np.concatenate([first[:3], first[3:3 + cache.capacity()]])
    got, found = table.lookup(query)
    self.assertTrue(found.all())
    np.testing.assert_array_equal(got, rows_of(query))
    for _ in range(3):  # slots refilled by other blocks: stale entries unused
      np.testing.assert_array_equal(table.lookup(first[:3])[0], rows_of(first[:3]))
      np.testing.assert_array_equal(table.lookup(first[-6:])[0], rows_of(first[-6:]))
    # An upsert's newer row wins over the memoized older one.
    new = values[[where[k] for k in first[:3].tolist()]] + 1
    writer.upsert(reader.Table(self.dir), first[:3], new)
    newer = reader.Table(self.dir, cache_bytes=96 << 10)
    np.testing.assert_array_equal(newer.lookup(first[:3])[0], new)
    np.testing.assert_array_equal(table.lookup(first[:3])[0], rows_of(first[:3]))

  def test_a_lookup_of_many_blocks_stays_within_the_budget(self):
    # 300k rows in ~1,200 blocks (21 MB) behind a 16 MiB budget: 20k random
    # keys need nearly every block, so the lookup is served in pieces, each
    # filled by reads of at most 1/8 of the budget at a time.
    keys, values = sf.data(300_000, 16, seed=16)
    sf.write(self.dir, keys, values)
    budget = 16 << 20
    table = reader.Table(self.dir, cache_bytes=budget)
    query = np.random.default_rng(16).permutation(keys)[:20_000]
    tracemalloc.start()
    try:
      got, found = table.lookup(query)
      peak = tracemalloc.get_traced_memory()[1]
    finally:
      tracemalloc.stop()
    self.assertTrue(found.all())
    # The slab, its reads in flight and the lookup's output (and as much
    # again of per-key work arrays); reading all of a piece's blocks before
    # placing any peaked at ~1.8x the budget.
    self.assertLess(peak, 1.1 * budget + 2 * got.nbytes)
    self.assertLessEqual(table.memory_bytes(), budget)

  def test_reader_memory_does_not_grow_with_table_size(self):
    budget = 1 << 20
    used = []
    for n in (30_000, 300_000):
      path = os.path.join(self.dir, str(n))
      keys, values = sf.data(n, 16, seed=13)
      sf.write(path, keys, values, dtype="int8")
      table = reader.Table(path, cache_bytes=budget)
      rng = np.random.default_rng(14)
      for _ in range(3):
        idx = rng.integers(0, n, 20_000)
        got, found = table.lookup(keys[idx])
        self.assertTrue(found.all())
        np.testing.assert_allclose(got, values[idx], atol=0.1)
      used.append(table.memory_bytes())
    self.assertLessEqual(max(used), budget)
    self.assertGreater(used[0], budget // 2)  # the small table nearly fits
    self.assertLess(used[1], 2 * used[0])  # 10x the rows, the same budget

  def test_lookup_stored_returns_the_stored_rows(self):
    keys, values = sf.data(3_000, 8, seed=17)
    sf.write(self.dir, keys, values, dtype="int8")
    stored, scales = rows.quantize(values, "int8")
    query = np.concatenate([keys[::3], np.array([0], np.uint64)])
    got, got_scales, found = reader.Table(self.dir).lookup_stored(query)
    np.testing.assert_array_equal(found, np.isin(query, keys))
    np.testing.assert_array_equal(got[:-1], stored[::3])
    np.testing.assert_array_equal(got_scales[:-1], scales[::3])
    np.testing.assert_array_equal(got[-1], 0)


if __name__ == "__main__":
  absltest.main()
