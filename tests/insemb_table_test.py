"""Tests of the InsEmb store: round trips, misses, metadata, crash safety, Eq. 12.

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
import functools
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized
import ml_collections
import numpy as np

from iat_jax.store import estimate
from iat_jax.store import insemb_table
from iat_jax.store import memory_table

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The crash-safety table: big enough that its write takes seconds.
_BIG_ROWS, _BIG_DIM = 2_000_000, 64
_INT8_SLACK = 1 + 2.0**-15


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


@functools.cache
def _big_data() -> tuple[np.ndarray, np.ndarray]:
  return _data(_BIG_ROWS, _BIG_DIM, seed=7)


def _write(path, keys, values, dtype="float32", step=0, source="source_temporal"):
  return insemb_table.write(path, keys, values, source=source, source_step=step,
                            source_config={"d": values.shape[1]}, dtype=dtype)


def child_write(path: str) -> None:
  """Run by the crash test's child process: the big write into `path`."""
  _write(path, *_big_data(), step=2)


def _tree_bytes(vdir: str) -> dict[str, bytes]:
  """Relative path -> content of the array files of a version directory."""
  out = {}
  for root, _, files in os.walk(vdir):
    for name in files:
      full = os.path.join(root, name)
      if name != "metadata.json":
        with open(full, "rb") as f:
          out[os.path.relpath(full, vdir)] = f.read()
  return out


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
      self.assertTrue((np.abs(got) <= np.abs(want).max(1, keepdims=True)
                       * _INT8_SLACK).all())
    # Same hits as the in-memory table, for present and absent keys.
    query = np.concatenate([keys[idx[:1000]], rng.integers(0, 2**64 - 1, 1000,
                                                           dtype=np.uint64)])
    _, ref_found = memory_table.MemoryTable(keys, values).lookup(query)
    np.testing.assert_array_equal(table.lookup(query)[1], ref_found)

  def test_chunk_cache_eviction_and_threads(self):
    keys, values = _data(20_000, 16, seed=11)  # 5 chunks of 4,096 rows
    _write(self.dir, keys, values, dtype="bfloat16")
    want = values.astype(insemb_table.DTYPES["bfloat16"].numpy_dtype).astype(
        np.float32)
    chunk_bytes = 4096 * 16 * 2
    with mock.patch.object(insemb_table, "_CACHE_BYTES", 2 * chunk_bytes):
      table = insemb_table.Table(self.dir)
      rng = np.random.default_rng(12)
      for _ in range(4):
        idx = rng.integers(0, len(keys), 3_000)
        np.testing.assert_array_equal(table.lookup(keys[idx])[0], want[idx])
        self.assertLessEqual(table._cache_bytes, 2 * chunk_bytes)
        self.assertLen(table._cache, 2)
      def worker(seed):
        r = np.random.default_rng(seed)
        for _ in range(10):
          idx = r.integers(0, len(keys), 2_000)
          np.testing.assert_array_equal(table.lookup(keys[idx])[0], want[idx])
      with futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(worker, range(4)))
      self.assertLessEqual(table._cache_bytes, 2 * chunk_bytes)

  def test_int8_bound_on_extreme_rows(self):
    values = np.array([[0, 0, 0, 0], [1e-30, -1e-30, 0, 5e-31], [127, -127, 0.5, 1],
                       [3.4e38, -1, 0, 1], [-2.5, 2.5, 1.25, -0.01]], np.float32)
    keys = np.arange(10, 15, dtype=np.uint64)
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
    got, found = table.lookup(keys[:6].reshape(2, 3))
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
    insemb_table.write(self.dir, keys, values, source="source_user",
                       source_step=1234, source_config=cfg, dtype="int8")
    table = insemb_table.Table(self.dir)
    m = table.metadata
    self.assertEqual(m["d"], 12)
    self.assertEqual(m["dtype"], "int8")
    self.assertEqual(m["num_rows"], 500)
    self.assertEqual(m["source"], "source_user")
    self.assertEqual(m["source_step"], 1234)
    self.assertEqual(m["source_config"], {"name": "din", "insemb_dim": 12})
    created = datetime.datetime.fromisoformat(m["created"])
    self.assertIsNotNone(created.tzinfo)
    self.assertLessEqual(before, created)
    self.assertLess(created - before, datetime.timedelta(minutes=5))
    # sha256 of the sorted keys, the stored int8 values and the scales.
    order = np.argsort(keys)
    stored, scales = insemb_table.quantize(values[order], "int8")
    digest = hashlib.sha256(keys[order].tobytes() + stored.tobytes()
                            + scales.tobytes()).hexdigest()
    self.assertEqual(m["sha256"], digest)
    table.verify()
    self.assertGreater(table.bytes_on_disk(), 500 * (12 + 8 + 4))
    table.check(d=12, source="source_user")
    with self.assertRaisesRegex(insemb_table.StoreError,
                                r"d=12.*d=32.*--config\.model\.insemb_dim"):
      table.check(d=32, source="source_user")
    with self.assertRaisesRegex(insemb_table.StoreError,
                                r"'source_temporal'.*--config\.store\.source"):
      table.check(d=12, source="source_temporal")
    with self.assertRaisesRegex(insemb_table.StoreError, r"exported from dataset"):
      table.check(d=12, source="source_user", dataset="another-build")

  def test_errors(self):
    missing = os.path.join(self.dir, "nothing_here")
    with self.assertRaisesRegex(insemb_table.StoreError, missing):
      insemb_table.Table(missing)
    keys, values = _data(10, 4)
    with self.assertRaisesRegex(insemb_table.StoreError, "duplicate InsIDs"):
      _write(self.dir, np.concatenate([keys, keys[:1]]),
             np.concatenate([values, values[:1]]))
    bad = values.copy()
    bad[3, 1] = np.nan
    with self.assertRaisesRegex(insemb_table.StoreError, "non-finite"):
      _write(self.dir, keys, bad)
    with self.assertRaisesRegex(insemb_table.StoreError, "do not match keys"):
      _write(self.dir, keys[:5], values)
    with self.assertRaisesRegex(insemb_table.StoreError, "dtype 'float16'"):
      _write(self.dir, keys, values, dtype="float16")
    self.assertFalse(os.path.exists(os.path.join(self.dir, "MANIFEST.json")))
    # A manifest naming a version that is gone.
    _write(self.dir, keys, values)
    with open(os.path.join(self.dir, "MANIFEST.json"), "w") as f:
      f.write('{"version": "v000042"}')
    with self.assertRaisesRegex(insemb_table.StoreError, "v000042.*missing"):
      insemb_table.Table(self.dir)

  def test_verify_detects_corruption(self):
    keys, values = _data(5_000, 8, seed=5)
    _write(self.dir, keys, values)
    table = insemb_table.Table(self.dir)
    chunk = os.path.join(self.dir, table.version, "values", "c", "0", "0")
    with open(chunk, "r+b") as f:
      f.seek(100)
      byte = f.read(1)
      f.seek(100)
      f.write(bytes([byte[0] ^ 0xFF]))
    with self.assertRaisesRegex(insemb_table.StoreError, "sha256"):
      insemb_table.Table(self.dir).verify()

  def test_keeps_newest_two_versions_and_readers_keep_theirs(self):
    data = [_data(300, 4, seed=s) for s in range(5)]
    for step in range(3):
      self.assertEqual(_write(self.dir, *data[step], step=step), f"v{step + 1:06d}")
    old = insemb_table.Table(self.dir)  # v000003
    pickled = pickle.dumps(old)
    _write(self.dir, *data[3], step=3)
    self.assertEqual(sorted(n for n in os.listdir(self.dir) if n.startswith("v")),
                     ["v000003", "v000004"])
    new = insemb_table.Table(self.dir)
    self.assertEqual((new.version, new.metadata["source_step"]), ("v000004", 3))
    # A reader of the older kept version (and its pickled copy, as in a Grain
    # worker) still reads that version.
    for reader in (old, pickle.loads(pickled)):
      self.assertEqual(reader.version, "v000003")
      got, found = reader.lookup(data[2][0])
      self.assertTrue(found.all())
      np.testing.assert_array_equal(got, data[2][1])
    _write(self.dir, *data[4], step=4)
    self.assertEqual(sorted(n for n in os.listdir(self.dir) if n.startswith("v")),
                     ["v000004", "v000005"])

  def test_leftovers_do_not_break_anything(self):
    keys, values = _data(1_000, 8, seed=6)
    _write(self.dir, keys, values)
    # A killed write's partial directories (the next one, a stray later one)
    # and a half-written manifest temp file.
    os.makedirs(os.path.join(self.dir, "v000002", "values", "c", "0"))
    with open(os.path.join(self.dir, "v000002", "values", "c", "0", "0"), "wb") as f:
      f.write(b"\x00" * 77)
    os.makedirs(os.path.join(self.dir, "v000009", "keys"))
    with open(os.path.join(self.dir, "MANIFEST.json.tmp"), "w") as f:
      f.write('{"vers')
    table = insemb_table.Table(self.dir)
    self.assertEqual(table.version, "v000001")
    np.testing.assert_array_equal(table.lookup(keys)[0], values)
    table.verify()
    keys2, values2 = _data(2_000, 8, seed=7)
    self.assertEqual(_write(self.dir, keys2, values2, step=1), "v000002")
    table = insemb_table.Table(self.dir)
    np.testing.assert_array_equal(table.lookup(keys2)[0], values2)
    table.verify()
    self.assertEqual(sorted(n for n in os.listdir(self.dir) if n.startswith("v")),
                     ["v000001", "v000002"])

  def test_killed_write_keeps_previous_version(self):
    path = os.path.join(self.dir, "table")
    old_keys, old_values = _data(10_000, _BIG_DIM, seed=8)
    _write(path, old_keys, old_values, step=1)
    old_sha = insemb_table.Table(path).metadata["sha256"]
    new_vdir = os.path.join(path, "v000002")
    values_dir = os.path.join(new_vdir, "values", "c")
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys; sys.path[:0] = [sys.argv[1]]; "
         "from tests import insemb_table_test; "
         "insemb_table_test.child_write(sys.argv[2])",
         _ROOT, path])
    rng = np.random.default_rng(9)
    reads = 0

    def read_old():
      table = insemb_table.Table(path)
      self.assertEqual(table.version, "v000001")
      idx = rng.integers(0, len(old_keys), 2_000)
      got, found = table.lookup(old_keys[idx])
      self.assertTrue(found.all())
      np.testing.assert_array_equal(got, old_values[idx])

    try:
      # The old version is read while the child writes; kill the child once
      # it is part way through the values of the new version.
      deadline = time.time() + 120
      while not (os.path.isdir(values_dir) and len(os.listdir(values_dir)) >= 20):
        self.assertIsNone(child.poll(), "the child finished before it was killed")
        self.assertLess(time.time(), deadline, "the child never started writing")
        read_old()
        reads += 1
        time.sleep(0.01)
      os.kill(child.pid, signal.SIGKILL)
    finally:
      child.kill()
      child.wait()
    self.assertEqual(child.returncode, -signal.SIGKILL)
    self.assertTrue(os.path.isdir(new_vdir))  # the partial version is there
    self.assertFalse(os.path.exists(os.path.join(new_vdir, "metadata.json")))
    read_old()
    table = insemb_table.Table(path)
    table.verify()
    self.assertEqual(table.metadata["sha256"], old_sha)
    self.assertGreater(reads, 0)

    # Re-running the write completes it, identical to an uninterrupted write.
    child_write(path)
    clean = os.path.join(self.dir, "clean")
    child_write(clean)
    rerun, fresh = insemb_table.Table(path), insemb_table.Table(clean)
    self.assertEqual((rerun.version, fresh.version), ("v000002", "v000001"))
    self.assertEqual(rerun.metadata["sha256"], fresh.metadata["sha256"])
    for key in ("d", "dtype", "num_rows", "source", "source_step"):
      self.assertEqual(rerun.metadata[key], fresh.metadata[key])
    rerun.verify()
    a = _tree_bytes(os.path.join(path, "v000002"))
    b = _tree_bytes(os.path.join(clean, "v000001"))
    self.assertEqual(sorted(a), sorted(b))
    self.assertTrue(all(a[k] == b[k] for k in a))
    keys, values = _big_data()
    idx = rng.integers(0, _BIG_ROWS, 50_000)
    np.testing.assert_array_equal(rerun.lookup(keys[idx])[0], values[idx])
    # The old version is still kept (newest two).
    self.assertEqual(insemb_table.Table(path, "v000001").metadata["sha256"], old_sha)


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
    n = 3 * 4096  # whole chunks: no edge padding
    insemb_table.write(path, *_data(n, 32, seed=10), source="source_temporal",
                       source_step=5, source_config=None, dtype="bfloat16")
    out = subprocess.run(
        [sys.executable, "-m", "iat_jax.store.estimate", "--instances_per_day=3e8",
         "--retention_days=730", "--dim=64", "--dtype=float32", f"--store={path}"],
        cwd=_ROOT, check=True, capture_output=True, text=True).stdout
    self.assertIn("56.1 TB", out)
    self.assertIn("28.0 TB", out)
    self.assertIn("14.0 TB", out)
    line = next(l for l in out.splitlines() if "measured on disk" in l)
    measured = float(line.split()[3])
    self.assertIn("72.0 B/row", out)  # formula: 32 x 2 + 8
    want = insemb_table.Table(path).bytes_on_disk() / n
    self.assertAlmostEqual(measured, want, delta=0.1)
    self.assertLess(abs(measured - 72) / 72, 0.02)  # zarr/json files only


if __name__ == "__main__":
  absltest.main()
