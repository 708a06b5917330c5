"""Tests of the Grain pipelines: coverage, order, leakage, resume, sharding."""

from concurrent import futures
import os
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from iat_jax.data import batching
from iat_jax.data import input_pipeline as ip
from iat_jax.store import memory_table
from iat_jax.store import tables
from tests import data_fixtures


def _batches(data, n=None, worker_count=0):
  it = data if hasattr(data, "get_state") else ip.iterate(data, worker_count)
  out = []
  for b in it:
    out.append(b)
    if n is not None and len(out) == n:
      break
  return out


def _pipeline(ds, kind, **kw):
  if kind == "temporal":
    return ip.temporal(ds, "train", 16, shuffle_window=32, seed=1, **kw)
  if kind == "user":
    return ip.user_ordered(ds, "train", 4, 8, seed=1, **kw)
  return ip.temporal(ds, "valid", 8, seed=1, history_len=5, **kw)


class PipelineTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.ds = data_fixtures.shared_dataset()

  def test_temporal_order_and_padding(self):
    ds = self.ds
    batches = _batches(ip.temporal(ds, "valid", 16))
    rows = np.concatenate([b["row"] for b in batches])
    n = ds.schema.split_sizes[1]
    np.testing.assert_array_equal(rows[:n], ds.split_rows("valid"))
    np.testing.assert_array_equal(rows[n:], -1)
    last = batches[-1]
    self.assertEqual(last["mask"].sum(), n - 16 * (len(batches) - 1))
    self.assertTrue((last["cat"][~last["mask"]] == 0).all())

  def test_window_shuffle_stays_in_window(self):
    ds = self.ds
    rows = ds.split_rows("train")
    for epoch in range(2):
      got = batching.window_shuffle(rows, 32, seed=5, epoch=epoch)
      self.assertFalse((got == rows).all())
      for w in range(0, len(rows), 32):
        self.assertCountEqual(got[w:w + 32], rows[w:w + 32])
    self.assertFalse(
        (batching.window_shuffle(rows, 32, 5,
                                 0) == batching.window_shuffle(rows, 32, 5, 1)).all())

  def test_epochs_cover_split_once_each(self):
    ds = self.ds
    batches = _batches(ip.temporal(ds, "train", 16, shuffle_window=64, num_epochs=2))
    per_epoch = len(batches) // 2
    for e in range(2):
      rows = np.concatenate(
          [b["row"] for b in batches[e * per_epoch:(e + 1) * per_epoch]])
      rows = rows[rows >= 0]
      np.testing.assert_array_equal(np.sort(rows), np.sort(ds.split_rows("train")))

  @parameterized.parameters("train", "valid", "test")
  def test_user_chunks_cover_every_instance_once(self, split):
    ds = self.ds
    batches = _batches(ip.user_ordered(ds, split, 4, 8, seed=3))
    rows = np.concatenate([b["row"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(np.sort(rows), np.sort(ds.split_rows(split)))
    for b in batches:
      m = b["mask"]
      # Real slots form a prefix of each chunk; dummy slots are zeroed.
      np.testing.assert_array_equal(m, np.sort(m, axis=1)[:, ::-1])
      self.assertTrue((b["dense"][~m] == 0).all() and (b["row"][~m] == -1).all())
      for r, mk in zip(b["row"], m):
        r = r[mk]
        if len(r):
          self.assertLen(np.unique(ds["user_index"][r]), 1)
          np.testing.assert_array_equal(r, np.arange(r[0], r[0] + len(r)))
          self.assertTrue((np.diff(ds["ts"][r]) >= 0).all())

  @parameterized.parameters("train", "valid", "test")
  def test_eval_chunks_lead_with_the_users_earlier_rows(self, split):
    """Chunks with context 3 of T=8: the mask covers the split once; each
    chunk's tokens are the user's rows right before its first evaluated row
    (any split, up to 3 of them), then up to 5 rows of the split."""
    ds = self.ds
    batches = _batches(ip.user_ordered(ds, split, 4, 8, order="users", context=3))
    rows = np.concatenate([b["row"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(np.sort(rows), np.sort(ds.split_rows(split)))
    in_split = np.asarray(ds["split"]) == ("train", "valid", "test").index(split)
    earlier_splits = 0
    for b in batches:
      for r, tok, m, g in zip(b["row"], b["token_mask"], b["mask"], b["tie_group"]):
        if not tok.any():
          continue
        np.testing.assert_array_equal(tok, np.sort(tok)[::-1])  # a prefix
        self.assertTrue((m <= tok).all() and m.sum() <= 5)
        r, m, g = r[tok], m[tok], g[tok]
        n_ctx = int(np.argmax(m))
        self.assertTrue(m[n_ctx:].all() and in_split[r[m]].all())
        np.testing.assert_array_equal(r, np.arange(r[0], r[0] + len(r)))
        self.assertEqual(n_ctx, min(3, r[n_ctx] - ds.user_start(r[n_ctx])))
        self.assertLen(np.unique(ds["user_index"][r]), 1)
        earlier_splits += int((~in_split[r[:n_ctx]]).sum())
        ts = ds["ts"][r]
        np.testing.assert_array_equal(g[:, None] == g[None], ts[:, None] == ts[None])
    # Valid and test chunks really carry rows of the splits before them.
    self.assertEqual(earlier_splits > 0, split != "train")

  def test_user_chunk_orders(self):
    ds = self.ds
    users = {}
    for order in ("users", "reversed"):
      rows = np.concatenate([
          b["row"][b["mask"]]
          for b in _batches(ip.user_ordered(ds, "train", 4, 8, order=order))
      ])
      np.testing.assert_array_equal(np.sort(rows), np.sort(ds.split_rows("train")))
      u = ds["user_index"][rows]
      users[order] = u
      # Within a user, time order; across users, monotone in the given order.
      step = np.diff(u)
      self.assertTrue((step >= 0).all() if order == "users" else (step <= 0).all())
    np.testing.assert_array_equal(np.unique(users["users"]),
                                  np.unique(users["reversed"]))
    with self.assertRaisesRegex(ValueError, "chunk order"):
      ip.user_ordered(ds, "train", 4, 8, order="random")

  def test_history_never_sees_now_or_future(self):
    ds = self.ds
    length = 5
    seen_ties = 0
    for b in _batches(ip.temporal(ds, "test", 8, history_len=length)):
      for i in np.flatnonzero(b["mask"]):
        row, ts = b["row"][i], b["ts"][i]
        u = ds["user_index"][row]
        lo, hi = ds["user_offsets"][u], ds["user_offsets"][u + 1]
        same_user = np.arange(lo, hi)
        earlier = same_user[ds["ts"][same_user] < ts]
        seen_ties += int((ds["ts"][same_user] == ts).sum() > 1)
        want = earlier[::-1][:length]
        m = b["hist_mask"][i]
        np.testing.assert_array_equal(b["hist_row"][i][m], want)
        self.assertTrue((ds["ts"][b["hist_row"][i][m]] < ts).all())
        np.testing.assert_array_equal(b["hist_ins_id"][i][m], ds["ins_id"][want])
        np.testing.assert_array_equal(b["hist_labels"][i][m], ds["labels"][want])
        self.assertTrue((b["hist_gap"][i][m] >= 1).all())
        self.assertTrue((b["hist_gap"][i][~m] == 0).all())
        self.assertTrue((b["hist_ins_id"][i][~m] == 0).all())
    self.assertGreater(seen_ties, 0)  # the fixture really has equal timestamps

  def test_history_on_user_chunks(self):
    ds = self.ds
    b = next(ip.iterate(ip.user_ordered(ds, "valid", 4, 8, history_len=3)))
    m = b["hist_mask"]
    self.assertEqual(m.shape, (4, 8, 3))
    req_ts = np.broadcast_to(b["ts"][..., None], m.shape)
    self.assertTrue((ds["ts"][b["hist_row"][m]] < req_ts[m]).all())
    self.assertFalse(m[~b["mask"]].any())

  @parameterized.parameters("temporal", "user", "history")
  def test_deterministic(self, kind):
    a = _batches(_pipeline(self.ds, kind), 5)
    b = _batches(_pipeline(self.ds, kind), 5)
    for x, y in zip(a, b):
      for k in x:
        np.testing.assert_array_equal(x[k], y[k])

  def test_seed_changes_order(self):
    a = next(ip.iterate(ip.user_ordered(self.ds, "train", 4, 8, seed=1)))
    b = next(ip.iterate(ip.user_ordered(self.ds, "train", 4, 8, seed=2)))
    self.assertFalse(np.array_equal(a["row"], b["row"]))

  @parameterized.parameters("temporal", "user", "history")
  def test_resume_mid_epoch(self, kind):
    full = _batches(_pipeline(self.ds, kind, num_epochs=2))
    it = ip.iterate(_pipeline(self.ds, kind, num_epochs=2))
    k = len(full) // 2 + 1
    _batches(it, k)
    state = it.get_state()
    resumed = ip.iterate(_pipeline(self.ds, kind, num_epochs=2))
    resumed.set_state(state)
    rest = _batches(resumed)
    self.assertLen(rest, len(full) - k)
    for x, y in zip(full[k:], rest):
      np.testing.assert_array_equal(x["row"], y["row"])
      np.testing.assert_array_equal(x["labels"], y["labels"])

  @parameterized.parameters(("temporal", 2), ("user", 2), ("history", 4))
  def test_process_shards_are_disjoint_and_complete(self, kind, count):
    whole = _batches(_pipeline(self.ds, kind))
    parts = [
        _batches(_pipeline(self.ds, kind, part=batching.ProcessSlice(p, count)))
        for p in range(count)
    ]
    for i, b in enumerate(whole):
      for k in ("row", "mask", "cat"):
        np.testing.assert_array_equal(
            b[k], np.concatenate([parts[p][i][k] for p in range(count)]))

  def test_processes_sharing_blocks_read_the_same_rows(self):
    # Of 4 blocks, process A's devices hold blocks 0 and 2, process B's 2 and
    # 3 (a data row of the mesh spans both): each reads its blocks, in order.
    whole = _batches(_pipeline(self.ds, "temporal"))
    a, b = (_batches(
        _pipeline(self.ds,
                  "temporal",
                  part=batching.ProcessSlice(count=4, blocks=blocks)))
            for blocks in ((0, 2), (2, 3)))
    for w, x, y in zip(whole, a, b):
      np.testing.assert_array_equal(x["row"],
                                    np.concatenate([w["row"][0:4], w["row"][8:12]]))
      np.testing.assert_array_equal(y["row"], w["row"][8:16])

  def test_indivisible_batch_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "not divisible into 3 blocks"):
      next(
          ip.iterate(ip.temporal(self.ds, "train", 16, part=batching.ProcessSlice(0,
                                                                                  3))))

  @parameterized.parameters("user", "insid")
  def test_lookup_adds_insembs_in_one_call(self, placement):
    ds = self.ds
    keys = tables.store_keys(placement, ds["ins_id"], ds["uid"])
    values = np.random.default_rng(0).normal(size=(len(keys), 4)).astype(np.float32)
    drop = keys[::3]  # a third of the instances have no InsEmb

    class CountingTable(memory_table.MemoryTable):
      calls = 0

      def lookup(self, k):
        CountingTable.calls += 1
        return super().lookup(k)

    keep = ~np.isin(keys, drop)
    table = CountingTable(keys[keep], values[keep])
    batches = _batches(
        ip.temporal(ds, "test", 8, history_len=5, table=table, placement=placement))
    self.assertEqual(CountingTable.calls, len(batches))
    missing = hits = 0
    for b in batches:
      for i, j in zip(*np.nonzero(b["hist_mask"])):
        row = b["hist_row"][i, j]
        np.testing.assert_array_equal(b["hist_insemb"][i, j], values[row])
      self.assertTrue((b["hist_insemb"][~b["hist_mask"]] == 0).all())
      hist_keys = tables.store_keys(placement, b["hist_ins_id"], b["uid"][:, None])
      self.assertTrue(np.isin(hist_keys[b["hist_mask"]], drop).sum() == 0)
      missing += int(b["hist_missing"])
      hits += int(b["hist_mask"].sum())
    self.assertGreater(missing, 0)
    self.assertGreater(hits, missing)  # a third was dropped: most are found

  def test_worker_processes_give_the_same_batches(self):
    a = _batches(_pipeline(self.ds, "history"))
    b = _batches(_pipeline(self.ds, "history"), worker_count=1)
    self.assertLen(b, len(a))
    for x, y in zip(a, b):
      np.testing.assert_array_equal(x["hist_row"], y["hist_row"])


class EpochBoundaryThreadsTest(parameterized.TestCase):
  """Batches read by many threads across epoch boundaries = a serial read."""

  def setUp(self):
    super().setUp()
    # Switch threads every few bytecodes, so races show up in a short test.
    self.addCleanup(sys.setswitchinterval, sys.getswitchinterval())
    sys.setswitchinterval(1e-6)

  def test_thread_pool_reads_each_batch_with_its_epochs_order(self):
    n, b, epochs = 20000, 5000, 4
    order = lambda e: np.random.default_rng(e).permutation(n)
    serial = batching.EpochBatches(n, b, epochs, order)
    want = [serial[i] for i in range(len(serial))]
    per_epoch = serial.batches_per_epoch
    # The last batch of each epoch and the first of the next, over and over.
    around = [k * per_epoch + d for k in range(1, epochs) for d in (-1, 0)] * 50
    shared = batching.EpochBatches(n, b, epochs, order)
    with futures.ThreadPoolExecutor(8) as pool:
      got = list(pool.map(shared.__getitem__, around))
    for i, g in zip(around, got):
      np.testing.assert_array_equal(g, want[i], err_msg=f"batch {i}")

  @parameterized.parameters("temporal", "user")
  def test_grain_read_threads_match_a_serial_read(self, kind):
    make = lambda: _pipeline(data_fixtures.shared_dataset(), kind, num_epochs=20)
    data = make()
    want = [data[i]["row"] for i in range(len(data))]
    for _ in range(3):
      got = [x["row"] for x in ip.iterate(make(), read_threads=8, prefetch=8)]
      self.assertLen(got, len(want))
      for i, (g, w) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(g, w, err_msg=f"batch {i}")

  def test_chunk_epochs_are_fresh_padded_permutations(self):
    n, b, epochs = 10, 4, 3
    batches = batching.chunk_batches(n, b, epochs, seed=1, fixed=None)
    self.assertLen(batches, 3 * epochs)
    per_epoch = [
        np.concatenate([batches[e * 3 + k] for k in range(3)]) for e in range(epochs)
    ]
    for ids in per_epoch:
      np.testing.assert_array_equal(ids[n:], -1)  # the last batch padded to B
      np.testing.assert_array_equal(np.sort(ids[:n]), np.arange(n))
    self.assertFalse(np.array_equal(per_epoch[0], per_epoch[1]))
    # Seeds s and s + 1 do not share epochs (Grain reseeds epoch e with seed + e).
    other = batching.chunk_batches(n, b, epochs, seed=2, fixed=None)
    self.assertFalse(
        np.array_equal(np.concatenate([other[k] for k in range(3)]), per_epoch[1]))
    fixed = batching.chunk_batches(n, b, epochs, seed=1, fixed=np.arange(n)[::-1])
    np.testing.assert_array_equal(fixed[5], [1, 0, -1, -1])


class LabelDelayPipelineTest(absltest.TestCase):
  """Downstream batches carry past labels only once known at the request."""

  def test_history_labels_match_brute_force(self):
    delay = (0, 1800)
    ds = data_fixtures.make_dataset(os.path.join(tempfile.mkdtemp(), "d"),
                                    label_delay=delay)
    length, hidden = 5, 0
    for b in _batches(ip.temporal(ds, "train", 16, seed=1, history_len=length), 6):
      for i in np.flatnonzero(b["mask"]):
        ts = b["ts"][i]
        same = np.flatnonzero(ds["uid"][:] == ds["uid"][b["row"][i]])
        earlier = same[ds["ts"][same] < ts]
        want = earlier[np.lexsort((ds["ins_id"][earlier], ds["ts"][earlier]))]
        want = want[::-1][:length]
        known = ds["ts"][want][:, None] + np.asarray(delay) < ts
        m = b["hist_mask"][i]
        np.testing.assert_array_equal(b["hist_row"][i][m], want)
        np.testing.assert_array_equal(b["hist_label_known"][i][m], known)
        np.testing.assert_array_equal(b["hist_labels"][i][m],
                                      ds["labels"][want] * known)
        self.assertFalse(b["hist_label_known"][i][~m].any())
        hidden += int((~known).sum())
    self.assertGreater(hidden, 20)  # some visible instances' labels are not


if __name__ == "__main__":
  absltest.main()
