"""Two-pass user-order training stores every train instance's InsEmb once."""

import os
import tempfile

from absl.testing import absltest
import numpy as np
import pytest

from iat_jax import configs
from iat_jax.data import dataset
from iat_jax.store import reader
from iat_jax.store import tables
from iat_jax.train import two_pass_lib
from tests import cli_fixtures as cli


@pytest.mark.slow
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
    config = configs.base_config()
    ins = tables.store_keys(config.store.placement, ds["ins_id"], ds["uid"])
    config.model.insemb_dim, config.stage = 4, "source_user"
    config.store.cache_bytes = 5 << 20
    passes = [
        two_pass_lib.pass_table(config, workdir, "source_user", p, ds).table
        for p, _ in two_pass_lib.PASSES
    ]
    for k, table in enumerate(passes):  # each pass stored exactly the rows it keeps
      self.assertEqual(table.cache_bytes, 5 << 20)  # --config.store.cache_bytes
      _, found = table.lookup(ins)
      np.testing.assert_array_equal(found, train & (keep == k))
      self.assertLen(table, int((train & (keep == k)).sum()))
    store = reader.Table(os.path.join(workdir, "stores", "source_user"))
    self.assertEqual(store.metadata["num_rows"], ds.num_rows)
    values, found = store.lookup(ins)
    self.assertTrue(found.all())
    for k, table in enumerate(passes):
      rows = np.flatnonzero(train & (keep == k))
      np.testing.assert_allclose(values[rows], table.lookup(ins[rows])[0])


if __name__ == "__main__":
  absltest.main()
