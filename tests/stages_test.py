"""Tests of the stage table (iat_jax.stages): every stage builds its model,
every pipeline model reads an exported source, names are checked."""

from absl.testing import absltest
from absl.testing import parameterized
import jax

from iat_jax import stages
from iat_jax import validation
from iat_jax.data import orders
from iat_jax.models import source as source_models
from iat_jax.train import trainers
from tests import model_fixtures as mf


class StageTableTest(parameterized.TestCase):

  @parameterized.parameters(*stages.STAGES)
  def test_every_stage_builds_its_model(self, name):
    stage = stages.get(name)
    config = mf.tiny_config()
    config.stage = name
    validation.validate(config)
    model = mf.make_model(name, config)
    batch = mf.stage_batch(name, config)
    out, variables = jax.eval_shape(
        lambda: model.init_with_output(jax.random.key(0), batch))
    lead = batch["mask"].shape
    self.assertEqual(out["logits"].shape, lead + (mf.NUM_TASKS,))
    self.assertNotEmpty(jax.tree.leaves(variables["params"]))
    if stage.exports:  # a source: its InsEmbs are what the store holds
      self.assertEqual(out["insemb"].shape, lead + (config.model.insemb_dim,))
    self.assertIn(stage.order, orders.ORDERS)
    self.assertIn(stage.trainer, trainers.TRAINERS)
    source = stages.read_source(config, stage)
    if stage.reads is None:
      self.assertIsNone(source)
    else:
      self.assertIn(source, stages.SOURCES)

  def test_sources_are_the_exporting_stages(self):
    self.assertEqual(set(stages.SOURCES),
                     {n for n, s in stages.STAGES.items() if s.exports})
    self.assertIn("source_user", stages.SOURCES)
    self.assertNotIn("downstream", stages.SOURCES)

  def test_every_pipeline_models_source_exports_before_it(self):
    order = list(stages.PIPELINE)
    for name, model in stages.PIPELINE.items():
      stage = model.stage
      if model.source is None:
        self.assertIsNone(stage.reads, name)
        continue
      self.assertIsNotNone(stage.reads, name)  # the key the source is set as
      source = stages.PIPELINE[model.source]
      self.assertTrue(source.stage.exports, name)
      self.assertLess(order.index(model.source), order.index(name))

  def test_read_source_follows_the_config_key(self):
    config = mf.tiny_config()
    config.store.source = "source_temporal"
    config.stream.init_from = "source_user"
    self.assertEqual(stages.read_source(config, stages.get("downstream")),
                     "source_temporal")
    self.assertEqual(stages.read_source(config, stages.get("source_stream")),
                     "source_user")
    self.assertIsNone(stages.read_source(config, stages.get("base")))

  def test_stream_model_takes_its_mode_from_the_stream_block(self):
    config = mf.tiny_config()
    for mode in source_models.STREAM_MODES:
      config.stream.mode = mode
      self.assertEqual(mf.make_model("source_stream", config).mode, mode)

  def test_get_names_the_flag(self):
    with self.assertRaisesRegex(ValueError,
                                r"--config\.stage: 'nope' is not one of \('base'"):
      stages.get("nope")
    config = mf.tiny_config()
    config.stage = "nope"
    with self.assertRaisesRegex(ValueError, r"--config\.stage: 'nope'"):
      validation.validate(config)


if __name__ == "__main__":
  absltest.main()
