"""The PyTorch-eager twin (experiments/torch_twin.py) computes the JAX train
steps: parameters, loss, gradients and AdamW steps on a real tiny batch, its
downstream history deduplicated (hist_insemb_unique + hist_index) and dense
(hist_insemb, as the pipeline gives it past `input_pipeline.DENSE_ABOVE`);
'same' with the JAX model's compute-time folds (config.model.fold_linear).

Skipped where torch is not installed (CI does not install it).
"""

import importlib.util
import os
import sys
import tempfile
from unittest import mock

import pytest

torch = pytest.importorskip("torch")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl.testing import absltest
from absl.testing import parameterized
import jax
import numpy as np

from iat_jax import stages
from iat_jax.data import input_pipeline
from iat_jax.data import sources
from iat_jax.store import memory_table
from iat_jax.train import cost
from iat_jax.train import steps
from iat_jax.train import train_lib
from tests import cli_fixtures as cli
from tests import model_fixtures as mf

pytestmark = pytest.mark.slow  # subprocess / end-to-end runs


def _load_twin():
  path = os.path.join(cli.REPO, "experiments", "torch_twin.py")
  spec = importlib.util.spec_from_file_location("torch_twin", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # its dataclass looks its module up
  spec.loader.exec_module(module)
  return module


tt = _load_twin()
STAGES = tuple(tt.MODELS)
ALGORITHMS = tt.ALGORITHMS
# Leaves whose gradient is exactly 0 in exact arithmetic (a key bias shifts
# every logit of a query's row alike, and the softmax ignores that): both
# sides hold float rounding noise, which Adam's normalization scales to ~lr.
NOISE = "attn/key/bias"


def _path(path) -> str:
  return "/".join(k.key for k in path)


def _pairs(want, got):
  """(path, want leaf, got leaf) of two trees shaped like the flax params."""
  for (path, w), g in zip(
      jax.tree_util.tree_flatten_with_path(want)[0], jax.tree.leaves(got)):
    yield _path(path), w, g


def _close(got, want, *, rtol, atol=0.0, leaf_atol=0.0):
  """Leaf by leaf assert_allclose (but the NOISE leaves), to within atol +
  leaf_atol * the leaf's largest |value| (float32 sums in another order)."""
  for path, w, g in _pairs(want, got):
    if NOISE not in path:
      np.testing.assert_allclose(g,
                                 w,
                                 rtol=rtol,
                                 atol=atol + leaf_atol * np.abs(w).max(),
                                 err_msg=path)


class TwinTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    config = mf.tiny_config()
    config.data.cache_dir = cli.DATA
    ds = sources.prepare(config, cls.workdir)
    keys = np.asarray(ds["ins_id"])
    values = np.random.default_rng(0).standard_normal(
        (len(keys), config.model.insemb_dim), np.float32)
    table = memory_table.MemoryTable(keys, values)
    cls.runs, cls.host_state, cls.batch = {}, {}, {}
    for stage in STAGES:
      c = config.copy_and_resolve_references()
      c.stage = stage
      run = train_lib.Run(stages.get(stage), c, cls.workdir, stage, ds, table)
      cls.runs[stage] = run
      cls.host_state[stage] = jax.device_get(run.state)
      # A real batch; downstream: deduplicated, whatever its U (with 8
      # devices a shard has B / 8 x L = 16 slots, which the ladder's U, >=
      # distinct rows + 1, can exceed: dense past DENSE_ABOVE of them).
      with mock.patch.object(input_pipeline, "DENSE_ABOVE", float("inf")):
        cls.batch[stage] = run.train_data[0]
    # The same history dense ('hist_insemb' [B, L, d]), as the pipeline gives
    # a batch past `input_pipeline.DENSE_ABOVE` of its slots.
    down = cls.batch["downstream"]
    assert "hist_insemb_unique" in down, "train_data[0] is deduplicated"
    cls.dense_batch = input_pipeline.fit_unique(down,
                                                int(down["hist_unique"]),
                                                dense_above=0.0)

  @classmethod
  def tearDownClass(cls):
    for run in cls.runs.values():
      run.close()
    super().tearDownClass()

  def _twin(self, stage, algorithm, batch=None):
    run = self.runs[stage]
    model = tt.build(stage, run.config, run.ds.schema, algorithm)
    tt.load_flax_params(model, self.host_state[stage].params)
    return model, tt.torch_batch(self.batch[stage] if batch is None else batch,
                                 algorithm)

  def _jax_loss_and_grads(self, stage, batch=None):
    run, params = self.runs[stage], self.host_state[stage].params
    batch = steps.model_inputs(self.batch[stage] if batch is None else batch)

    def loss_fn(p):
      out = run.model.apply({"params": p}, batch, train=True)
      return steps._task_loss(out["logits"], batch["labels"], batch["mask"])  # pylint: disable=protected-access

    return jax.jit(jax.value_and_grad(loss_fn))(params)

  @parameterized.product(stage=STAGES, algorithm=ALGORITHMS)
  def test_same_parameters_as_the_jax_model(self, stage, algorithm):
    run = self.runs[stage]
    model = tt.build(stage, run.config, run.ds.schema, algorithm)
    self.assertEqual(sum(p.numel() for p in model.parameters()),
                     cost.param_counts(self.host_state[stage].params)["total"])
    twin = {n: tuple(p.shape) for n, p in model.named_parameters()}
    flax = jax.tree_util.tree_flatten_with_path(self.host_state[stage].params)[0]
    self.assertLen(twin, len(flax))
    for path, x in flax:
      name, transposed = tt.torch_name(tuple(k.key for k in path))
      self.assertEqual(twin[name], x.shape[::-1] if transposed else x.shape, name)

  @parameterized.product(stage=STAGES, algorithm=ALGORITHMS)
  def test_same_loss_and_gradients(self, stage, algorithm):
    self._assert_same_loss_and_gradients(stage, algorithm)

  @parameterized.parameters(*ALGORITHMS)
  def test_same_loss_and_gradients_on_a_dense_history(self, algorithm):
    self.assertIn("hist_insemb", self.dense_batch)
    self.assertNotIn("hist_insemb_unique", self.dense_batch)
    self._assert_same_loss_and_gradients("downstream", algorithm, self.dense_batch)

  def _assert_same_loss_and_gradients(self, stage, algorithm, batch=None):
    loss, grads = self._jax_loss_and_grads(stage, batch)
    model, batch = self._twin(stage, algorithm, batch)
    got = tt.task_loss(model(batch), batch["labels"], batch["mask"])
    got.backward()
    np.testing.assert_allclose(got.item(), float(loss), rtol=1e-5)
    norm = np.sqrt(sum(float((g**2).sum()) for g in jax.tree.leaves(grads)))
    self.assertGreater(norm, self.runs[stage].config.optimizer.grad_clip_norm)  # clips
    got = tt.to_flax(model, grads, grad=True)
    _close(got, grads, rtol=1e-4, leaf_atol=1e-5)
    top = max(np.abs(g).max() for g in jax.tree.leaves(grads))
    for path, w, g in _pairs(grads, got):
      if NOISE in path:
        self.assertLess(max(np.abs(w).max(), np.abs(g).max()), 1e-6 * top, path)

  @parameterized.product(stage=STAGES, algorithm=ALGORITHMS)
  def test_same_adamw_steps(self, stage, algorithm):
    run = self.runs[stage]
    state = jax.device_put(self.host_state[stage], run.shardings)
    model, batch = self._twin(stage, algorithm)
    step = tt.TrainStep(model, run.config, run.num_steps)
    dev_batch = steps.to_device(self.batch[stage], run.mesh)
    # Warm-up of 2 steps: learning rates 0, lr / 2, then ~lr (the schedule).
    for _ in range(3):
      state, out, _ = run.train_step(state, dev_batch)
      np.testing.assert_allclose(step(batch).item(), float(out["loss"]), rtol=1e-5)
    want = jax.device_get(state.params)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), want,
                         self.host_state[stage].params)
    self.assertGreater(max(jax.tree.leaves(moved)), 1e-3)
    got = tt.to_flax(model, want)
    lr = run.config.optimizer.learning_rate
    _close(got, want, rtol=1e-5, atol=1e-3 * lr)
    for path, w, g in _pairs(want, got):
      if NOISE in path:  # each side moved by < 2.5 lr (Adam's steps at t <= 3)
        self.assertLessEqual(np.abs(g - w).max(), 5 * lr, path)

  def test_same_runs_on_distinct_rows_and_the_candidate_row(self):
    shapes = {}
    for algorithm in ALGORITHMS:
      model, batch = self._twin("downstream", algorithm)
      seen = shapes[algorithm] = {}
      for name in ("iat.adapt.dense_0", "iat.adapt.dense_1", "iat.label_embed",
                   "iat.encoder.block_0", "trunk.seq_encoder.block_0"):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name, seen=seen: seen.update({name: tuple(o.shape)}))
      model(batch)
    b, l = batch["hist_mask"].shape
    rows = self.batch["downstream"]["hist_insemb_unique"]
    s = self.runs["downstream"].ds.schema.seq_len
    a = self.runs["downstream"].config.model.adapt_dim
    w = self.runs["downstream"].config.model.iat.width
    self.assertEqual(shapes["full"]["iat.adapt.dense_0"], (b, l, a))
    self.assertEqual(shapes["same"]["iat.adapt.dense_0"],
                     (rows.shape[0] * rows.shape[1], a))
    # 'same' folds adapt's last layer and the label embedding into the
    # encoder's input projection (config.model.fold_linear): never applied.
    self.assertTrue(self.runs["downstream"].config.model.fold_linear)
    self.assertEqual(shapes["full"]["iat.adapt.dense_1"], (b, l, a))
    self.assertEqual(shapes["full"]["iat.label_embed"][:2], (b, l))
    self.assertNotIn("iat.adapt.dense_1", shapes["same"])
    self.assertNotIn("iat.label_embed", shapes["same"])
    self.assertEqual(shapes["full"]["iat.encoder.block_0"], (b, 1 + l, w))
    self.assertEqual(shapes["same"]["iat.encoder.block_0"], (b, 1, w))
    self.assertEqual(shapes["full"]["trunk.seq_encoder.block_0"][1], 1 + s)
    self.assertEqual(shapes["same"]["trunk.seq_encoder.block_0"][1], 1)

  @parameterized.parameters("deduplicated", "dense")
  def test_folds_are_the_same_function(self, layout):
    """'same' with and without config.model.fold_linear: the same loss and
    gradients up to float rounding (torch alone, no JAX)."""
    run = self.runs["downstream"]
    host = self.batch["downstream"] if layout == "deduplicated" else self.dense_batch
    results = []
    for fold in (True, False):
      config = run.config.copy_and_resolve_references()
      config.model.fold_linear = fold
      model = tt.build("downstream", config, run.ds.schema, "same")
      tt.load_flax_params(model, self.host_state["downstream"].params)
      batch = tt.torch_batch(host, "same")
      loss = tt.task_loss(model(batch), batch["labels"], batch["mask"])
      loss.backward()
      like = self.host_state["downstream"].params
      results.append((loss.item(), tt.to_flax(model, like, grad=True)))
    (folded, g_folded), (plain, g_plain) = results
    np.testing.assert_allclose(folded, plain, rtol=1e-6)
    _close(g_folded, g_plain, rtol=1e-4, leaf_atol=1e-5)


if __name__ == "__main__":
  absltest.main()
