"""The OCDBT engine end to end (`insemb_table.Backend`): round trips, misses,
metadata, versions, pickled readers, corruption.

Precision contract tested here (see rows.quantize):
  float32   lookup returns exactly what was written;
  bfloat16  |got - v| <= 2**-8 |v| per element (round to nearest, 8-bit
            significand);
  int8      |got - v| <= max|row| / 254 per element (symmetric per-row scale
            max|row| / 127, rounding error at most half a step), times
            (1 + 2**-15) for float32 rounding of the scale arithmetic (the
            exact half-step bound is exceeded by ~1e-5 relative in practice).

(The engine's seams: store_*_test.py.)
"""

import datetime
import glob
import os
import pickle

from absl.testing import absltest
from absl.testing import parameterized
import ml_collections
import numpy as np

from iat_jax import errors
from iat_jax.store import database
from iat_jax.store import insemb_table
from iat_jax.store import memory_table
from iat_jax.store import rows
from iat_jax.store import segments
from iat_jax.store import tables
from tests import store_fixtures as sf

_BACKEND = insemb_table.Backend()


class InsEmbTableTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path

  @parameterized.parameters("float32", "bfloat16", "int8")
  def test_round_trip_big_lookup(self, dtype):
    keys, values = sf.data(20_000, 16, seed=1)
    path = os.path.join(self.dir, dtype)
    _BACKEND.publish(path,
                     keys,
                     values,
                     source="s",
                     source_step=0,
                     source_config=None,
                     dtype=dtype)
    table = _BACKEND.open(path)
    self.assertIsInstance(table, tables.Table)
    table.verify()
    self.assertLen(table, 20_000)
    self.assertEqual(table.dim, 16)
    rng = np.random.default_rng(2)
    idx = rng.integers(0, len(keys), 120_000)  # random order, many repeats
    got, found = table.lookup(keys[idx])
    self.assertEqual(got.shape, (120_000, 16))
    self.assertEqual(got.dtype, np.float32)
    self.assertTrue(found.all())
    want = values[idx]
    err = np.abs(got - want)
    if dtype == "float32":
      np.testing.assert_array_equal(got, want)
    elif dtype == "bfloat16":
      self.assertTrue((err <= 2.0**-8 * np.abs(want)).all())
      self.assertGreater(err.max(), 0)
    else:
      bound = np.abs(want).max(axis=1, keepdims=True) / 254
      self.assertTrue((err <= bound * sf.INT8_SLACK).all(), (err / bound).max())
      self.assertGreater((err / bound).max(), 0.9)  # the bound is tight
      self.assertTrue((np.abs(got)
                       <= np.abs(want).max(1, keepdims=True) * sf.INT8_SLACK).all())
    # Same hits as the in-memory table, for present and absent keys.
    query = np.concatenate(
        [keys[idx[:1000]],
         rng.integers(0, 2**64 - 1, 1000, dtype=np.uint64)])
    _, ref_found = memory_table.MemoryTable(keys, values).lookup(query)
    np.testing.assert_array_equal(table.lookup(query)[1], ref_found)

  def test_int8_bound_on_extreme_rows(self):
    values = np.array([[0, 0, 0, 0], [1e-30, -1e-30, 0, 5e-31], [127, -127, 0.5, 1],
                       [3.4e38, -1, 0, 1], [-2.5, 2.5, 1.25, -0.01]], np.float32)
    keys = np.array([10, 11, 12, 2**64 - 1, 2**63], np.uint64)  # edge keys too
    sf.write(self.dir, keys, values, dtype="int8")
    got, found = _BACKEND.open(self.dir).lookup(keys)
    self.assertTrue(found.all())
    bound = np.abs(values).max(axis=1, keepdims=True) / 254
    self.assertTrue((np.abs(got - values) <= bound * sf.INT8_SLACK).all())
    np.testing.assert_array_equal(got[0], 0)

  def test_missing_empty_and_duplicate_keys(self):
    keys, values = sf.data(1_000, 8, seed=3)
    sf.write(self.dir, keys, values)
    table = _BACKEND.open(self.dir)
    absent = np.array([0, 2**64 - 1, keys.min() - 1, keys.max() + 1], np.uint64)
    absent = absent[~np.isin(absent, keys)]
    query = np.concatenate([keys[:5], absent, keys[3:4], keys[3:4], absent[:1]])
    got, found = table.lookup(query)
    want_found = np.isin(query, keys)
    np.testing.assert_array_equal(found, want_found)
    np.testing.assert_array_equal(got[~want_found], 0)
    np.testing.assert_array_equal(got[:5], values[:5])
    np.testing.assert_array_equal(got[-3], values[3])  # duplicates
    np.testing.assert_array_equal(got[-2], values[3])
    # All missing, and empty.
    got, found = table.lookup(absent)
    self.assertFalse(found.any())
    np.testing.assert_array_equal(got, 0)
    got, found = table.lookup(np.array([], np.uint64))
    self.assertEqual(got.shape, (0, 8))
    self.assertEqual(found.shape, (0,))
    # int64 keys from a batch (hist_ins_id), 2-D input is flattened.
    got, found = table.lookup(keys[:6].astype(np.int64).reshape(2, 3))
    self.assertTrue(found.all())
    np.testing.assert_array_equal(got, values[:6])

  def test_empty_table(self):
    sf.write(self.dir, np.array([], np.uint64), np.zeros((0, 4), np.float32))
    table = _BACKEND.open(self.dir)
    self.assertEqual(table.metadata["num_rows"], 0)
    got, found = table.lookup(np.array([1, 2], np.uint64))
    self.assertEqual(got.shape, (2, 4))
    self.assertFalse(found.any())
    table.verify()

  def test_metadata_and_check(self):
    keys, values = sf.data(500, 12, seed=4)
    cfg = ml_collections.ConfigDict({"name": "din", "insemb_dim": 12})
    before = datetime.datetime.now(datetime.timezone.utc)
    _BACKEND.publish(self.dir,
                     keys,
                     values,
                     source="source_user",
                     source_step=1234,
                     source_config=cfg,
                     dtype="int8",
                     dataset="build-1")
    table = _BACKEND.open(self.dir)
    m = table.metadata
    self.assertEqual(m["d"], 12)
    self.assertEqual(m["dtype"], "int8")
    self.assertEqual(m["num_rows"], 500)
    self.assertEqual(m["source"], "source_user")
    self.assertEqual(m["source_step"], 1234)
    self.assertEqual(tables.step_of(table), 1234)
    self.assertEqual(m["dataset"], "build-1")
    self.assertEqual(m["source_config"], {"name": "din", "insemb_dim": 12})
    created = datetime.datetime.fromisoformat(m["created"])
    self.assertIsNotNone(created.tzinfo)
    self.assertLessEqual(before, created)
    self.assertLess(created - before, datetime.timedelta(minutes=5))
    # The checksum: sums of row hashes of (key, int8 values, scale), any order.
    stored, scales = rows.quantize(values, "int8")
    half = rows.add_checksums(rows.row_checksum(keys[::2], stored[::2], scales[::2]),
                              rows.row_checksum(keys[1::2], stored[1::2], scales[1::2]))
    self.assertEqual(m["checksum"], rows.checksum_hex(half))
    table.verify()
    self.assertGreater(table.bytes_on_disk(), 500 * (12 + 8 + 4))
    tables.check(table, d=12, source="source_user", dataset="build-1")
    with self.assertRaisesRegex(errors.StoreError,
                                r"d=12.*d=32.*--config\.model\.insemb_dim"):
      tables.check(table, d=32, source="source_user")
    with self.assertRaisesRegex(errors.StoreError,
                                r"'source_temporal'.*--config\.store\.source"):
      tables.check(table, d=12, source="source_temporal")
    with self.assertRaisesRegex(errors.StoreError, r"exported from dataset"):
      tables.check(table, d=12, source="source_user", dataset="another-build")

  def test_missing_and_corrupt_tables(self):
    missing = os.path.join(self.dir, "nothing_here")
    with self.assertRaisesRegex(errors.StoreError, missing):
      _BACKEND.open(missing)
    with self.assertRaisesRegex(errors.StoreError, "no InsEmb table"):
      _BACKEND.open(self.dir)  # nothing was created
    # Missing and corrupt pieces of a table.
    path = os.path.join(self.dir, "t")
    tkeys, tvalues = sf.data(5_000, 8, seed=5)
    sf.write(path, tkeys, tvalues)
    table = _BACKEND.open(path)
    seg = table.metadata["shards"][0][0]["name"]
    kv = database.open_kv(path)
    kv.write(f"{seg}/00000000", b"short").result()
    with self.assertRaisesRegex(
        errors.StoreError, rf"{path}: block 00000000 of segment {seg}: .*truncated"):
      _BACKEND.open(path).verify()
    kv.write(f"{seg}/index", None).result()
    with self.assertRaisesRegex(errors.StoreError, "index of segment.*missing"):
      _BACKEND.open(path).lookup(tkeys)
    kv.write("meta", b"{not json").result()
    with self.assertRaisesRegex(errors.StoreError, "corrupt metadata"):
      _BACKEND.open(path)
    with open(os.path.join(path, "manifest.ocdbt"), "r+b") as f:
      f.write(b"garbage!")
    with self.assertRaises(errors.StoreError):
      _BACKEND.open(path)

  def test_a_flipped_bit_in_a_block_fails_its_read_naming_it(self):
    keys, values = sf.data(5_000, 8, seed=5)
    sf.write(self.dir, keys, values, block_rows=64)
    seg = _BACKEND.open(self.dir).metadata["shards"][0][0]
    kv = database.open_kv(self.dir)
    fences = segments.read_index(kv, seg["name"], seg["blocks"]).fences
    seg = seg["name"]
    blob = bytearray(kv.read(f"{seg}/00000001").result().value)
    blob[len(blob) // 2] ^= 0x10  # one bit of one value: same length
    kv.write(f"{seg}/00000001", bytes(blob)).result()
    fresh = _BACKEND.open(self.dir)
    shard = keys >> np.uint64(64 - 6)  # 2**6 shards by default
    in_block = keys[(shard == 0) & (keys >= fences[1])]  # block 1 is shard 0's last
    others = keys[shard == 5][:100]
    _, found = fresh.lookup(others)
    self.assertTrue(found.all())  # the damage is confined to its block
    where = rf"{self.dir}: block 00000001 of segment {seg}: CRC-32 mismatch"
    with self.assertRaisesRegex(errors.StoreError, where):
      fresh.lookup(in_block)
    with self.assertRaisesRegex(errors.StoreError, where):
      _BACKEND.open(self.dir).verify()  # found beforehand, without a lookup

  def test_counters_count_misses_and_block_reads(self):
    keys, values = sf.data(5_000, 8, seed=5)
    sf.write(self.dir, keys, values, block_rows=64)
    table = _BACKEND.open(self.dir)
    absent = keys[:10] ^ np.uint64(1)
    absent = absent[~np.isin(absent, keys)]
    _, found = table.lookup(np.concatenate([keys[:100], absent]))
    self.assertEqual(found.sum(), 100)
    c = table.counters()
    self.assertEqual((c["keys"], c["missed"]), (100 + len(absent), len(absent)))
    self.assertGreater(c["blocks_read"], 0)
    self.assertEqual(c["rows_read"], 64 * c["blocks_read"])
    table.lookup(keys[:100])  # the same blocks, now cached
    self.assertEqual(table.counters()["blocks_read"], c["blocks_read"])

  def test_verify_detects_corruption(self):
    keys, values = sf.data(5_000, 8, seed=5)
    sf.write(self.dir, keys, values)
    table = _BACKEND.open(self.dir)
    table.verify()
    data = max(glob.glob(os.path.join(self.dir, "d", "*")), key=os.path.getsize)
    with open(data, "r+b") as f:  # one value byte of the big data file
      f.seek(os.path.getsize(data) // 2)
      byte = f.read(1)
      f.seek(os.path.getsize(data) // 2)
      f.write(bytes([byte[0] ^ 0xFF]))
    with self.assertRaisesRegex(errors.StoreError, "CRC-32 mismatch"):
      _BACKEND.open(self.dir).verify()

  def test_pinned_versions_and_pickled_readers(self):
    data = [sf.data(300, 4, seed=s) for s in range(3)]
    gens = [sf.write(self.dir, *data[0], step=0)]
    old = _BACKEND.open(self.dir)
    self.assertEqual(old.version, gens[0])
    pickled = pickle.dumps(old)
    self.assertLess(len(pickled), 300)  # path, version, budget
    gens.append(sf.write(self.dir, *data[1], step=1))
    gens.append(
        _BACKEND.upsert(_BACKEND.open(self.dir), *data[2], source_step=2).version)
    self.assertEqual(gens, sorted(gens))
    new = _BACKEND.open(self.dir)
    self.assertEqual(new.metadata["source_step"], 2)
    self.assertLen(new, 600)  # data[1] + data[2]
    self.assertFalse(new.lookup(data[0][0])[1].any())
    # A reader of version 1 (and its pickled copy, as in a Grain worker) and
    # one opened later by number still read that version.
    for reader in (old, pickle.loads(pickled), _BACKEND.open(self.dir,
                                                             version=gens[0])):
      self.assertEqual(reader.version, gens[0])
      got, found = reader.lookup(data[0][0])
      self.assertTrue(found.all())
      np.testing.assert_array_equal(got, data[0][1])
      self.assertFalse(reader.lookup(data[2][0])[1].any())
      reader.verify()
    mid = _BACKEND.open(self.dir, version=gens[1])
    self.assertLen(mid, 300)
    np.testing.assert_array_equal(mid.lookup(data[1][0])[0], data[1][1])


if __name__ == "__main__":
  absltest.main()
