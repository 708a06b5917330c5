"""Tests of the user history index: strictly earlier, newest first, both paths."""

import os
import tempfile

from absl.testing import absltest
import numpy as np

from iat_jax.data import user_history
from tests import data_fixtures


class UserHistoryTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.ds = data_fixtures.shared_dataset()
    cls.index = user_history.UserHistory(cls.ds)

  def test_rows_path_matches_brute_force(self):
    ds, length = self.ds, 7
    rows = np.arange(ds.num_rows)
    hist = self.index.before_rows(rows, length)
    for i in rows:
      same = np.flatnonzero(ds["uid"][:] == ds["uid"][i])
      earlier = same[ds["ts"][same] < ds["ts"][i]]
      want = earlier[np.lexsort(
          (ds["ins_id"][earlier], ds["ts"][earlier]))][::-1][:length]
      m = hist["hist_mask"][i]
      np.testing.assert_array_equal(hist["hist_row"][i][m], want)
      np.testing.assert_array_equal(hist["hist_ts"][i][m], ds["ts"][want])
      self.assertTrue((hist["hist_row"][i][~m] == -1).all())

  def test_uid_ts_path_agrees_and_never_sees_now(self):
    ds = self.ds
    rows = np.arange(ds.num_rows)
    a = self.index.before_rows(rows, 5)
    b = self.index.before(np.asarray(ds["uid"]), np.asarray(ds["ts"]), 5)
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
    self.assertTrue((b["hist_ts"][b["hist_mask"]]
                     < np.broadcast_to(ds["ts"][:, None],
                                       b["hist_mask"].shape)[b["hist_mask"]]).all())

  def test_arbitrary_requests(self):
    ds = self.ds
    uid = ds["uid"][0]
    rows = np.flatnonzero(ds["uid"][:] == uid)
    late = self.index.before(np.array([uid]), np.array([10**12]), 1000)
    np.testing.assert_array_equal(late["hist_row"][0][late["hist_mask"][0]], rows[::-1])
    early = self.index.before(np.array([uid]), np.array([ds["ts"][rows[0]]]), 5)
    self.assertFalse(early["hist_mask"].any())
    unknown = self.index.before(np.array([-5, 10**9]), np.array([10**12, 10**12]), 3)
    self.assertFalse(unknown["hist_mask"].any())


_DELAY = (0, 1800)  # click known at once, "buy" 30 min later (ts steps of 600 s)


def _visible_labels(ds, uid, request_ts, length):
  """Brute force over the raw rows: (labels, known) [length, tasks] of the
  newest `length` instances of `uid` before request_ts, labels after delays."""
  rows = np.flatnonzero((ds["uid"][:] == uid) & (ds["ts"][:] < request_ts))
  rows = rows[np.lexsort((ds["ins_id"][rows], ds["ts"][rows]))][::-1][:length]
  known = np.zeros((length, len(_DELAY)), bool)
  labels = np.zeros((length, len(_DELAY)), np.float32)
  for j, r in enumerate(rows):
    for k, delay in enumerate(_DELAY):
      known[j, k] = ds["ts"][r] + delay < request_ts
      labels[j, k] = ds["labels"][r, k] if known[j, k] else 0.0
  return labels, known


class LabelDelayTest(absltest.TestCase):
  """A past label is visible only once known: past ts + delay < request ts."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    path = os.path.join(tempfile.mkdtemp(prefix="iat-delay-ds-"), "d")
    cls.ds = data_fixtures.make_dataset(path, label_delay=_DELAY)
    cls.index = user_history.UserHistory(cls.ds)

  def test_rows_path_matches_brute_force(self):
    ds, length = self.ds, 6
    rows = np.random.default_rng(0).choice(ds.num_rows, 150, replace=False)
    hist = self.index.before_rows(rows, length)
    hidden = 0
    for i, row in enumerate(rows):
      labels, known = _visible_labels(ds, ds["uid"][row], ds["ts"][row], length)
      np.testing.assert_array_equal(hist["hist_label_known"][i], known)
      np.testing.assert_array_equal(hist["hist_labels"][i], labels)
      hidden += int((hist["hist_mask"][i] & ~known[:, 1]).sum())
    self.assertGreater(hidden, 20)  # the delay really hides some labels
    self.assertTrue(hist["hist_label_known"][..., 0][hist["hist_mask"]].all())

  def test_arbitrary_requests_match_brute_force(self):
    ds, length = self.ds, 8
    rng = np.random.default_rng(1)
    rows = rng.choice(ds.num_rows, 100)
    uids = np.asarray(ds["uid"][rows])
    ts = np.asarray(ds["ts"][rows]) + rng.integers(-900, 2400, len(rows))
    hist = self.index.before(uids, ts, length)
    for i in range(len(rows)):
      labels, known = _visible_labels(ds, uids[i], ts[i], length)
      np.testing.assert_array_equal(hist["hist_label_known"][i], known)
      np.testing.assert_array_equal(hist["hist_labels"][i], labels)

  def test_label_known_only_after_the_request_is_invisible(self):
    ds = self.ds
    r = int(np.flatnonzero(ds["labels"][:, 1] == 1)[0])  # a past "buy"
    uid, t = ds["uid"][r], ds["ts"][r]
    length = 64  # more than any user's instances (the fixture has <= 40)
    # Known at t + 1800: a request at exactly that time must not see it.
    for request_ts, want in ((t + 1, 0.0), (t + 1800, 0.0), (t + 1801, 1.0)):
      hist = self.index.before(np.array([uid]), np.array([request_ts]), length)
      slot = np.flatnonzero(hist["hist_row"][0] == r)
      self.assertLen(slot, 1)  # the instance itself is visible...
      self.assertEqual(hist["hist_labels"][0, slot[0], 1], want)  # ...its label not
      self.assertEqual(hist["hist_label_known"][0, slot[0], 1], bool(want))
      self.assertTrue(hist["hist_label_known"][0, slot[0], 0])  # click: at once


if __name__ == "__main__":
  absltest.main()
