"""Tests of the InsEmb store: round trips, misses, metadata, versions, upserts,
crash-safe parallel export, bounded reader memory, Eq. 12.

Precision contract tested here (see insemb_table's docstring):
  float32   lookup returns exactly what was written;
  bfloat16  |got - v| <= 2**-8 |v| per element (round to nearest, 8-bit
            significand);
  int8      |got - v| <= max|row| / 254 per element (symmetric per-row scale
            max|row| / 127, rounding error at most half a step), times
            (1 + 2**-15) for float32 rounding of the scale arithmetic (the
            exact half-step bound is exceeded by ~1e-5 relative in practice).
"""

from concurrent import futures
import datetime
import glob
import os
import pickle
import signal
import subprocess
import sys
import time
import tracemalloc

from absl.testing import absltest
from absl.testing import parameterized
import ml_collections
import numpy as np

from iat_jax import errors
from iat_jax.store import estimate
from iat_jax.store import insemb_table
from iat_jax.store import memory_table
from iat_jax.store import segments

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_INT8_SLACK = 1 + 2.0**-15
# The export of the crash and multi-process tests.
_EXPORT_ROWS, _EXPORT_DIM, _EXPORT_CHUNK = 300_000, 16, 10_000


def _data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """n unique uint64 keys spread over the whole range, in random order; [n, d].

  The keys are a bijection of 0..n-1 (odd multiply, xor-shift: both invertible
  mod 2**64), so they are unique without a sort.
  """
  rng = np.random.default_rng(seed)
  keys = np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(n)
  keys *= np.uint64(0x9E3779B97F4A7C15)
  keys ^= keys >> np.uint64(29)
  keys *= np.uint64(0xBF58476D1CE4E5B9)
  values = rng.random((n, d), dtype=np.float32)
  values -= 0.5
  values *= rng.uniform(0.02, 20, (n, 1)).astype(np.float32)  # varied row norms
  return keys, values


def _write(path, keys, values, dtype="float32", step=0, source="source_temporal", **kw):
  return insemb_table.write(path,
                            keys,
                            values,
                            source=source,
                            source_step=step,
                            source_config={"d": values.shape[1]},
                            dtype=dtype,
                            **kw)


def child_export(path: str, process_index: int, process_count: int, phase: str) -> None:
  """Run in subprocesses: one process's part of the test export.

  phase "all" (1 process): add, close, merge, publish; "write" / "merge": one
  phase of a multi-process export of slice process_index.
  """
  keys, values = _data(_EXPORT_ROWS, _EXPORT_DIM, seed=7)
  mine = slice(process_index, None, process_count)
  if phase in ("all", "write"):
    w = insemb_table.ExportWriter(path,
                                  "e1",
                                  process_index=process_index,
                                  process_count=process_count,
                                  d=_EXPORT_DIM,
                                  dtype="int8",
                                  chunk_rows=_EXPORT_CHUNK)
    for start in range(0, _EXPORT_ROWS // process_count, 4096):  # batches
      w.add(keys[mine][start:start + 4096], values[mine][start:start + 4096])
    w.close()
  if phase in ("all", "merge"):
    insemb_table.merge_export(path,
                              "e1",
                              process_index=process_index,
                              process_count=process_count)
  if phase == "all":
    insemb_table.publish(path,
                         "e1",
                         source="source_user",
                         source_step=3,
                         source_config=None)


def _child(path: str, process_index: int, process_count: int, phase: str):
  return subprocess.Popen([
      sys.executable, "-c", "import sys; sys.path[:0] = [sys.argv[1]]; "
      "from tests import insemb_table_test as t; "
      "t.child_export(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])",
      _ROOT, path,
      str(process_index),
      str(process_count), phase
  ])


class InsEmbTableTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path

  @parameterized.parameters("float32", "bfloat16", "int8")
  def test_round_trip_big_lookup(self, dtype):
    keys, values = _data(20_000, 16, seed=1)
    path = os.path.join(self.dir, dtype)
    _write(path, keys, values, dtype=dtype)
    table = insemb_table.Table(path)
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
      self.assertTrue((err <= bound * _INT8_SLACK).all(), (err / bound).max())
      self.assertGreater((err / bound).max(), 0.9)  # the bound is tight
      self.assertTrue((np.abs(got)
                       <= np.abs(want).max(1, keepdims=True) * _INT8_SLACK).all())
    # Same hits as the in-memory table, for present and absent keys.
    query = np.concatenate(
        [keys[idx[:1000]],
         rng.integers(0, 2**64 - 1, 1000, dtype=np.uint64)])
    _, ref_found = memory_table.MemoryTable(keys, values).lookup(query)
    np.testing.assert_array_equal(table.lookup(query)[1], ref_found)

  def test_cache_budget_eviction_and_threads(self):
    keys, values = _data(20_000, 16, seed=11)  # 79 blocks of 256 rows
    _write(self.dir, keys, values, dtype="bfloat16", shard_bits=2)
    want = values.astype(insemb_table.DTYPES["bfloat16"].numpy_dtype).astype(np.float32)
    budget = 64 << 10  # ~7 blocks of 8.2 KB, plus the 4 indexes
    table = insemb_table.Table(self.dir, cache_bytes=budget)
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
    keys, values = _data(20_000, 16, seed=15)
    _write(self.dir, keys, values, shard_bits=2)
    table = insemb_table.Table(self.dir, cache_bytes=96 << 10)
    # One key of each block of shard 0 (its sorted keys, 256 per block).
    shard = np.sort(keys[keys >> np.uint64(62) == 0])
    first = shard[::256]
    where = {k: i for i, k in enumerate(keys.tolist())}
    rows = lambda q: values[[where[k] for k in q.tolist()]]
    table.lookup(first[:3])  # memoized ...
    self.assertTrue(table._recall(first[:3])[1].all())  # pylint: disable=protected-access
    # ... then as many other blocks as the cache holds: reading them evicts
    # the memoized keys' blocks in the same lookup.
    query = np.concatenate([first[:3], first[3:3 + table._capacity()]])  # pylint: disable=protected-access
    got, found = table.lookup(query)
    self.assertTrue(found.all())
    np.testing.assert_array_equal(got, rows(query))
    for _ in range(3):  # slots refilled by other blocks: stale entries unused
      np.testing.assert_array_equal(table.lookup(first[:3])[0], rows(first[:3]))
      np.testing.assert_array_equal(table.lookup(first[-6:])[0], rows(first[-6:]))
    # An upsert's newer row wins over the memoized older one.
    new = values[[where[k] for k in first[:3].tolist()]] + 1
    insemb_table.upsert(self.dir, first[:3], new)
    newer = insemb_table.Table(self.dir, cache_bytes=96 << 10)
    np.testing.assert_array_equal(newer.lookup(first[:3])[0], new)
    np.testing.assert_array_equal(table.lookup(first[:3])[0], rows(first[:3]))

  def test_a_lookup_of_many_blocks_stays_within_the_budget(self):
    # 300k rows in ~1,200 blocks (21 MB) behind a 16 MiB budget: 20k random
    # keys need nearly every block, so the lookup is served in pieces, each
    # filled by reads of at most 1/8 of the budget at a time.
    keys, values = _data(300_000, 16, seed=16)
    _write(self.dir, keys, values)
    budget = 16 << 20
    table = insemb_table.Table(self.dir, cache_bytes=budget)
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
      keys, values = _data(n, 16, seed=13)
      _write(path, keys, values, dtype="int8")
      table = insemb_table.Table(path, cache_bytes=budget)
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

  def test_int8_bound_on_extreme_rows(self):
    values = np.array([[0, 0, 0, 0], [1e-30, -1e-30, 0, 5e-31], [127, -127, 0.5, 1],
                       [3.4e38, -1, 0, 1], [-2.5, 2.5, 1.25, -0.01]], np.float32)
    keys = np.array([10, 11, 12, 2**64 - 1, 2**63], np.uint64)  # edge keys too
    _write(self.dir, keys, values, dtype="int8")
    got, found = insemb_table.Table(self.dir).lookup(keys)
    self.assertTrue(found.all())
    bound = np.abs(values).max(axis=1, keepdims=True) / 254
    self.assertTrue((np.abs(got - values) <= bound * _INT8_SLACK).all())
    np.testing.assert_array_equal(got[0], 0)

  def test_missing_empty_and_duplicate_keys(self):
    keys, values = _data(1_000, 8, seed=3)
    _write(self.dir, keys, values)
    table = insemb_table.Table(self.dir)
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
    _write(self.dir, np.array([], np.uint64), np.zeros((0, 4), np.float32))
    table = insemb_table.Table(self.dir)
    self.assertEqual(table.metadata["num_rows"], 0)
    got, found = table.lookup(np.array([1, 2], np.uint64))
    self.assertEqual(got.shape, (2, 4))
    self.assertFalse(found.any())
    table.verify()

  def test_metadata_and_check(self):
    keys, values = _data(500, 12, seed=4)
    cfg = ml_collections.ConfigDict({"name": "din", "insemb_dim": 12})
    before = datetime.datetime.now(datetime.timezone.utc)
    insemb_table.write(self.dir,
                       keys,
                       values,
                       source="source_user",
                       source_step=1234,
                       source_config=cfg,
                       dtype="int8",
                       dataset="build-1")
    table = insemb_table.Table(self.dir)
    m = table.metadata
    self.assertEqual(m["d"], 12)
    self.assertEqual(m["dtype"], "int8")
    self.assertEqual(m["num_rows"], 500)
    self.assertEqual(m["source"], "source_user")
    self.assertEqual(m["source_step"], 1234)
    self.assertEqual(m["dataset"], "build-1")
    self.assertEqual(m["source_config"], {"name": "din", "insemb_dim": 12})
    created = datetime.datetime.fromisoformat(m["created"])
    self.assertIsNotNone(created.tzinfo)
    self.assertLessEqual(before, created)
    self.assertLess(created - before, datetime.timedelta(minutes=5))
    # The checksum: sums of row hashes of (key, int8 values, scale), any order.
    stored, scales = insemb_table.quantize(values, "int8")
    half = segments.add_checksums(
        segments.row_checksum(keys[::2], stored[::2], scales[::2]),
        segments.row_checksum(keys[1::2], stored[1::2], scales[1::2]))
    self.assertEqual(m["checksum"], segments.checksum_hex(half))
    table.verify()
    self.assertGreater(table.bytes_on_disk(), 500 * (12 + 8 + 4))
    table.check(d=12, source="source_user", dataset="build-1")
    with self.assertRaisesRegex(errors.StoreError,
                                r"d=12.*d=32.*--config\.model\.insemb_dim"):
      table.check(d=32, source="source_user")
    with self.assertRaisesRegex(errors.StoreError,
                                r"'source_temporal'.*--config\.store\.source"):
      table.check(d=12, source="source_temporal")
    with self.assertRaisesRegex(errors.StoreError, r"exported from dataset"):
      table.check(d=12, source="source_user", dataset="another-build")

  def test_errors(self):
    missing = os.path.join(self.dir, "nothing_here")
    with self.assertRaisesRegex(errors.StoreError, missing):
      insemb_table.Table(missing)
    keys, values = _data(10, 4)
    with self.assertRaisesRegex(errors.StoreError, "duplicate InsIDs"):
      _write(self.dir, np.concatenate([keys, keys[:1]]),
             np.concatenate([values, values[:1]]))
    bad = values.copy()
    bad[3, 1] = np.nan
    with self.assertRaisesRegex(errors.StoreError, "non-finite"):
      _write(self.dir, keys, bad)
    with self.assertRaisesRegex(errors.StoreError, "do not match keys"):
      _write(self.dir, keys[:5], values)
    with self.assertRaisesRegex(errors.StoreError, "dtype 'float16'"):
      _write(self.dir, keys, values, dtype="float16")
    with self.assertRaisesRegex(errors.StoreError, "no InsEmb table"):
      insemb_table.Table(self.dir)  # nothing was created
    # An export closed but not merged cannot be published.
    w = insemb_table.ExportWriter(os.path.join(self.dir, "db"), "x", d=4)
    w.add(keys, values)
    w.close()
    with self.assertRaisesRegex(errors.StoreError, "not merged yet"):
      insemb_table.publish(os.path.join(self.dir, "db"),
                           "x",
                           source="s",
                           source_step=0,
                           source_config=None)
    # Missing and corrupt pieces of a table.
    path = os.path.join(self.dir, "t")
    tkeys, tvalues = _data(5_000, 8, seed=5)
    _write(path, tkeys, tvalues)
    table = insemb_table.Table(path)
    seg = table.metadata["shards"][0][0]["name"]
    kv = insemb_table._open(path)  # pylint: disable=protected-access
    kv.write(f"{seg}/00000000", b"short").result()
    with self.assertRaisesRegex(errors.StoreError, "corrupt or truncated"):
      insemb_table.Table(path).verify()
    kv.write(f"{seg}/index", None).result()
    with self.assertRaisesRegex(errors.StoreError, "index of segment.*missing"):
      insemb_table.Table(path).lookup(tkeys)
    kv.write("meta", b"{not json").result()
    with self.assertRaisesRegex(errors.StoreError, "corrupt metadata"):
      insemb_table.Table(path)
    with open(os.path.join(path, "manifest.ocdbt"), "r+b") as f:
      f.write(b"garbage!")
    with self.assertRaises(errors.StoreError):
      insemb_table.Table(path)

  def test_verify_detects_corruption(self):
    keys, values = _data(5_000, 8, seed=5)
    _write(self.dir, keys, values)
    table = insemb_table.Table(self.dir)
    table.verify()
    data = max(glob.glob(os.path.join(self.dir, "d", "*")), key=os.path.getsize)
    with open(data, "r+b") as f:  # one value byte of the big data file
      f.seek(os.path.getsize(data) // 2)
      byte = f.read(1)
      f.seek(os.path.getsize(data) // 2)
      f.write(bytes([byte[0] ^ 0xFF]))
    with self.assertRaisesRegex(errors.StoreError, "checksum"):
      insemb_table.Table(self.dir).verify()

  def test_pinned_versions_and_pickled_readers(self):
    data = [_data(300, 4, seed=s) for s in range(3)]
    gens = [_write(self.dir, *data[0], step=0)]
    old = insemb_table.Table(self.dir)
    self.assertEqual(old.version, gens[0])
    pickled = pickle.dumps(old)
    self.assertLess(len(pickled), 300)  # path, version, budget
    gens.append(_write(self.dir, *data[1], step=1))
    gens.append(insemb_table.upsert(self.dir, *data[2], source_step=2))
    self.assertEqual(gens, sorted(gens))
    new = insemb_table.Table(self.dir)
    self.assertEqual(new.metadata["source_step"], 2)
    self.assertLen(new, 600)  # data[1] + data[2]
    self.assertFalse(new.lookup(data[0][0])[1].any())
    # A reader of version 1 (and its pickled copy, as in a Grain worker) and
    # one opened later by number still read that version.
    for reader in (old, pickle.loads(pickled), insemb_table.Table(self.dir, gens[0])):
      self.assertEqual(reader.version, gens[0])
      got, found = reader.lookup(data[0][0])
      self.assertTrue(found.all())
      np.testing.assert_array_equal(got, data[0][1])
      self.assertFalse(reader.lookup(data[2][0])[1].any())
      reader.verify()
    mid = insemb_table.Table(self.dir, gens[1])
    self.assertLen(mid, 300)
    np.testing.assert_array_equal(mid.lookup(data[1][0])[0], data[1][1])

  def test_upsert_replaces_adds_and_compacts(self):
    keys, values = _data(20_000, 8, seed=20)
    _write(self.dir, keys, values, shard_bits=2)
    want = dict(zip(keys.tolist(), values))
    rng = np.random.default_rng(21)
    writer = insemb_table.Writer(self.dir)
    for i in range(12):
      old = keys[rng.choice(len(keys), 300, replace=False)]
      new_keys, _ = _data(200, 8, seed=100 + i)
      k = np.concatenate([old, new_keys])
      v = rng.standard_normal((len(k), 8)).astype(np.float32)
      writer.upsert(k, v, source_step=i)
      want.update(zip(k.tolist(), v))
      keys = np.array(list(want), np.uint64)
      got, found = writer.table.lookup(k)  # the writer sees its own rows
      self.assertTrue(found.all())
      np.testing.assert_array_equal(got, v)
    table = insemb_table.Table(self.dir)
    self.assertLen(table, len(want))
    self.assertEqual(table.metadata["source_step"], 11)
    got, found = table.lookup(keys)
    self.assertTrue(found.all())
    np.testing.assert_array_equal(got, np.stack([want[k] for k in keys.tolist()]))
    table.verify()
    # Merges keep a few segments a shard; the content equals a fresh write.
    self.assertLessEqual(max(len(s) for s in table.metadata["shards"]), 4)
    fresh = os.path.join(self.dir, "fresh")
    _write(fresh, keys, np.stack([want[k] for k in keys.tolist()]), shard_bits=2)
    self.assertEqual(
        insemb_table.Table(fresh).metadata["checksum"], table.metadata["checksum"])
    # A writer whose version is stale fails instead of losing an update.
    stale = insemb_table.Writer(self.dir)
    writer.upsert(keys[:3], values[:3])
    with self.assertRaisesRegex(errors.StoreError, "another writer"):
      stale.upsert(keys[3:6], values[3:6])

  def test_killed_export_resumes_to_identical_table(self):
    path = os.path.join(self.dir, "table")
    old_keys, old_values = _data(10_000, _EXPORT_DIM, seed=8)
    old_gen = _write(path, old_keys, old_values, step=1)
    rng = np.random.default_rng(9)

    def read_old():  # the old version by number; the newest: old or complete
      idx = rng.integers(0, len(old_keys), 2_000)
      got, found = insemb_table.Table(path, old_gen).lookup(old_keys[idx])
      self.assertTrue(found.all())
      np.testing.assert_array_equal(got, old_values[idx])
      newest = insemb_table.Table(path).metadata
      self.assertIn((newest["source_step"], newest["num_rows"]), [(1, len(old_keys)),
                                                                  (3, _EXPORT_ROWS)])

    kills, staging = 0, os.path.join(path, "staging", "e1", "p0")
    for attempt in range(3):  # kill at random points, then let it finish
      child = _child(path, 0, 1, "all")
      try:
        if attempt < 2:
          deadline = time.time() + 60
          while not os.path.exists(os.path.join(staging, "manifest.ocdbt")):
            self.assertLess(time.time(), deadline, "the child never started")
            time.sleep(0.01)
          until = time.time() + rng.uniform(0.1, 1.0)
          while time.time() < until and child.poll() is None:
            read_old()
          if child.poll() is None:
            os.kill(child.pid, signal.SIGKILL)
            kills += 1
        child.wait(timeout=120)
      finally:
        child.kill()
        child.wait()
      if attempt < 2 and child.returncode == -signal.SIGKILL:
        read_old()
        insemb_table.Table(path).verify()
    self.assertEqual(child.returncode, 0)
    self.assertGreater(kills, 0)
    done = insemb_table.Table(path)
    done.verify()
    self.assertEqual(done.metadata["source_step"], 3)
    staged = glob.glob(os.path.join(path, "staging", "**"), recursive=True)
    self.assertEqual([f for f in staged if os.path.isfile(f)], [])  # removed
    keys, values = _data(_EXPORT_ROWS, _EXPORT_DIM, seed=7)
    clean = os.path.join(self.dir, "clean")
    _write(clean, keys, values, dtype="int8")
    fresh = insemb_table.Table(clean)
    self.assertEqual(done.metadata["checksum"], fresh.metadata["checksum"])
    self.assertEqual(done.metadata["num_rows"], _EXPORT_ROWS)
    idx = rng.integers(0, _EXPORT_ROWS, 50_000)
    np.testing.assert_array_equal(done.lookup(keys[idx])[0], fresh.lookup(keys[idx])[0])
    old = insemb_table.Table(path, old_gen)  # the previous version is kept
    np.testing.assert_array_equal(old.lookup(old_keys)[0], old_values)

  def test_two_process_export_equals_one_process(self):
    two = os.path.join(self.dir, "two")
    for phase in ("write", "merge"):  # each phase ends at a barrier
      children = [_child(two, p, 2, phase) for p in range(2)]
      self.assertEqual([c.wait(timeout=120) for c in children], [0, 0])
    gen = insemb_table.publish(two,
                               "e1",
                               process_count=2,
                               source="source_user",
                               source_step=3,
                               source_config=None)
    self.assertEqual(
        insemb_table.publish(two,
                             "e1",
                             process_count=2,
                             source="source_user",
                             source_step=3,
                             source_config=None), gen)  # idempotent
    one = os.path.join(self.dir, "one")
    child_export(one, 0, 1, "all")
    a, b = insemb_table.Table(two), insemb_table.Table(one)
    self.assertEqual(a.metadata["checksum"], b.metadata["checksum"])
    self.assertEqual(len(a), _EXPORT_ROWS)
    a.verify()
    keys, _ = _data(_EXPORT_ROWS, _EXPORT_DIM, seed=7)
    np.testing.assert_array_equal(
        a.lookup(keys[:20_000])[0],
        b.lookup(keys[:20_000])[0])


class EstimateTest(absltest.TestCase):

  def test_paper_example(self):
    fp32 = estimate.estimate_bytes(3e8, 730, 64, "float32")
    self.assertAlmostEqual(fp32["value_bytes"], 3e8 * 730 * 64 * 4)
    self.assertAlmostEqual(fp32["value_bytes"] / 1e12, 56, delta=0.5)  # ~56 TB
    self.assertEqual(estimate.human(fp32["value_bytes"]), "56.1 TB")
    self.assertAlmostEqual(fp32["overhead_bytes"], 3e8 * 730 * 8)
    bf16 = estimate.estimate_bytes(3e8, 730, 64, "bfloat16")
    int8 = estimate.estimate_bytes(3e8, 730, 64, "int8")
    self.assertAlmostEqual(fp32["value_bytes"] / bf16["value_bytes"], 2)
    self.assertAlmostEqual(fp32["value_bytes"] / int8["value_bytes"], 4)
    self.assertAlmostEqual(int8["overhead_bytes"], 3e8 * 730 * 12)
    self.assertEqual(int8["bytes_per_row"], 64 + 8 + 4)
    self.assertAlmostEqual(fp32["total_bytes"],
                           fp32["value_bytes"] + fp32["overhead_bytes"])
    with self.assertRaises(ValueError):
      estimate.estimate_bytes(1, 1, 1, "float64")

  def test_cli_on_a_real_table(self):
    path = os.path.join(self.create_tempdir().full_path, "t")
    n = 3 * 4096
    insemb_table.write(path,
                       *_data(n, 32, seed=10),
                       source="source_temporal",
                       source_step=5,
                       source_config=None,
                       dtype="bfloat16")
    out = subprocess.run([
        sys.executable, "-m", "iat_jax.store.estimate", "--instances_per_day=3e8",
        "--retention_days=730", "--dim=64", "--dtype=float32", f"--store={path}"
    ],
                         cwd=_ROOT,
                         check=True,
                         capture_output=True,
                         text=True).stdout
    self.assertIn("56.1 TB", out)
    self.assertIn("28.0 TB", out)
    self.assertIn("14.0 TB", out)
    line = next(l for l in out.splitlines() if "measured on disk" in l)
    measured = float(line.split()[3])
    self.assertIn("72.0 B/row", out)  # formula: 32 x 2 + 8
    want = insemb_table.Table(path).bytes_on_disk() / n
    self.assertAlmostEqual(measured, want, delta=0.1)
    self.assertLess(abs(measured - 72) / 72, 0.02)  # OCDBT index/manifest only


if __name__ == "__main__":
  absltest.main()
