"""Tests of the user history index: strictly earlier, newest first, both paths."""

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


if __name__ == "__main__":
  absltest.main()
