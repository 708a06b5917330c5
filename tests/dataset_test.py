"""Tests of the on-disk dataset: ordering, splits, leakage, atomic writes."""

import os
import tempfile

from absl.testing import absltest
import numpy as np

from iat_jax import errors
from iat_jax.data import dataset
from iat_jax.data import history
from tests import data_fixtures


class DatasetTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.dir = tempfile.mkdtemp()
    cls.ds = data_fixtures.make_dataset(os.path.join(cls.dir, "d"))

  def test_user_order_and_offsets(self):
    ds = self.ds
    key = np.lexsort((ds["ins_id"], ds["ts"], ds["uid"]))
    np.testing.assert_array_equal(key, np.arange(ds.num_rows))
    off = ds["user_offsets"]
    self.assertEqual(len(off) - 1, ds.schema.num_users)
    for k in range(ds.schema.num_users):
      users = np.unique(ds["uid"][off[k]:off[k + 1]])
      self.assertLen(users, 1)
      np.testing.assert_array_equal(ds["user_index"][off[k]:off[k + 1]], k)

  def test_columns_are_memory_mapped(self):
    self.assertIsInstance(self.ds["cat"], np.memmap)

  def test_temporal_order_and_splits(self):
    ds = self.ds
    order = ds["temporal_order"]
    np.testing.assert_array_equal(order, np.lexsort((ds["ins_id"], ds["ts"])))
    n_train, n_valid, n_test = ds.schema.split_sizes
    self.assertEqual(n_train + n_valid + n_test, ds.num_rows)
    self.assertEqual(n_train, round(0.8 * ds.num_rows))
    np.testing.assert_array_equal(ds["split"][order],
                                  np.repeat([0, 1, 2], [n_train, n_valid, n_test]))
    # Every valid instance is at or after every train instance in (ts, ins_id).
    train, valid = ds.split_rows("train"), ds.split_rows("valid")
    last = (ds["ts"][train[-1]], ds["ins_id"][train[-1]])
    first = (ds["ts"][valid[0]], ds["ins_id"][valid[0]])
    self.assertLess(last, first)
    self.assertEqual(tuple(ds.schema.split_boundaries[0]), tuple(int(x) for x in first))

  def test_behaviour_sequence_is_the_newest_strictly_earlier(self):
    ds = self.ds
    s = ds.schema.seq_len
    for i in range(ds.num_rows):
      u = ds["user_index"][i]
      lo = ds["user_offsets"][u]
      earlier = [j for j in range(lo, i + 1) if ds["ts"][j] < ds["ts"][i]]
      want = ds["item"][earlier[::-1][:s]]
      got = ds["seq_item"][i]
      np.testing.assert_array_equal(got[:len(want)], want)
      np.testing.assert_array_equal(got[len(want):], 0)
      self.assertEqual(ds["hist_end"][i], lo + len(earlier))

  def test_history_end_excludes_equal_timestamps(self):
    user = np.array([0, 0, 0, 0, 1, 1])
    ts = np.array([5, 7, 7, 9, 7, 7])
    np.testing.assert_array_equal(history.history_end(user, ts), [0, 1, 1, 3, 4, 4])

  def test_rebuild_check(self):
    self.assertTrue(dataset.is_complete(self.ds.path, "tiny"))
    self.assertFalse(dataset.is_complete(self.ds.path, "other"))
    self.assertFalse(dataset.is_complete(os.path.join(self.dir, "nope"), "tiny"))


class ActionDelayTest(absltest.TestCase):
  """A behaviour action derived from a delayed label shows once known."""

  def test_sequence_action_matches_brute_force(self):
    path = os.path.join(tempfile.mkdtemp(), "d")
    ds = data_fixtures.make_dataset(path, label_delay=(0, 1200))
    self.assertEqual(ds.schema.action_delay, 1200)
    s, ts = ds.schema.seq_len, np.asarray(ds["ts"])
    pending = 0
    for i in range(ds.num_rows):
      lo = ds["user_offsets"][ds["user_index"][i]]
      earlier = [j for j in range(lo, i + 1) if ts[j] < ts[i]][::-1][:s]
      known = ts[earlier] + 1200 < ts[i]  # known strictly before the request
      want = np.where(known, ds["action"][earlier], ds["action_now"][earlier])
      np.testing.assert_array_equal(ds["seq_action"][i][:len(want)], want)
      np.testing.assert_array_equal(ds["seq_action"][i][len(want):], 0)
      pending += int((~known).sum())
    self.assertGreater(pending, 100)  # the delay really hides actions

  def test_delayed_schema_needs_action_now(self):
    path = os.path.join(tempfile.mkdtemp(), "d")
    ds = data_fixtures.make_dataset(path, num_users=3, label_delay=(0, 60))
    chunk = {k: np.asarray(ds[k]) for k in dataset.row_shapes(ds.schema)}
    del chunk["action_now"]
    with self.assertRaisesRegex(errors.DataError, "action_now"):
      with dataset.Writer(path, ds.schema, ds.num_rows) as w:
        w.append(chunk)


class WriterErrorsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.path = os.path.join(self.dir, "d")
    self.old = data_fixtures.make_dataset(self.path, num_users=5)

  def _assert_old_intact(self):
    ds = dataset.Dataset(self.path)
    self.assertEqual(ds.num_rows, self.old.num_rows)
    np.testing.assert_array_equal(ds["ins_id"], self.old["ins_id"])
    self.assertEqual(os.listdir(self.dir), ["d"])  # no temp dir left behind

  def _chunk(self, n=3, uid=1):
    ds = self.old
    c = {k: np.asarray(ds[k][:n]) for k in dataset.row_shapes(ds.schema)}
    c["uid"] = np.full(n, uid)
    c["ts"] = np.arange(n) * 10
    return c

  def test_failure_midway_leaves_old_dataset(self):
    with self.assertRaisesRegex(RuntimeError, "boom"):
      with dataset.Writer(self.path, self.old.schema, 6) as w:
        w.append(self._chunk(3, uid=1))
        raise RuntimeError("boom")
    self._assert_old_intact()

  def test_users_split_across_chunks(self):
    with self.assertRaisesRegex(errors.DataError, "whole users"):
      with dataset.Writer(self.path, self.old.schema, 6) as w:
        w.append(self._chunk(3, uid=1))
        w.append(self._chunk(3, uid=1))
    self._assert_old_intact()

  def test_unsorted_rows(self):
    c = self._chunk(3)
    c["ts"] = np.array([10, 5, 20])
    with self.assertRaisesRegex(errors.DataError, "chunk row 1"):
      with dataset.Writer(self.path, self.old.schema, 3) as w:
        w.append(c)
    self._assert_old_intact()

  def test_id_out_of_vocab(self):
    c = self._chunk(3)
    c["cat"] = c["cat"].copy()
    c["cat"][2, 1] = 99
    with self.assertRaisesRegex(errors.DataError, "field category: id 99"):
      with dataset.Writer(self.path, self.old.schema, 3) as w:
        w.append(c)
    self._assert_old_intact()

  def test_row_count_mismatch(self):
    with self.assertRaisesRegex(errors.DataError, "announced"):
      with dataset.Writer(self.path, self.old.schema, 5) as w:
        w.append(self._chunk(3))
    self._assert_old_intact()

  def test_replace_publishes_new(self):
    new = data_fixtures.make_dataset(self.path, num_users=9, seed=4)
    self.assertNotEqual(new.num_rows, self.old.num_rows)
    self.assertEqual(dataset.Dataset(self.path).num_rows, new.num_rows)
    self.assertEqual(os.listdir(self.dir), ["d"])


if __name__ == "__main__":
  absltest.main()
