"""`database`: the OCDBT database of a table, its metadata and commits."""

import glob
import json
import os

from absl.testing import absltest
import numpy as np

from iat_jax import errors
from iat_jax.store import database
from tests import store_fixtures as sf


def _meta(**kw) -> dict:
  args = dict(d=4,
              dtype="float32",
              source="s",
              source_step=0,
              source_config=None,
              dataset="",
              shard_bits=2,
              block_rows=8)
  return database.new_meta(**{**args, **kw})


class DatabaseTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path

  def test_commits_are_versions(self):
    self.assertIsNone(database.latest_generation(self.dir))
    kv = database.open_kv(self.dir)
    self.assertEqual(database.read_meta(kv, self.dir)[0], None)
    gens = []
    for step in range(3):
      _, based_on = database.read_meta(database.open_kv(self.dir), self.dir)
      gens.append(
          database.commit(self.dir, database.open_kv(self.dir), _meta(source_step=step),
                          based_on, []))
    self.assertEqual(gens, sorted(set(gens)))
    self.assertEqual(database.latest_generation(self.dir), gens[-1])
    for gen, step in zip(gens, range(3)):
      meta, _ = database.read_meta(database.open_kv(self.dir, gen), self.dir)
      self.assertEqual(meta["source_step"], step)
      self.assertEqual(meta["format"], database.FORMAT)
      self.assertLen(meta["shards"], 4)

  def test_a_commit_on_a_stale_version_fails(self):
    kv = database.open_kv(self.dir)
    _, based_on = database.read_meta(kv, self.dir)
    database.commit(self.dir, kv, _meta(), based_on, [])
    with self.assertRaisesRegex(errors.StoreError, "another writer published"):
      database.commit(self.dir, database.open_kv(self.dir), _meta(), based_on, [])

  def test_unreadable_metadata(self):
    kv = database.open_kv(self.dir)
    kv.write("meta", json.dumps({"format": "other/9"}).encode()).result()
    with self.assertRaisesRegex(errors.StoreError, "format 'other/9'.*re-export"):
      database.read_meta(kv, self.dir)
    kv.write("meta", b"{").result()
    with self.assertRaisesRegex(errors.StoreError, "corrupt metadata"):
      database.read_meta(kv, self.dir)

  def test_layout(self):
    with self.assertRaisesRegex(errors.StoreError, "shard_bits=0 is not in 1..16"):
      _meta(shard_bits=0)
    with self.assertRaisesRegex(errors.StoreError, "block_rows=3 is not a power"):
      _meta(block_rows=3)
    with self.assertRaisesRegex(errors.StoreError, "dtype 'f16'"):
      _meta(dtype="f16")
    keys = np.sort(sf.data(1_000, 1)[0])
    bounds = database.shard_bounds(keys, 2)
    self.assertEqual((bounds[0], bounds[-1]), (0, 1_000))
    for s in range(4):
      self.assertTrue((keys[bounds[s]:bounds[s + 1]] >> np.uint64(62) == s).all())
    self.assertEqual(database.base_spec("gs://b/t", "staging/x"), "gs://b/t/staging/x/")
    self.assertEqual(database.base_spec(self.dir)["path"], self.dir + "/")

  def test_segments_and_staging_are_dropped(self):
    sf.write(self.dir, *sf.data(500, 4), shard_bits=1)
    meta, _ = database.read_meta(database.open_kv(self.dir), self.dir)
    self.assertLen(database.segment_prefixes(meta), 2)
    self.assertEqual(database.segment_prefixes(None), set())
    staging = database.open_kv(self.dir, sub=database.staging("e", 0))
    staging.write("config", b"{}").result()
    database.drop_staging(self.dir, "e")
    staged = glob.glob(os.path.join(self.dir, "staging", "**"), recursive=True)
    self.assertEqual([f for f in staged if os.path.isfile(f)], [])


if __name__ == "__main__":
  absltest.main()
