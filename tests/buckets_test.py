"""dAUC by available IAT length (`iat_jax.buckets`, --mode=buckets)."""

import json
import os

from absl.testing import absltest
import numpy as np
import pytest

from iat_jax import buckets
from iat_jax import metrics
from iat_jax import workdir as workdir_lib
from tests import cli_fixtures as cli
from tests import data_fixtures


class BucketsTest(absltest.TestCase):

  def test_names(self):
    self.assertEqual(buckets.bucket_names([0, 1, 16, 64, 256]),
                     ["0", "1-15", "16-63", "64-255", ">=256"])

  def test_available_length_counts_strictly_earlier_rows_only(self):
    ds = data_fixtures.shared_dataset()  # ~1/3 of timestamps tied
    rows = np.arange(ds.num_rows)
    uid, ts = np.asarray(ds["uid"]), np.asarray(ds["ts"])
    want = [int(((uid == uid[r]) & (ts < ts[r])).sum()) for r in rows]
    np.testing.assert_array_equal(ds.earlier_count(rows), want)
    tied = [r for r in rows if ((uid == uid[r]) & (ts == ts[r])).sum() > 1]
    self.assertNotEmpty(tied)  # rows whose same-time rows must not count

  def test_paired_interval(self):
    rng = np.random.default_rng(0)
    n = 4000
    users = rng.integers(0, 400, n)
    labels = (rng.random(n) < 0.3).astype(np.float32)
    base = rng.random(n)
    same = buckets.paired_dauc(labels, base, base, users, 50, 0)
    self.assertEqual((same["dauc"], same["ci"]), (0.0, [0.0, 0.0]))
    better = base + 0.5 * labels  # more separable
    out = buckets.paired_dauc(labels, base, better, users, 50, 0)
    self.assertAlmostEqual(out["auc_model"], metrics.auc(labels, better))
    self.assertGreater(out["ci"][0], 0.0)
    self.assertLessEqual(out["ci"][0], out["dauc"])
    self.assertLessEqual(out["dauc"], out["ci"][1])
    noise = buckets.paired_dauc(labels, base, base + 1e-3 * rng.random(n), users, 50, 0)
    self.assertLess(noise["ci"][0], 0.0 + 1e-3)

  def test_table_buckets_partition_the_rows(self):
    rng = np.random.default_rng(1)
    n = 600
    lengths = rng.integers(0, 400, n)
    lengths[:50] = 0
    labels = (rng.random(n) < 0.5).astype(np.float32)
    scores = rng.random(n)
    rows = buckets.table(labels, scores, scores, lengths, rng.integers(0, 60, n),
                         [0, 1, 16, 64, 256], 5, 0)
    self.assertEqual([r["bucket"] for r in rows],
                     ["all", "0", "1-15", "16-63", "64-255", ">=256"])
    self.assertEqual(rows[0]["rows"], n)
    self.assertEqual(sum(r["rows"] for r in rows[1:]), n)
    self.assertEqual(rows[1]["rows"], 50)
    self.assertEqual(rows[-1]["rows"], int((lengths >= 256).sum()))


@pytest.mark.slow
class BucketsModeTest(absltest.TestCase):

  def test_finished_pipeline(self):
    workdir = cli.copy_of(cli.shared_pipeline())
    cli.run_main(workdir, "buckets", "--config.buckets.resamples=3")
    with open(os.path.join(workdir, "buckets", "buckets.json")) as f:
      out = json.load(f)
    results = workdir_lib.load_results(workdir)["models"]
    self.assertEqual(sorted(out["models"]), ["stream_iat", "temporal_iat", "user_iat"])
    for name, tasks in out["models"].items():
      for task, rows in tasks.items():
        # The "all" row is the pipeline's own test evaluation.
        self.assertAlmostEqual(rows[0]["auc_base"],
                               results["base"]["test"][f"auc/{task}"])
        self.assertAlmostEqual(rows[0]["auc_model"],
                               results[name]["test"][f"auc/{task}"])
        self.assertEqual(sum(r["rows"] for r in rows[1:]), rows[0]["rows"])
      self.assertTrue(os.path.exists(os.path.join(workdir, "buckets",
                                                  "dauc_click.png")))
    bad = cli.run_main(workdir, "buckets", "--config.buckets.edges=(1,16)", check=False)
    self.assertNotEqual(bad.returncode, 0)
    self.assertIn("buckets.edges", bad.stderr)


if __name__ == "__main__":
  absltest.main()
