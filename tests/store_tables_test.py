"""`tables`: the store contract over `BACKENDS` (a dummy backend registered
alone, the memory backend against the OCDBT one) and its config checks."""

import glob
import os
import pickle
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from iat_jax import configs
from iat_jax import errors
from iat_jax.store import memory_table
from iat_jax.store import tables
from tests import store_fixtures as sf

_D = 4


def _config(backend: str = "ocdbt", **store):
  config = configs.base_config()
  config.model.insemb_dim = _D
  config.store.backend = backend
  config.store.update(store)
  return config


class _Dummy(memory_table.MemoryBackend):
  """The memory backend, counting the calls `tables` makes of it."""

  def __init__(self):
    super().__init__()
    self.calls = []

  def open(self, path, **kw):
    self.calls.append("open")
    return super().open(path, **kw)

  def publish(self, path, keys, values, **kw):
    self.calls.append("publish")
    return super().publish(path, keys, values, **kw)

  def upsert(self, table, keys, values, **kw):
    self.calls.append("upsert")
    return super().upsert(table, keys, values, **kw)

  def export(self, path, export_id, **kw):
    self.calls.append("export")
    return super().export(path, export_id, **kw)


class RegistryTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dummy = _Dummy()
    registry = mock.patch.dict(tables.BACKENDS, {"dummy": self.dummy})
    registry.start()
    self.addCleanup(registry.stop)
    self.workdir = self.create_tempdir().full_path
    self.config = _config("dummy")
    tables.validate_config(self.config)
    self.ins_id, self.values = sf.data(300, _D, seed=1)
    self.uid = np.arange(300) % 7  # 7 users
    self.keys = tables.store_keys(self.config.store.placement, self.ins_id, self.uid)
    self.path = tables.path(self.config, self.workdir, "source_temporal")
    tables.publish(self.config,
                   self.path,
                   self.keys,
                   self.values,
                   source="source_temporal",
                   step=3,
                   fingerprint="f")

  def tearDown(self):  # nothing reached the OCDBT backend's files
    self.assertEqual(glob.glob(os.path.join(self.workdir, "**", "*"), recursive=True),
                     [])
    super().tearDown()

  def test_a_registered_backend_is_opened_checked_and_looked_up(self):
    table = tables.open_checked(self.config, self.workdir, "source_temporal", "f")
    self.assertIsInstance(table, memory_table.MemoryTable)
    self.assertIsInstance(table, tables.Table)
    got, found = table.lookup(self.keys[::-1])
    self.assertTrue(found.all())
    np.testing.assert_array_equal(got, self.values[::-1])
    self.assertTrue(tables.is_published(self.config, self.path, "source_temporal", 3))
    self.assertFalse(  # the same path under the ocdbt backend
        tables.is_published(_config("ocdbt"), self.path, "source_temporal", 3))
    self.assertEqual(self.dummy.calls, ["publish", "open", "open"])

  def test_a_registered_backend_exports_and_upserts(self):
    config, keys, values = self.config, self.keys, self.values
    table = tables.open_checked(config, self.workdir, "source_temporal", "f")
    copy = tables.path(config, self.workdir, "source_stream")
    where = dict(source="source_stream", step=3, fingerprint="f")
    self.assertFalse(tables.holds_export(config, copy, **where))
    tables.publish_copy(config, table, self.ins_id, self.uid, copy, **where)
    self.assertTrue(tables.holds_export(config, copy, **where))
    got, found = tables.open_table(config, copy).lookup(keys)
    self.assertTrue(found.all())
    np.testing.assert_array_equal(got, values)
    w = tables.export_writer(config,
                             self.path,
                             source="source_temporal",
                             step=4,
                             fingerprint="f")
    w.add(keys[:100], values[:100] * 2)
    tables.finish_export(w)
    table = tables.open_checked(config, self.workdir, "source_temporal", "f")
    self.assertEqual((tables.step_of(table), len(table)), (4, 100))
    np.testing.assert_array_equal(table.lookup(keys[:100])[0], values[:100] * 2)
    up = tables.Upserts.open_or_create(config,
                                       os.path.join(self.workdir, "up"),
                                       d=_D,
                                       dtype="float32",
                                       source="s",
                                       fingerprint="f")
    up.put(keys[:5], values[:5])
    up.flush(step=7)
    self.assertEqual(tables.step_of(tables.open_table(config, up.path)), 7)
    self.assertEqual(sorted(set(self.dummy.calls)),
                     ["export", "open", "publish", "upsert"])


class PlacementTest(absltest.TestCase):

  def test_user_placement_keeps_a_users_rows_adjacent_and_distinct(self):
    ins_id, _ = sf.data(20_000, 1, seed=2)
    uid = np.random.default_rng(0).integers(0, 50, len(ins_id))
    keys = tables.store_keys("user", ins_id, uid)
    self.assertEqual(len(np.unique(keys)), len(keys))  # no two rows share a key
    np.testing.assert_array_equal(tables.store_keys("insid", ins_id, uid), ins_id)
    order = np.argsort(keys)
    runs = 1 + np.count_nonzero(np.diff(uid[order]))
    self.assertEqual(runs, 50)  # sorted by key, each user's rows are one run
    hashed_runs = 1 + np.count_nonzero(np.diff(uid[np.argsort(ins_id)]))
    self.assertGreater(hashed_runs, 10_000)  # by InsID they scatter
    self.assertEqual(
        tables.store_keys("user", np.zeros(3, np.uint64), uid[:3]).tolist(),
        [0, 0, 0])  # no instance stays no instance
    shards = keys >> np.uint64(64 - 6)
    for u in range(50):  # one user, one shard
      self.assertEqual(len(np.unique(shards[uid == u])), 1)

  def test_a_table_keyed_another_way_is_refused(self):
    workdir = self.create_tempdir().full_path
    user, insid = _config("memory"), _config("memory", placement="insid")
    keys, values = sf.data(10, _D, seed=1)
    tables.publish(user,
                   tables.path(user, workdir, "s"),
                   keys,
                   values,
                   source="s",
                   step=1,
                   fingerprint="f")
    tables.open_checked(user, workdir, "s", "f")
    with self.assertRaisesRegex(errors.StoreError, r"placement.*'f/user'.*'f'"):
      tables.open_checked(insid, workdir, "s", "f")


class ValidateConfigTest(absltest.TestCase):

  def test_names_the_flag(self):
    tables.validate_config(_config())
    tables.validate_config(_config("memory"))
    for store, flag, message in (
        (dict(backend="zarr"), "backend", "'zarr' is not one of ('ocdbt', 'memory')"),
        (dict(dtype="float16"), "dtype", "'float16' is not one of ('float32',"),
        (dict(shard_bits=0), "shard_bits", "0 must be in 1..16"),
        (dict(shard_bits=17), "shard_bits", "17 must be in 1..16"),
        (dict(block_rows=48), "block_rows", "48 must be a power of two >= 2"),
        (dict(block_rows=1), "block_rows", "1 must be a power of two >= 2"),
        (dict(cache_bytes=0), "cache_bytes", "must be > 0, got 0"),
        (dict(placement="uid"), "placement", "'uid' is not one of ('user', 'insid')"),
    ):
      with self.assertRaises(errors.ConfigError) as e:
        tables.validate_config(_config(**store))
      self.assertEqual(e.exception.flag, f"--config.store.{flag}")
      self.assertIn(f"--config.store.{flag}: {message}", str(e.exception))


class BackendsAgreeTest(parameterized.TestCase):
  """The memory and OCDBT backends hold the same rows the same way."""

  def _both(self):
    root = self.create_tempdir().full_path
    return [(tables.BACKENDS[name], os.path.join(root, name))
            for name in ("ocdbt", "memory")]

  @parameterized.parameters("float32", "bfloat16", "int8")
  def test_same_lookups_and_checksums(self, dtype):
    keys, values = sf.data(5_000, _D, seed=2)
    absent = sf.data(100, _D, seed=99)[0]
    query = np.concatenate([keys[::3], absent, keys[:7]])
    new_keys, new_values = sf.data(400, _D, seed=3)
    got = []
    for backend, path in self._both():
      backend.publish(path,
                      keys,
                      values,
                      source="s",
                      source_step=1,
                      source_config=None,
                      dtype=dtype,
                      dataset="f",
                      shard_bits=2,
                      block_rows=8)
      table = backend.open(path)
      first = table.lookup(query)
      table = backend.upsert(table,
                             np.concatenate([keys[:200], new_keys]),
                             np.concatenate([values[:200] + 1, new_values]),
                             source_step=2)
      table.verify()
      got.append((first, table.lookup(np.concatenate([query, new_keys])), len(table),
                  table.metadata["checksum"], tables.step_of(table)))
    (ocdbt_first, ocdbt_after, *ocdbt_rest), (mem_first, mem_after, *mem_rest) = got
    for a, b in ((ocdbt_first, mem_first), (ocdbt_after, mem_after)):
      np.testing.assert_array_equal(a[0], b[0])  # bit for bit
      np.testing.assert_array_equal(a[1], b[1])
    self.assertEqual(ocdbt_rest, mem_rest)
    self.assertEqual(mem_rest[0], 5_400)

  def test_same_exports(self):
    keys, values = sf.data(3_000, _D, seed=4)
    sums = []
    for name in ("ocdbt", "memory"):
      config = _config(name, export_chunk_rows=500, dtype="int8")
      path = os.path.join(self.create_tempdir().full_path, "t")
      w = tables.export_writer(config, path, source="s", step=2, fingerprint="f")
      for lo in range(0, 3_000, 700):
        w.add(keys[lo:lo + 700], values[lo:lo + 700])
      tables.finish_export(w)
      table = tables.open_table(config, path)
      table.verify()
      sums.append((len(table), table.metadata["checksum"], table.lookup(keys)[0]))
    self.assertEqual(sums[0][:2], sums[1][:2])
    np.testing.assert_array_equal(sums[0][2], sums[1][2])


class MemoryBackendTest(absltest.TestCase):

  def test_versions_writers_and_exports(self):
    store = memory_table.MemoryBackend()
    path = self.create_tempdir().full_path
    with self.assertRaisesRegex(errors.StoreError, "no InsEmb table.*--mode=export"):
      store.open(path)
    keys, values = sf.data(50, _D, seed=5)
    first = store.publish(path,
                          keys,
                          values,
                          source="s",
                          source_step=0,
                          source_config=None)
    table = store.open(path)
    newer = store.upsert(table, keys[:3], values[:3] + 1, source_step=1)
    self.assertEqual((first, newer.version), (1, 2))
    np.testing.assert_array_equal(
        store.open(path, version=1).lookup(keys[:3])[0], values[:3])
    with self.assertRaisesRegex(errors.StoreError, "another writer"):
      store.upsert(table, keys[:1], values[:1])
    with self.assertRaisesRegex(errors.StoreError, "no version 3"):
      store.open(path, version=3)
    with self.assertRaisesRegex(errors.StoreError, "one process"):
      store.export(path, "e", process_index=0, process_count=2, d=_D)
    copy = pickle.loads(pickle.dumps(newer))  # as into a Grain worker
    np.testing.assert_array_equal(copy.lookup(keys)[0], newer.lookup(keys)[0])
    self.assertEqual(newer.memory_bytes(), 50 * (8 + 4 * _D))
    self.assertEqual(newer.full_index_bytes(), 0)

  def test_a_bare_table(self):
    keys = np.array([3, 1, 2], np.uint64)
    values = np.arange(6, dtype=np.float32).reshape(3, 2)
    table = memory_table.MemoryTable(keys, values)
    got, found = table.lookup(np.array([[2, 9]], np.int64))
    np.testing.assert_array_equal(found, [True, False])
    np.testing.assert_array_equal(got, [[4, 5], [0, 0]])
    self.assertEqual((len(table), table.dim, table.metadata["num_rows"]), (3, 2, 3))
    table.verify()
    empty = memory_table.MemoryTable(keys[:0], values[:0])
    got, found = empty.lookup(keys)
    self.assertEqual((got.shape, found.any()), ((3, 2), False))


if __name__ == "__main__":
  absltest.main()
