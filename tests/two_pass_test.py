"""Two-pass user-order training stores every train instance's InsEmb once."""

import os
import tempfile

from absl.testing import absltest
import numpy as np

from iat_jax.data import dataset
from iat_jax.store import insemb_table
from iat_jax.train import two_pass_lib
from tests import cli_fixtures as cli


class TwoPassTest(absltest.TestCase):

  def test_each_train_instance_written_by_exactly_one_pass(self):
    workdir = tempfile.mkdtemp()
    args = ("--config.stage=source_user", "--config.two_pass=True")
    cli.run_main(workdir, "train", *args)
    cli.run_main(workdir, "export", *args)
    ds = dataset.Dataset(os.path.join(cli.DATA, "synthetic"))
    keep = two_pass_lib.keeper(ds)
    self.assertEqual(set(np.unique(keep)), {0, 1})  # both passes keep some users
    train = np.asarray(ds["split"]) == 0
    written = []
    for pass_name, _ in two_pass_lib.PASSES:
      table = two_pass_lib.pass_table(workdir, "source_user", pass_name, ds, 4)
      written.append(np.abs(table.read_all()).sum(-1) > 0)
    np.testing.assert_array_equal(written[0], train & (keep == 0))
    np.testing.assert_array_equal(written[1], train & (keep == 1))
    store = insemb_table.Table(os.path.join(workdir, "stores", "source_user"))
    self.assertEqual(store.metadata["num_rows"], ds.num_rows)
    values, found = store.lookup(np.asarray(ds["ins_id"]))
    self.assertTrue(found.all())
    for k, (pass_name, _) in enumerate(two_pass_lib.PASSES):
      rows = np.flatnonzero(train & (keep == k))
      table = two_pass_lib.pass_table(workdir, "source_user", pass_name, ds, 4)
      np.testing.assert_allclose(values[rows], table.read(rows))


if __name__ == "__main__":
  absltest.main()
