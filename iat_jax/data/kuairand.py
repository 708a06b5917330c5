"""KuaiRand-Pure adapter: the original KuaiRand files -> an instance dataset.

`build(data_dir, out_dir)` reads the KuaiRand-Pure files in `data_dir` (Gao et
al., "KuaiRand: An Unbiased Sequential Recommendation Dataset with Randomly
Exposed Videos", CIKM 2022; Kuaishou short videos) and writes a `dataset`
directory with one instance per (deduplicated) row of the standard-policy log:

  log_standard_*_pure.csv     one or more interaction logs (the full dataset
                              has log_standard_4_08_to_4_21_pure.csv and
                              log_standard_4_22_to_5_08_pure.csv), CSV with
                              the header LOG_COLUMNS, every field a
                              non-negative integer; read in sorted name order
  user_features_pure.csv      one row per user, header USER_COLUMNS
  video_features_basic_pure.csv  one row per video, header VIDEO_COLUMNS
The random-exposure logs (log_random_*) are not read.

Features of the instance (user u is shown video v at time t). Id 0 always
means missing. Users, videos and authors get exact ids (their row in the
users / videos file, their rank among the distinct authors; + 1); every other
categorical string is its rank among the field's distinct non-empty values in
its file + 1:
  categorical
    user_id, the 23 profile fields USER_FIELDS (user_active_degree, the
                  follow / fans / friend / register-days ranges,
                  onehot_feat0..17)
    video_id      exact video id (the behaviour-sequence item field)
    author_id, video_type, upload_type, music_type
    first_tag     first listed tag + 1 (the sequence category field)
    duration      1 + log2(1 + video seconds), the videos file's
                  video_duration, else the log row's duration_ms   vocab 16
    upload_age    2 + days from upload_dt to the request date (1 = uploaded
                  later), capped                                    vocab 64
    tab, hour, weekday  tab + 1 (vocab 16), hour of `hourmin` + 1 (25),
                  weekday of `date` (Monday = 1, vocab 8); local time
    gap           1 = no earlier row, else log2(1 + minutes since the
                  previous one) + 2                                vocab 24
    earlier_count, earlier_clicks, earlier_long_views, earlier_likes
                  log2(1 + count) + 1 over the user's earlier rows  vocab 16
  multi-hot  tags (all tags of v, ids as first_tag), max_len >= 4
  dense      log1p(earlier count), log1p(hours since the previous row), the
             earlier click / long-view / like rates (0 without earlier rows),
             log1p(video seconds)
  tasks      is_click (main), long_view, is_like
  behaviour  item = video_id, category = first_tag, action = 1 + is_click
             + 2 long_view + 4 is_like + 8 (is_follow | is_comment |
             is_forward), vocab 17.
"Earlier" always means a strictly earlier timestamp (seconds) of the same user
(`history.history_end`): rows in the same second are not each other's past.

The outcome rule: a row's outcome columns (OUTCOME_COLUMNS: clicks, likes,
follows, comments, forwards, hates, long views, play and stay times, profile
entries) are never features of its own instance. They enter only its labels,
its `action` (what later rows see in their behaviour sequence) and the earlier
counts / rates of the user's later rows. Changing them changes no feature
column (cat, dense, mh_*, seq_*) of that row, nor its InsID.

InsID = `hashing.ins_ids(uid, ts, video, request_id)` with ts = time_ms //
1000 and request_id = time_ms * 1024 + k, k the row's rank among the kept rows
of the same (user, video, time_ms) in file order (425 such repeats with
different outcomes in the 04-25..05-08 extract).

Validation policy: nothing is written unless every file is valid. Each problem
raises `errors.DataError` naming the file and the 1-based line (line 1 is the
header): a missing file, a wrong header, an empty log, a byte other than a
digit / comma / newline in a log, a wrong number of fields, an empty or
non-numeric field, a 0/1 column outside {0, 1}, a tab outside 0..14, an hourmin
that is not a time of day, a date that is not a yyyymmdd calendar date, a user
or video listed twice, a bad upload_dt / video_duration / music_type / tag, a
log row of a user or video the features files do not list. Duplicates: a log
row equal in all 19 fields to an earlier row (same file or an earlier one in
sorted order) is an exact repeat of the same log record and is dropped, the
first copy kept (5,460 of 228,329 rows in the 04-25..05-08 extract, leaving
222,869); rows that share user, video and time but differ in any outcome are
all kept. Trailing blank lines are ignored; a blank line elsewhere is a
malformed row. A rebuild with unchanged files, seq_len and adapter version is
a no-op.

Download (CC BY-SA 4.0, fetched from the authors' Zenodo record; the archive
also holds the random-exposure logs):
  python -m iat_jax.data.kuairand --download --data_dir=DIR [--out_dir=OUT]

This module is longer than most (~600 lines) on purpose: the description
above is the adapter's specification, and its parsers (with the file:line
checks, half of the code) and features follow it line by line; split, one
format would be spread over several files.
"""

from __future__ import annotations

import csv
import datetime
import glob
import io
import os
import re

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from iat_jax import errors
from iat_jax.data import adapter
from iat_jax.data import hashing
from iat_jax.data import schema as schema_lib

VERSION = "kuairand-adapter-1"
URL = "https://zenodo.org/records/10439422/files/KuaiRand-Pure.tar.gz"
LOG_GLOB = "log_standard_*_pure.csv"
USERS_FILE = "user_features_pure.csv"
VIDEOS_FILE = "video_features_basic_pure.csv"
LOG_COLUMNS = ("user_id", "video_id", "date", "hourmin", "time_ms", "is_click",
               "is_like", "is_follow", "is_comment", "is_forward", "is_hate",
               "long_view", "play_time_ms", "duration_ms", "profile_stay_time",
               "comment_stay_time", "is_profile_enter", "is_rand", "tab")
OUTCOME_COLUMNS = ("is_click", "is_like", "is_follow", "is_comment", "is_forward",
                   "is_hate", "long_view", "play_time_ms", "profile_stay_time",
                   "comment_stay_time", "is_profile_enter")
USER_FIELDS = ("user_active_degree", "follow_user_num_range", "fans_user_num_range",
               "friend_user_num_range", "register_days_range") + tuple(
                   f"onehot_feat{k}" for k in range(18))
USER_COLUMNS = ("user_id", "user_active_degree", "is_lowactive_period",
                "is_live_streamer", "is_video_author", "follow_user_num",
                "follow_user_num_range", "fans_user_num", "fans_user_num_range",
                "friend_user_num", "friend_user_num_range", "register_days",
                "register_days_range") + tuple(f"onehot_feat{k}" for k in range(18))
VIDEO_COLUMNS = ("video_id", "author_id", "video_type", "upload_dt", "upload_type",
                 "visible_status", "video_duration", "server_width", "server_height",
                 "music_id", "music_type", "tag")
TASKS = ("is_click", "long_view", "is_like")
_BINARY = ("is_click", "is_like", "is_follow", "is_comment", "is_forward", "is_hate",
           "long_view", "is_profile_enter", "is_rand")
_COL = {name: k for k, name in enumerate(LOG_COLUMNS)}
_TAB_VOCAB = 16
_GAP_VOCAB = 24
_COUNT_VOCAB = 16
_DURATION_VOCAB = 16
_AGE_VOCAB = 64
_MAX_TAG = 1 << 16
_MIN_TAGS = 4
_MAX_REPEATS = 1024  # request_id = time_ms * 1024 + rank among repeats
_UPLOAD_DT = re.compile(r"^\d{4}-\d{2}-\d{2}$")

# ---------------------------------------------------------------------------
# Files.


def log_files(data_dir: str) -> list[str]:
  """Names of the standard logs in `data_dir`, sorted; checks the other files."""
  logs = sorted(
      os.path.basename(p) for p in glob.glob(os.path.join(data_dir, LOG_GLOB)))
  if not logs:
    raise errors.DataError(
        f"no KuaiRand log in {data_dir}: expected {LOG_GLOB} (KuaiRand-Pure); "
        f"fetch it with `python -m iat_jax.data.kuairand --download "
        f"--data_dir={data_dir}`")
  for name in (USERS_FILE, VIDEOS_FILE):
    if not os.path.isfile(os.path.join(data_dir, name)):
      raise errors.DataError(f"missing file {name} in {data_dir} (found "
                             f"{logs[0]}, so expected the KuaiRand-Pure files)")
  return logs


def validate_config(data: ml_collections.ConfigDict) -> None:
  """The KuaiRand source's check of the run config's data block
  (`Source.validate`): --config.data.dir holds the KuaiRand-Pure files.

  Raises:
    errors.ConfigError: naming --config.data.dir.
  """
  adapter.check_data_dir(data.dir, "kuairand", log_files)


def _check_header(path: str, header: str, expected: tuple[str, ...]) -> None:
  if header.strip() != ",".join(expected):
    raise errors.DataError(
        f"{path}, line 1: header {header[:200]!r} is not the KuaiRand-Pure "
        f"header {','.join(expected)!r}")


def _read_csv(path: str, columns: tuple[str, ...]) -> list[list[str]]:
  """Rows (after the header) of a small UTF-8 CSV; row k is line k + 2."""
  lines = adapter.read_text(path, "UTF-8").split("\n")
  _check_header(path, lines[0], columns)
  if len(lines) < 2:
    raise errors.DataError(f"{path}: no rows after the header")
  rows = []
  for i, row in enumerate(csv.reader(lines[1:]), 2):
    if len(row) != len(columns):
      raise errors.DataError(
          f"{path}, line {i}: expected {len(columns)} comma-separated fields, "
          f"got {len(row)}: {lines[i - 1][:100]!r}")
    rows.append(row)
  return rows


def _number(path: str, lineno: int, what: str, s: str) -> float | None:
  """A float field (None when empty)."""
  if not s:
    return None
  try:
    value = float(s)
  except ValueError:
    value = float("nan")
  if not np.isfinite(value):
    raise errors.DataError(f"{path}, line {lineno}: {what} {s!r} is not a number")
  return value


def _ranks(values: list[str]) -> tuple[np.ndarray, int]:
  """Categorical strings -> (ids int32 [n], vocab): rank + 1, "" -> 0."""
  uniq = sorted(set(values) - {""})
  index = {v: k + 1 for k, v in enumerate(uniq)}
  return np.array([index.get(v, 0) for v in values], dtype=np.int32), len(uniq) + 1


def _parse_users(path: str) -> dict:
  """Users file -> {"id": int64 [U], field: (int32 ids [U], vocab) per USER_FIELDS}."""
  rows = _read_csv(path, USER_COLUMNS)
  col = {name: k for k, name in enumerate(USER_COLUMNS)}
  ids = np.array(
      [adapter.parse_int(path, i, "user_id", r[0]) for i, r in enumerate(rows, 2)],
      dtype=np.int64)
  adapter.check_unique(path, ids, "user", 2)
  out = {"id": ids}
  for name in USER_FIELDS:
    values = [r[col[name]].strip() for r in rows]
    if name.startswith("onehot_feat"):  # "1.0" and "1" are the same value
      values = [
          "" if v == "" else repr(_number(path, i, name, v))
          for i, v in enumerate(values, 2)
      ]
    out[name] = _ranks(values)
  return out


def _parse_videos(path: str) -> dict:
  """Videos file -> {"id", "author", "upload_day" (-1 unknown): int64 [V],
  "duration_s": float [V] (NaN unknown), "tags": list of int lists,
  field: (int32 ids [V], vocab) for video_type, upload_type, music_type}."""
  rows = _read_csv(path, VIDEO_COLUMNS)
  col = {name: k for k, name in enumerate(VIDEO_COLUMNS)}
  out = {
      k: [] for k in ("id", "author", "upload_day", "duration_s", "tags", "music_type")
  }
  for i, r in enumerate(rows, 2):
    f = dict(zip(VIDEO_COLUMNS, r))
    out["id"].append(adapter.parse_int(path, i, "video_id", f["video_id"]))
    out["author"].append(adapter.parse_int(path, i, "author_id", f["author_id"]))
    day = -1
    if f["upload_dt"]:
      try:
        if not _UPLOAD_DT.match(f["upload_dt"]):
          raise ValueError
        day = datetime.date.fromisoformat(f["upload_dt"]).toordinal()
      except ValueError:
        raise errors.DataError(f"{path}, line {i}: upload_dt {f['upload_dt']!r} "
                               f"is not a yyyy-mm-dd date") from None
    out["upload_day"].append(day)
    duration = _number(path, i, "video_duration", f["video_duration"])
    if duration is not None and duration < 0:
      raise errors.DataError(f"{path}, line {i}: video_duration {duration} < 0")
    out["duration_s"].append(np.nan if duration is None else duration / 1000.0)
    music = _number(path, i, "music_type", f["music_type"])
    out["music_type"].append("" if music is None else repr(music))
    tags = [t.strip() for t in f["tag"].split(",")] if f["tag"].strip() else []
    for t in tags:
      if not (t.isdigit() and int(t) < _MAX_TAG):
        raise errors.DataError(
            f"{path}, line {i}: tag {t!r} is not an integer in 0..{_MAX_TAG - 1}")
    out["tags"].append([int(t) + 1 for t in tags])
  for k in ("id", "author", "upload_day"):
    out[k] = np.asarray(out[k], dtype=np.int64)
  adapter.check_unique(path, out["id"], "video", 2)
  out["duration_s"] = np.asarray(out["duration_s"], dtype=np.float64)
  out["music_type"] = _ranks(out["music_type"])
  for name in ("video_type", "upload_type"):
    out[name] = _ranks([r[col[name]].strip() for r in rows])
  return out


def _bad_log_line(path: str, lineno: int, line: str) -> errors.DataError:
  """The error for a log line that failed the vectorized checks."""
  fields = line.split(",")
  if len(fields) != len(LOG_COLUMNS):
    return errors.DataError(
        f"{path}, line {lineno}: expected {len(LOG_COLUMNS)} comma-separated "
        f"fields ({','.join(LOG_COLUMNS)}), got {len(fields)}: {line[:100]!r}")
  return adapter.int_line_error(path, lineno, line, fields, LOG_COLUMNS)


def _parse_log(path: str) -> np.ndarray:
  """A log file -> int64 [n, 19] in LOG_COLUMNS order; row k is line k + 2.

  Vectorized: the whole file is checked with numpy (byte classes, commas per
  line, field lengths); only the first bad line is looked at in Python.
  """
  with open(path, "rb") as f:
    raw = f.read()
  norm = raw.replace(b"\r\n", b"\n").rstrip(b"\n")
  header, _, body = norm.partition(b"\n")
  _check_header(path, header.decode("latin-1"), LOG_COLUMNS)
  if not body.strip():
    raise errors.DataError(f"{path}: empty log (no rows after the header)")
  text = body + b"\n"
  bad = adapter.bad_int_lines(text, ord(","), len(LOG_COLUMNS))
  if bad.size:
    k = int(bad.min())
    line = body.split(b"\n")[k].decode("latin-1")
    raise _bad_log_line(path, k + 2, line)
  values = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.int64, ndmin=2)
  checks = [(name, values[:, _COL[name]] > 1, "is not 0 or 1") for name in _BINARY]
  hourmin = values[:, _COL["hourmin"]]
  checks.append(("hourmin", (hourmin // 100 > 23) | (hourmin % 100 > 59),
                 "is not a time of day hhmm"))
  checks.append(("tab", values[:, _COL["tab"]]
                 >= _TAB_VOCAB - 1, f"is outside 0..{_TAB_VOCAB - 2}"))
  for name, wrong, why in checks:
    if wrong.any():
      k = int(np.flatnonzero(wrong)[0])
      raise errors.DataError(
          f"{path}, line {k + 2}: {name} {values[k, _COL[name]]} {why} "
          f"({int(wrong.sum())} such lines)")
  _dates_to_days(values[:, _COL["date"]], lambda k: f"{path}, line {k + 2}")
  return values


def _dates_to_days(dates: np.ndarray, where) -> np.ndarray:
  """yyyymmdd int64 [n] -> proleptic Gregorian ordinals int64 [n] (1 = Monday).

  `where` maps a row index to its "file, line n" string.
  """
  uniq, inverse = np.unique(dates, return_inverse=True)
  days = np.empty(len(uniq), dtype=np.int64)
  for k, d in enumerate(uniq):
    try:
      days[k] = datetime.date(int(d) // 10000,
                              int(d) // 100 % 100,
                              int(d) % 100).toordinal()
    except ValueError:
      k = int(np.flatnonzero(dates == d)[0])
      raise errors.DataError(
          f"{where(k)}: date {d} is not a yyyymmdd calendar date") from None
  return days[inverse.reshape(-1)]


def _dedupe(values: np.ndarray) -> np.ndarray:
  """Indices (ascending) of the first copy of each distinct row of int64 [n, c]."""
  o = np.lexsort(values.T[::-1])
  same = np.all(values[o][1:] == values[o][:-1], axis=1)
  first = np.ones(len(o), dtype=bool)
  first[1:] = ~same
  # Within a run of equal rows lexsort keeps file order, so o[run start] is first.
  return np.sort(o[first])


# ---------------------------------------------------------------------------
# Features.

# Outcome columns counted over a user's earlier rows: (column, field suffix).
_EARLIER = (("is_click", "clicks"), ("long_view", "long_views"), ("is_like", "likes"))
# The dense fields, in column order (see `_dense`), and their groups.
_DENSE_GROUPS = {
    "log_earlier_count": "user",
    "log_gap_hours": "context",
    "earlier_click_rate": "user",
    "earlier_long_view_rate": "user",
    "earlier_like_rate": "user",
    "log_duration_s": "item"
}


def _repeat_rank(c: dict[str, np.ndarray], where) -> np.ndarray:
  """Each row's rank among the rows of its (user, video, time_ms), in file order.

  Args:
    c: the log columns, {name: int64 [n]}, file order.
    where: row index -> "file, line n" (for errors).

  Returns:
    int64 [n], each < _MAX_REPEATS.
  """
  uid, video, time_ms = c["user_id"], c["video_id"], c["time_ms"]
  n = len(uid)
  o = np.lexsort((np.arange(n), time_ms, video, uid))
  run = np.ones(n, dtype=bool)
  run[1:] = ((uid[o][1:] != uid[o][:-1]) | (video[o][1:] != video[o][:-1]) |
             (time_ms[o][1:] != time_ms[o][:-1]))
  rank = np.empty(n, dtype=np.int64)
  rank[o] = np.arange(n) - np.maximum.accumulate(np.where(run, np.arange(n), 0))
  if rank.max() >= _MAX_REPEATS:
    k = int(np.argmax(rank))
    raise errors.DataError(f"{where(k)}: more than {_MAX_REPEATS} rows of the "
                           f"same user, video and time_ms")
  return rank


def _sorted_log(log: np.ndarray, where, users, videos) -> dict[str, np.ndarray]:
  """The log rows joined with their user and video, sorted by (uid, ts, ins_id).

  Args:
    log, where: as `_instances`.
    users, videos: from `_parse_users` / `_parse_videos`.

  Returns:
    {name: [n]}: the LOG_COLUMNS, "ts" (seconds), "ins" (InsID, uint64),
    "upos" / "vpos" (row of the user / video in its file), "day" (ordinal of
    the date), "duration_s" (the video's length, float64, 0 if unknown) and
    "duration_known" (bool).
  """
  c = {name: log[:, k] for name, k in _COL.items()}
  upos = adapter.lookup(where, c["user_id"], users["id"], "user", USERS_FILE,
                        "log rows")
  vpos = adapter.lookup(where, c["video_id"], videos["id"], "video", VIDEOS_FILE,
                        "log rows")
  rank = _repeat_rank(c, where)
  ts = c["time_ms"] // 1000
  ins = hashing.ins_ids(c["user_id"], ts, c["video_id"],
                        c["time_ms"] * _MAX_REPEATS + rank)
  day = _dates_to_days(c["date"], where)
  o = np.lexsort((ins, ts, c["user_id"]))
  c.update(ts=ts, ins=ins, upos=upos, vpos=vpos, day=day)
  r = {name: v[o] for name, v in c.items()}
  # The video's length: the videos file's, else the log row's duration_ms.
  duration_s = videos["duration_s"][r["vpos"]]
  from_log = r["duration_ms"] / 1000.0
  duration_s = np.where(np.isnan(duration_s) & (from_log > 0), from_log, duration_s)
  r["duration_known"] = ~np.isnan(duration_s)
  r["duration_s"] = np.where(r["duration_known"], duration_s, 0.0)
  return r


def _past(r: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Aggregates of each row's strictly earlier rows of its user.

  Args:
    r: from `_sorted_log`.

  Returns:
    int64 [n] each: "earlier" (their count), "gap_s" (seconds since the
    latest, 0 without), "is_click", "long_view", "is_like" (their sums).
  """
  user_start, hist_end, gap_s = adapter.earlier_rows(r["user_id"], r["ts"])
  out = {"earlier": hist_end - user_start, "gap_s": gap_s}
  for name in ("is_click", "long_view", "is_like"):
    csum = np.concatenate([[0], np.cumsum(r[name])])
    out[name] = csum[hist_end] - csum[user_start]
  return out


def _tag_table(videos) -> tuple[np.ndarray, int]:
  """Tag ids of each video, int32 [V, max(_MIN_TAGS, most tags)] 0-padded,
  and their vocabulary size."""
  max_tags = max(_MIN_TAGS, max(len(t) for t in videos["tags"]))
  tag_table = np.zeros((len(videos["id"]), max_tags), dtype=np.int32)
  for k, t in enumerate(videos["tags"]):
    tag_table[k, :len(t)] = t
  return tag_table, max(2, int(tag_table.max()) + 1)


def _categorical(users, videos, tags: tuple[np.ndarray, int], r: dict[str, np.ndarray],
                 past: dict[str, np.ndarray]) -> list:
  """The categorical fields: (name, vocabulary size, ids int [n], group) each.

  Args:
    users, videos: from `_parse_users` / `_parse_videos`.
    tags: from `_tag_table`.
    r, past: from `_sorted_log` / `_past`.
  """
  upos, vpos, day = r["upos"], r["vpos"], r["day"]
  tag_table, tag_vocab = tags
  authors, author_ids = np.unique(videos["author"], return_inverse=True)
  duration_id = np.where(r["duration_known"],
                         adapter.log2_bucket(r["duration_s"], 1, _DURATION_VOCAB), 0)
  upload_day = videos["upload_day"][vpos]
  age = np.clip(day - upload_day + 2, 1, _AGE_VOCAB - 1)
  gap_id = np.where(past["earlier"] > 0,
                    adapter.log2_bucket(past["gap_s"] // 60, 2, _GAP_VOCAB), 1)
  fields = [("user_id", len(users["id"]) + 1, upos + 1, "user")]
  fields += [
      (name, users[name][1], users[name][0][upos], "user") for name in USER_FIELDS
  ]
  fields += [
      ("video_id", len(videos["id"]) + 1, (vpos + 1).astype(np.int32), "item"),
      ("author_id", len(authors) + 1, author_ids[vpos] + 1, "item"),
  ]
  fields += [(name, videos[name][1], videos[name][0][vpos], "item")
             for name in ("video_type", "upload_type", "music_type")]
  fields += [
      ("first_tag", tag_vocab, tag_table[vpos, 0], "item"),
      ("duration", _DURATION_VOCAB, duration_id, "item"),
      ("upload_age", _AGE_VOCAB, np.where(upload_day >= 0, age, 0), "item"),
      ("tab", _TAB_VOCAB, r["tab"] + 1, "context"),
      ("hour", 25, r["hourmin"] // 100 + 1, "context"),
      ("weekday", 8, (day - 1) % 7 + 1, "context"),  # ordinal 1 was a Monday
      ("gap", _GAP_VOCAB, gap_id, "context"),
      ("earlier_count", _COUNT_VOCAB,
       adapter.log2_bucket(past["earlier"], 1, _COUNT_VOCAB), "user"),
  ]
  fields += [(f"earlier_{what}", _COUNT_VOCAB,
              adapter.log2_bucket(past[name], 1, _COUNT_VOCAB), "user")
             for name, what in _EARLIER]
  return fields


def _dense(r: dict[str, np.ndarray], past: dict[str, np.ndarray]) -> np.ndarray:
  """The dense fields `_DENSE_GROUPS`: float32 [n, 6]."""
  earlier = past["earlier"]
  rate = lambda k: np.where(earlier > 0, k / np.maximum(earlier, 1), 0.0)
  dense = np.stack([
      np.log1p(earlier),
      np.log1p(past["gap_s"] / 3600.0),
      rate(past["is_click"]),
      rate(past["long_view"]),
      rate(past["is_like"]),
      np.log1p(r["duration_s"])
  ],
                   axis=1)
  return dense.astype(np.float32)


def _instances(log: np.ndarray, where, users, videos, seq_len: int,
               sources: dict[str, str], fingerprint: str):
  """Joins, sorts and featurizes the deduplicated log rows.

  Args:
    log: int64 [n, 19] in LOG_COLUMNS order, file order, duplicates dropped.
    where: log row index -> "file, line n" (for errors).
    users, videos: from `_parse_users` / `_parse_videos`.
    seq_len, sources, fingerprint: copied into the schema.

  Returns:
    columns: {name: [n, ...]} as `dataset.row_shapes`, sorted by
      (uid, ts, ins_id).
    schema: the dataset's `schema.Schema`.
  """
  r = _sorted_log(log, where, users, videos)
  past = _past(r)
  tag_table, tag_vocab = _tag_table(videos)
  fields = _categorical(users, videos, (tag_table, tag_vocab), r, past)
  ids = {name: v for name, _, v, _ in fields}
  engaged = r["is_follow"] | r["is_comment"] | r["is_forward"]
  action = 1 + r["is_click"] + 2 * r["long_view"] + 4 * r["is_like"] + 8 * engaged
  cols = {
      "uid": r["user_id"],
      "ts": r["ts"],
      "ins_id": r["ins"],
      "cat": np.stack([v for _, _, v, _ in fields], axis=1).astype(np.int32),
      "dense": _dense(r, past),
      "labels": np.stack([r[t] for t in TASKS], axis=1).astype(np.float32),
      "mh_tags": tag_table[r["vpos"]],
      "item": ids["video_id"],
      "category": ids["first_tag"].astype(np.int32),
      "action": action.astype(np.int32),
  }
  multi_hot = schema_lib.MultiHot("tags", tag_vocab, tag_table.shape[1])
  schema = schema_lib.Schema(dataset="kuairand-pure",
                             **adapter.schema_features(fields, multi_hot,
                                                       _DENSE_GROUPS),
                             tasks=TASKS,
                             seq_len=seq_len,
                             seq_item_field="video_id",
                             seq_category_field="first_tag",
                             num_actions=17,
                             sources=dict(sources),
                             fingerprint=fingerprint)
  return cols, schema


def build(data_dir: str, out_dir: str, seq_len: int = 50) -> str:
  """Builds the instance dataset of the KuaiRand-Pure files in `data_dir`.

  Args:
    data_dir: directory with the KuaiRand-Pure files (see module docstring).
    out_dir: dataset directory to write (atomically replaced).
    seq_len: length S of the behaviour sequence.

  Returns:
    out_dir. Nothing is done if it already holds the dataset of the same files,
    seq_len and adapter version.

  Raises:
    errors.DataError: a missing or bad input file; nothing is written.
  """
  if seq_len < 1:
    raise ValueError(f"seq_len must be >= 1, got {seq_len}")
  logs = log_files(data_dir)
  names = logs + [USERS_FILE, VIDEOS_FILE]
  paths, sources, fp = adapter.hash_sources(data_dir, names, seq_len, VERSION)
  if adapter.is_up_to_date(out_dir, fp):
    return out_dir
  users = _parse_users(paths[USERS_FILE])
  videos = _parse_videos(paths[VIDEOS_FILE])
  parts = [_parse_log(paths[name]) for name in logs]
  log = np.concatenate(parts)
  file_of = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
  line_of = np.concatenate([np.arange(2, len(p) + 2) for p in parts])
  keep = _dedupe(log)
  logging.info("%d exact duplicate log rows dropped, %d kept",
               len(log) - len(keep), len(keep))
  where = lambda k: f"{paths[logs[file_of[keep[k]]]]}, line {line_of[keep[k]]}"
  cols, schema = _instances(log[keep], where, users, videos, seq_len, sources, fp)
  adapter.write(out_dir, schema, cols)
  return out_dir


def main(argv: list[str]) -> None:
  adapter.main(argv, "give --download and/or --out_dir", lambda f: (f.url, USERS_FILE),
               build)


def _define_flags() -> None:
  flags.DEFINE_bool("download", False, "Fetch and unpack the KuaiRand-Pure archive.")
  flags.DEFINE_string("url", URL, "Where --download fetches it (a zip or tar archive).")
  adapter.define_flags("Directory of the KuaiRand-Pure files.")
  flags.adopt_module_key_flags(adapter)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
