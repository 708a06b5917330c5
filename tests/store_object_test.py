"""The InsEmb store and the user-history index on object storage: s3:// paths
against a local S3 server (moto, `tests/s3_fixtures.py`), through
TensorStore's s3 driver as a pod uses them (the endpoint, region and
credentials from the AWS environment)."""

import os
import threading
from unittest import mock

from absl.testing import absltest
import numpy as np
import pytest

from iat_jax import configs
from iat_jax import errors
from iat_jax.store import database
from iat_jax.store import export
from iat_jax.store import partitions
from iat_jax.store import reader
from iat_jax.store import tables
from iat_jax.store import user_index
from iat_jax.store import writer
from tests import s3_fixtures
from tests import store_export_test
from tests import store_fixtures as sf

S3: s3_fixtures.Server | None = None


@pytest.fixture(scope="module", autouse=True)
def _server():
  global S3
  if not s3_fixtures.AVAILABLE:
    pytest.skip(s3_fixtures.MISSING)
  with s3_fixtures.running() as S3:
    yield
  S3 = None


def _race(*calls):
  """Runs the calls in threads at once -> their results (or exceptions)."""
  out = [None] * len(calls)

  def run(i):
    try:
      out[i] = calls[i]()
    except Exception as e:  # pylint: disable=broad-except
      out[i] = e

  threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=120)
  return out


class StoreTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.url = S3.bucket()

  def test_base_spec_reads_the_aws_environment(self):
    spec = database.base_spec("s3://b/t", "staging/x")
    self.assertEqual(
        spec, {
            "driver": "s3",
            "bucket": "b",
            "path": "t/staging/x/",
            "endpoint": S3.endpoint,
            "aws_region": s3_fixtures.REGION
        })
    with mock.patch.dict(os.environ, {"AWS_ENDPOINT_URL_S3": "", "AWS_REGION": ""}):
      with mock.patch.dict(os.environ, {"AWS_ENDPOINT_URL": "http://h:1"}):
        self.assertEqual(database.base_spec("s3://b/t")["endpoint"], "http://h:1")
      self.assertEqual(database.base_spec("s3://b/t"), "s3://b/t/")  # AWS itself
    self.assertEqual(database.base_spec("gs://b/t", "x"), "gs://b/t/x/")

  def test_write_lookup_upsert_verify(self):
    path = f"{self.url}/table"
    keys, values = sf.data(3_000, 8, seed=1)
    first = sf.write(path, keys, values, shard_bits=2, block_rows=64)
    table = reader.Table(path)
    self.assertEqual((table.version, len(table)), (first, 3_000))
    got, found = table.lookup(keys)
    self.assertTrue(found.all())
    np.testing.assert_array_equal(got, values)
    table.verify()
    new_keys, new_values = sf.data(200, 8, seed=2)
    k = np.concatenate([keys[:100], new_keys])
    v = np.concatenate([values[:100] * 2, new_values])
    table = writer.upsert(table, k, v, source_step=1)
    table = reader.Table(path)
    self.assertEqual((len(table), table.metadata["source_step"]), (3_200, 1))
    np.testing.assert_array_equal(table.lookup(k)[0], v)
    np.testing.assert_array_equal(table.lookup(keys[100:])[0], values[100:])
    table.verify()
    np.testing.assert_array_equal(reader.Table(path, first).lookup(keys)[0], values)
    # An upsert over a stale version fails instead of losing an update.
    with self.assertRaisesRegex(errors.StoreError, "another writer published"):
      writer.upsert(reader.Table(path, first), keys[:3], values[:3])

  def test_runs_publish_and_read_at_store_path(self):
    """What --mode=export and a downstream run do with --config.store.path."""
    config = configs.base_config()
    config.store.path = f"{self.url}/stores/source_user"
    path = tables.path(config, "/workdir/unused", "source_user")
    self.assertEqual(path, config.store.path)
    d = config.model.insemb_dim
    keys, values = sf.data(500, d, seed=8)
    tables.publish(config,
                   path,
                   keys,
                   values,
                   source="source_user",
                   step=4,
                   fingerprint="fp")
    self.assertTrue(tables.is_published(config, path, "source_user", 4))
    table = tables.open_checked(config, "/workdir/unused", "source_user", "fp")
    np.testing.assert_array_equal(table.lookup(keys)[0], values)
    tables.drop(config, path)
    self.assertFalse(tables.exists(config, path))
    self.assertEqual(S3.objects(path), {})

  def test_verify_finds_a_value_corrupted_in_the_bucket(self):
    path = f"{self.url}/table"
    keys, values = sf.data(1_000, 4, seed=3)
    sf.write(path, keys, values, shard_bits=1, block_rows=64)
    kv = database.open_kv(path)
    block = next(k for k in kv.list().result() if k.endswith(b"/00000001"))
    blob = kv.read(block).result().value
    objects = {k: v for k, v in S3.objects(self.url).items() if blob in v}
    self.assertLen(objects, 1)  # the OCDBT data file holding the block
    (name, data), = objects.items()
    at = data.index(blob) + len(blob) - 8  # a byte of the block's last value
    S3.put(self.url, name, data[:at] + bytes([data[at] ^ 0x40]) + data[at + 1:])
    with self.assertRaises(errors.StoreError):
      reader.Table(path).verify()

  def test_two_processes_export_in_parallel(self):
    path = f"{self.url}/table"
    keys, values = sf.data(20_000, 8, seed=4)
    writers = [
        export.ExportWriter(path,
                            "e1",
                            process_index=p,
                            process_count=2,
                            d=8,
                            dtype="int8",
                            chunk_rows=3_000,
                            shard_bits=2) for p in range(2)
    ]

    def write(p):  # process p's slice, in batches
      k, v = keys[p::2], values[p::2]
      for start in range(0, len(k), 4_096):
        writers[p].add(k[start:start + 4_096], v[start:start + 4_096])
      writers[p].close()

    self.assertEqual(_race(lambda: write(0), lambda: write(1)), [None, None])
    # The processes' merges commit to the same database at once.
    self.assertEqual(_race(writers[0].merge, writers[1].merge), [None, None])
    gen = writers[0].publish(source="s", source_step=3, source_config=None)
    self.assertEqual(writers[0].publish(source="s", source_step=3, source_config=None),
                     gen)  # idempotent
    self.assertEqual(store_export_test.staged(path), [])
    table = reader.Table(path)
    self.assertEqual(len(table), len(keys))
    table.verify()
    whole = f"{self.url}/whole"
    sf.write(whole, keys, values, dtype="int8", shard_bits=2)
    self.assertEqual(table.metadata["checksum"],
                     reader.Table(whole).metadata["checksum"])
    np.testing.assert_array_equal(
        table.lookup(keys)[0],
        reader.Table(whole).lookup(keys)[0])

  def test_two_writers_publish_at_once_and_one_wins(self):
    path = f"{self.url}/table"
    sf.write(path, *sf.data(100, 4, seed=5))
    rows = [sf.data(5_000, 4, seed=6), sf.data(5_000, 4, seed=7)]
    commit, both_read = database.commit, threading.Barrier(2, timeout=60)

    def racing_commit(*args):
      both_read.wait()  # each writer has read "meta" and written its segments
      return commit(*args)

    with mock.patch.object(database, "commit", racing_commit):
      got = _race(*[lambda i=i: sf.write(path, *rows[i], step=i + 1) for i in range(2)])
    lost = [isinstance(g, errors.StoreError) for g in got]
    self.assertEqual(sorted(lost), [False, True], got)
    self.assertRegex(str(got[lost.index(True)]), "another writer published")
    won = lost.index(False)
    table = reader.Table(path)
    self.assertEqual((table.version, table.metadata["source_step"]),
                     (got[won], won + 1))
    values, found = table.lookup(rows[won][0])
    self.assertTrue(found.all())
    np.testing.assert_array_equal(values, rows[won][1])
    self.assertFalse(table.lookup(rows[1 - won][0])[1].any())
    table.verify()

  @pytest.mark.slow
  def test_killed_export_resumes_to_identical_table(self):
    store_export_test.killed_export_resumes(self, f"{self.url}/table",
                                            self.create_tempdir().full_path)


class IndexTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.url = S3.bucket()

  def test_user_index_appends_reads_and_restores(self):
    index = user_index.UserIndex(f"{self.url}/index", num_tasks=2, capacity=3)
    self.assertEqual(index.generations(), [0])
    uids = np.array([7, 8, 7, 7, 9, 7])
    entries = np.zeros(len(uids), index.dtype)
    entries["ins_id"] = np.arange(100, 106)
    entries["ts"] = np.arange(10, 16)
    entries["labels"] = np.arange(12).reshape(6, 2)
    first = index.append(uids[:3],
                         entries[:3],
                         cutoff=0,
                         expired_uids=np.zeros(0, np.int64))
    index.append(uids[3:], entries[3:], cutoff=0, expired_uids=np.zeros(0, np.int64))
    got = index.read(np.array([7, 8, 9, 10]))
    np.testing.assert_array_equal(got[0]["ins_id"], [102, 103, 105])  # capacity 3
    np.testing.assert_array_equal(got[0]["labels"], [[4, 5], [6, 7], [10, 11]])
    np.testing.assert_array_equal(got[1]["ins_id"], [101])
    np.testing.assert_array_equal(got[2]["ts"], [14])
    self.assertEmpty(got[3])
    # A reopened index reads the same; generations name the first append.
    again = user_index.UserIndex(f"{self.url}/index", num_tasks=2, capacity=3)
    self.assertGreater(again.generations()[0], first[0])
    np.testing.assert_array_equal(
        again.read(np.array([7]), first)[0]["ins_id"], [100, 102])
    again.restore(np.array([7, 8, 9]), first)
    got = again.read(np.array([7, 8, 9]))
    self.assertEqual([g["ins_id"].tolist() for g in got], [[100, 102], [101], []])

  def test_period_tables_and_their_retention(self):
    config = configs.base_config()
    root = f"{self.url}/stores/src"
    table = partitions.Partitions(config,
                                  root,
                                  d=2,
                                  source="src",
                                  fingerprint="f",
                                  flush_rows=3)
    for p in range(2):
      table.begin(p)
      table.put(np.arange(1, 6, dtype=np.uint64), np.full((5, 2), p, np.float32))
      table.end()
    v, found = table.lookup(np.array([1, 2], np.uint64), np.array([0, 1]))
    self.assertTrue(found.all())
    np.testing.assert_array_equal(v[:, 0], [0, 1])
    table.drop_before(1)
    self.assertFalse(tables.exists(config, table.path(0)))
    self.assertEqual(list(S3.objects(f"{root}/period-00000")), [])
    self.assertTrue(tables.exists(config, table.path(1)))


if __name__ == "__main__":
  absltest.main()
