"""Export (iat_jax.train.export_lib) of a tiny source trained in-process."""

import os
import tempfile

from absl.testing import absltest
import numpy as np

from iat_jax import configs
from iat_jax.data import sources
from iat_jax.store import tables
from iat_jax.train import export_lib
from iat_jax.train import train_lib
from iat_jax.train import trainers
from tests import cli_fixtures as cli
from tests import model_fixtures as mf


class ExportTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.config = mf.tiny_config()
    cls.config.stage = "source_temporal"
    cls.config.data.cache_dir = cli.DATA  # shared with this process's CLI runs
    configs.validate(cls.config)
    cls.ds = sources.prepare(cls.config, cls.workdir)
    cls.results = trainers.train(cls.config, cls.workdir, "source_temporal", cls.ds)
    cls.path = export_lib.export(cls.config, cls.workdir, "source_temporal", cls.ds)

  def test_table_holds_every_instance(self):
    self.assertEqual(self.path, os.path.join(self.workdir, "stores", "source_temporal"))
    table = tables.open_checked(self.config, self.workdir, "source_temporal",
                                self.ds.schema.fingerprint)
    ins = np.asarray(self.ds["ins_id"])
    self.assertLen(table, len(ins))
    self.assertEqual(table.dim, self.config.model.insemb_dim)
    self.assertEqual(table.metadata["source"], "source_temporal")
    self.assertEqual(table.metadata["source_step"], self.results["best_step"])
    values, found = table.lookup(ins)
    self.assertTrue(found.all())
    self.assertTrue(np.isfinite(values).all())
    self.assertGreater(np.abs(values).min(axis=1).max(), 0)

  def test_export_again_is_skipped(self):
    versions = sorted(os.listdir(self.path))
    version = tables.Table(self.path).version
    with self.assertLogs(level="INFO") as logs:
      path = export_lib.export(self.config, self.workdir, "source_temporal", self.ds)
    self.assertEqual(path, self.path)
    self.assertTrue(any("already done" in line for line in logs.output), logs.output)
    self.assertEqual(tables.Table(self.path).version, version)
    self.assertEqual(sorted(os.listdir(self.path)), versions)

  def test_evaluate_matches_training_results(self):
    got = train_lib.evaluate_stage(self.config, self.workdir, "source_temporal",
                                   self.ds)
    self.assertEqual(got["best_step"], self.results["best_step"])
    for split in ("valid", "test"):
      for name, value in self.results[split].items():
        self.assertAlmostEqual(got[split][name], value, places=6, msg=name)

  def test_needs_a_source_stage(self):
    config = mf.tiny_config()
    config.stage = "base"
    with self.assertRaisesRegex(ValueError, "--config.stage='base': export needs a "
                                "source stage"):
      export_lib.export(config, self.workdir, "base", self.ds)


if __name__ == "__main__":
  absltest.main()
