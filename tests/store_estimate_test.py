"""`estimate`: paper Eq. 12, and the bytes per row of a real table."""

import os
import subprocess
import sys

from absl.testing import absltest
import pytest

from iat_jax.store import estimate
from iat_jax.store import reader
from tests import store_fixtures as sf

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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

  @pytest.mark.slow
  def test_cli_on_a_real_table(self):
    path = os.path.join(self.create_tempdir().full_path, "t")
    n = 3 * 4096
    sf.write(path, *sf.data(n, 32, seed=10), dtype="bfloat16", step=5)
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
    want = reader.Table(path).bytes_on_disk() / n
    self.assertAlmostEqual(measured, want, delta=0.1)
    self.assertLess(abs(measured - 72) / 72, 0.02)  # OCDBT index/manifest only


if __name__ == "__main__":
  absltest.main()
