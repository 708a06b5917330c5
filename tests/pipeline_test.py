"""Tests of iat_jax.pipeline's pieces (the whole CLI pipeline runs in
train_test): which steps run, each step's config, reused sources, stores."""

import dataclasses
import os
import tempfile
import types

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

from iat_jax import errors
from iat_jax import pipeline
from iat_jax import stages
from iat_jax import validation
from iat_jax import workdir as workdir_lib
from iat_jax.data import orders
from iat_jax.store import tables
from tests import cli_fixtures as cli
from tests import data_fixtures
from tests import model_fixtures as mf
from tests import store_fixtures as sf


def _names(models):
  return [m.name for m in models]


class StepsTest(parameterized.TestCase):

  def test_default_runs_every_model_in_order(self):
    self.assertEqual(_names(pipeline.steps(mf.tiny_config())), list(stages.PIPELINE))

  @parameterized.named_parameters(
      ("user_iat", ("user_iat",), ["source_user", "user_iat"]),
      ("temporal_iat_and_base",
       ("temporal_iat", "base"), ["base", "source_temporal", "temporal_iat"]),
      ("source_alone", ("source_user",), ["source_user"]),
      ("source_and_its_iat", ("user_iat", "source_user"), ["source_user", "user_iat"]),
      ("stream_iat_brings_both_sources",
       ("stream_iat",), ["source_user", "source_stream", "stream_iat"]),
  )
  def test_selection_pulls_in_sources_in_pipeline_order(self, models, want):
    config = mf.tiny_config()
    config.pipeline.models = models
    self.assertEqual(_names(pipeline.steps(config)), want)


class StageConfigTest(absltest.TestCase):

  def test_downstream_model_reads_its_source(self):
    config = mf.tiny_config()
    model = stages.PIPELINE["temporal_iat"]
    cfg = pipeline.stage_config(config, model)
    self.assertEqual(cfg.stage, "downstream")
    self.assertEqual(cfg.store.source, "source_temporal")
    self.assertEqual(stages.read_source(cfg, stages.get(cfg.stage)), model.source)
    # A copy: the run config is unchanged, every other key is carried over.
    self.assertEqual((config.stage, config.store.source), ("base", "source_user"))
    want = config.to_dict()
    want["stage"], want["store"]["source"] = "downstream", "source_temporal"
    self.assertEqual(cfg.to_dict(), want)

  def test_streaming_models_read_their_sources(self):
    config = mf.tiny_config()
    config.store.source = "source_temporal"
    config.stream.init_from = "source_temporal"
    stream = pipeline.stage_config(config, stages.PIPELINE["source_stream"])
    self.assertEqual((stream.stage, stream.stream.init_from, stream.store.source),
                     ("source_stream", "source_user", "source_temporal"))
    iat = pipeline.stage_config(config, stages.PIPELINE["stream_iat"])
    self.assertEqual((iat.stage, iat.store.source, iat.stream.init_from),
                     ("downstream", "source_stream", "source_temporal"))
    self.assertEqual(stages.read_source(iat, stages.get(iat.stage)), "source_stream")

  def test_stream_cannot_start_from_a_stream(self):
    config = mf.tiny_config()
    config.stream.init_from = "source_stream"
    with self.assertRaisesRegex(
        ValueError, r"--config\.stream\.init_from: "
        r"'source_stream' is not one of"):
      validation.validate(config)

  def test_default_pipeline_streams_after_user_iat(self):
    self.assertEqual(
        tuple(mf.tiny_config().pipeline.models)[-3:],
        ("user_iat", "source_stream", "stream_iat"))

  def test_source_model_keeps_the_store_key(self):
    config = mf.tiny_config()
    config.store.source = "source_temporal"
    cfg = pipeline.stage_config(config, stages.PIPELINE["source_user"])
    self.assertEqual(cfg.stage, "source_user")
    self.assertEqual(cfg.store.source, "source_temporal")


class ReusedSourceTest(absltest.TestCase):

  def test_missing_results_name_the_flag(self):
    other = tempfile.mkdtemp()
    with self.assertRaisesRegex(
        ValueError, r"--config\.pipeline\.sources_from: .*source_user/results\.json "
        r"does not exist; finish that pipeline's source_user first"):
      pipeline.reused_source(other, "source_user")

  def test_finished_source_results_are_read(self):
    other = tempfile.mkdtemp()
    directory = workdir_lib.stage_dir(other, "source_user")
    os.makedirs(directory)
    results = {"valid": {"auc/click": 0.5}, "test": {"auc/click": 0.6}}
    workdir_lib.write_results(directory, results)
    self.assertTrue(workdir_lib.is_complete(directory))
    self.assertEqual(pipeline.reused_source(other, "source_user"), results)


class OpenStoreTest(absltest.TestCase):
  """pipeline.open_store and the store contract (iat_jax.store.tables)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.ds = data_fixtures.shared_dataset()
    cls.workdir = tempfile.mkdtemp()
    cls.config = mf.tiny_config()
    cls.config.stage = "downstream"
    cls.config.store.source = "source_temporal"
    cls.keys = sf.ds_keys(cls.ds)
    cls.values = np.random.default_rng(0).normal(
        size=(len(cls.keys), cls.config.model.insemb_dim)).astype(np.float32)
    cls.path = tables.path(cls.config, cls.workdir, "source_temporal")
    tables.publish(cls.config,
                   cls.path,
                   cls.keys,
                   cls.values,
                   source="source_temporal",
                   step=3,
                   fingerprint=cls.ds.schema.fingerprint)

  def test_only_orders_that_read_a_store_get_one(self):
    for name, stage in stages.STAGES.items():
      if not orders.get(stage.order).reads_store:
        config = mf.tiny_config()
        config.stage = name
        self.assertIsNone(
            pipeline.open_store(stages.get(config.stage), config, self.workdir,
                                self.ds), name)

  def test_opens_the_published_table(self):
    self.assertEqual(self.path, os.path.join(self.workdir, "stores", "source_temporal"))
    table = pipeline.open_store(stages.get(self.config.stage), self.config,
                                self.workdir, self.ds)
    self.assertIsInstance(table, tables.Table)
    values, found = table.lookup(self.keys[:50])
    self.assertTrue(found.all())
    np.testing.assert_array_equal(values, self.values[:50])

  def test_is_published(self):
    config = self.config
    self.assertTrue(tables.is_published(config, self.path, "source_temporal", 3))
    self.assertFalse(tables.is_published(config, self.path, "source_temporal", 4))
    self.assertFalse(tables.is_published(config, self.path, "source_user", 3))
    self.assertFalse(
        tables.is_published(config, os.path.join(self.workdir, "none"),
                            "source_temporal", 3))

  def test_mismatched_store_names_the_flag(self):
    config = mf.tiny_config()
    config.update(stage="downstream")
    config.store.source = "source_temporal"
    config.model.insemb_dim = self.config.model.insemb_dim + 2
    with self.assertRaisesRegex(errors.StoreError, "--config.model.insemb_dim"):
      pipeline.open_store(stages.get(config.stage), config, self.workdir, self.ds)

  def test_missing_store(self):
    config = mf.tiny_config()
    config.stage = "downstream"  # reads source_user's store: never exported
    with self.assertRaisesRegex(errors.StoreError, "no InsEmb table.*--mode=export"):
      pipeline.open_store(stages.get(config.stage), config, self.workdir, self.ds)

  def test_store_of_another_dataset(self):
    other = types.SimpleNamespace(
        schema=dataclasses.replace(self.ds.schema, fingerprint="another"))
    with self.assertRaisesRegex(errors.StoreError,
                                "exported from dataset / placement 'tiny/user'"):
      pipeline.open_store(stages.get(self.config.stage), self.config, self.workdir,
                          other)


@pytest.mark.slow
class StreamInPipelineTest(absltest.TestCase):
  """The shared tiny pipeline ran the streaming source and stream_iat."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = cli.shared_pipeline()
    cls.results = workdir_lib.load_results(cls.workdir)["models"]

  def test_results_carry_the_streaming_models(self):
    metrics = {"auc/click", "auc/conversion", "logloss/click", "logloss/conversion"}
    for name in ("source_stream", "stream_iat"):
      for split in ("valid", "test"):
        self.assertEqual(set(self.results[name][split]), metrics, name)
        self.assertBetween(self.results[name][split]["auc/click"], 0.0, 1.0)
    # The streaming source's are its progressive metrics (its results.json).
    self.assertEqual(
        self.results["source_stream"],
        workdir_lib.load_results(os.path.join(self.workdir, "source_stream")))

  def test_stream_iat_reads_the_store_at_the_streams_last_step(self):
    path = os.path.join(self.workdir, "stores", "source_stream")
    self.assertTrue(
        tables.is_published(mf.tiny_config(), path, "source_stream",
                            self.results["source_stream"]["best_step"]))
    train = [
        r for r in cli.metric_lines(self.workdir, "stream_iat") if r["split"] == "train"
    ]
    self.assertNotEmpty(train)
    self.assertTrue(all(r["hist_missing"] == 0 for r in train))


if __name__ == "__main__":
  absltest.main()
