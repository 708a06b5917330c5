"""Two CPU processes (gloo) train the same model as one process."""

import os
import sys
import tempfile

from absl.testing import absltest
import numpy as np

from tests import cli_fixtures as cli


class TwoProcessTest(absltest.TestCase):

  def test_two_processes_match_one(self):
    # The one-process run: the shared pipeline's base model (same config; the
    # train lines do not depend on how often it evaluates or checkpoints).
    single = cli.shared_pipeline()
    args = ("--config.eval_every=0", "--config.checkpoint_every=12")
    multi = tempfile.mkdtemp()
    launcher = os.path.join(cli.REPO, "launch", "local.py")
    cli.run([
        sys.executable, launcher, "--num_processes=2", "--",
        *cli.main_args(multi, "train", *args)
    ])
    one = [r for r in cli.metric_lines(single) if r["split"] == "train"]
    two = [r for r in cli.metric_lines(multi) if r["split"] == "train"]
    self.assertEqual([r["step"] for r in one], [r["step"] for r in two])
    np.testing.assert_allclose([r["loss"] for r in two], [r["loss"] for r in one],
                               rtol=1e-5)
    # Only process 0 writes metrics: one line per step, no duplicates.
    self.assertLen(two, len(set(r["step"] for r in two)))


if __name__ == "__main__":
  absltest.main()
