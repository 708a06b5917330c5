"""Tests of the KuaiRand-Pure adapter (`iat_jax.data.kuairand`).

The real KuaiRand files are never copied into the repo: the count test reads
the 04-25..05-08 extract from ../shared/data (or $IAT_KUAIRAND) and is skipped
when absent; every derived dataset goes to a temporary directory. All other
tests write their own small file sets. The file is long (~490 lines) because
every validation rule of the adapter has its bad-input case here.
"""

import importlib.util
import os
import subprocess
import sys
import tarfile

from absl.testing import absltest
from absl.testing import parameterized
import ml_collections
import numpy as np
import pytest

from iat_jax import errors
from iat_jax.data import dataset
from iat_jax.data import download
from iat_jax.data import kuairand
from iat_jax.data import sources

_REPO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
KUAIRAND_DIR = os.environ.get(
    "IAT_KUAIRAND",
    os.path.join(_REPO, "..", "shared", "data", "kuairand-pure-0425-0508"))
_LOG = "log_standard_4_25_to_5_08_pure.csv"
_T0 = 1650812741436  # 2022-04-25 (a Monday) 23:05:41 +08:00, in ms


def _user_row(uid, degree="full_active", fans="[100,1k)", feat4="1.0"):
  profile = [
      degree, "0", "-124", "1", "514", "500+", "150", fans, "34", "[30,60)", "799",
      "730+"
  ]
  onehot = [
      "1", "1", "29", "949", feat4, "0", "0", "14", "135", "6", "3", "0", "0.0", "1.0",
      "0.0", "0.0", "0.0", "0.0"
  ]
  return ",".join([str(uid)] + [f'"{v}"' if "," in v else v for v in profile + onehot])


_USERS = "\n".join([
    ",".join(kuairand.USER_COLUMNS),
    _user_row(0),
    _user_row(1, "high_active", "[1,10)", ""),
    _user_row(5, "low_active", "0", "3.0")
]) + "\n"
_VIDEOS = ",".join(kuairand.VIDEO_COLUMNS) + "\n" + (
    "0,7349781,NORMAL,2022-04-10,LongImport,0.0,87433.0,720.0,1280.0,91,9.0,39\n"
    '1,2103883,AD,2022-04-09,Kmovie,0.0,,720.0,1280.0,63,,"2,39"\n'
    "2,7349781,NORMAL,,Web,0.0,9233.0,720.0,1280.0,66,4.0,\n")


def _log_row(user,
             video,
             dt_ms=0,
             *,
             click=0,
             like=0,
             follow=0,
             long_view=0,
             play=0,
             duration=8000,
             tab=1,
             date=20220425,
             hourmin=2300):
  """One log line; time = _T0 + dt_ms; outcome columns as given."""
  values = dict(user_id=user,
                video_id=video,
                date=date,
                hourmin=hourmin,
                time_ms=_T0 + dt_ms,
                is_click=click,
                is_like=like,
                is_follow=follow,
                is_comment=0,
                is_forward=0,
                is_hate=0,
                long_view=long_view,
                play_time_ms=play,
                duration_ms=duration,
                profile_stay_time=0,
                comment_stay_time=0,
                is_profile_enter=0,
                is_rand=0,
                tab=tab)
  return ",".join(str(values[c]) for c in kuairand.LOG_COLUMNS)


_ROWS = [
    _log_row(0, 0, 0, click=1, long_view=1, play=60000),
    _log_row(0, 1, 400, click=1, like=1),  # same second as the first: a tie
    _log_row(0, 2, 5000, tab=3),
    _log_row(0, 0, 3_600_000, click=1, date=20220426, hourmin=0),
    _log_row(1, 1, 100, long_view=1),
    _log_row(1, 2, 7000, click=1),
    _log_row(1, 2, 7000, click=1),  # exact duplicate of the line above: dropped
    _log_row(1, 2, 7000, click=0),  # same user, video, time; other outcome: kept
    _log_row(5, 0, 2000, tab=0),
    _log_row(5, 1, 90_000, click=1, like=1, follow=1),
]


def _header():
  return ",".join(kuairand.LOG_COLUMNS)


def _log(rows):
  return "\n".join([_header()] + list(rows)) + "\n"


def _write(directory, files):
  os.makedirs(directory, exist_ok=True)
  for name, content in files.items():
    with open(os.path.join(directory, name), "wb") as f:
      f.write(content if isinstance(content, bytes) else content.encode())
  return directory


def _files(rows=_ROWS, **override):
  files = {kuairand.USERS_FILE: _USERS, kuairand.VIDEOS_FILE: _VIDEOS, _LOG: _log(rows)}
  files.update(override)
  return files


def _cat(ds, name):
  return np.asarray(ds["cat"][:, ds.schema.categorical_index(name)])


def _row(ds, user, video, dt_ms=None):
  """The one row of `user` watching raw `video` (at _T0 + dt_ms, if given)."""
  hit = (np.asarray(ds["uid"]) == user) & (np.asarray(ds["item"]) == video + 1)
  if dt_ms is not None:
    hit &= np.asarray(ds["ts"]) == (_T0 + dt_ms) // 1000
  (row,) = np.flatnonzero(hit)
  return int(row)


def _check_seq(test, ds, rows):
  """seq_* of each row = its user's strictly-earlier rows, newest first."""
  for row in rows:
    lo = ds.user_start(np.array([row]))[0]
    ts = np.asarray(ds["ts"][lo:row + 1])
    earlier = np.flatnonzero(ts < ts[-1])[::-1][:ds.schema.seq_len] + lo
    pad = ds.schema.seq_len - len(earlier)
    for name in ("item", "category", "action"):
      np.testing.assert_array_equal(ds[f"seq_{name}"][row],
                                    np.pad(ds[name][earlier], (0, pad)),
                                    err_msg=f"row {row} seq_{name}")
    if len(earlier) < ds.schema.seq_len:
      dense = ds["dense"][row, ds.schema.dense.index("log_earlier_count")]
      test.assertAlmostEqual(float(dense), np.log1p(len(earlier)), places=5)


class SmallFilesTest(absltest.TestCase):
  """Parsing, features and policies on small files written here."""

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    self.data = _write(os.path.join(self.tmp, "data"), _files())

  def build(self, data=None, seq_len=4):
    out = os.path.join(self.tmp, "out")
    return dataset.Dataset(kuairand.build(data or self.data, out, seq_len))

  def test_parse(self):
    ds = self.build()
    s = ds.schema
    self.assertEqual(s.dataset, "kuairand-pure")
    self.assertEqual(s.tasks, ("is_click", "long_view", "is_like"))
    self.assertEqual((s.num_rows, s.num_users), (9, 3))
    self.assertEqual(set(s.sources), {_LOG, kuairand.USERS_FILE, kuairand.VIDEOS_FILE})
    np.testing.assert_array_equal(ds["uid"], [0, 0, 0, 0, 1, 1, 1, 5, 5])
    np.testing.assert_array_equal(ds["ts"][:4],
                                  (_T0 + np.array([0, 400, 5000, 3_600_000])) // 1000)
    for i, f in enumerate(s.categorical):
      col = ds["cat"][:, i]
      self.assertTrue(((col >= 0) & (col < f.vocab_size)).all(), f.name)
    cat = lambda name, user, video, dt=None: _cat(ds, name)[_row(ds, user, video, dt)]
    # User 0 watches video 0 on Monday 2022-04-25, 23h, tab 1, then on 04-26 0h.
    self.assertEqual(cat("user_id", 0, 0, 0), 1)
    self.assertEqual(cat("video_id", 0, 0, 0), 1)
    self.assertEqual(cat("weekday", 0, 0, 0), 1)
    self.assertEqual(cat("hour", 0, 0, 0), 24)
    self.assertEqual(cat("tab", 0, 0, 0), 2)
    self.assertEqual(cat("upload_age", 0, 0, 0), 15 + 2)  # uploaded 04-10
    self.assertEqual(cat("weekday", 0, 0, 3_600_000), 2)
    self.assertEqual(cat("hour", 0, 0, 3_600_000), 1)
    self.assertEqual(cat("tab", 0, 2), 4)
    # Videos 0 and 2 share an author; video 2 has no upload date and no tag.
    self.assertEqual(cat("author_id", 0, 0, 0), cat("author_id", 0, 2))
    self.assertNotEqual(cat("author_id", 0, 0, 0), cat("author_id", 0, 1))
    self.assertEqual(cat("upload_age", 0, 2), 0)
    self.assertEqual(cat("first_tag", 0, 2), 0)
    self.assertEqual(cat("first_tag", 0, 1), 3)  # tags "2,39"
    np.testing.assert_array_equal(ds["mh_tags"][_row(ds, 0, 1)], [3, 40, 0, 0])
    np.testing.assert_array_equal(ds["category"], _cat(ds, "first_tag"))
    self.assertEqual(cat("video_type", 0, 1), 1)  # AD < NORMAL
    # Video 1 has no video_duration: the log's duration_ms (8 s) stands in.
    np.testing.assert_allclose(ds["dense"][_row(ds, 0, 1),
                                           s.dense.index("log_duration_s")],
                               np.log1p(8.0),
                               rtol=1e-6)
    # Profile fields: quoted ranges parse; "" is missing; "1.0" != "3.0".
    fans = _cat(ds, "fans_user_num_range")
    self.assertEqual(len({fans[0], fans[4], fans[7]}), 3)
    feat4 = _cat(ds, "onehot_feat4")
    self.assertEqual(feat4[4], 0)
    self.assertNotEqual(feat4[0], feat4[7])
    self.assertGreater(feat4[0], 0)
    # Labels (is_click, long_view, is_like) and actions.
    np.testing.assert_array_equal(ds["labels"][_row(ds, 0, 0, 0)], [1, 1, 0])
    np.testing.assert_array_equal(ds["labels"][_row(ds, 0, 1)], [1, 0, 1])
    self.assertEqual(ds["action"][_row(ds, 0, 0, 0)], 1 + 1 + 2)
    self.assertEqual(ds["action"][_row(ds, 0, 1)], 1 + 1 + 4)
    self.assertEqual(ds["action"][_row(ds, 0, 2)], 1)
    self.assertEqual(ds["action"][_row(ds, 5, 1)], 1 + 1 + 4 + 8)  # + follow

  def test_history_is_strictly_earlier(self):
    ds = self.build()
    # User 0's first two rows share a second: neither is the other's past.
    tie = [_row(ds, 0, 0, 0), _row(ds, 0, 1)]
    np.testing.assert_array_equal(ds["seq_item"][tie], 0)
    np.testing.assert_array_equal(_cat(ds, "earlier_count")[tie], 1)
    np.testing.assert_array_equal(_cat(ds, "gap")[tie], 1)
    third, fourth = _row(ds, 0, 2), _row(ds, 0, 0, 3_600_000)
    self.assertCountEqual(ds["seq_item"][third, :2], [1, 2])
    self.assertEqual(ds["seq_item"][fourth, 0], 3)
    self.assertCountEqual(ds["seq_item"][fourth, 1:3], [1, 2])
    rates = ds["dense"][:, [
        ds.schema.dense.index(f"earlier_{t}_rate")
        for t in ("click", "long_view", "like")
    ]]
    np.testing.assert_allclose(rates[tie], 0)
    np.testing.assert_allclose(rates[third], [1.0, 0.5, 0.5])
    np.testing.assert_allclose(rates[fourth], [2 / 3, 1 / 3, 1 / 3], rtol=1e-6)
    self.assertEqual(_cat(ds, "earlier_clicks")[fourth], 2)  # log2(1 + 2) + 1
    # User 1's two rows at 7000 ms are ties of each other.
    twins = np.flatnonzero((np.asarray(ds["uid"]) == 1) & (np.asarray(ds["item"]) == 3))
    np.testing.assert_array_equal(ds["seq_item"][twins, 1:], 0)
    np.testing.assert_array_equal(ds["seq_item"][twins, 0], 2)
    _check_seq(self, ds, range(ds.num_rows))

  def test_duplicates_policy(self):
    ds = self.build()
    self.assertEqual(ds.num_rows, len(_ROWS) - 1)  # one exact repeat dropped
    user1 = np.asarray(ds["uid"]) == 1
    # The two kept rows at the same (user, video, time) differ in is_click.
    np.testing.assert_array_equal(np.sort(ds["labels"][user1, 0]), [0, 0, 1])
    self.assertLen(np.unique(ds["ins_id"]), ds.num_rows)

  def test_multiple_log_files(self):
    one = self.build()
    ins, cat, labels = (np.asarray(one[k]).copy() for k in ("ins_id", "cat", "labels"))
    split = self.create_tempdir().full_path
    # Two files in sorted-name order; the first line of b repeats the last of a.
    files = _files(**{_LOG: None})
    del files[_LOG]
    files["log_standard_4_08_to_4_21_pure.csv"] = _log(_ROWS[:5])
    files["log_standard_4_22_to_5_08_pure.csv"] = _log(_ROWS[4:])
    files["log_random_4_22_to_5_08_pure.csv"] = _log(_ROWS[:1])  # not read
    two = dataset.Dataset(
        kuairand.build(_write(split, files), os.path.join(split, "out"), 4))
    self.assertEqual(two.num_rows, one.num_rows)
    self.assertCountEqual(two.schema.sources, [
        "log_standard_4_08_to_4_21_pure.csv", "log_standard_4_22_to_5_08_pure.csv",
        kuairand.USERS_FILE, kuairand.VIDEOS_FILE
    ])
    np.testing.assert_array_equal(two["ins_id"], ins)
    np.testing.assert_array_equal(two["cat"], cat)
    np.testing.assert_array_equal(two["labels"], labels)

  def test_outcomes_never_feed_their_own_row(self):
    """Perturbing one row's outcome columns changes only its labels / action
    and the features of that user's strictly later rows."""
    base = self.build()
    feature_cols = base.feature_columns()
    kept = feature_cols + ("ins_id", "ts", "uid")
    ref = {k: np.asarray(base[k]).copy() for k in kept}
    rng = np.random.default_rng(0)
    outcome_idx = [kuairand.LOG_COLUMNS.index(c) for c in kuairand.OUTCOME_COLUMNS]
    for line in (0, 1, 4, 7, 9):  # includes a tie row and a repeat's twin
      fields = _ROWS[line].split(",")
      for k in outcome_idx:
        name = kuairand.LOG_COLUMNS[k]
        fields[k] = str(1 - int(fields[k]) if name.startswith("is_") or name ==
                        "long_view" else int(rng.integers(1, 10**6)))
      rows = list(_ROWS)
      rows[line] = ",".join(fields)
      _write(self.data, {_LOG: _log(rows)})
      ds = self.build()
      np.testing.assert_array_equal(ds["ins_id"], ref["ins_id"])
      user, time_ms = int(fields[0]), int(fields[4])
      later = (ref["uid"] == user) & (ref["ts"] > time_ms // 1000)
      changed = np.zeros(ds.num_rows, dtype=bool)
      for k in feature_cols:
        diff = np.asarray(ds[k]) != ref[k]
        changed |= diff.reshape(ds.num_rows, -1).any(axis=1)
      self.assertFalse((changed & ~later).any(),
                       f"line {line}: rows {np.flatnonzero(changed & ~later)} "
                       f"changed features")
      self.assertTrue(changed[later].all(), f"line {line}: later rows unchanged")

  def test_rebuild_is_noop(self):
    out = os.path.join(self.tmp, "out")
    kuairand.build(self.data, out, 4)
    mtime = os.stat(os.path.join(out, "schema.json")).st_mtime_ns
    kuairand.build(self.data, out, 4)
    self.assertEqual(os.stat(os.path.join(out, "schema.json")).st_mtime_ns, mtime)
    kuairand.build(self.data, out, 5)  # another seq_len is another dataset
    self.assertEqual(dataset.Dataset(out).schema.seq_len, 5)

  def test_registered_source(self):
    src = sources.get("kuairand")
    data = ml_collections.ConfigDict(dict(dir=self.data, seq_len=3))
    src.validate(data)
    self.assertEqual(src.subdir(data), "data")
    out = src.build(data, os.path.join(self.tmp, "reg"), 0)
    self.assertEqual(dataset.Dataset(out).schema.seq_len, 3)
    with self.assertRaisesRegex(errors.ConfigError, "^--config.data.dir: required"):
      src.validate(ml_collections.ConfigDict(dict(dir="", seq_len=3)))
    with self.assertRaisesRegex(errors.ConfigError,
                                "^--config.data.dir: no KuaiRand log in "):
      src.validate(ml_collections.ConfigDict(dict(dir=self.tmp, seq_len=3)))

  def test_config_names_the_source(self):
    spec = importlib.util.spec_from_file_location(
        "kuairand_config", os.path.join(_REPO, "experiments", "configs", "kuairand.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for arg in (None, "runlocal"):
      c = module.get_config(arg)
      self.assertIs(sources.get(c.data.source), sources.get("kuairand"))
      self.assertLessEqual(c.model.hist_len, c.data.seq_len)


class BadInputTest(parameterized.TestCase):
  """Each bad input raises errors.DataError naming file and line; nothing is written."""

  def setUp(self):
    super().setUp()
    self.tmp = self.create_tempdir().full_path
    self.data = os.path.join(self.tmp, "data")
    self.out = os.path.join(self.tmp, "out")

  def assert_fails(self, files, *expected):
    _write(self.data, files)
    with self.assertRaises(errors.DataError) as cm:
      kuairand.build(self.data, self.out, 4)
    for text in expected:
      self.assertIn(text, str(cm.exception))
    self.assertEqual(os.listdir(self.tmp), ["data"])  # no dataset, no temp dir
    return str(cm.exception)

  @parameterized.named_parameters(
      ("field_count", _ROWS[0] + ",7", "line 3", "got 20"),
      ("short", _ROWS[0].rsplit(",", 1)[0], "line 3", "got 18"),
      ("non_numeric", _ROWS[0].replace(
          "1650812741436", "1650812741x36"), "line 3", "time_ms '1650812741x36'"),
      ("negative", "-" + _ROWS[0], "line 3", "user_id '-0'"),
      ("float", _ROWS[0].replace(",8000,",
                                 ",8000.0,"), "line 3", "duration_ms '8000.0'"),
      ("empty_field", _ROWS[0].replace(",8000,", ",,"), "line 3", "duration_ms ''"),
      ("blank_line", "", "line 3", "got 1"),
      ("not_binary", _log_row(0, 0, click=2), "line 3", "is_click 2 is not 0 or 1"),
      ("tab", _log_row(0, 0, tab=15), "line 3", "tab 15 is outside 0..14"),
      ("hourmin", _log_row(0, 0, hourmin=2460), "line 3", "hourmin 2460"),
      ("date", _log_row(0, 0, date=20220231), "line 3", "date 20220231"),
      ("unknown_user", _log_row(3, 0), "line 3", "unknown user 3"),
      ("unknown_video", _log_row(0, 9), "line 3", "unknown video 9"),
      ("non_ascii", _ROWS[0] + "\u00e9", "line 3"),
  )
  def test_bad_log_row(self, bad, *expected):
    rows = [_ROWS[0], bad] + _ROWS[1:]
    self.assert_fails(_files(rows), _LOG, *expected)

  def test_bad_header_and_empty_log(self):
    self.assert_fails(_files(**{_LOG: _log(_ROWS).replace("tab", "page", 1)}), _LOG,
                      "line 1", "header")
    self.assert_fails(_files(**{_LOG: _header() + "\n\n"}), _LOG, "empty log")

  def test_error_names_the_right_file(self):
    files = _files()
    files["log_standard_4_26_pure.csv"] = _log([_ROWS[0], _log_row(0, 0, tab=99)])
    self.assert_fails(files, "log_standard_4_26_pure.csv, line 3", "tab 99")

  def test_bad_users_and_videos(self):
    twice = _USERS + _user_row(0) + "\n"
    self.assert_fails(_files(**{kuairand.USERS_FILE: twice}), kuairand.USERS_FILE,
                      "line 5", "already listed on line 2")
    self.assert_fails(
        _files(**{kuairand.USERS_FILE: _USERS.replace('"[1,10)"', "[1,10)")}),
        kuairand.USERS_FILE, "line 3", "expected 31")
    self.assert_fails(_files(**{kuairand.USERS_FILE: _USERS.replace(",3.0,", ",x,")}),
                      kuairand.USERS_FILE, "line 4", "onehot_feat4 'x'")
    for bad, expected in (("2022-04-10", "2022-13-10"), ("87433.0", "long"),
                          ("9.0", "nine"), (",39\n", ",3x\n")):
      videos = _VIDEOS.replace(bad, expected, 1)
      self.assert_fails(_files(**{kuairand.VIDEOS_FILE: videos}), kuairand.VIDEOS_FILE,
                        "line 2", repr(expected.strip(",\n")))

  def test_missing_file(self):
    message = self.assert_fails({}, "log_standard_*_pure.csv", self.data)
    self.assertIn("--download", message)
    os.remove(os.path.join(_write(self.data, _files()), kuairand.VIDEOS_FILE))
    self.assert_fails({}, f"missing file {kuairand.VIDEOS_FILE}")

  def test_bad_rebuild_keeps_previous_dataset(self):
    kuairand.build(_write(self.data, _files()), self.out, 4)
    before = np.asarray(dataset.Dataset(self.out)["ins_id"]).copy()
    _write(self.data, {_LOG: _log(_ROWS + [_log_row(0, 0, like=5)])})
    with self.assertRaisesRegex(errors.DataError, f"{_LOG}, line 12"):
      kuairand.build(self.data, self.out, 4)
    self.assertCountEqual(os.listdir(self.tmp), ["data", "out"])
    np.testing.assert_array_equal(dataset.Dataset(self.out)["ins_id"], before)


class DownloadTest(absltest.TestCase):

  def test_unpacks_tar_archive(self):
    tmp = self.create_tempdir().full_path
    src = _write(os.path.join(tmp, "KuaiRand-Pure", "data"), _files())
    archive = os.path.join(tmp, "KuaiRand-Pure.tar.gz")
    with tarfile.open(archive, "w:gz") as t:
      t.add(os.path.join(tmp, "KuaiRand-Pure"), arcname="KuaiRand-Pure")
    target = os.path.join(tmp, "kr")
    download.download("file://" + archive, target, kuairand.USERS_FILE)
    self.assertCountEqual(os.listdir(target), os.listdir(src))
    self.assertEqual(kuairand.build(target, os.path.join(tmp, "out")),
                     os.path.join(tmp, "out"))

  @pytest.mark.slow
  def test_command_offline_names_url(self):
    self.assertTrue(kuairand.URL.startswith("https://zenodo.org/records/10439422/"))
    tmp = self.create_tempdir().full_path
    data_dir = os.path.join(tmp, "kr")
    url = "http://127.0.0.1:9/KuaiRand-Pure.tar.gz"  # discard port: refused
    proc = subprocess.run([
        sys.executable, "-m", "iat_jax.data.kuairand", "--download", f"--url={url}",
        f"--data_dir={data_dir}", "--timeout=5"
    ],
                          cwd=_REPO,
                          capture_output=True,
                          text=True,
                          timeout=60,
                          env={
                              **os.environ, "PYTHONPATH": _REPO
                          })
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn(url, proc.stderr)
    self.assertIn("tar -xzf KuaiRand-Pure.tar.gz", proc.stderr)
    self.assertIn(data_dir, proc.stderr)
    self.assertEqual(os.listdir(tmp), [])


@absltest.skipUnless(os.path.isfile(os.path.join(KUAIRAND_DIR, _LOG)),
                     f"KuaiRand extract not found at {KUAIRAND_DIR}")
class KuaiRandExtractTest(absltest.TestCase):
  """The real 04-25..05-08 extract (228,329 log rows, 5,460 exact repeats)."""

  def test_counts_and_history(self):
    out = self.create_tempdir().full_path + "/ds"
    ds = dataset.Dataset(kuairand.build(KUAIRAND_DIR, out, 8))
    s = ds.schema
    self.assertEqual((s.num_rows, s.num_users), (222_869, 25_156))
    self.assertEqual(s.split_sizes, (178_295, 22_287, 22_287))
    self.assertLen(np.unique(ds["item"]), 6_361)
    np.testing.assert_allclose(np.asarray(ds["labels"]).mean(0), [0.449, 0.316, 0.0174],
                               atol=1e-3)
    split, ts = np.asarray(ds["split"]), np.asarray(ds["ts"])
    self.assertLessEqual(ts[split == 0].max(), ts[split == 1].min())
    self.assertLessEqual(ts[split == 1].max(), ts[split == 2].min())
    uid = np.asarray(ds["uid"])
    ties = np.flatnonzero((ts[1:] == ts[:-1]) & (uid[1:] == uid[:-1]))
    rows = np.concatenate([[0, 1, s.num_rows - 1], ties[:5], ties[:5] + 1,
                           np.random.default_rng(0).integers(0, s.num_rows, 40)])
    _check_seq(self, ds, rows)


if __name__ == "__main__":
  absltest.main()
