"""Streaming source training: never reads the future; resumes identically."""

import json
import os
import signal
import tempfile

from absl.testing import absltest
import numpy as np
import pytest

from iat_jax import configs
from iat_jax import workdir as workdir_lib
from iat_jax.data import input_pipeline as ip
from iat_jax.metrics import read_jsonl
from iat_jax.store import reader
from iat_jax.store import writer
from iat_jax.train import stream_lib
from tests import cli_fixtures as cli
from tests import data_fixtures


class StreamPipelineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.ds = data_fixtures.shared_dataset()

  def test_past_is_strictly_earlier_and_already_processed(self):
    ds = self.ds
    rank = np.empty(ds.num_rows, np.int64)
    rank[ds["temporal_order"]] = np.arange(ds.num_rows)
    # Every instance's stored InsEmb holds its own timestamp: a leak would show.
    path = os.path.join(tempfile.mkdtemp(), "t")
    writer.write(path,
                 np.asarray(ds["ins_id"]),
                 np.repeat(np.asarray(ds["ts"], np.float32)[:, None], 2, 1),
                 source="source_stream",
                 source_step=0,
                 source_config=None)
    table = reader.Table(path)
    seen, visible = set(), 0
    for b in ip.iterate(ip.stream(ds, ("valid", "test"), 8, 6)):
      m, pm = b["mask"], b["past_mask"]
      np.testing.assert_array_equal(b["past_ins_id"][pm],
                                    np.asarray(ds["ins_id"])[b["past_row"][pm]])
      fetched, found = table.lookup(b["past_ins_id"].reshape(-1))
      self.assertTrue(found.reshape(pm.shape)[pm].all())
      fetched = fetched.reshape(pm.shape + (2,))[..., 0]
      self.assertTrue((fetched[pm] < np.broadcast_to(b["ts"][:, None],
                                                     pm.shape)[pm]).all())
      for r in b["past_row"][pm]:
        # Either before the stream, or written by an earlier batch.
        self.assertTrue(ds["split"][r] == 0 or r in seen)
      self.assertTrue((b["past_row"][~pm] == -1).all())
      visible += int(pm.sum())
      seen.update(b["row"][m].tolist())
    self.assertGreater(visible, 0)
    self.assertEqual(
        seen,
        set(np.concatenate([ds.split_rows("valid"),
                            ds.split_rows("test")]).tolist()))

  def test_same_batch_instances_do_not_see_each_other(self):
    ds = self.ds
    for b in ip.iterate(ip.stream(ds, ("valid", "test"), 64, 6)):
      in_batch = set(b["row"][b["mask"]].tolist())
      self.assertFalse(in_batch & set(b["past_row"][b["past_mask"]].tolist()))

  def test_tie_groups_are_equal_exactly_for_equal_timestamps(self):
    ds = self.ds
    ties = 0
    for b in ip.iterate(ip.stream(ds, ("valid", "test"), 8, 6)):
      for i in np.flatnonzero(b["mask"]):
        pm = b["past_mask"][i]
        g = np.concatenate([b["tie_group"][i:i + 1], b["past_tie_group"][i][pm]])
        ts = np.concatenate([b["ts"][i:i + 1], ds["ts"][b["past_row"][i][pm]]])
        np.testing.assert_array_equal(g[:, None] == g[None], ts[:, None] == ts[None])
        ties += int((g[:, None] == g[None]).sum() - len(g))
    self.assertGreater(ties, 0)  # ties among the past entries do occur

  def test_recompute_mode_carries_past_features(self):
    b = ip.stream(self.ds, ("test",), 8, 4, features=True)[0]
    pm = b["past_mask"]
    np.testing.assert_array_equal(b["past_cat"][pm], self.ds["cat"][b["past_row"][pm]])
    self.assertTrue((b["past_cat"][~pm] == 0).all())


class SharedTableTest(absltest.TestCase):

  def test_reads_through_its_buffer_within_the_cache_flag(self):
    config = configs.base_config()
    config.store.cache_bytes = 3 << 20
    path = os.path.join(tempfile.mkdtemp(), "preds")
    shared = stream_lib._Shared.open_or_create(  # pylint: disable=protected-access
        config,
        path,
        d=2,
        dtype="float32",
        source="s",
        fingerprint="f")
    shared.put(np.array([4], np.uint64), np.ones((1, 2), np.float32), step=1)
    np.testing.assert_array_equal(
        shared.lookup(np.array([4, 5], np.uint64))[1], [True, False])
    self.assertLen(reader.Table(path), 0)  # nothing durable before a flush
    shared.flush(2)
    table = reader.Table(path)
    self.assertEqual((len(table), table.metadata["source_step"]), (1, 2))
    upserts = shared._upserts  # pylint: disable=protected-access
    self.assertEqual(upserts.table.cache_bytes, 3 << 20)


@pytest.mark.slow
class StreamTrainingTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    # A trained and exported source_user (the stream starts from both).
    cls.base = cli.shared_pipeline()
    cls.args = ("--config.stage=source_stream", "--config.batch_size=16")

  def _copy(self):
    return cli.fresh_stream(self.base)

  def _store_sha(self, workdir):
    return reader.Table(os.path.join(workdir, "stores",
                                     "source_stream")).metadata["checksum"]

  def test_resume_after_kill_matches_uninterrupted(self):
    ref = self._copy()
    cli.run_main(ref, "train", *self.args)
    rows = read_jsonl(os.path.join(ref, "source_stream", "metrics.jsonl"))
    self.assertIn("staleness_cosine", {k for r in rows for k in r})
    self.assertEqual({r["split"] for r in rows},
                     {"train", "stream", "final_valid", "test"})

    workdir = self._copy()
    proc = cli.start_main(workdir, *self.args[:1], *self.args[1:])
    cli.wait_for_step(workdir, 6, proc, stage="source_stream", checkpoint=4)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    cli.run_main(workdir, "train", *self.args)
    self.assertEqual(
        read_jsonl(os.path.join(workdir, "source_stream", "metrics.jsonl")), rows)
    self.assertEqual(self._store_sha(workdir), self._store_sha(ref))

  def test_recompute_method_runs(self):
    workdir = self._copy()
    cli.run_main(workdir, "train", *self.args, "--config.stream.mode=recompute")
    rows = read_jsonl(os.path.join(workdir, "source_stream", "metrics.jsonl"))
    self.assertTrue(any(r["split"] == "test" for r in rows))
    self.assertFalse(any("staleness_cosine" in r for r in rows))


@pytest.mark.slow
class StreamStageCliTest(absltest.TestCase):
  """--mode=evaluate / export of the pipeline's finished source_stream."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.base = cli.shared_pipeline()
    cls.results = workdir_lib.load_results(os.path.join(cls.base, "source_stream"))

  def test_evaluate_reports_the_progressive_metrics(self):
    workdir = cli.copy_of(self.base)
    out = cli.run_main(workdir, "evaluate", "--config.stage=source_stream").stdout
    got = json.loads(out[out.index("{"):])
    for split in ("valid", "test"):
      self.assertEqual(got[split], self.results[split])
      self.assertBetween(got[split]["auc/click"], 0.0, 1.0)
    self.assertEqual(got["best_step"], self.results["best_step"])
    # Nothing was trained: the stage directory's metric lines are unchanged.
    self.assertEqual(cli.metric_lines(workdir, "source_stream"),
                     cli.metric_lines(self.base, "source_stream"))

  def test_export_returns_the_up_to_date_store_unchanged(self):
    workdir = cli.copy_of(self.base)
    path = os.path.join(workdir, "stores", "source_stream")
    before = reader.Table(path).metadata
    out = cli.run_main(workdir, "export", "--config.stage=source_stream").stdout
    self.assertEqual(out.strip().splitlines()[-1], path)
    self.assertEqual(reader.Table(path).metadata, before)
    self.assertEqual(before["source_step"], self.results["best_step"])

  def test_unfinished_stream_is_refused_naming_the_flag(self):
    workdir = cli.fresh_stream(self.base)
    for mode in ("evaluate", "export"):
      proc = cli.run_main(workdir, mode, "--config.stage=source_stream", check=False)
      self.assertNotEqual(proc.returncode, 0)
      self.assertRegex(proc.stderr.strip().splitlines()[-1],
                       r"^error: --config\.stage=source_stream: .* --mode=train")


if __name__ == "__main__":
  absltest.main()
