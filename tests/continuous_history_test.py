"""Continuous training's data paths: periods, the user-history index in
TensorStore, per-period InsEmb tables, and what a request may see."""

import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from iat_jax import configs
from iat_jax import errors
from iat_jax import metrics
from iat_jax.continuous import batches
from iat_jax.continuous import history as history_lib
from iat_jax.continuous import report
from iat_jax.data import periods as periods_lib
from iat_jax.data import user_history
from iat_jax.store import partitions
from iat_jax.store import tables
from iat_jax.store import user_index
from tests import data_fixtures
from tests import store_fixtures as sf

_NONE = -(1 << 62)


def _index(ds, capacity=64):
  return user_index.UserIndex(os.path.join(tempfile.mkdtemp(), "index"),
                              ds.schema.num_tasks, capacity)


def _walk(ds, per, index, cutoff=lambda p: _NONE):
  """Yields (p, rows, uid, timeline) period by period, appending each
  period's rows to `index` after it is yielded."""
  uid_col = np.asarray(ds["uid"])
  for p in range(len(per)):
    rows = per.rows(p)
    uid = uid_col[rows]
    users = np.unique(uid)
    entries = history_lib.entries(ds, rows)
    tl = history_lib.Timeline.build(index.read(users), users, uid, entries)
    yield p, rows, uid, tl
    index.append(uid, entries, cutoff(p + 1), np.zeros(0, np.int64))


def _newest_first(ds, rows):
  """rows sorted newest first by (ts, ins_id)."""
  return rows[np.lexsort((ds["ins_id"][rows], ds["ts"][rows]))][::-1]


class PeriodsTest(absltest.TestCase):

  def test_time_periods_start_on_multiples_and_cover_every_row(self):
    ds = data_fixtures.shared_dataset()
    per = periods_lib.of_dataset(ds, "1h")
    self.assertTrue((per.start % 3600 == 0).all())
    rows = np.concatenate([per.rows(p) for p in range(len(per))])
    np.testing.assert_array_equal(rows, ds["temporal_order"])
    for p in range(len(per)):
      np.testing.assert_array_equal(per.of_time(ds["ts"][per.rows(p)]), p)

  def test_row_periods_never_split_a_timestamp(self):
    ds = data_fixtures.shared_dataset()
    per = periods_lib.of_dataset(ds, "rows:50")
    self.assertGreater(len(per), 5)
    for p in range(1, len(per)):
      self.assertLess(ds["ts"][per.rows(p - 1)].max(), ds["ts"][per.rows(p)].min())

  def test_bad_periods_name_the_flag(self):
    ds = data_fixtures.shared_dataset()
    for spec in ("0", "-1d", "1day", "rows:0", "rows:x"):
      with self.assertRaisesRegex(errors.ConfigError, "--config.data.period"):
        periods_lib.of_dataset(ds, spec)
    with self.assertRaisesRegex(errors.ConfigError, "1 period.*at least 2"):
      periods_lib.of_dataset(ds, "1w")


class HistoryTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.ds = data_fixtures.make_dataset(os.path.join(tempfile.mkdtemp(), "d"),
                                        label_delay=(0, 1800))
    cls.per = periods_lib.of_dataset(cls.ds, "1h")

  def test_period_by_period_index_equals_the_full_log_index(self):
    """With no lag and no retention a request sees exactly what the index of
    the whole log (`user_history`) gives: the index appended period by period
    in TensorStore holds the same entries, labels only once known."""
    ds, ref = self.ds, user_history.UserHistory(self.ds)
    for _, rows, uid, tl in _walk(ds, self.per, _index(ds)):
      got = tl.downstream(uid, ds["ts"][rows], np.ones(len(rows), bool), 7, 0, _NONE,
                          ds.schema.label_delays)
      want = ref.before_rows(rows, 7)
      for key in got:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)

  @parameterized.parameters((0, 0), (1800, 0), (3600, 2), (0, 1))
  def test_downstream_sees_only_visible_strictly_earlier_entries(self, lag, keep):
    ds = self.ds
    cutoff = lambda p: (int(self.per.start[p - keep])
                        if keep and p - keep >= 0 else _NONE)
    uid_all, ts_all = np.asarray(ds["uid"]), np.asarray(ds["ts"])
    seen = 0
    for p, rows, uid, tl in _walk(ds, self.per, _index(ds), cutoff):
      ts = ts_all[rows]
      got = tl.downstream(uid, ts, np.ones(len(rows), bool), 5, lag, cutoff(p),
                          ds.schema.label_delays)
      for i, r in enumerate(rows):
        mine = np.flatnonzero(uid_all == uid_all[r])
        ok = mine[(ts_all[mine] + lag < ts_all[r]) & (ts_all[mine] >= cutoff(p))]
        want = _newest_first(ds, ok)[:5]
        m = got["hist_mask"][i]
        np.testing.assert_array_equal(got["hist_ins_id"][i][m], ds["ins_id"][want])
        self.assertNotIn(ds["ins_id"][r], got["hist_ins_id"][i][m])
        known = got["hist_label_known"][i][m]
        delays = np.asarray(ds.schema.label_delays)
        np.testing.assert_array_equal(known, ts_all[want][:, None] + delays[None]
                                      < ts_all[r])
        self.assertTrue((got["hist_labels"][i][m][~known] == 0).all())
        seen += m.sum()
    self.assertGreater(seen, 100)

  def test_stream_past_is_what_earlier_batches_processed(self):
    ds, b = self.ds, 16
    uid_all, ts_all = np.asarray(ds["uid"]), np.asarray(ds["ts"])
    rank = np.empty(ds.num_rows, np.int64)
    rank[np.asarray(ds["temporal_order"])] = np.arange(ds.num_rows)
    for p, rows, uid, tl in _walk(ds, self.per, _index(ds)):
      for start in range(0, len(rows), b):
        sl = slice(start, start + b)
        got = tl.stream_past(uid[sl], ts_all[rows[sl]], np.ones(len(rows[sl]), bool), 4,
                             start, _NONE)
        first = rank[rows[0]] + start  # the batch's first global rank
        for i, r in enumerate(rows[sl]):
          mine = np.flatnonzero(uid_all == uid_all[r])
          ok = mine[(ts_all[mine] < ts_all[r]) & (rank[mine] < first)]
          want = _newest_first(ds, ok)[:4]
          m = got["past_mask"][i]
          np.testing.assert_array_equal(got["past_ins_id"][i][m], ds["ins_id"][want])

  def test_index_with_retention_equals_the_log_cut_at_the_window(self):
    ds, keep, cap = self.ds, 2, 6
    index = _index(ds, cap)
    cutoff = lambda p: int(self.per.start[p - keep]) if p - keep >= 0 else _NONE
    uid_all = np.asarray(ds["uid"])
    for p, rows, uid, _ in _walk(ds, self.per, index, cutoff):
      expired = (np.unique(uid_all[self.per.rows(p - keep)]) if p -
                 keep >= 0 else np.zeros(0, np.int64))
      # _walk appended without expiring; expire like the loop does.
      del rows, uid
      index.append(np.zeros(0,
                            np.int64), history_lib.entries(ds, np.zeros(0, np.int64)),
                   cutoff(p + 1), expired)
    last = len(self.per)
    users = np.unique(uid_all)
    for u, got in zip(users, index.read(users)):
      mine = np.flatnonzero(uid_all == u)
      mine = mine[ds["ts"][mine] >= cutoff(last)]
      want = _newest_first(ds, mine)[:cap][::-1]
      np.testing.assert_array_equal(got["ins_id"], ds["ins_id"][want])

  def test_restore_undoes_a_commit(self):
    ds = self.ds
    index = _index(ds)
    walk = _walk(ds, self.per, index)
    next(walk)
    next(walk)  # period 0 appended
    generation = index.generations()
    users = np.unique(ds["uid"])
    before = index.read(users)
    next(walk)  # period 1 appended
    self.assertNotEqual(index.generations(), generation)
    index.restore(users, generation)
    for a, b in zip(before, index.read(users)):
      self.assertEqual(a.tobytes(), b.tobytes())


class AssembleTest(absltest.TestCase):

  def test_downstream_batches_hold_no_leak(self):
    """Through the real batch assembly (history + InsEmb lookup): every slot
    is strictly earlier than its request and the InsEmb it carries is the
    one stored for that InsID."""
    ds = data_fixtures.shared_dataset()
    per = periods_lib.of_dataset(ds, "1h")
    config = configs.base_config()
    config.store.backend = "memory"
    config.batch_size, config.model.hist_len, d = 8, 5, 3
    table = partitions.Partitions(config,
                                  os.path.join(tempfile.mkdtemp(), "s"),
                                  d=d,
                                  source="src",
                                  fingerprint="f",
                                  flush_rows=10)
    value = lambda ids: np.stack([(ids % 97).astype(np.float32)] * d, 1)
    index, slots = _index(ds), 0
    for p, rows, uid, tl in _walk(ds, per, index):
      table.begin(p)
      table.put(sf.ds_keys(ds, rows), value(ds["ins_id"][rows]))
      table.end()
      data = batches.period_batches(config,
                                    ds,
                                    per,
                                    p,
                                    tl,
                                    "history",
                                    cutoff=_NONE,
                                    sync_lag=0,
                                    table=table)
      for i in range(len(data)):
        b = data[i]
        m = b["hist_mask"]
        self.assertTrue((b["hist_ts"][m] < np.broadcast_to(b["ts"][:, None],
                                                           m.shape)[m]).all())
        np.testing.assert_array_equal(b["hist_insemb"][m], value(b["hist_ins_id"][m]))
        self.assertTrue((b["hist_insemb"][~m] == 0).all())
        slots += m.sum()
    self.assertGreater(slots, 100)


class PartitionsTest(parameterized.TestCase):

  @parameterized.parameters("ocdbt", "memory")
  def test_periods_answer_their_own_keys_and_retention_drops_whole_tables(
      self, backend):
    config = configs.base_config()
    config.store.backend = backend
    root = os.path.join(tempfile.mkdtemp(), "s")
    open_root = lambda: partitions.Partitions(
        config, root, d=2, source="src", fingerprint="f", flush_rows=3)
    table = open_root()
    for p in range(3):
      table.begin(p)
      table.put(np.arange(1, 6, dtype=np.uint64), np.full((5, 2), p, np.float32))
      table.end()
    v, found = table.lookup(np.array([1, 2, 3], np.uint64), np.array([0, 1, 2]))
    self.assertTrue(found.all())
    np.testing.assert_array_equal(v[:, 0], [0, 1, 2])
    self.assertBetween(table.memory_bytes(), 1, config.store.cache_bytes)
    table.drop_before(2)
    self.assertFalse(tables.exists(config, table.path(1)))
    self.assertFalse(os.path.exists(table.path(1)))
    with self.assertRaisesRegex(errors.StoreError, "period 0"):
      table.lookup(np.array([1], np.uint64), np.array([0]))
    # A half-written table of a killed run is dropped when its period restarts.
    table.begin(2)
    self.assertEqual(
        table.lookup(np.array([1], np.uint64), np.array([2]))[1].tolist(), [False])
    table.end()
    # A resumed process's first drop reaches every earlier period.
    open_root().drop_before(3)
    self.assertFalse(tables.exists(config, table.path(2)))


class ReportTest(absltest.TestCase):

  def test_binned_auc_is_close_to_the_exact_one(self):
    rng = np.random.default_rng(0)
    labels = (rng.random((5000, 2)) < 0.3).astype(np.float32)
    probs = np.clip(0.3 * labels + rng.random((5000, 2)) * 0.7, 0, 1).astype(np.float32)
    hist = report.empty_hist(2)
    report.add_hist(hist, labels[:2000], probs[:2000])
    report.add_hist(hist, labels[2000:], probs[2000:])
    for t in range(2):
      self.assertAlmostEqual(report.hist_auc(hist[t]),
                             metrics.auc(labels[:, t], probs[:, t]), 4)

  def test_paired_differences_and_seeds(self):
    rows = [
        report.period_row(p, 0, 10, p == 0, {
            "base": {
                "auc/a": 0.6
            },
            "m": {
                "auc/a": 0.6 + 0.01 * p
            }
        }) for p in range(4)
    ]
    hists = {n: report.empty_hist(1) for n in ("base", "m")}
    out = report.summarize(rows, hists, ["a"], ["base", "m"], 4)
    d = out["vs_base"]["m"]["auc/a"]
    self.assertEqual(out["record_periods"], 3)  # period 0 is warm-up
    self.assertAlmostEqual(d["mean"], 0.02)
    self.assertEqual((d["better"], d["periods"]), (3, 3))
    seeds = report.across_seeds([out, out])
    m = [r for r in seeds if r["model"] == "m"][0]
    self.assertAlmostEqual(m["dauc"][0], 0.02)
    self.assertIn("| m | auc/a |", report.seeds_markdown(seeds))


if __name__ == "__main__":
  absltest.main()
