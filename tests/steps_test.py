"""Tests of iat_jax.train.steps: sharded state, train step, eval step.

One tiny base ranker on the 4 x 2 (data x model) mesh of the 8 forced CPU
devices; the state and the steps are built (and compiled) once per class.
"""

from absl.testing import absltest
import jax
from jax.sharding import PartitionSpec as P
import numpy as np

from iat_jax import sharding
from iat_jax.data import examples
from iat_jax.data import input_pipeline
from iat_jax.train import steps
from tests import model_fixtures as mf

SCHEMA = mf.SCHEMA
NUM_STEPS = 12


class StepsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.config = mf.tiny_config()
    cls.config.optimizer.learning_rate = 1e-2
    cls.model = mf.make_model("base", cls.config)
    cls.mesh = sharding.make_mesh((4, 2), cls.config.mesh_axes)
    cls.rules = tuple(cls.config.logical_axis_rules)
    cls.batch = examples.base_batch(SCHEMA, b=16)
    cls.batch["row"] = np.arange(16)  # a host-only key: never reaches the model
    cls.dev_batch = steps.to_device(cls.batch, cls.mesh)
    tx = steps.make_optimizer(cls.config, NUM_STEPS)
    cls.state, cls.shardings = steps.create_state(cls.model, tx, cls.dev_batch,
                                                  cls.config.seed, cls.mesh, cls.rules)
    cls.host_state = jax.device_get(cls.state)
    cls.eval_step = staticmethod(
        steps.make_eval_step(cls.model, cls.shardings.params, cls.mesh, cls.rules))

  def fresh_state(self):
    """A copy of the initial state (a train step donates the one it gets)."""
    return jax.device_put(self.host_state, self.shardings)

  def test_to_device_drops_host_keys_and_shards_over_data(self):
    self.assertNotIn("row", self.dev_batch)
    self.assertEqual(set(self.dev_batch),
                     set(self.batch) - set(input_pipeline.HOST_KEYS))
    labels = self.dev_batch["labels"]
    self.assertEqual(labels.sharding.spec, P("data"))
    self.assertEqual({s.data.shape for s in labels.addressable_shards},
                     {(4, SCHEMA.num_tasks)})

  def test_create_state_shardings(self):
    state, shardings = self.state, self.shardings
    self.assertEqual(int(state.step), 0)
    # Embedding rows over 'model' (replicated over 'data'), dense replicated;
    # the optimizer moments are sharded like their parameters.
    table = state.params["trunk"]["embed"]["embedding"]
    self.assertEqual(shardings.params["trunk"]["embed"]["embedding"].spec,
                     P("model", None))
    self.assertEqual(table.sharding.spec, P("model", None))
    self.assertEqual({s.data.shape for s in table.addressable_shards},
                     {(table.shape[0] // 2, table.shape[1])})
    kernel = state.params["heads"]["logits"]["kernel"]
    self.assertEqual({s.data.shape for s in kernel.addressable_shards}, {kernel.shape})
    adam = state.opt_state[-1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
    self.assertEqual(adam.mu["trunk"]["embed"]["embedding"].sharding.spec,
                     P("model", None))
    # Every leaf sits on the sharding create_state returned for it.
    jax.tree.map(lambda x, s: self.assertTrue(x.sharding.is_equivalent_to(s, x.ndim)),
                 state, shardings)
    # Unboxed: plain arrays, no Partitioned boxes.
    for leaf in jax.tree.leaves(state.params):
      self.assertIsInstance(leaf, jax.Array)

  def test_eval_step_matches_model_apply(self):
    params = self.fresh_state().params
    out = self.eval_step(params, self.dev_batch)
    self.assertEqual(set(out), {"probs"})
    self.assertEqual(out["probs"].shape, (16, SCHEMA.num_tasks))
    self.assertEqual(out["probs"].sharding.spec, P("data"))
    want = jax.nn.sigmoid(
        self.model.apply({"params": self.host_state.params},
                         steps.model_inputs(self.batch))["logits"])
    np.testing.assert_allclose(np.asarray(out["probs"]), want, atol=1e-5)

  def test_train_step_decreases_loss_on_a_fixed_batch(self):
    train_step = steps.make_train_step(self.model,
                                       self.shardings,
                                       self.mesh,
                                       self.rules,
                                       aux=("probs",))
    state = self.fresh_state()
    before = jax.device_get(self.eval_step(state.params, self.dev_batch)["probs"])
    losses = []
    for i in range(NUM_STEPS):
      state, out, aux = train_step(state, self.dev_batch)
      losses.append(float(out["loss"]))
      if i == 0:  # the aux outputs are those of the step's (pre-update) forward
        self.assertEqual(aux["probs"].sharding.spec, P("data"))
        np.testing.assert_allclose(np.asarray(aux["probs"]), before, atol=1e-5)
    self.assertEqual(int(state.step), NUM_STEPS)
    self.assertTrue(np.isfinite(losses).all(), losses)
    self.assertLess(losses[-1], 0.8 * losses[0], losses)
    # The state stays on its shardings across steps.
    self.assertEqual(state.params["trunk"]["embed"]["embedding"].sharding.spec,
                     P("model", None))
    # The eval step sees the trained params: its predictions moved.
    after = np.asarray(self.eval_step(state.params, self.dev_batch)["probs"])
    self.assertGreater(np.abs(after - before).max(), 1e-3)

  def test_optimizer_handles_short_runs(self):
    for num_steps in (1, 2, 100):
      tx = steps.make_optimizer(self.config, num_steps)
      params = {"w": np.ones(3, np.float32)}
      updates, _ = tx.update({"w": np.ones(3, np.float32)}, tx.init(params), params)
      self.assertTrue(np.isfinite(updates["w"]).all())


if __name__ == "__main__":
  absltest.main()
