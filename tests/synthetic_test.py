"""Tests of the synthetic instance generator (`iat_jax.data.synthetic`)."""

import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
import ml_collections
import numpy as np
import pytest

from iat_jax import errors
from iat_jax.data import dataset
from iat_jax.data import synthetic
from iat_jax.data import synthetic_world

# About 40 rows per user, so a block is ~800 users and the base build has three
# blocks; seq_len is short so that sequences fill up.
_BASE = dict(seed=3,
             num_users=2000,
             num_instances=80_000,
             num_categorical=40,
             num_dense=10,
             num_tasks=3,
             num_items=800,
             num_categories=20,
             seq_len=8,
             vocab_size=500)
_SMALL = dict(seed=1,
              num_users=300,
              num_instances=12_000,
              num_categorical=24,
              num_items=300,
              num_categories=10,
              vocab_size=300)
_ROW_COLUMNS = ("uid", "ts", "ins_id", "cat", "dense", "labels", "mh_item_tags",
                "mh_query_terms", "item", "category", "action", "action_now",
                "seq_item", "seq_category", "seq_action", "hist_end")


def _assert_same(test, a: dataset.Dataset, b: dataset.Dataset) -> None:
  test.assertEqual(a.schema, b.schema)
  for name in _ROW_COLUMNS + ("split", "temporal_order", "user_offsets"):
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _context_gap(ds: dataset.Dataset, field: str, task: int = 0) -> float:
  """How much a user's past label rate per value of `field` predicts the future.

  Each user's rows are cut in half (past, future). For a future row with value v
  the score is the user's past label rate on v minus the user's overall past
  rate (users with >= 3 past rows on v). Returns the mean future label, centred
  by the user's future rate and by the global future rate of v, of rows with a
  positive score minus that of rows with a negative score: about 0 unless
  users have persistent, personal preferences over the field's values.
  """
  s = ds.schema
  v = np.asarray(ds["cat"][:, s.categorical_index(field)]).astype(np.int64)
  y = np.asarray(ds["labels"][:, task], dtype=np.float64)
  ui = np.asarray(ds["user_index"]).astype(np.int64)
  off = np.asarray(ds["user_offsets"])
  rank = np.arange(len(ui)) - off[ui]
  past = rank < (off[1:] - off[:-1])[ui] // 2
  fut = ~past
  vocab, nu = s.vocab_size(field), s.num_users
  key = ui * vocab + v
  cnt = np.bincount(key[past], minlength=nu * vocab)
  pos = np.bincount(key[past], y[past], minlength=nu * vocab)
  ucnt = np.bincount(ui[past], minlength=nu)
  upos = np.bincount(ui[past], y[past], minlength=nu)
  vrate = (np.bincount(v[fut], y[fut], minlength=vocab) /
           np.maximum(np.bincount(v[fut], minlength=vocab), 1))
  ufut = (np.bincount(ui[fut], y[fut], minlength=nu) /
          np.maximum(np.bincount(ui[fut], minlength=nu), 1))
  ok = fut & (cnt[key] >= 3)
  score = pos[key] / np.maximum(cnt[key], 1) - upos[ui] / np.maximum(ucnt[ui], 1)
  resid = y - ufut[ui] - vrate[v]  # Within-user, value-centred.
  return float(resid[ok & (score > 0)].mean() - resid[ok & (score < 0)].mean())


class SyntheticTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    cls.path = synthetic.build(os.path.join(cls.dir, "base"), **_BASE)
    cls.ds = dataset.Dataset(cls.path)

  @classmethod
  def tearDownClass(cls):
    shutil.rmtree(cls.dir, ignore_errors=True)
    super().tearDownClass()

  def _build(self, name, **knobs):
    return dataset.Dataset(synthetic.build(os.path.join(self.dir, name), **knobs))

  def test_schema(self):
    s = self.ds.schema
    self.assertEqual(s.dataset, "synthetic")
    self.assertEqual(s.num_rows, _BASE["num_instances"])
    self.assertLen(s.categorical, _BASE["num_categorical"])
    self.assertLen({f.name for f in s.categorical}, _BASE["num_categorical"])
    self.assertLen(s.dense, _BASE["num_dense"])
    self.assertEqual(s.tasks, ("click", "conversion", "task_2"))
    self.assertEqual((s.seq_item_field, s.seq_category_field), ("item_id", "category"))
    self.assertEqual(s.vocab_size("item_id"), _BASE["num_items"] + 1)
    self.assertEqual(s.vocab_size("category"), _BASE["num_categories"] + 1)
    self.assertEqual(s.num_actions, 5)
    self.assertEqual(s.label_delay, (0, 86400, 0))  # only conversions arrive late
    self.assertEqual(s.sources["generator"], synthetic.VERSION)
    for knob, value in _BASE.items():
      self.assertEqual(s.sources[knob], str(value))
    self.assertNotIn("chunk_rows", s.sources)

  def test_shapes_and_ranges(self):
    ds, s = self.ds, self.ds.schema
    n = s.num_rows
    shapes = {
        "cat": (n, len(s.categorical)),
        "dense": (n, len(s.dense)),
        "labels": (n, s.num_tasks),
        "mh_item_tags": (n, 4),
        "mh_query_terms": (n, 4),
        "seq_item": (n, s.seq_len)
    }
    for name, shape in shapes.items():
      self.assertEqual(ds[name].shape, shape, msg=name)
    cat = np.asarray(ds["cat"])
    vocab = np.array([f.vocab_size for f in s.categorical])
    self.assertTrue(((cat >= 1) & (cat < vocab)).all())  # Never missing.
    # Hashed fields spread over their vocabulary.
    self.assertGreater(len(np.unique(cat[:, s.categorical_index("city")])), 50)
    np.testing.assert_array_equal(ds["item"], cat[:, s.categorical_index("item_id")])
    np.testing.assert_array_equal(ds["category"], cat[:,
                                                      s.categorical_index("category")])
    labels = np.asarray(ds["labels"])
    self.assertTrue(np.isin(labels, (0.0, 1.0)).all())
    click, conv = labels[:, 0], labels[:, 1]
    self.assertTrue((labels[:, 1:] <= click[:, None]).all())  # Given click.
    np.testing.assert_array_equal(ds["action"], 1 + click + conv)
    np.testing.assert_array_equal(ds["action_now"], np.where(click, 4, 1))
    self.assertBetween(click.mean(), 0.1, 0.5)
    self.assertBetween(conv.sum() / click.sum(), 0.1, 0.7)
    self.assertTrue(np.isfinite(ds["dense"]).all())
    for f in s.multi_hot:
      mh = np.asarray(ds[f"mh_{f.name}"])
      self.assertTrue(((mh >= 0) & (mh < f.vocab_size)).all())
      # 0-padding is trailing only.
      self.assertTrue(((mh[:, 1:] == 0) | (mh[:, :-1] != 0)).all())
    self.assertTrue((ds["mh_item_tags"][:, 0] > 0).all())
    ts = np.asarray(ds["ts"])
    self.assertGreaterEqual(ts.min(), synthetic_world.EPOCH)
    self.assertLess(ts.max(), synthetic_world.EPOCH + 30 * 86400)

  def test_rows_sorted_per_user(self):
    ds = self.ds
    uid, ts, ins = (np.asarray(ds[k]) for k in ("uid", "ts", "ins_id"))
    same = uid[1:] == uid[:-1]
    self.assertTrue((uid[1:] >= uid[:-1]).all())
    self.assertTrue((~same | (ts[1:] > ts[:-1]) | ((ts[1:] == ts[:-1]) &
                                                   (ins[1:] > ins[:-1]))).all())
    self.assertEqual(ds.schema.num_users, len(np.unique(uid)))
    # Slates give same-time rows (ties) within users.
    self.assertGreater((same & (ts[1:] == ts[:-1])).sum(), 1000)

  def test_behaviour_sequence_never_leaks(self):
    ds = self.ds
    s = ds.schema.seq_len
    ts, off = np.asarray(ds["ts"]), np.asarray(ds["user_offsets"])
    cols = {n: np.asarray(ds[n]) for n in ("item", "category", "action")}
    seqs = {n: np.asarray(ds[f"seq_{n}"]) for n in cols}
    now = np.asarray(ds["action_now"])
    nonempty = hidden = 0
    for u in range(0, ds.schema.num_users, 40):
      for i in range(off[u], off[u + 1]):
        earlier = np.flatnonzero(ts[off[u]:i + 1] < ts[i])[::-1][:s] + off[u]
        k = len(earlier)
        nonempty += k > 0
        # A conversion is known one day after its impression, strictly before ts.
        pending = ts[earlier] + 86400 >= ts[i]
        hidden += int((pending & (cols["action"][earlier] == 3)).sum())
        want = {n: c[earlier] for n, c in cols.items()}
        want["action"] = np.where(pending, now[earlier], want["action"])
        for n in cols:
          np.testing.assert_array_equal(seqs[n][i, :k], want[n])
          np.testing.assert_array_equal(seqs[n][i, k:], 0)
    self.assertGreater(nonempty, 500)
    self.assertGreater(hidden, 50)  # recent conversions really are hidden

  def test_same_seed_same_data(self):
    _assert_same(self, self.ds, self._build("again", **_BASE))

  def test_chunk_rows_do_not_change_data(self):
    # A chunk holds at least one user block (~800 users here), so chunk_rows=1
    # writes one block per chunk.
    _assert_same(self, self.ds, self._build("chunked", chunk_rows=1, **_BASE))

  def test_different_seed_different_data(self):
    other = self._build("seed", **{**_BASE, "seed": 4})
    for name in ("ts", "cat", "labels", "dense"):
      self.assertFalse(np.array_equal(self.ds[name], other[name]), msg=name)

  def test_named_columns_do_not_depend_on_widths(self):
    narrow = self._build(
        "narrow", **{
            **_BASE, "num_categorical": 20,
            "num_dense": 4,
            "num_tasks": 2
        })
    np.testing.assert_array_equal(narrow["cat"][:, :17], self.ds["cat"][:, :17])
    np.testing.assert_array_equal(narrow["dense"], self.ds["dense"][:, :4])
    np.testing.assert_array_equal(narrow["labels"], self.ds["labels"][:, :2])
    np.testing.assert_array_equal(narrow["ins_id"], self.ds["ins_id"])

  def test_personal_context_signal(self):
    # Users click and convert more in the contexts they favoured before (a
    # signal in past instances' features + labels, not in the behaviour
    # sequence); the control field (network) carries no personal preference.
    gaps = {
        (f, task): _context_gap(self.ds, f, task)
        for f in ("surface", "device", "campaign") for task in (0, 1)
    }
    self.assertGreater(np.mean(list(gaps.values())), 0.01, msg=gaps)
    for f in ("surface", "campaign"):
      for task in (0, 1):
        self.assertGreater(gaps[f, task], 0.008, msg=gaps)
    for task in (0, 1):
      self.assertLess(abs(_context_gap(self.ds, "network", task)), 0.006)

  def test_rebuild_is_a_noop(self):
    path = synthetic.build(os.path.join(self.dir, "noop"), **_SMALL)
    marker = os.path.join(path, "marker")
    open(marker, "w").close()
    synthetic.build(path, **_SMALL)
    self.assertTrue(os.path.exists(marker))
    synthetic.build(path, **{**_SMALL, "seed": 2})  # New knobs: rebuilt.
    self.assertFalse(os.path.exists(marker))
    self.assertEqual(dataset.Dataset(path).schema.sources["seed"], "2")

  def test_thousand_fields(self):
    ds = self._build("wide",
                     num_users=50,
                     num_instances=2000,
                     num_categorical=1000,
                     num_dense=20,
                     num_tasks=4)
    s = ds.schema
    self.assertEqual(ds["cat"].shape, (2000, 1000))
    self.assertLen({f.name for f in s.categorical}, 1000)
    cat = np.asarray(ds["cat"])
    vocab = np.array([f.vocab_size for f in s.categorical])
    self.assertTrue(((cat >= 1) & (cat < vocab)).all())
    self.assertGreater(len(np.unique(cat[:, -300:])), 100)
    self.assertEqual(ds["labels"].shape, (2000, 4))

  def test_fewer_instances_than_users(self):
    ds = self._build("sparse",
                     num_users=500,
                     num_instances=100,
                     num_categorical=2,
                     num_dense=0,
                     num_tasks=1)
    self.assertEqual(ds.num_rows, 100)
    self.assertLessEqual(ds.schema.num_users, 100)
    self.assertEqual(ds["cat"].shape, (100, 2))

  def test_bad_knobs(self):
    with self.assertRaises(ValueError):
      synthetic.build(os.path.join(self.dir, "bad"), num_categorical=1)
    with self.assertRaisesWithLiteralMatch(
        errors.ConfigError, "--num_items: must be >= num_categories (10), got 5"):
      synthetic.build(os.path.join(self.dir, "bad"), num_items=5, num_categories=10)
    self.assertFalse(os.path.exists(os.path.join(self.dir, "bad")))

  def test_run_config_check_names_the_flag(self):
    data = ml_collections.ConfigDict(
        dict(seq_len=4, synthetic=synthetic.default_config()))
    synthetic.validate_config(data)
    data.synthetic.num_categorical = 1
    with self.assertRaisesWithLiteralMatch(
        errors.ConfigError, "--config.data.synthetic.num_categorical: must be >= 2 "
        "(item_id and category), got 1"):
      synthetic.validate_config(data)
    data.synthetic.num_categorical, data.seq_len = 2, 0
    with self.assertRaisesWithLiteralMatch(errors.ConfigError,
                                           "--config.data.seq_len: must be > 0, got 0"):
      synthetic.validate_config(data)

  @pytest.mark.slow
  def test_command_line(self):
    out = os.path.join(self.dir, "cli")
    subprocess.run([
        sys.executable, "-m", "iat_jax.data.synthetic", f"--out={out}",
        "--num_instances=500", "--num_users=20", "--num_categorical=8"
    ],
                   check=True,
                   capture_output=True)
    ds = dataset.Dataset(out)
    self.assertEqual(ds["cat"].shape, (500, 8))

  @pytest.mark.slow
  def test_command_line_bad_knob_is_one_line(self):
    out = os.path.join(self.dir, "cli_bad")
    proc = subprocess.run(
        [sys.executable, "-m", "iat_jax.data.synthetic", f"--out={out}", "--days=0"],
        capture_output=True,
        text=True)
    self.assertNotEqual(proc.returncode, 0)
    self.assertEqual(proc.stderr.strip(), "error: --days: must be > 0, got 0")
    self.assertFalse(os.path.exists(out))


if __name__ == "__main__":
  absltest.main()
