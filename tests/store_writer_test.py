"""`writer`: whole versions (and the rows they refuse) and LSM upserts."""

import os

from absl.testing import absltest
import numpy as np

from iat_jax import errors
from iat_jax.store import reader
from iat_jax.store import writer
from tests import store_fixtures as sf


class WriterTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path

  def test_bad_rows_are_refused(self):
    keys, values = sf.data(10, 4)
    with self.assertRaisesRegex(errors.StoreError, "duplicate InsIDs"):
      sf.write(self.dir, np.concatenate([keys, keys[:1]]),
               np.concatenate([values, values[:1]]))
    bad = values.copy()
    bad[3, 1] = np.nan
    with self.assertRaisesRegex(errors.StoreError, "non-finite"):
      sf.write(self.dir, keys, bad)
    with self.assertRaisesRegex(errors.StoreError, "do not match keys"):
      sf.write(self.dir, keys[:5], values)
    with self.assertRaisesRegex(errors.StoreError, "dtype 'float16'"):
      sf.write(self.dir, keys, values, dtype="float16")
    with self.assertRaisesRegex(errors.StoreError, "shard_bits=17"):
      sf.write(self.dir, keys, values, shard_bits=17)
    with self.assertRaisesRegex(errors.StoreError, "block_rows=12"):
      sf.write(self.dir, keys, values, block_rows=12)
    with self.assertRaisesRegex(errors.StoreError, "no InsEmb table"):
      reader.Table(self.dir)  # nothing was published
    sf.write(self.dir, keys, values)
    with self.assertRaisesRegex(errors.StoreError, "width 3, the table d=4"):
      writer.upsert(reader.Table(self.dir), keys, values[:, :3])

  def test_a_new_version_replaces_every_row(self):
    keys, values = sf.data(1_000, 4, seed=1)
    first = sf.write(self.dir, keys, values)
    other_keys, other_values = sf.data(500, 4, seed=5)  # keys 2,500..2,999
    second = sf.write(self.dir, other_keys, other_values, step=1)
    self.assertGreater(second, first)
    table = reader.Table(self.dir)
    self.assertLen(table, 500)
    self.assertFalse(table.lookup(keys)[1].any())
    np.testing.assert_array_equal(table.lookup(other_keys)[0], other_values)

  def test_upsert_replaces_adds_and_compacts(self):
    keys, values = sf.data(20_000, 8, seed=20)
    sf.write(self.dir, keys, values, shard_bits=2)
    want = dict(zip(keys.tolist(), values))
    rng = np.random.default_rng(21)
    table = reader.Table(self.dir)
    for i in range(12):
      old = keys[rng.choice(len(keys), 300, replace=False)]
      new_keys, _ = sf.data(200, 8, seed=100 + i)
      k = np.concatenate([old, new_keys])
      v = rng.standard_normal((len(k), 8)).astype(np.float32)
      table = writer.upsert(table, k, v, source_step=i)
      want.update(zip(k.tolist(), v))
      keys = np.array(list(want), np.uint64)
      got, found = table.lookup(k)  # the new version holds the rows
      self.assertTrue(found.all())
      np.testing.assert_array_equal(got, v)
    table = reader.Table(self.dir)
    self.assertLen(table, len(want))
    self.assertEqual(table.metadata["source_step"], 11)
    got, found = table.lookup(keys)
    self.assertTrue(found.all())
    np.testing.assert_array_equal(got, np.stack([want[k] for k in keys.tolist()]))
    table.verify()
    # Merges keep a few segments a shard; the content equals a fresh write.
    self.assertLessEqual(max(len(s) for s in table.metadata["shards"]), 4)
    fresh = os.path.join(self.dir, "fresh")
    sf.write(fresh, keys, np.stack([want[k] for k in keys.tolist()]), shard_bits=2)
    self.assertEqual(
        reader.Table(fresh).metadata["checksum"], table.metadata["checksum"])
    # An upsert over a stale version fails instead of losing an update.
    writer.upsert(table, keys[:3], values[:3])
    with self.assertRaisesRegex(errors.StoreError, "another writer"):
      writer.upsert(table, keys[3:6], values[3:6])

  def test_upsert_keeps_the_reader_budget(self):
    keys, values = sf.data(100, 4, seed=3)
    sf.write(self.dir, keys, values)
    table = writer.upsert(reader.Table(self.dir, cache_bytes=1 << 20), keys[:5],
                          values[:5] * 2)
    self.assertEqual(table.cache_bytes, 1 << 20)
    self.assertEqual(table.version, reader.Table(self.dir).version)
    np.testing.assert_array_equal(table.lookup(keys[:5])[0], values[:5] * 2)


if __name__ == "__main__":
  absltest.main()
