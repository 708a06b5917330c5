"""Tests of iat_jax.checkpointing: state + Grain iterator round trip, retention,
best-by-metric tracking, and reopening a directory (what a resume does)."""

import os
import tempfile

from absl.testing import absltest
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from iat_jax import checkpointing
from iat_jax import errors
from iat_jax import sharding
from iat_jax.data import input_pipeline as ip
from tests import data_fixtures

METRIC = "auc/click"


def _state(mesh, scale: float):
  """A small sharded pytree standing in for a train state."""
  w = jax.device_put(scale * jnp.arange(24.0).reshape(8, 3),
                     NamedSharding(mesh, P("data")))
  return {
      "params": {
          "w": w
      },
      "step": jax.device_put(jnp.int32(scale), sharding.replicated(mesh))
  }


class CheckpointsTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.ds = data_fixtures.shared_dataset()
    cls.mesh = sharding.make_mesh()

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()

  def _data(self):
    return ip.temporal(self.ds, "train", 16, shuffle_window=32, seed=1, num_epochs=2)

  def test_state_and_iterator_round_trip(self):
    ckpts = checkpointing.Checkpoints(self.dir, keep=2, best_metric=METRIC)
    it = ip.iterate(self._data())
    for _ in range(3):
      next(it)
    state = _state(self.mesh, 3.0)
    ckpts.save(3, state, it)
    ckpts.save(3, _state(self.mesh, 99.0), it)  # a step already saved: no-op
    want = [next(it)["row"] for _ in range(2)]  # what follows step 3
    ckpts.close()

    again = checkpointing.Checkpoints(self.dir, keep=2, best_metric=METRIC)
    self.assertEqual(again.latest_step(), 3)
    fresh = ip.iterate(self._data())
    restored = again.restore(checkpointing.abstract(state), fresh)
    again.close()
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    self.assertEqual(int(restored["step"]), 3)
    # Restored onto the shardings of the abstract target.
    self.assertEqual(restored["params"]["w"].sharding.spec, P("data"))
    # The iterator continues where the saved one was.
    for rows in want:
      np.testing.assert_array_equal(next(fresh)["row"], rows)

  def test_keeps_the_last_k_and_restores_any_kept_step(self):
    ckpts = checkpointing.Checkpoints(self.dir, keep=2, best_metric=METRIC)
    it = ip.iterate(self._data())
    for step in (2, 4, 6):
      next(it)
      ckpts.save(step, _state(self.mesh, float(step)), it)
    ckpts.wait()
    self.assertEqual(ckpts.ckpt.all_steps(), [4, 6])
    self.assertEqual(ckpts.latest_step(), 6)
    target = checkpointing.abstract(_state(self.mesh, 0.0))
    restored = ckpts.restore(target, ip.iterate(self._data()), step=4)
    self.assertEqual(int(restored["step"]), 4)
    ckpts.close()

  def test_best_tracking(self):
    ckpts = checkpointing.Checkpoints(self.dir, keep=2, best_metric=METRIC)
    target = checkpointing.abstract(_state(self.mesh, 0.0)["params"])
    with self.assertRaisesRegex(errors.CheckpointError, "no best checkpoint"):
      ckpts.restore_best(target)
    for step, auc in ((1, 0.6), (2, 0.7), (3, 0.65)):
      ckpts.save_best(step,
                      _state(self.mesh, float(step))["params"], {
                          METRIC: auc,
                          "logloss/click": 0.5
                      })
    ckpts.save_best(2, _state(self.mesh, 99.0)["params"], {METRIC: 0.99})  # no-op
    ckpts.wait()
    step, params = ckpts.restore_best(target)
    self.assertEqual(step, 2)
    np.testing.assert_array_equal(params["w"], _state(self.mesh, 2.0)["params"]["w"])
    ckpts.close()
    # Reopened (a resumed run): the best so far is still known and kept.
    again = checkpointing.Checkpoints(self.dir, keep=2, best_metric=METRIC)
    again.save_best(4, _state(self.mesh, 4.0)["params"], {METRIC: 0.68})
    again.wait()
    self.assertEqual(again.restore_best(target)[0], 2)
    again.save_best(5, _state(self.mesh, 5.0)["params"], {METRIC: 0.8})
    again.wait()
    self.assertEqual(again.restore_best(target)[0], 5)
    again.close()
    self.assertEqual(sorted(os.listdir(os.path.join(self.dir, "best"))), ["5"])


if __name__ == "__main__":
  absltest.main()
