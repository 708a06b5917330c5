"""`export`: the parallel, resumable export of an OCDBT table (chunks, resume,
merge, publish), killed and in two processes."""

import glob
import os
import signal
import subprocess
import sys
import time

from absl.testing import absltest
import numpy as np
import pytest
import tensorstore as ts

from iat_jax import errors
from iat_jax.store import database
from iat_jax.store import export
from iat_jax.store import reader
from tests import store_fixtures as sf

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The export of the crash and multi-process tests.
_EXPORT_ROWS, _EXPORT_DIM, _EXPORT_CHUNK = 300_000, 16, 10_000


def child_export(path: str, process_index: int, process_count: int, phase: str) -> None:
  """Run in subprocesses: one process's part of the test export.

  phase "all" (1 process): add, close, merge, publish; "write" / "merge": one
  phase of a multi-process export of slice process_index.
  """
  keys, values = sf.data(_EXPORT_ROWS, _EXPORT_DIM, seed=7)
  mine = slice(process_index, None, process_count)
  w = export.ExportWriter(path,
                          "e1",
                          process_index=process_index,
                          process_count=process_count,
                          d=_EXPORT_DIM,
                          dtype="int8",
                          chunk_rows=_EXPORT_CHUNK)
  if phase in ("all", "write"):
    for start in range(0, _EXPORT_ROWS // process_count, 4096):  # batches
      w.add(keys[mine][start:start + 4096], values[mine][start:start + 4096])
    w.close()
  if phase in ("all", "merge"):
    w.merge()
  if phase == "all":
    w.publish(source="source_user", source_step=3, source_config=None)


def _child(path: str, process_index: int, process_count: int, phase: str):
  return subprocess.Popen([
      sys.executable, "-c", "import sys; sys.path[:0] = [sys.argv[1]]; "
      "from tests import store_export_test as t; "
      "t.child_export(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])",
      _ROOT, path,
      str(process_index),
      str(process_count), phase
  ])


def staged(path: str) -> list:
  """The keys left under the staging/ of the table at `path` (any URL)."""
  return ts.KvStore.open(database.base_spec(path, "staging")).result().list().result()


def killed_export_resumes(test: absltest.TestCase, path: str, scratch: str) -> None:
  """Kills the test export into `path` (a directory or a URL) at random
  points, twice, then lets it finish: the old version stays readable by
  number throughout, the newest is always the old or the complete one, and
  the table is the one a clean write makes (in local `scratch`)."""
  old_keys, old_values = sf.data(10_000, _EXPORT_DIM, seed=8)
  old_gen = sf.write(path, old_keys, old_values, step=1)
  rng = np.random.default_rng(9)

  def read_old():  # the old version by number; the newest: old or complete
    idx = rng.integers(0, len(old_keys), 2_000)
    got, found = reader.Table(path, old_gen).lookup(old_keys[idx])
    test.assertTrue(found.all())
    np.testing.assert_array_equal(got, old_values[idx])
    newest = reader.Table(path).metadata
    test.assertIn((newest["source_step"], newest["num_rows"]), [(1, len(old_keys)),
                                                                (3, _EXPORT_ROWS)])

  kills, staging = 0, database.staging("e1", 0)
  for attempt in range(3):  # kill at random points, then let it finish
    child = _child(path, 0, 1, "all")
    try:
      if attempt < 2:
        deadline = time.time() + 60
        while database.latest_generation(path, staging) is None:
          test.assertLess(time.time(), deadline, "the child never started")
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
      reader.Table(path).verify()
  test.assertEqual(child.returncode, 0)
  test.assertGreater(kills, 0)
  done = reader.Table(path)
  done.verify()
  test.assertEqual(done.metadata["source_step"], 3)
  test.assertEqual(staged(path), [])  # removed
  keys, values = sf.data(_EXPORT_ROWS, _EXPORT_DIM, seed=7)
  clean = os.path.join(scratch, "clean")
  sf.write(clean, keys, values, dtype="int8")
  fresh = reader.Table(clean)
  test.assertEqual(done.metadata["checksum"], fresh.metadata["checksum"])
  test.assertEqual(done.metadata["num_rows"], _EXPORT_ROWS)
  idx = rng.integers(0, _EXPORT_ROWS, 50_000)
  np.testing.assert_array_equal(done.lookup(keys[idx])[0], fresh.lookup(keys[idx])[0])
  old = reader.Table(path, old_gen)  # the previous version is kept
  np.testing.assert_array_equal(old.lookup(old_keys)[0], old_values)


class ExportTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = self.create_tempdir().full_path

  def test_chunks_resume_and_equal_a_whole_write(self):
    keys, values = sf.data(5_000, 4, seed=1)
    w = export.ExportWriter(self.dir, "x", d=4, chunk_rows=1_000, block_rows=8)
    w.add(keys[:2_500], values[:2_500])  # two durable chunks, 500 rows buffered
    again = export.ExportWriter(self.dir, "x", d=4, chunk_rows=1_000, block_rows=8)
    self.assertEqual((again.done_chunks, again.done_rows), (2, 2_000))
    again.skip(1_000)  # fed from row 1,000: its first 1,000 rows are durable
    again.add(keys[1_000:], values[1_000:])
    again.close()
    again.merge()
    gen = again.publish(source="s", source_step=5, source_config=None)
    self.assertEqual(again.publish(source="s", source_step=5, source_config=None),
                     gen)  # idempotent
    table = reader.Table(self.dir)
    self.assertEqual((len(table), table.metadata["export_id"]), (5_000, "x"))
    table.verify()
    whole = os.path.join(self.dir, "whole")
    sf.write(whole, keys, values, block_rows=8)
    self.assertEqual(table.metadata["checksum"],
                     reader.Table(whole).metadata["checksum"])
    self.assertEqual(glob.glob(os.path.join(self.dir, "staging", "x", "*", "c*")), [])

  def test_errors(self):
    keys, values = sf.data(10, 4)
    path = os.path.join(self.dir, "db")
    w = export.ExportWriter(path, "x", d=4)
    with self.assertRaisesRegex(errors.StoreError, r"skip\(3\): only 0 rows"):
      w.skip(3)
    with self.assertRaisesRegex(errors.StoreError, "do not match keys"):
      w.add(keys, values[:, :3])
    with self.assertRaisesRegex(errors.StoreError, "was started with"):
      export.ExportWriter(path, "x", d=4, dtype="int8")
    w.add(keys, values)
    w.close()
    with self.assertRaisesRegex(errors.StoreError, "was closed after 10 rows"):
      w.add(keys[:1] + np.uint64(1), values[:1])
    # An export closed but not merged cannot be published.
    with self.assertRaisesRegex(errors.StoreError, "not merged yet"):
      w.publish(source="s", source_step=0, source_config=None)
    with self.assertRaisesRegex(errors.StoreError, "process 1 never started"):
      export.merge_export(path, "x", process_count=2)
    # The same InsID in two processes' slices.
    for p in range(2):
      two = export.ExportWriter(path, "dup", process_index=p, process_count=2, d=4)
      two.add(keys[p:p + 2], values[p:p + 2])
      two.close()
    for p in range(2):
      export.merge_export(path, "dup", process_index=p, process_count=2)
    with self.assertRaisesRegex(errors.StoreError, "duplicate InsIDs in export dup"):
      export.publish(path,
                     "dup",
                     process_count=2,
                     source="s",
                     source_step=0,
                     source_config=None)

  @pytest.mark.slow
  def test_killed_export_resumes_to_identical_table(self):
    killed_export_resumes(self, os.path.join(self.dir, "table"), self.dir)

  @pytest.mark.slow
  def test_two_process_export_equals_one_process(self):
    two = os.path.join(self.dir, "two")
    for phase in ("write", "merge"):  # each phase ends at a barrier
      children = [_child(two, p, 2, phase) for p in range(2)]
      self.assertEqual([c.wait(timeout=120) for c in children], [0, 0])
    gen = export.publish(two,
                         "e1",
                         process_count=2,
                         source="source_user",
                         source_step=3,
                         source_config=None)
    self.assertEqual(
        export.publish(two,
                       "e1",
                       process_count=2,
                       source="source_user",
                       source_step=3,
                       source_config=None), gen)  # idempotent
    one = os.path.join(self.dir, "one")
    child_export(one, 0, 1, "all")
    a, b = reader.Table(two), reader.Table(one)
    self.assertEqual(a.metadata["checksum"], b.metadata["checksum"])
    self.assertEqual(len(a), _EXPORT_ROWS)
    a.verify()
    keys, _ = sf.data(_EXPORT_ROWS, _EXPORT_DIM, seed=7)
    np.testing.assert_array_equal(
        a.lookup(keys[:20_000])[0],
        b.lookup(keys[:20_000])[0])


if __name__ == "__main__":
  absltest.main()
