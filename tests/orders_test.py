"""The batch-order table (iat_jax.data.orders): every order's chains, sizes
and example batch agree with each other, and a new order needs only its entry."""

import dataclasses
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import grain
import numpy as np

from iat_jax import errors
from iat_jax import pipeline
from iat_jax import stages
from iat_jax import validation
from iat_jax.data import batching
from iat_jax.data import input_pipeline
from iat_jax.data import orders
from iat_jax.train import memory
from iat_jax.train import train_lib
from tests import data_fixtures
from tests import model_fixtures as mf


def _first(data) -> dict:
  return next(input_pipeline.iterate(data))


def _model_keys(batch: dict) -> set[str]:
  return set(batch) - set(input_pipeline.HOST_KEYS)


class OrderTableTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.ds = data_fixtures.shared_dataset()
    cls.config = mf.tiny_config()
    cls.config.stream.k = 3

  @parameterized.parameters("temporal", "user_chunks", "stream")
  def test_train_batches_have_the_example_layout(self, name):
    order = orders.get(name)
    batch = _first(orders.batches(self.config, self.ds, name, "train", train=True))
    example = order.example(self.config, self.ds.schema, 0)
    # The example may carry more: what the train loop adds (the stream's
    # past_insemb) and what only one stream mode reads (past features).
    self.assertContainsSubset(_model_keys(batch), _model_keys(example))
    abstract = orders.abstract_batch(self.config, self.ds.schema, name)
    for key in _model_keys(batch):
      self.assertEqual(batch[key].shape, abstract[key].shape, key)
      self.assertEqual(batch[key].dtype, abstract[key].dtype, key)
    instances = int(np.prod(batch["mask"].shape))
    self.assertEqual(instances, order.instances(self.config))

  def test_evaluation_batches_scale_with_the_data_shards(self):
    config = mf.tiny_config()
    config.eval_batch_size = 16
    config.mesh_shape = (1, -1)  # the 8 test devices all on 'model'
    one = _first(orders.batches(config, self.ds, "temporal", "valid", train=False))
    config.mesh_shape = (2, -1)
    two = _first(orders.batches(config, self.ds, "temporal", "valid", train=False))
    self.assertEqual((len(one["mask"]), len(two["mask"])), (16, 32))
    # The first shard of a 2-shard batch is the whole 1-shard batch: each
    # device computes the same rows in the same shape.
    np.testing.assert_array_equal(two["row"][:16], one["row"])

  def test_train_batch_larger_than_the_data_names_the_flag(self):
    config = mf.tiny_config()
    config.batch_size = 10**6
    with self.assertRaisesRegex(errors.ConfigError, "--config.batch_size"):
      orders.check_sizes(config, self.ds, ["temporal"])
    config = mf.tiny_config()
    config.users_per_batch = 10**6
    with self.assertRaisesRegex(errors.ConfigError, "--config.users_per_batch"):
      orders.check_sizes(config, self.ds, ["user_chunks", "temporal"])

  def test_train_batch_must_split_over_the_data_shards(self):
    config = mf.tiny_config()
    config.mesh_shape = (8, 1)
    config.users_per_batch = 4  # 4 user chunks over 8 data shards
    with self.assertRaisesRegex(
        errors.ConfigError, r"--config.users_per_batch: 4 does not split evenly "
        r"over the 8 data shards .*use a multiple of 8"):
      orders.check_sizes(config, self.ds, ["temporal", "user_chunks"])
    config.mesh_shape = (2, 4)
    orders.check_sizes(config, self.ds, ["temporal", "user_chunks"])

  def test_a_new_order_is_one_entry(self):
    """An order of time-reversed batches, registered alone, is what a stage
    naming it trains on, with its size flags, progress rate and checks."""

    def reversed_time(config, ds, split, ctx):
      rows = ds.split_rows(split)[::-1]
      source = batching.EpochBatches(len(rows), config.batch_size, 1,
                                     lambda epoch: rows)
      read = input_pipeline.ReadInstances(ds, batching.ProcessSlice(0, 1))
      return grain.MapDataset.source(source).map(read)

    temporal = orders.get("temporal")
    order = dataclasses.replace(temporal,
                                name="reversed_time",
                                train=reversed_time,
                                evaluate=reversed_time,
                                size_flags=("batch_size", "shuffle_window"),
                                instances=lambda c: 2 * c.batch_size)
    stage = dataclasses.replace(stages.get("base"),
                                name="base_reversed",
                                order="reversed_time")
    orders.register(order)
    stages.STAGES[stage.name] = stage
    try:
      config = mf.tiny_config()
      config.stage = stage.name
      validation.validate(config)
      run = train_lib.Run(stage, config, tempfile.mkdtemp(), stage.name, self.ds)
      batch = _first(run.train_data)
      ts = self.ds["ts"][batch["row"][batch["mask"]]]
      self.assertTrue((np.diff(ts) <= 0).all())  # newest first
      self.assertIn("--config.shuffle_window", memory.size_flags(stage.order))
      self.assertEqual(orders.get(stage.order).instances(config), 2 * config.batch_size)
      self.assertIsNone(pipeline.open_store(stage, config, "/nonexistent", self.ds))
      orders.check_sizes(config, self.ds, ["reversed_time"])
    finally:
      del orders.ORDERS["reversed_time"], stages.STAGES[stage.name]
    with self.assertRaisesRegex(ValueError, "registered twice"):
      orders.register(temporal)


if __name__ == "__main__":
  absltest.main()
