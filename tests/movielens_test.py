"""Tests of the MovieLens adapter (`iat_jax.data.movielens`).

The real GroupLens files are never copied into the repo: the count tests read
them from ../shared/data (or $IAT_MOVIELENS_100K / $IAT_MOVIELENS_1M) and are
skipped when absent; every derived dataset goes to a temporary directory. The
parser and bad-input tests write their own small files.
"""

import os
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import ml_collections
import numpy as np
import pytest

from iat_jax import errors
from iat_jax.data import dataset
from iat_jax.data import download
from iat_jax.data import hashing
from iat_jax.data import movielens

_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
_SHARED = os.path.join(_REPO, "..", "shared", "data")
ML100K_DIR = os.environ.get("IAT_MOVIELENS_100K", os.path.join(_SHARED, "ml-100k"))
ML1M_DIR = os.environ.get("IAT_MOVIELENS_1M", os.path.join(_SHARED,
                                                           "ml-1m-users1-2999"))

_USERS_1M = "1::F::1::10::48067\n2::M::56::16::70072\n3::M::25::15::55117-1234\n"
_MOVIES_1M = ("1::Toy Story (1995)::Animation|Children's|Comedy\n"
              "2::Misérables, Les (1995)::Drama|Musical\n"
              "3::Café au Lait (1993)::Comedy\n").encode("latin-1")
_RATINGS_1M = (
    "1::1::5::978300760\n"
    "1::2::3::978300760\n"  # same second as line 1: not its past
    "1::3::4::978300800\n"
    "2::1::1::978300000\n"
    "2::3::5::978400000\n"
    "3::2::2::978300100\n")
_USERS_100K = "1|24|M|technician|85711\n2|53|F|other|94043\n3|7|M|student|T8H1N\n"
_RATINGS_100K = "1\t1\t5\t100\n2\t2\t3\t200\n1\t2\t4\t300\n3\t1\t1\t400\n"


def _flags(*genres):
  return "|".join("1" if g in genres else "0" for g in movielens.GENRES)


_MOVIES_100K = (
    f"1|Toy Story (1995)|01-Jan-1995||http://x|{_flags('Animation', 'Comedy')}\n"
    f"2|Café (1996)|||http://y|{_flags('unknown')}\n").encode("latin-1")


def _write(directory, files):
  os.makedirs(directory, exist_ok=True)
  for name, content in files.items():
    with open(os.path.join(directory, name), "wb") as f:
      f.write(content if isinstance(content, bytes) else content.encode())
  return directory


def _files_1m(**override):
  files = {"users.dat": _USERS_1M, "movies.dat": _MOVIES_1M, "ratings.dat": _RATINGS_1M}
  files.update(override)
  return files


def _files_100k(**override):
  files = {"u.user": _USERS_100K, "u.item": _MOVIES_100K, "u.data": _RATINGS_100K}
  files.update({k.replace("_", "."): v for k, v in override.items()})
  return files


def _expected_seq(ds, row):
  """Items / actions of the user's strictly-earlier rows, newest first."""
  lo, hi = ds.user_start(np.array([row]))[0], row + 1
  ts = np.asarray(ds["ts"][lo:hi])
  earlier = np.flatnonzero(ts < ts[-1])[::-1][:ds.schema.seq_len] + lo
  pad = ds.schema.seq_len - len(earlier)
  return (np.pad(ds["item"][earlier], (0, pad)), np.pad(ds["action"][earlier],
                                                        (0, pad)))


def _check_seq(test, ds, rows):
  for row in rows:
    items, actions = _expected_seq(ds, row)
    np.testing.assert_array_equal(ds["seq_item"][row], items, err_msg=f"row {row}")
    np.testing.assert_array_equal(ds["seq_action"][row], actions)
    n_earlier = int((actions > 0).sum())
    log_count = ds["dense"][row, ds.schema.dense.index("log_earlier_count")]
    if n_earlier < ds.schema.seq_len:
      test.assertAlmostEqual(float(log_count), np.log1p(n_earlier), places=5)


def _check_movie_aggregates(test, ds, rows):
  """The movie's count / mean rating / like rate over every user's ratings of
  it at a strictly earlier second (brute force), as the dense columns."""
  col = lambda name: np.asarray(ds["dense"][:, ds.schema.dense.index(name)])
  item, ts, rating = (np.asarray(ds[n][:]) for n in ("item", "ts", "action"))
  for row in rows:
    past = rating[(item == item[row]) & (ts < ts[row])]
    want = ((np.log1p(len(past)), past.mean() - 3.5,
             (past >= 4).mean() - 0.5) if len(past) else (0.0, 0.0, 0.0))
    got = [
        col(n)[row] for n in ("log_movie_earlier_count", "movie_earlier_mean_rating",
                              "movie_earlier_like_rate")
    ]
    np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"row {row}")


class SmallFilesTest(absltest.TestCase):
  """The parsers and features on small files written here."""

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path

  def test_ml1m_parser(self):
    data = _write(os.path.join(self.tmp, "data"), _files_1m())
    ds = dataset.Dataset(movielens.build(data, os.path.join(self.tmp, "out"), 4))
    s = ds.schema
    self.assertEqual(s.dataset, "movielens-1m")
    self.assertEqual((s.num_rows, s.num_users), (6, 3))
    self.assertEqual(set(s.sources), {"ratings.dat", "users.dat", "movies.dat"})
    np.testing.assert_array_equal(ds["uid"], [1, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(ds["ts"][:3], [978300760, 978300760, 978300800])
    cat = {f.name: ds["cat"][:, i] for i, f in enumerate(s.categorical)}
    for f in s.categorical:
      self.assertTrue(((cat[f.name] >= 0) & (cat[f.name] < f.vocab_size)).all())
    # Latin-1 titles: the year comes out of "Misérables, Les (1995)".
    rows_movie2 = np.flatnonzero(ds["action"][:] == 3)  # user 1 rated movie 2: 3
    self.assertEqual(cat["release_year"][rows_movie2[0]], cat["release_year"][0])
    genre = lambda name: movielens.GENRES.index(name) + 1
    self.assertEqual(ds["category"][rows_movie2[0]], genre("Drama"))
    np.testing.assert_array_equal(
        ds["mh_genres"][np.flatnonzero(ds["action"][:] == 1)[0]],
        [genre("Animation"),
         genre("Children's"),
         genre("Comedy"), 0, 0, 0])
    self.assertEqual(cat["gender"][0], 2)  # F
    self.assertEqual(cat["age"][-1], movielens.AGE_CODES.index(25) + 1)
    self.assertEqual(cat["occupation"][-1], 16)  # code 15
    np.testing.assert_array_equal(ds["labels"][:, 0], ds["action"][:] >= 4)
    np.testing.assert_array_equal(ds["labels"][:, 1], ds["action"][:] == 5)
    # The two ratings at the same second have no past; the third sees both.
    np.testing.assert_array_equal(ds["seq_action"][:2], 0)
    self.assertCountEqual(ds["seq_action"][2, :2], [5, 3])
    self.assertEqual(cat["gap"][0], 1)
    _check_seq(self, ds, range(6))
    ins = hashing.ins_ids([3], [978300100], [2], [6])
    self.assertEqual(ds["ins_id"][5], ins[0])

  def test_movie_aggregates_are_strictly_earlier(self):
    # User 3 rates movie 1 at the second user 1 does (line 1): neither is the
    # other's past; user 2's earlier rating of movie 1 is both's.
    data = _write(os.path.join(self.tmp, "data"),
                  _files_1m(**{"ratings.dat": _RATINGS_1M + "3::1::4::978300760\n"}))
    ds = dataset.Dataset(movielens.build(data, os.path.join(self.tmp, "out"), 4))
    _check_movie_aggregates(self, ds, range(ds.schema.num_rows))
    tied = np.flatnonzero((ds["item"][:] == 1) & (ds["ts"][:] == 978300760))
    self.assertLen(tied, 2)
    mean = ds["dense"][tied, ds.schema.dense.index("movie_earlier_mean_rating")]
    np.testing.assert_allclose(mean, [1 - 3.5] * 2)

  def test_ml100k_parser(self):
    data = _write(os.path.join(self.tmp, "data"), _files_100k())
    ds = dataset.Dataset(movielens.build(data, os.path.join(self.tmp, "out"), 3))
    self.assertEqual(ds.schema.dataset, "movielens-100k")
    np.testing.assert_array_equal(ds["uid"], [1, 1, 2, 3])
    np.testing.assert_array_equal(ds["action"], [5, 4, 3, 1])
    age = ds.schema.categorical_index("age")
    # Ages 24, 53, 7 -> ML-1M buckets 18-24, 50-55, under 18.
    np.testing.assert_array_equal(ds["cat"][:, age], [2, 2, 6, 1])
    self.assertEqual(ds["category"][1], 1)  # genre "unknown" is a real genre
    _check_seq(self, ds, range(4))

  def test_rebuild_is_noop(self):
    data = _write(os.path.join(self.tmp, "data"), _files_1m())
    out = os.path.join(self.tmp, "out")
    movielens.build(data, out, 4)
    mtime = os.stat(os.path.join(out, "schema.json")).st_mtime_ns
    movielens.build(data, out, 4)
    self.assertEqual(os.stat(os.path.join(out, "schema.json")).st_mtime_ns, mtime)
    movielens.build(data, out, 5)  # another seq_len is another dataset
    self.assertEqual(dataset.Dataset(out).schema.seq_len, 5)


_BAD_1M = ("ratings.dat", "users.dat", "movies.dat")


class BadInputTest(parameterized.TestCase):
  """Each bad input raises errors.DataError naming file and line; nothing is written."""

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    self.data = os.path.join(self.tmp, "data")
    self.out = os.path.join(self.tmp, "out")

  def assert_fails(self, files, *expected):
    """Writes `files` (unless None) as the data dir, builds, checks the error."""
    if files is not None:
      shutil.rmtree(self.data, ignore_errors=True)
      _write(self.data, files)
    with self.assertRaises(errors.DataError) as cm:
      movielens.build(self.data, self.out, 4)
    for text in expected:
      self.assertIn(text, str(cm.exception))
    self.assertEqual(os.listdir(self.tmp), ["data"])  # no dataset, no temp dir
    return str(cm.exception)

  @parameterized.named_parameters(
      ("field_count", "1\t1\t5\t100\n1\t2\t4\n", "line 2", "expected 4 fields"),
      ("extra_field", "1\t1\t5\t100\t7\n", "line 1", "got 5"),
      ("non_numeric", "1\t1\t5\t100\nx2\t2\t3\t200\n", "line 2", "'x2'"),
      ("negative", "1\t1\t5\t100\n2\t-2\t3\t200\n", "line 2", "'-2'"),
      ("empty_field", "1\t1\t5\t100\n2\t\t3\t200\n", "line 2", "movie id ''"),
      ("rating_0", "1\t1\t5\t100\n2\t2\t0\t200\n", "line 2", "rating 0 outside 1..5"),
      ("rating_6", "1\t1\t6\t100\n", "line 1", "rating 6 outside 1..5"),
      ("blank_line", "1\t1\t5\t100\n\n2\t2\t3\t200\n", "line 2", "got 1"),
      ("empty", "", "empty ratings file"),
      ("duplicate", "1\t1\t5\t100\n2\t2\t3\t200\n1\t1\t4\t100\n1\t1\t4\t100\n",
       "2 duplicate rating lines", "line 1 and line 3"),
      ("unknown_user", "1\t1\t5\t100\n9\t2\t3\t200\n", "line 2", "unknown user 9"),
      ("unknown_movie", "1\t1\t5\t100\n2\t7\t3\t200\n", "line 2", "unknown movie 7"),
  )
  def test_bad_ratings_100k(self, ratings, *expected):
    self.assert_fails(_files_100k(u_data=ratings), "u.data", *expected)

  def test_bad_encoding(self):
    bad = b"1\t1\t5\t100\n2\t2\t3\t200\n3\t\xe9\t1\t1\n"
    self.assert_fails(_files_100k(u_data=bad), "u.data, line 3", "bad encoding", "0xe9")
    self.assert_fails(_files_1m(**{"ratings.dat": b"1::1::5::1\n\xff\n"}),
                      "ratings.dat, line 2", "bad encoding")
    self.assert_fails(_files_100k(u_user=b"1|24|M|technician|85711\n2|5\xff|F|x|1\n"),
                      "u.user, line 2", "bad encoding")

  @parameterized.named_parameters(
      ("lone_colon", "1::1::5::100\n1::2:3::200\n", "line 2"),
      ("tab", "1::1::5::100\n1::2\t3::4::200\n", "line 2"),
      ("field_count", "1::1::5\n", "line 1", "expected 4 fields"),
      ("duplicate", "1::1::5::100\n1::1::5::100\n", "1 duplicate", "line 1 and line 2"),
  )
  def test_bad_ratings_1m(self, ratings, *expected):
    self.assert_fails(_files_1m(**{"ratings.dat": ratings}), "ratings.dat", *expected)

  def test_bad_users_and_movies(self):
    twice = "1::F::1::10::48067\n1::M::18::1::1\n"
    self.assert_fails(_files_1m(**{"users.dat": twice}), "users.dat, line 2",
                      "already listed on line 1")
    self.assert_fails(_files_1m(**{"users.dat": "1::F::2::10::48067\n"}),
                      "users.dat, line 1", "age code 2")
    self.assert_fails(_files_1m(**{"movies.dat": "1::A (1990)::Noir\n"}),
                      "movies.dat, line 1", "unknown genre 'Noir'")
    self.assert_fails(_files_100k(u_item="1|A|01-Jan-1995||u|" + "0|" * 18 + "2\n"),
                      "u.item, line 1", "genre flag '2'")

  def test_missing_file(self):
    message = self.assert_fails({}, "u.data", "ratings.dat", self.data)
    self.assertIn("--download", message)
    os.remove(os.path.join(_write(self.data, _files_100k()), "u.item"))
    self.assert_fails(None, "missing file u.item", self.data)

  def test_source_check_names_the_data_dir(self):
    check = lambda d: movielens.validate_config(ml_collections.ConfigDict(dict(dir=d)))
    with self.assertRaisesWithLiteralMatch(
        errors.ConfigError, "--config.data.dir: required for data.source=movielens"):
      check("")
    with self.assertRaisesRegex(errors.ConfigError,
                                "^--config.data.dir: .* is not a directory"):
      check(os.path.join(self.tmp, "nowhere"))
    os.makedirs(self.data)
    with self.assertRaisesRegex(errors.ConfigError,
                                "^--config.data.dir: no MovieLens ratings file"):
      check(self.data)
    check(_write(self.data, _files_100k()))

  def test_bad_rebuild_keeps_previous_dataset(self):
    movielens.build(_write(self.data, _files_1m()), self.out, 4)
    before = np.asarray(dataset.Dataset(self.out)["ins_id"]).copy()
    _write(self.data, {"ratings.dat": _RATINGS_1M + "2::1::9::5\n"})
    with self.assertRaisesRegex(errors.DataError, "ratings.dat, line 7"):
      movielens.build(self.data, self.out, 4)
    self.assertCountEqual(os.listdir(self.tmp), ["data", "out"])
    ds = dataset.Dataset(self.out)
    self.assertEqual(ds.num_rows, 6)
    np.testing.assert_array_equal(ds["ins_id"], before)


@absltest.skipUnless(os.path.isfile(os.path.join(ML100K_DIR, "u.data")),
                     f"ML-100K not found at {ML100K_DIR}")
class MovieLens100KTest(absltest.TestCase):
  """The real ML-100K files."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tmp = tempfile.TemporaryDirectory()
    cls.ds = dataset.Dataset(movielens.build(ML100K_DIR, cls.tmp.name + "/ds", 20))
    raw = np.loadtxt(os.path.join(ML100K_DIR, "u.data"), dtype=np.int64)
    line = np.arange(1, len(raw) + 1)
    ins = hashing.ins_ids(raw[:, 0], raw[:, 3], raw[:, 1], line)
    cls.raw = raw[np.lexsort((ins, raw[:, 3], raw[:, 0]))]
    cls.raw_ins = np.sort(ins)

  @classmethod
  def tearDownClass(cls):
    cls.tmp.cleanup()
    super().tearDownClass()

  def test_counts(self):
    s = self.ds.schema
    self.assertEqual((s.num_rows, s.num_users), (100_000, 943))
    self.assertEqual(s.split_sizes, (80_000, 10_000, 10_000))
    self.assertLen(np.unique(self.raw[:, 1]), 1682)
    self.assertLen(s.sources["u.data"], 64)

  def test_rows_match_raw_file(self):
    np.testing.assert_array_equal(self.ds["uid"], self.raw[:, 0])
    np.testing.assert_array_equal(self.ds["ts"], self.raw[:, 3])
    np.testing.assert_array_equal(self.ds["action"], self.raw[:, 2])
    np.testing.assert_array_equal(np.sort(self.ds["ins_id"]), self.raw_ins)
    # One hashed id per movie, and no movie lost.
    pairs = np.unique(np.stack([self.raw[:, 1], self.ds["item"]], 1), axis=0)
    self.assertLen(pairs, 1682)

  def test_labels(self):
    rating = self.raw[:, 2]
    np.testing.assert_array_equal(self.ds["labels"][:, 0], rating >= 4)
    np.testing.assert_array_equal(self.ds["labels"][:, 1], rating == 5)

  def test_sequences(self):
    ts = np.asarray(self.ds["ts"])
    uid = np.asarray(self.ds["uid"])
    ties = np.flatnonzero((ts[1:] == ts[:-1]) & (uid[1:] == uid[:-1]))
    rows = np.concatenate([[0, 1, 57, 99_999], ties[:5], ties[:5] + 1,
                           np.random.default_rng(0).integers(0, 100_000, 40)])
    _check_seq(self, self.ds, rows)
    _check_movie_aggregates(self, self.ds, rows)

  def test_splits_are_temporal(self):
    split, ts = np.asarray(self.ds["split"]), np.asarray(self.ds["ts"])
    self.assertLessEqual(ts[split == 0].max(), ts[split == 1].min())
    self.assertLessEqual(ts[split == 1].max(), ts[split == 2].min())


@absltest.skipUnless(os.path.isfile(os.path.join(ML1M_DIR, "ratings.dat")),
                     f"ML-1M subset not found at {ML1M_DIR}")
class MovieLens1MSubsetTest(absltest.TestCase):

  def test_counts(self):
    out = self.create_tempdir().full_path + "/ds"
    s = dataset.Dataset(movielens.build(ML1M_DIR, out, 4)).schema
    self.assertEqual(s.dataset, "movielens-1m")
    self.assertEqual((s.num_rows, s.num_users), (487_650, 2_999))


class DownloadTest(absltest.TestCase):

  @pytest.mark.slow
  def test_command_offline_names_url(self):
    tmp = self.create_tempdir().full_path
    data_dir = os.path.join(tmp, "ml")
    proc = subprocess.run([
        sys.executable, "-m", "iat_jax.data.movielens", "--download=ml-100k",
        f"--data_dir={data_dir}", "--timeout=10"
    ],
                          cwd=_REPO,
                          capture_output=True,
                          text=True,
                          timeout=60)
    if proc.returncode == 0:  # network available: the files must be there
      self.assertTrue(os.path.isfile(os.path.join(data_dir, "u.data")))
      return
    self.assertIn(movielens.ARCHIVES["ml-100k"][0], proc.stderr)
    self.assertIn("network is unreachable", proc.stderr)
    self.assertIn(data_dir, proc.stderr)
    self.assertEqual(os.listdir(tmp), [])

  def test_unreachable_server(self):
    tmp = self.create_tempdir().full_path
    url = "http://127.0.0.1:9/ml-100k.zip"  # discard port: connection refused
    with self.assertRaisesRegex(errors.DownloadError, "127.0.0.1:9/ml-100k.zip"):
      download.download(url, os.path.join(tmp, "ml"), "u.data", timeout=5)
    self.assertEqual(os.listdir(tmp), [])


if __name__ == "__main__":
  absltest.main()
