"""Function-preserving performance changes compute what they replaced (issue 15)."""

import importlib.util
import os
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iat_jax import allocator
from iat_jax import stages
from iat_jax.data import examples
from iat_jax.data import history
from iat_jax.data import input_pipeline
from iat_jax.models import layers
from iat_jax.models import sequence
from iat_jax.store import memory_table
from tests import cli_fixtures as cli

from tests import model_fixtures as mf

TOL = 1e-5
_OPT = []


def setUpModule():
  # Compiling with XLA's optimizations mostly off saves these tests' time
  # (measured ~40% of CPU time); both sides of a comparison compile alike.
  _OPT.append(jax.config.values["jax_disable_most_optimizations"])
  jax.config.update("jax_disable_most_optimizations", True)


def tearDownModule():
  jax.config.update("jax_disable_most_optimizations", _OPT.pop())


def _encoder_inputs(seed=0, n=6, s=7, dq=5, ds=6):
  rng = np.random.default_rng(seed)
  query = rng.normal(size=(n, dq)).astype(np.float32)
  seq = rng.normal(size=(n, s, ds)).astype(np.float32)
  lengths = np.array([0, 1, 3, s, s - 1, 2])[:n]  # an empty history, padding
  mask = np.arange(s) < lengths[:, None]
  profile = rng.normal(size=(n, 1, 4)).astype(np.float32)
  return query, seq, mask, profile


def _encoders(kind, num_layers):
  if kind == "transformer":
    make = lambda q: sequence.TransformerEncoder(  # noqa: E731
        8, num_heads=2, num_layers=num_layers, max_len=8, query_only=q)
  elif kind == "longer":
    make = lambda q: sequence.LongerEncoder(  # noqa: E731
        8,
        num_heads=2,
        num_layers=num_layers,
        merge=2,
        recent_k=2,
        max_len=8,
        query_only=q)
  else:  # longer without merge
    make = lambda q: sequence.LongerEncoder(  # noqa: E731
        8,
        num_heads=2,
        num_layers=num_layers,
        merge=1,
        recent_k=3,
        max_len=8,
        query_only=q)
  return make(True), make(False)


def _assert_trees_close(test, a, b):
  jax.tree_util.tree_map(
      lambda x, y: np.testing.assert_allclose(x, y, rtol=TOL, atol=TOL), a, b)
  test.assertEqual(jax.tree_util.tree_structure(a), jax.tree_util.tree_structure(b))


class QueryOnlyLastBlockTest(parameterized.TestCase):

  @parameterized.parameters(("transformer", 1), ("transformer", 2), ("longer", 0),
                            ("longer_nomerge", 2))
  def test_same_function_outputs_and_gradients(self, kind, num_layers):
    fast, full = _encoders(kind, num_layers)
    query, seq, mask, profile = _encoder_inputs()
    params = jax.jit(full.init)(jax.random.PRNGKey(1), query, seq, mask, profile)
    params_fast = jax.jit(fast.init)(jax.random.PRNGKey(1), query, seq, mask, profile)
    _assert_trees_close(self, params, params_fast)  # same tree, same init

    def loss(model):

      def f(p, q, s):
        out = model.apply(p, q, s, mask, profile)
        return jnp.sum(out * jnp.arange(out.shape[-1])), out

      return f

    g_fast, out_fast = jax.jit(jax.grad(loss(fast), argnums=(0, 1, 2),
                                        has_aux=True))(params, query, seq)
    g_full, out_full = jax.jit(jax.grad(loss(full), argnums=(0, 1, 2),
                                        has_aux=True))(params, query, seq)
    self.assertTrue(np.isfinite(out_fast).all())
    np.testing.assert_allclose(out_fast, out_full, rtol=TOL, atol=TOL)
    _assert_trees_close(self, g_fast, g_full)

  def test_padding_never_leaks(self):
    fast, _ = _encoders("transformer", 2)
    query, seq, mask, profile = _encoder_inputs()
    params = jax.jit(fast.init)(jax.random.PRNGKey(0), query, seq, mask, profile)
    noisy = np.where(mask[..., None], seq, 1e3)
    apply = jax.jit(fast.apply)
    np.testing.assert_allclose(apply(params, query, seq, mask),
                               apply(params, query, noisy, mask),
                               rtol=TOL,
                               atol=TOL)


def _lookup_reference(table, batch):
  """LookupInsEmb as it was: a lookup of every real slot, boolean scatter."""
  mask = batch["hist_mask"]
  values, found = table.lookup(batch["hist_ins_id"][mask])
  out = np.zeros(mask.shape + values.shape[1:], np.float32)
  out[mask] = values
  hit = np.zeros_like(mask)
  hit[mask] = found
  return {
      "hist_insemb": out,
      "hist_mask": hit,
      "hist_missing": np.int64(len(found) - found.sum())
  }


class ConcatDenseTest(absltest.TestCase):

  def test_same_parameters_and_function_as_dense_on_the_concat(self):
    rng = np.random.default_rng(4)
    g, u, b, l = 2, 5, 6, 4  # 2 blocks of 3 rows, 5 distinct rows each
    rows = rng.normal(size=(g, u, 3)).astype(np.float32)
    index = rng.integers(0, u, (b, l)).astype(np.int32)
    side = rng.normal(size=(b, l, 2)).astype(np.float32)
    gathered = rows[np.repeat(np.arange(g), b // g)[:, None], index]  # [B, L, 3]
    ref = layers.dense(7, name="seq_proj")
    fast = layers.ConcatDense(7, name="seq_proj")
    concat = np.concatenate([gathered, side], axis=-1)
    p_ref = ref.init(jax.random.PRNGKey(0), concat)
    p_fast = fast.init(jax.random.PRNGKey(0), [layers.Gathered(rows, index), side])
    self.assertEqual(jax.tree_util.tree_structure(p_ref),
                     jax.tree_util.tree_structure(p_fast))
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_ref, p_fast)  # same init

    def f_ref(p, r, s):
      x = jnp.concatenate([r[np.repeat(np.arange(g), b // g)[:, None], index], s], -1)
      return jnp.sum(jnp.sin(ref.apply(p, x)))

    def f_fast(p, r, s):
      return jnp.sum(jnp.sin(fast.apply(p, [layers.Gathered(r, index), s])))

    want = jax.value_and_grad(f_ref, argnums=(0, 1, 2))(p_ref, rows, side)
    got = jax.value_and_grad(f_fast, argnums=(0, 1, 2))(p_ref, rows, side)
    _assert_trees_close(self, got, want)
    # One plain part is exactly `dense`.
    np.testing.assert_array_equal(fast.apply(p_ref, concat), ref.apply(p_ref, concat))


class PipelineTest(absltest.TestCase):

  def _history_batch(self, rng, requests=8, length=6):
    """A batch as AddHistory builds it: users' rows [0, 10), [10, 25), [25, 40),
    [40, 60); requests of the same user share their past; a tie group (the
    request's hist_end before its own row) and a request without history."""
    starts = np.repeat([0, 10, 25, 40], [10, 15, 15, 20])
    req = np.sort(rng.choice(60, requests, replace=False))
    req[0] = 25  # first row of its user: no history
    hist_end = np.maximum(req - rng.integers(0, 3, requests), starts[req])
    rows, mask = history.earlier_rows(hist_end, starts[req], length)
    return rows, mask

  def test_distinct_numbers_each_blocks_distinct_rows(self):
    rng = np.random.default_rng(1)
    for trial in range(20):
      rows, mask = self._history_batch(rng, requests=8, length=int(rng.integers(1, 9)))
      mask[rng.random(8) < 0.2] = False  # padded batch rows
      for groups in (1, 2, 4):
        index, counts = history.distinct(rows, mask, groups)
        n = counts.sum()
        self.assertTrue((index[~mask] == n).all())
        per = 8 // groups
        for g in range(groups):
          blk = slice(g * per, (g + 1) * per)
          want = np.unique(rows[blk][mask[blk]])
          got = index[blk][mask[blk]]
          start = counts[:g].sum()
          self.assertEqual(counts[g], len(want), (trial, groups, g))
          # One number per distinct row, numbering the block's rows from start.
          np.testing.assert_array_equal(np.sort(np.unique(got)),
                                        np.arange(start, start + len(want)))
          pairs = np.unique(np.stack([got, rows[blk][mask[blk]]]), axis=1)
          self.assertEqual(pairs.shape[1], len(want))
    rows, mask = history.earlier_rows(np.array([5, 9]), np.array([0, 0]), 4)
    history.distinct(rows, mask)
    gap = mask.copy()
    gap[0, 0] = False  # real slots not a prefix
    with self.assertRaisesRegex(ValueError, "consecutive rows"):
      history.distinct(rows, gap)
    skip = rows.copy()
    skip[1, 2] -= 1  # rows 8, 7, 5: not consecutive
    with self.assertRaisesRegex(ValueError, "consecutive rows"):
      history.distinct(skip, mask)

  def test_deduplicated_lookup_equals_the_per_slot_lookup(self):
    rng = np.random.default_rng(0)
    keys = (rng.choice(2**62, 60, replace=False) * 3).astype(np.uint64)  # > 2**63 too
    values = rng.normal(size=(60, 3)).astype(np.float32)
    table = memory_table.MemoryTable(keys[::2], values[::2])  # half missing
    rows, mask = self._history_batch(rng)
    ids = np.where(mask, keys[rows], 0).astype(np.uint64)
    batch = {
        "hist_mask": mask,
        "hist_ins_id": ids,
        "hist_row": np.where(mask, rows, -1),
        "uid": np.arange(len(mask))
    }
    want = _lookup_reference(table, dict(batch))
    got = input_pipeline.LookupInsEmb(table).map(dict(batch))
    for k, v in want.items():
      np.testing.assert_array_equal(got[k], v)
      self.assertEqual(got[k].dtype, v.dtype)
    self.assertGreater(int(got["hist_missing"]), 0)
    for groups in (1, 2, 4):  # blocks of 8, 4, 2 rows, one per batch shard
      compact = input_pipeline.LookupInsEmb(table,
                                            compact=True,
                                            groups=groups,
                                            dense_above=np.inf).map(dict(batch))
      self.assertNotIn("hist_insemb", compact)
      g, u, _ = compact["hist_insemb_unique"].shape
      block = np.repeat(np.arange(groups), 8 // groups)[:, None]
      most = max(
          len(np.unique(ids[block[:, 0] == b][mask[block[:, 0] == b]]))
          for b in range(groups))
      self.assertEqual((g, u, compact["hist_unique"]),
                       (groups, input_pipeline.unique_rows(most), u))
      np.testing.assert_array_equal(
          compact["hist_insemb_unique"][block, compact["hist_index"]],
          want["hist_insemb"])
      # Each block holds only its own rows' distinct InsEmbs.
      for b in range(groups):
        rows = slice(b * 8 // groups, (b + 1) * 8 // groups)
        distinct = len(np.unique(ids[rows][mask[rows]]))
        self.assertFalse(compact["hist_insemb_unique"][b, distinct:].any())
      np.testing.assert_array_equal(compact["hist_mask"], want["hist_mask"])
      self.assertEqual(compact["hist_missing"], want["hist_missing"])
      # Past the dense limit the same lookup gives the per-slot rows.
      spread = input_pipeline.LookupInsEmb(table,
                                           compact=True,
                                           groups=groups,
                                           dense_above=0.0).map(dict(batch))
      self.assertNotIn("hist_insemb_unique", spread)
      self.assertEqual(spread["hist_unique"], u)
      for k, v in want.items():
        np.testing.assert_array_equal(spread[k], v)
    with self.assertRaisesRegex(ValueError, "8 rows .* 3 batch shards"):
      input_pipeline.LookupInsEmb(table, compact=True, groups=3).map(dict(batch))
    # Agreement on a larger U: padded with zero rows, or spread past the limit.
    slots = compact["hist_index"].size // 4
    padded = input_pipeline.fit_unique(compact, 2 * u, dense_above=2 * u / slots)
    self.assertEqual(padded["hist_insemb_unique"].shape, (4, 2 * u, 3))
    self.assertEqual(padded["hist_unique"], 2 * u)
    np.testing.assert_array_equal(padded["hist_insemb_unique"][:, :u],
                                  compact["hist_insemb_unique"])
    self.assertFalse(padded["hist_insemb_unique"][:, u:].any())
    spread = input_pipeline.fit_unique(compact, 2 * u, dense_above=(2 * u - 1) / slots)
    np.testing.assert_array_equal(spread["hist_insemb"], want["hist_insemb"])
    self.assertIs(
        input_pipeline.fit_unique(spread, 4 * u)["hist_insemb"],
        spread["hist_insemb"])  # dense stays dense

  def test_unique_rows_ladder(self):
    sizes = [input_pipeline.unique_rows(d) for d in range(100_000)]
    self.assertTrue(all(u >= d + 1 for d, u in enumerate(sizes)))
    self.assertTrue(all(a <= b for a, b in zip(sizes, sizes[1:])))
    # Padding under 1/8 of U past the minimum; 8 sizes per octave.
    self.assertLess(max((u - d - 1) / u for d, u in enumerate(sizes) if d >= 16), 1 / 8)
    for e in range(5, 16):
      self.assertEqual(len({u for u in sizes if 2**e < u <= 2**(e + 1)}), 8, e)
    # compact_shapes: the largest U that stays deduplicated.
    for b, l, g in ((256, 16, 1), (256, 16, 8), (24, 64, 2)):
      shape = jax.ShapeDtypeStruct((b, l, 3), np.float32)
      u = input_pipeline.compact_shapes({"hist_insemb": shape},
                                        g)["hist_insemb_unique"].shape[1]
      self.assertIn(u, sizes)
      batch = {
          "hist_insemb_unique": np.zeros((g, 16, 3), np.float32),
          "hist_index": np.zeros((b, l), np.int32)
      }
      self.assertIn("hist_insemb_unique", input_pipeline.fit_unique(batch, u))
      bigger = min(x for x in sizes if x > u)
      self.assertIn("hist_insemb", input_pipeline.fit_unique(batch, bigger))

  def test_gap_bucket_matches_log2(self):
    rng = np.random.default_rng(0)
    req = rng.integers(0, 2**40, (5,))
    past = req[:, None] - rng.integers(-100, 2**38, (5, 9))
    past[0, :3] = req[0] - np.array([0, 60 * (2**20 - 1), 60 * 2**20])
    mask = rng.random((5, 9)) < 0.8
    minutes = np.maximum(req[:, None] - past, 0) // 60
    b = np.floor(np.log2(1.0 + minutes)).astype(np.int32) + 1
    want = np.where(mask, np.minimum(b, 15), 0).astype(np.int32)
    np.testing.assert_array_equal(history.gap_bucket(req, past, mask, 16), want)


def _tiny_run_config():
  path = os.path.join(cli.REPO, "experiments", "configs", "tiny.py")
  spec = importlib.util.spec_from_file_location("tiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _downstream_batch(config, b):
  """A random dense downstream batch of b rows at the config's shapes."""
  m = config.model
  return examples.downstream_batch(mf.SCHEMA,
                                   m.insemb_dim,
                                   l=m.hist_len,
                                   b=b,
                                   num_gap_buckets=m.num_gap_buckets)


class DedupedHistoryTest(absltest.TestCase):

  def test_downstream_same_outputs_and_gradients(self):
    config = _tiny_run_config()
    config.model.iat.layers = 2
    schema = mf.SCHEMA
    d = config.model.insemb_dim
    dense = _downstream_batch(config, 5)
    rng = np.random.default_rng(3)
    unique = np.zeros((64, d), np.float32)
    unique[:6] = rng.normal(size=(6, d))  # 6 distinct past instances, repeated
    index = np.where(dense["hist_mask"], rng.integers(0, 6, dense["hist_mask"].shape),
                     63).astype(np.int32)
    dense["hist_insemb"] = np.where(dense["hist_mask"][..., None], unique[index],
                                    rng.normal(size=unique[index].shape)).astype(
                                        np.float32)  # padding: anything
    compact = {k: v for k, v in dense.items() if k != "hist_insemb"}
    compact.update(hist_insemb_unique=unique[None], hist_index=index)
    model = stages.make_model(config, schema, "downstream")
    params = jax.jit(model.init)(jax.random.PRNGKey(0), dense)

    def loss(p, batch):
      out = model.apply(p, batch)
      return jnp.sum(out["logits"]**2), out

    (_, a), ga = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, dense)
    (_, b), gb = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, compact)
    for k in ("logits", "iat_token"):
      np.testing.assert_allclose(a[k], b[k], rtol=TOL, atol=TOL)
    _assert_trees_close(self, ga, gb)


class FoldedLinearChainsTest(absltest.TestCase):

  def test_same_parameters_outputs_and_gradients_as_unfolded(self):
    config = _tiny_run_config()
    schema = mf.SCHEMA
    d = config.model.insemb_dim
    dense = _downstream_batch(config, 6)
    rng = np.random.default_rng(5)
    index = rng.integers(0, 16, dense["hist_mask"].shape).astype(np.int32)
    unique = rng.normal(size=(2, 16, d)).astype(np.float32)
    compact = {k: v for k, v in dense.items() if k != "hist_insemb"}
    compact.update(hist_insemb_unique=unique, hist_index=index)
    models = {}
    for fold in (False, True):
      config.model.fold_linear = fold
      models[fold] = stages.make_model(config, schema, "downstream")
    trees = {f: mf.abstract_params(m, dense) for f, m in models.items()}
    self.assertEqual(jax.tree_util.tree_structure(trees[True]),
                     jax.tree_util.tree_structure(trees[False]))
    jax.tree_util.tree_map(lambda a, b: self.assertEqual(a.shape, b.shape), trees[True],
                           trees[False])
    params = {"params": mf.random_params(models[False], dense)}  # biases nonzero

    def grad(model):

      def loss(p, batch):
        out = model.apply(p, batch)
        return jnp.sum(jnp.sin(out["logits"])), out

      return jax.jit(jax.value_and_grad(loss, has_aux=True))

    for batch in (dense, compact):
      (_, a), ga = grad(models[False])(params, batch)
      (_, b), gb = grad(models[True])(params, batch)
      for k in ("logits", "iat_token"):
        np.testing.assert_allclose(b[k], a[k], rtol=TOL, atol=TOL)
      _assert_trees_close(self, gb, ga)
      # Every folded map's gradient flows (through the product).
      iat = gb["params"]["iat"]
      for g in (iat["adapt"]["dense_1"]["kernel"], iat["label_embed"]["kernel"],
                iat["embedding"]):
        self.assertGreater(float(jnp.abs(g).max()), 0.0)


@pytest.mark.slow
class AllocatorTest(absltest.TestCase):
  """`python -m iat_jax.main` re-executes itself once with the malloc settings."""

  BAD_STAGE = "--config.stage=no_such_stage"  # fails right after the log line

  def _started_with(self, proc):
    (line,) = [
        l for l in proc.stderr.splitlines() if "allocator settings at start:" in l
    ]
    return line.split("allocator settings at start:", 1)[1].strip()

  def _run(self, **env):
    base = {
        k: v
        for k, v in cli.ENV.items()
        if k not in (*allocator.SETTINGS, allocator.OPT_OUT, allocator.MARKER)
    }
    with tempfile.TemporaryDirectory() as workdir:
      return subprocess.run([
          sys.executable, "-m", "iat_jax.main",
          *cli.main_args(workdir, "train", self.BAD_STAGE)
      ],
                            cwd=cli.REPO,
                            env={
                                **base,
                                **env
                            },
                            capture_output=True,
                            text=True,
                            timeout=300)

  @staticmethod
  def _settings() -> dict[str, str]:
    """The tests' environment with the allocator settings, not re-executing."""
    return allocator.environ({
        k: v
        for k, v in cli.ENV.items()
        if k not in (allocator.OPT_OUT, allocator.MARKER)
    })

  @staticmethod
  def _python(script: str, env: dict[str, str]) -> str:
    """stdout of `python -c script` in the repository with env."""
    return subprocess.run([sys.executable, "-c", script],
                          cwd=cli.REPO,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=300,
                          check=True).stdout

  def test_child_starts_with_the_settings(self):
    if not allocator.applies():
      self.skipTest("not glibc")
    proc = self._run()
    self.assertIn("no_such_stage", proc.stderr)  # it ran main(), then failed
    self.assertEqual(self._started_with(proc), str(allocator.SETTINGS))

  def test_own_values_win_and_opt_out(self):
    if not allocator.applies():
      self.skipTest("not glibc")
    own = self._run(MALLOC_MMAP_MAX_="7")
    self.assertEqual(self._started_with(own),
                     str({
                         **allocator.SETTINGS, "MALLOC_MMAP_MAX_": "7"
                     }))
    out = self._run(IAT_JAX_KEEP_MALLOC="1")
    self.assertEqual(self._started_with(out), str({allocator.OPT_OUT: "1"}))

  def test_xla_heaps_cut_the_per_step_page_faults(self):
    if not allocator.applies():
      self.skipTest("not glibc")
    # A train-step-like program: 40 layers whose [8192, 64] activations (2 MiB
    # each, 82 MiB in all) stay live for the backward pass. One temporary
    # buffer that large is mapped afresh every run; of heaps of 8 MiB, the
    # arenas keep most (measured here: 21k -> 6.5k-11.9k faults per run).
    script = """
import resource, jax, jax.numpy as jnp
from iat_jax import allocator
def loss(ws, x):
  for w in ws:
    x = jnp.tanh(x @ w)
  return jnp.sum(x)
ws, x = [jnp.eye(64) * 0.5] * 40, jnp.ones((8192, 64))
for opts in ({}, allocator.compiler_options("cpu")):
  step = jax.jit(jax.grad(loss), compiler_options=opts).lower(ws, x).compile()
  jax.block_until_ready(step(ws, x))
  f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(5):
    jax.block_until_ready(step(ws, x))
  print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 5)
"""
    whole, heaps = map(float, self._python(script, self._settings()).split())
    self.assertGreater(whole, 15_000)  # ~82 MiB of fresh 4 KiB pages per run
    self.assertLess(heaps, 0.7 * whole)
    self.assertEqual(allocator.compiler_options("gpu"), {})

  def test_worker_threads_keep_their_heaps(self):
    if not allocator.applies():
      self.skipTest("not glibc")
    # A thread whose arena's first heap (64 MiB at most) is nearly full gets a
    # second heap for each further block; glibc deletes that heap when the
    # block is freed unless MALLOC_TOP_PAD_ says keep it.
    script = """
import resource, threading
import numpy as np
def work(out):
  hold = np.ones((56 << 20) // 8)
  np.ones((16 << 20) // 8)  # the second heap, grown once
  f0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
  for _ in range(10):
    np.ones((16 << 20) // 8)  # allocated, touched, freed
  out.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - f0) / 10)
out = []
t = threading.Thread(target=work, args=(out,))
t.start()
t.join()
print(out[0])
"""
    settings = self._settings()
    faults = {}
    for name, env in (("settings", settings), ("no top pad", {
        k: v for k, v in settings.items() if k != "MALLOC_TOP_PAD_"
    })):
      faults[name] = float(self._python(script, env))
    self.assertGreater(faults["no top pad"], 100, faults)  # a fresh heap per block
    self.assertLess(faults["settings"], 0.1 * faults["no top pad"], faults)

  def test_environ(self):
    self.assertEqual(allocator.environ({"A": "1"}), {**allocator.SETTINGS, "A": "1"})
    self.assertEqual(
        allocator.environ({"MALLOC_MMAP_MAX_": "3"})["MALLOC_MMAP_MAX_"], "3")
    self.assertEqual(allocator.environ({allocator.OPT_OUT: "1"}),
                     {allocator.OPT_OUT: "1"})


if __name__ == "__main__":
  absltest.main()
