"""Sharded (4 x 2 data x model mesh) vs single-device runs of the models.

The 8 CPU devices are forced by tests/conftest.py.
"""

import re

from absl.testing import absltest
from absl.testing import parameterized
import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

from iat_jax import configs
from iat_jax import sharding
from iat_jax.data import examples
from iat_jax.data import history
from iat_jax.data import input_pipeline
from iat_jax.models import embedding
from iat_jax.store import memory_table
from iat_jax.train import steps
from tests import model_fixtures as mf

SCHEMA = mf.SCHEMA
RULES = configs.base_config().logical_axis_rules
LR = 0.1


def _step_fn(model):
  """(params, batch) -> (outputs, grads, params after one SGD step)."""

  def step(params, batch):

    def loss(p):
      out = model.apply({"params": p}, batch, train=True)
      bce = optax.sigmoid_binary_cross_entropy(out["logits"], batch["labels"])
      return bce.mean(), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(params)
    new = jax.tree_util.tree_map(lambda p, g: p - LR * g, params, grads)
    return out, grads, new

  return step


class MeshTest(absltest.TestCase):

  def test_make_mesh(self):
    self.assertLen(jax.devices(), 8)
    mesh = sharding.make_mesh((-1, 2))
    self.assertEqual(dict(mesh.shape), {"data": 4, "model": 2})
    self.assertEqual(dict(sharding.make_mesh().shape), {"data": 8, "model": 1})
    with self.assertRaisesRegex(ValueError, "do not fill"):
      sharding.make_mesh((-1, 3))
    with self.assertRaisesRegex(ValueError, "needs 6 devices"):
      sharding.make_mesh((3, 2))


class ShardedModelTest(parameterized.TestCase):

  @parameterized.parameters(
      ("downstream", "transformer",
       lambda m: examples.downstream_batch(SCHEMA, d=m.insemb_dim, l=m.hist_len, b=8)),
      ("source_user", "din", lambda m: examples.user_batch(SCHEMA, bu=4, t=3)))
  def test_sharded_matches_single_device(self, stage, encoder, make_batch):
    cfg = mf.tiny_config(seq=dict(encoder=encoder)).model
    model = mf.make_model(stage, seq=dict(encoder=encoder))
    batch = make_batch(cfg)
    mesh = sharding.make_mesh((4, 2))
    rules = RULES
    dev_batch = steps.to_device(batch, mesh)
    state, state_shardings = steps.create_state(model, optax.sgd(LR), dev_batch, 0,
                                                mesh, rules)
    params, shardings = state.params, state_shardings.params

    # The shared embedding table is row-split over 'model', replicated over
    # 'data'; a dense kernel is replicated.
    table = params["trunk"]["embed"]["embedding"]
    _, rows = embedding.table_layout(SCHEMA, cfg.vocab_pad_multiple)
    self.assertEqual(table.shape, (rows, cfg.embed_dim))
    self.assertEqual(shardings["trunk"]["embed"]["embedding"].spec, P("model", None))
    self.assertEqual({s.data.shape for s in table.addressable_shards},
                     {(rows // 2, cfg.embed_dim)})
    self.assertLen(table.addressable_shards, 8)
    kernel = params["heads"]["logits"]["kernel"]
    self.assertEqual({s.data.shape for s in kernel.addressable_shards}, {kernel.shape})

    step = _step_fn(model)
    with sharding.mesh_context(mesh, rules):
      sharded = mf.jit(step,
                       in_shardings=(shardings, sharding.batch_sharding(mesh)),
                       out_shardings=(sharding.batch_sharding(mesh), shardings,
                                      shardings))(params, dev_batch)
    self.assertEqual(sharded[2]["trunk"]["embed"]["embedding"].sharding.spec,
                     P("model", None))

    host_params = jax.device_get(params)
    single = mf.jit(step)(host_params, batch)

    def check(path, a, b):
      # Within 1e-5 of the leaf's scale (reduction order differs by device).
      a, b = np.asarray(a), np.asarray(b)
      scale = max(1.0, float(np.abs(b).max()))
      self.assertLessEqual(float(np.abs(a - b).max()), 1e-5 * scale,
                           jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(check, jax.device_get(sharded),
                                     jax.device_get(single))
    self.assertGreater(np.abs(single[1]["trunk"]["embed"]["embedding"]).max(), 0.0)
    self.assertTrue(np.all(np.isfinite(single[0]["logits"])))


class DedupedShardedTest(absltest.TestCase):

  def test_per_shard_dedup_matches_dense_single_device(self):
    # Histories that repeat 10 past instances; LookupInsEmb dedups each of
    # the mesh's 4 batch shards on its own, each device gathers its block.
    cfg = mf.tiny_config().model
    model = mf.make_model("downstream")
    dense = examples.downstream_batch(SCHEMA, d=cfg.insemb_dim, l=cfg.hist_len, b=8)
    rng = np.random.default_rng(1)
    keys = np.arange(1, 11, dtype=np.uint64) * 7919
    vectors = rng.normal(size=(10, cfg.insemb_dim)).astype(np.float32)
    # 8 requests of one user whose rows 0..9 are those instances (AddHistory's layout).
    which, mask = history.earlier_rows(rng.integers(0, 11, 8), np.zeros(8, np.int64),
                                       cfg.hist_len)
    dense["hist_mask"] = mask
    dense["hist_insemb"] = np.where(mask[..., None], vectors[which], 0)
    compact = {k: v for k, v in dense.items() if k != "hist_insemb"}
    compact["hist_ins_id"] = np.where(mask, keys[which], 0)
    compact["hist_row"] = which
    compact["uid"] = np.zeros(8, np.int64)
    mesh = sharding.make_mesh((4, 2))
    groups = sharding.local_batch_shards(mesh)
    self.assertEqual(groups, 4)
    compact = input_pipeline.LookupInsEmb(memory_table.MemoryTable(keys, vectors),
                                          compact=True,
                                          groups=groups,
                                          dense_above=np.inf).map(compact)
    self.assertEqual(compact["hist_insemb_unique"].shape[0], 4)

    dev_dense, dev_compact = (steps.to_device(b, mesh) for b in (dense, compact))
    state, state_shardings = steps.create_state(model, optax.sgd(LR), dev_compact, 0,
                                                mesh, RULES)
    params, shardings = state.params, state_shardings.params
    step = _step_fn(model)
    with sharding.mesh_context(mesh, RULES):
      jitted = mf.jit(step,
                      in_shardings=(shardings, sharding.batch_sharding(mesh)),
                      out_shardings=(sharding.batch_sharding(mesh), shardings,
                                     shardings))
      sharded = jitted(params, dev_compact)
      # The gather adds no collective: as many all-gathers as the dense batch.
      gathers = [
          len(
              re.findall(r"= \S+ all-gather\(",
                         jitted.lower(params, b).compile().as_text()))
          for b in (dev_dense, dev_compact)
      ]
    self.assertEqual(gathers[1], gathers[0])
    single = mf.jit(step)(jax.device_get(params), steps.model_inputs(dense))
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(sharded)),
                    jax.tree_util.tree_leaves(single)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()))


if __name__ == "__main__":
  absltest.main()
