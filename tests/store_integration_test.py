"""The OCDBT store in the package: parallel, resumable export by `--mode=export`.

(Streaming and two-pass write-back: stream_test.py, two_pass_test.py;
downstream reads: train_test.py's pipeline tests.)
"""

import os
import shutil
import signal
import sys
import tempfile
import time

from absl.testing import absltest
import numpy as np
import pytest

from iat_jax import errors
from iat_jax.data import dataset
from iat_jax.store import database
from iat_jax.store import reader
from iat_jax.store import tables
from iat_jax.store import writer
from tests import cli_fixtures as cli
from tests import model_fixtures as mf
from tests import store_fixtures as sf

_STAGE = "--config.stage=source_temporal"
# Small chunks and batches: an export of the tiny dataset is ~60 chunks. At 32
# rows per device, one and two processes compute every row in the same batch
# shape; rows computed in 32- and 16-row batches differ on this CPU (XLA:CPU),
# so a per-process (not per-device) batch size makes the two-process test fail.
_EXPORT = (_STAGE, "--config.store.export_chunk_rows=16", "--config.eval_batch_size=32")


def _store(workdir):
  return os.path.join(workdir, "stores", "source_temporal")


def _checksum(workdir):
  table = reader.Table(_store(workdir))
  table.verify()
  return len(table), table.metadata["checksum"]


class UpsertsTest(absltest.TestCase):

  def test_reads_through_its_buffer_and_flushes_one_version(self):
    path = os.path.join(tempfile.mkdtemp(), "t")
    config = mf.tiny_config()
    config.store.cache_bytes = 3 << 20
    up = tables.Upserts.open_or_create(config,
                                       path,
                                       d=2,
                                       dtype="float32",
                                       source="s",
                                       fingerprint="f",
                                       flush_rows=100)
    empty = up.table.version
    self.assertEqual(up.table.cache_bytes, 3 << 20)  # --config.store.cache_bytes
    up.put(np.array([5, 7], np.uint64), np.array([[1, 1], [2, 2]], np.float32))
    up.put(np.array([7], np.uint64), np.array([[3, 3]], np.float32))  # later wins
    values, found = up.lookup(np.array([7, 5, 9], np.uint64))
    np.testing.assert_array_equal(found, [True, True, False])
    np.testing.assert_array_equal(values, [[3, 3], [1, 1], [0, 0]])
    self.assertEqual(reader.Table(path).version, empty)  # nothing durable yet
    up.flush(step=4)
    table = reader.Table(path)
    self.assertEqual((len(table), table.metadata["source_step"]), (2, 4))
    self.assertEqual(up.table.cache_bytes, 3 << 20)
    table.verify()
    np.testing.assert_array_equal(table.lookup(np.array([7], np.uint64))[0], [[3, 3]])
    up.put(np.arange(100, 200, dtype=np.uint64), np.ones((100, 2), np.float32))
    self.assertLen(reader.Table(path), 102)  # flush_rows reached


@pytest.mark.slow
class ExportTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.trained = os.path.join(tempfile.mkdtemp(), "w")
    cli.run_main(cls.trained, "train", _STAGE)
    cls.ref = cls._copy()
    cli.run_main(cls.ref, "export", *_EXPORT)
    cls.ref_sum = _checksum(cls.ref)
    cls.ds = dataset.Dataset(os.path.join(cli.DATA, "synthetic"))

  @classmethod
  def _copy(cls):
    workdir = os.path.join(tempfile.mkdtemp(), "w")
    shutil.copytree(cls.trained, workdir)
    return workdir

  def test_exports_every_instance_and_is_a_noop_when_done(self):
    self.assertEqual(self.ref_sum[0], self.ds.num_rows)
    _, found = reader.Table(_store(self.ref)).lookup(sf.ds_keys(self.ds))
    self.assertTrue(found.all())
    gen = reader.Table(_store(self.ref)).version
    out = cli.run_main(self.ref, "export", *_EXPORT)
    self.assertIn("already done", out.stderr)
    self.assertEqual(reader.Table(_store(self.ref)).version, gen)

  def test_layout_flags_lay_out_the_same_rows(self):
    workdir = self._copy()
    cli.run_main(workdir, "export", *_EXPORT, "--config.store.block_rows=8",
                 "--config.store.shard_bits=2")
    table = reader.Table(_store(workdir))
    self.assertEqual((table.metadata["block_rows"], table.metadata["shard_bits"]),
                     (8, 2))
    self.assertEqual(_checksum(workdir), self.ref_sum)
    ref = reader.Table(_store(self.ref))
    self.assertEqual((ref.metadata["block_rows"], ref.metadata["shard_bits"]),
                     (tables.DEFAULT_BLOCK_ROWS, tables.DEFAULT_SHARD_BITS))
    keys = sf.ds_keys(self.ds)
    np.testing.assert_array_equal(table.lookup(keys)[0], ref.lookup(keys)[0])

  def test_readers_keep_to_the_cache_flag(self):
    config = mf.tiny_config()
    config.store.cache_bytes = 1 << 16
    small = tables.open_checked(config, self.ref, "source_temporal",
                                self.ds.schema.fingerprint)
    keys = sf.ds_keys(self.ds)
    values, found = small.lookup(keys)
    self.assertTrue(found.all())
    self.assertLessEqual(small.memory_bytes(), 1 << 16)
    np.testing.assert_array_equal(values,
                                  reader.Table(_store(self.ref)).lookup(keys)[0])
    # A budget the indexes alone would fill is refused, naming the flag.
    config.store.cache_bytes = small.full_index_bytes()
    with self.assertRaisesRegex(errors.StoreError, "--config.store.cache_bytes="):
      tables.open_checked(config, self.ref, "source_temporal",
                          self.ds.schema.fingerprint)

  def test_two_processes_export_the_same_table(self):
    workdir = self._copy()
    launcher = os.path.join(cli.REPO, "launch", "local.py")
    cli.run([
        sys.executable, launcher, "--num_processes=2", "--",
        *cli.main_args(workdir, "export", *_EXPORT)
    ])
    self.assertEqual(_checksum(workdir), self.ref_sum)

  def test_killed_export_resumes_to_the_same_table(self):
    workdir = self._copy()
    path = _store(workdir)
    # A previous version, which must stay readable throughout.
    keys = np.asarray(self.ds["ins_id"])[:100]
    old = writer.write(path,
                       keys,
                       np.ones((100, 4), np.float32),
                       source="source_temporal",
                       source_step=-1,
                       source_config=None,
                       dataset=self.ds.schema.fingerprint)
    proc = cli.start_main(workdir, *_EXPORT, mode="export")
    try:
      self._wait_for_chunk(path, 3, proc)
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    table = reader.Table(path)
    self.assertEqual((table.version, table.metadata["source_step"]), (old, -1))
    table.verify()
    out = cli.run_main(workdir, "export", *_EXPORT)
    self.assertIn("resuming at batch", out.stderr)  # durable chunks were kept
    self.assertEqual(_checksum(workdir), self.ref_sum)
    self.assertEqual(reader.Table(path, version=old).metadata["source_step"], -1)

  def _wait_for_chunk(self, path, chunk, proc):
    """Waits until process 0's staging holds a durable chunk `chunk`."""
    deadline = time.time() + 600
    staging = os.path.join(path, "staging")
    while time.time() < deadline:
      if proc.poll() is not None:
        raise AssertionError(f"export ended before the kill (exit {proc.returncode})"
                             f": {proc.stderr.read()[-3000:]}")
      ids = os.listdir(staging) if os.path.isdir(staging) else []
      if ids and os.path.exists(os.path.join(staging, ids[0], "p0", "manifest.ocdbt")):
        kv = database.open_kv(path, sub=f"staging/{ids[0]}/p0")
        if kv.read(f"c{chunk:06d}/done").result().state == "value":
          return
      time.sleep(0.02)
    raise AssertionError("timed out waiting for the export's chunks")


if __name__ == "__main__":
  absltest.main()
