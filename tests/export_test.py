"""Export (iat_jax.train.export_lib) of a tiny source trained in-process, and
the user-order source's evaluation batches (what evaluate and export read)."""

import os
import shutil
import tempfile

from absl.testing import absltest
import numpy as np
import pytest

from iat_jax import pipeline
from iat_jax import sharding
from iat_jax import stages
from iat_jax import validation
from iat_jax.data import orders
from iat_jax.data import sources
from iat_jax.store import tables
from iat_jax.train import export_lib
from iat_jax.train import predict
from iat_jax.train import steps
from iat_jax.train import train_lib
from iat_jax.train import trainers
from tests import cli_fixtures as cli
from tests import data_fixtures
from tests import model_fixtures as mf
from tests import store_fixtures as sf


@pytest.mark.slow
class ExportTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.config = mf.tiny_config()
    cls.config.stage = "source_temporal"
    cls.stage = stages.get(cls.config.stage)
    cls.config.data.cache_dir = cli.DATA  # shared with this process's CLI runs
    validation.validate(cls.config)
    cls.ds = sources.prepare(cls.config, cls.workdir)
    cls.results = trainers.train(cls.stage, cls.config, cls.workdir, "source_temporal",
                                 cls.ds)
    cls.path = export_lib.export(cls.stage, cls.config, cls.workdir, "source_temporal",
                                 cls.ds)

  def test_table_holds_every_instance(self):
    self.assertEqual(self.path, os.path.join(self.workdir, "stores", "source_temporal"))
    table = tables.open_checked(self.config, self.workdir, "source_temporal",
                                self.ds.schema.fingerprint)
    ins = sf.ds_keys(self.ds)
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
    version = tables.open_table(self.config, self.path).version
    with self.assertLogs(level="INFO") as logs:
      path = export_lib.export(self.stage, self.config, self.workdir, "source_temporal",
                               self.ds)
    self.assertEqual(path, self.path)
    self.assertTrue(any("already done" in line for line in logs.output), logs.output)
    self.assertEqual(tables.open_table(self.config, self.path).version, version)
    self.assertEqual(sorted(os.listdir(self.path)), versions)

  def test_evaluate_matches_training_results(self):
    got = train_lib.evaluate_stage(self.stage, self.config, self.workdir,
                                   "source_temporal", self.ds)
    self.assertEqual(got["best_step"], self.results["best_step"])
    for split in ("valid", "test"):
      for name, value in self.results[split].items():
        self.assertAlmostEqual(got[split][name], value, places=6, msg=name)

  def test_two_models_over_one_stage_keep_their_own_stores(self):
    """A second model over source_temporal writes stores/<its name>, leaves the
    first one's alone, and a downstream reading it gets its store."""
    shutil.copytree(os.path.join(self.workdir, "source_temporal"),
                    os.path.join(self.workdir, "source_b"))
    version = tables.open_table(self.config, self.path).version
    other = export_lib.export(self.stage, self.config, self.workdir, "source_b",
                              self.ds)
    self.assertEqual(other, os.path.join(self.workdir, "stores", "source_b"))
    self.assertEqual(tables.open_table(self.config, self.path).version, version)
    model = stages.PipelineModel("iat_b", stages.STAGES["downstream"], "source_b")
    cfg = pipeline.stage_config(self.config, model)
    table = pipeline.open_store(model.stage, cfg, self.workdir, self.ds)
    self.assertEqual((table.path, table.metadata["source"]), (other, "source_b"))
    keys = sf.ds_keys(self.ds)
    np.testing.assert_array_equal(
        table.lookup(keys)[0],
        tables.open_table(self.config, self.path).lookup(keys)[0])

  def test_needs_a_source_stage(self):
    config = mf.tiny_config()
    config.stage = "base"
    with self.assertRaisesRegex(ValueError, "--config.stage='base': export needs a "
                                "source stage"):
      export_lib.export(stages.get("base"), config, self.workdir, "base", self.ds)


class UserOrderEvaluationTest(absltest.TestCase):
  """source_user's valid batches (its order's evaluation chain) with a
  random-parameter model on the tiny data."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.ds = data_fixtures.shared_dataset()
    cls.config = mf.tiny_config()
    cls.config.stage = "source_user"
    cls.model = mf.make_model("source_user", cls.config)
    cls.data = orders.batches(cls.config, cls.ds, "user_chunks", "valid", train=False)
    cls.params = mf.random_params(cls.model, steps.model_inputs(cls.data[0]))
    cls.fwd = staticmethod(
        mf.jit(lambda p, b: cls.model.apply({"params": p}, b)["sit_out"]))

  def _first_valid_after_train(self):
    """(batch, chunk, position) of a valid instance strictly later than its
    user's last train instance, and that train instance's position."""
    ds = self.ds
    split, ts = np.asarray(ds["split"]), np.asarray(ds["ts"])
    for b in self.data:
      for i, (rows, tok, m) in enumerate(zip(b["row"], b["token_mask"], b["mask"])):
        train = np.flatnonzero(tok & (split[np.maximum(rows, 0)] == 0))
        later = np.flatnonzero(
            m & (ts[np.maximum(rows, 0)] > ts[rows[train[-1]]])) if len(train) else []
        if len(later):
          return b, i, later[0], train[-1]
    self.fail("no valid instance after a train instance in the valid batches")

  def test_valid_instance_sees_its_users_last_train_instance(self):
    ds = self.ds
    b, i, p, q = self._first_valid_after_train()
    r = b["row"][i, q]
    user = np.arange(*ds["user_offsets"][ds["user_index"][r] + np.arange(2)])
    self.assertEqual(r, user[np.asarray(ds["split"])[user] == 0].max())
    batch = steps.model_inputs(b)
    base = np.asarray(self.fwd(self.params, batch))[i, p]

    def changed(where):
      out = np.asarray(self.fwd(self.params, _perturbed(batch, where)))[i, p]
      return np.abs(out - base).max()

    here = np.zeros(b["mask"].shape, bool)
    here[i, q] = True
    self.assertGreater(changed(here), 1e-5)
    # Every later (or same-timestamp) instance, in any chunk of the batch.
    ts = np.where(b["token_mask"], b["ts"], -1)
    later = ts >= b["ts"][i, p]
    later[i, p] = False
    self.assertTrue(later.any())
    self.assertLess(changed(later), 1e-6)

  def test_metrics_count_each_valid_instance_once(self):
    ds, config = self.ds, self.config
    mesh = sharding.make_mesh(tuple(config.mesh_shape), tuple(config.mesh_axes))
    rules = tuple(tuple(rule) for rule in config.logical_axis_rules)
    _, shardings = steps.create_state(self.model, steps.make_optimizer(config, 1),
                                      steps.to_device(self.data[0], mesh), 0, mesh,
                                      rules)
    eval_step = steps.make_eval_step(self.model, shardings.params, mesh, rules)
    res = predict.predict(eval_step, self.params, self.data, mesh)
    rows = ds.split_rows("valid")
    self.assertLen(res["ins_id"], len(rows))
    order = np.argsort(res["ins_id"])
    want = np.argsort(ds["ins_id"][rows])
    np.testing.assert_array_equal(res["ins_id"][order], ds["ins_id"][rows][want])
    np.testing.assert_array_equal(res["labels"][order], ds["labels"][rows][want])
    context = sum(int((b["token_mask"] & ~b["mask"]).sum()) for b in self.data)
    self.assertGreater(context, 0)  # the batches carry rows that do not count

  def test_eval_context_is_checked(self):
    self.assertEqual(orders.eval_context(self.config),
                     self.config.data.user_chunk_len // 2)
    config = mf.tiny_config()
    config.data.eval_context = config.data.user_chunk_len
    with self.assertRaisesRegex(ValueError, "--config.data.eval_context"):
      validation.validate(config)


def _perturbed(batch, where):
  """`batch` with the features of the instances where `where` [Bu, T] replaced."""
  rng = np.random.default_rng(1)
  out = dict(batch)
  for k in ("cat", "mh_tags", "dense", "seq_item", "seq_category", "seq_action"):
    x = np.asarray(batch[k])
    w = where.reshape(where.shape + (1,) * (x.ndim - where.ndim))
    new = rng.integers(1, 3, x.shape) if x.dtype.kind == "i" else rng.normal(
        size=x.shape)
    out[k] = np.where(w, new.astype(x.dtype), x)
  return out


if __name__ == "__main__":
  absltest.main()
