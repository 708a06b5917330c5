"""MovieLens adapter: the original GroupLens files -> an instance dataset.

`build(data_dir, out_dir)` reads the GroupLens files found in `data_dir` and
writes a `dataset` directory with one instance per rating. The format is
detected from the files present:

  ML-100K  u.data  user<TAB>movie<TAB>rating<TAB>unix seconds (ASCII)
           u.user  id|age|gender|occupation|zip (ASCII / UTF-8)
           u.item  id|title|release date|video date|url|19 genre flags (latin-1)
  ML-1M    ratings.dat  user::movie::rating::unix seconds (ASCII)
           users.dat    id::gender::age code::occupation code::zip (ASCII / UTF-8)
           movies.dat   id::Title (year)::Genre|Genre (latin-1)

Features of the instance (user u rates movie m at time t). Id 0 always means
missing. Users and movies get exact ids (their row in the users / movies file
+ 1); zip prefixes are hashed (`hashing.hash_to_vocab`, vocabulary >= 4x the
number of prefixes, rounded up to a power of two):
  categorical
    user_id       exact user id
    gender        M=1, F=2                                          vocab 3
    age           ML-1M age codes 1,18,25,35,45,50,56 -> 1..7; ML-100K ages
                  are put in the same buckets                       vocab 8
    occupation    index + 1 (ML-100K names, ML-1M codes 0..20)      vocab 22
    zip_prefix    hashed first 3 characters of the zip code
    movie_id      exact movie id (the behaviour-sequence item field)
    release_year  bucketed year (decades, then single years)        vocab 17
    first_genre   first listed genre (the sequence category field)  vocab 20
    hour, weekday hour of day 1..24 and weekday 1..7 (Monday=1), UTC  25, 8
    gap           1 = no earlier rating, else log2(1 + minutes since the
                  previous rating) + 2                              vocab 24
    earlier_count log2(1 + number of earlier ratings) + 1           vocab 16
    movie_earlier_count  the same for the movie's ratings by anyone  vocab 16
  multi-hot  genres (all genres of m; ids as first_genre), max_len >= 6
  dense      log1p(earlier count), log1p(hours since the previous rating),
             (release year - 1990) / 10, mean earlier rating - 3.5; of the
             movie's strictly earlier ratings by any user: log1p(count), mean
             rating - 3.5, like rate - 0.5 (each 0 when unknown)
  tasks      like = rating >= 4, love = rating == 5
  behaviour  item = movie_id id, category = first_genre id, action = rating.
"Earlier" always means a strictly earlier timestamp of the same user, or for
the movie's aggregates of any user (`history.history_end`,
`adapter.earlier_in_group`): ratings at the same second are not each other's
past, and a rating never enters its own features. (The movie aggregates are
what the strictly-past-aggregate baselines of issue 17 — LR and trees — read.)
InsID = `hashing.ins_ids(uid, ts, movie, request_id=line number)`.

Validation policy: nothing is written unless every file is valid. Each problem
raises `errors.DataError` naming the file and the 1-based line: a missing file,
an empty ratings file, bytes of the ratings file that are not ASCII (users files
must decode as UTF-8, movies files are latin-1), a wrong number of fields, a
non-numeric id, a rating outside 1..5, an unknown gender / age / occupation /
genre, a user or movie listed twice, a rating of a user or movie that the users
or movies file does not list. Duplicate ratings, i.e. two lines with the same
(user, movie, timestamp), are rejected, not deduplicated: the error gives their
count and the line numbers of the first duplicate pair. The same movie rated
again at another time is kept. Trailing blank lines are ignored; a blank line
elsewhere is a malformed row. A rebuild with unchanged files, seq_len and
adapter version is a no-op.

Download (the data may not be redistributed, so it is fetched from GroupLens):
  python -m iat_jax.data.movielens --download=ml-100k --data_dir=DIR \
      [--out_dir=OUT]

This module is longer than most (~550 lines) on purpose: the description
above is the adapter's specification, and its parsers (with the file:line
checks, half of the code) and features follow it line by line; split, one
format would be spread over several files.
"""

from __future__ import annotations

import dataclasses
import os
import re

from absl import app
from absl import flags
import ml_collections
import numpy as np

from iat_jax import errors
from iat_jax.data import adapter
from iat_jax.data import hashing
from iat_jax.data import schema as schema_lib

VERSION = "movielens-adapter-3"
# Archive name -> (URL, ratings file that marks an unpacked copy).
ARCHIVES = {
    "ml-100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip", "u.data"),
    "ml-1m":
        ("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "ratings.dat"),
}
# Genre vocabulary: ML-100K's u.genre order; ML-1M uses the same names except
# "unknown". Genre id = index + 1.
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
          "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
          "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western")
OCCUPATIONS_100K = ("administrator", "artist", "doctor", "educator", "engineer",
                    "entertainment", "executive", "healthcare", "homemaker", "lawyer",
                    "librarian", "marketing", "none", "other", "programmer", "retired",
                    "salesman", "scientist", "student", "technician", "writer")
AGE_CODES = (1, 18, 25, 35, 45, 50, 56)  # ML-1M: code = lower bound of bucket
_YEAR_EDGES = (1940, 1950, 1960, 1970, 1980, 1985, 1990, 1993, 1995, 1996, 1997, 1998,
               1999, 2000, 2001)
_GAP_VOCAB = 24
_COUNT_VOCAB = 16
_MIN_GENRES = 6
_ZIP_SALT = 0x21B


@dataclasses.dataclass(frozen=True)
class _Format:
  name: str  # schema.dataset
  ratings: str
  users: str
  movies: str
  sep: str  # field separator of the users and movies files
  rating_sep: bytes


_FORMATS = (
    _Format("movielens-100k", "u.data", "u.user", "u.item", "|", b"\t"),
    _Format("movielens-1m", "ratings.dat", "users.dat", "movies.dat", "::", b"::"),
)


def detect_format(data_dir: str) -> _Format:
  """The format whose ratings file is in `data_dir`; checks the other files."""
  for fmt in _FORMATS:
    if os.path.isfile(os.path.join(data_dir, fmt.ratings)):
      for name in (fmt.users, fmt.movies):
        if not os.path.isfile(os.path.join(data_dir, name)):
          raise errors.DataError(
              f"missing file {name} in {data_dir} (found {fmt.ratings}, so "
              f"expected the {fmt.name} files {fmt.ratings}, {fmt.users}, "
              f"{fmt.movies})")
      return fmt
  raise errors.DataError(
      f"no MovieLens ratings file in {data_dir}: expected u.data (ML-100K) or "
      f"ratings.dat (ML-1M); fetch one with `python -m iat_jax.data.movielens "
      f"--download=ml-100k --data_dir={data_dir}`")


def validate_config(data: ml_collections.ConfigDict) -> None:
  """The MovieLens source's check of the run config's data block
  (`Source.validate`): --config.data.dir holds the files of one format.

  Raises:
    errors.ConfigError: naming --config.data.dir.
  """
  adapter.check_data_dir(data.dir, "movielens", detect_format)


# ---------------------------------------------------------------------------
# Parsing.


def _read_lines(path: str, encoding: str) -> list[str]:
  """Lines of a small text file, trailing blank lines dropped."""
  text = adapter.read_text(path, encoding)
  if not text:
    raise errors.DataError(f"{path}: empty file")
  return text.split("\n")


def _split(path: str, lineno: int, line: str, sep: str, names) -> list[str]:
  """`line` split at `sep`; errors unless there is one field per name."""
  fields = line.split(sep)
  if len(fields) != len(names):
    raise errors.DataError(
        f"{path}, line {lineno}: expected {len(names)} fields "
        f"({', '.join(names)}) separated by {sep!r}, got {len(fields)}: "
        f"{line[:100]!r}")
  return fields


def _parse_users(path: str, fmt: _Format) -> dict[str, np.ndarray]:
  """Users file -> {"id", "gender", "age", "occupation": int [U]; "zip": str [U]}."""
  is_1m = fmt.name == "movielens-1m"
  names = (("user id", "gender", "age", "occupation", "zip") if is_1m else
           ("user id", "age", "gender", "occupation", "zip"))
  cols = {k: [] for k in ("id", "gender", "age", "occupation", "zip")}
  for i, line in enumerate(_read_lines(path, "utf-8"), 1):
    f = dict(zip(names, _split(path, i, line, fmt.sep, names)))
    cols["id"].append(adapter.parse_int(path, i, "user id", f["user id"]))
    if f["gender"] not in ("M", "F"):
      raise errors.DataError(f"{path}, line {i}: gender {f['gender']!r} is not M or F")
    cols["gender"].append(1 if f["gender"] == "M" else 2)
    age = adapter.parse_int(path, i, "age", f["age"])
    if is_1m:
      if age not in AGE_CODES:
        raise errors.DataError(
            f"{path}, line {i}: age code {age} is not one of {AGE_CODES}")
      cols["age"].append(AGE_CODES.index(age) + 1)
      occ = adapter.parse_int(path, i, "occupation", f["occupation"])
      if occ > 20:
        raise errors.DataError(f"{path}, line {i}: occupation {occ} not in 0..20")
      cols["occupation"].append(occ + 1)
    else:
      cols["age"].append(int(np.searchsorted(AGE_CODES, age, side="right")) or 1)
      if f["occupation"] not in OCCUPATIONS_100K:
        raise errors.DataError(
            f"{path}, line {i}: unknown occupation {f['occupation']!r}")
      cols["occupation"].append(OCCUPATIONS_100K.index(f["occupation"]) + 1)
    cols["zip"].append(f["zip"].strip()[:3].upper())
  out = {k: np.asarray(v, dtype=np.int64) for k, v in cols.items() if k != "zip"}
  out["zip"] = np.asarray(cols["zip"], dtype=object)
  adapter.check_unique(path, cols["id"], "user", 1)
  return out


_DATE = re.compile(r"^\d{1,2}-[A-Za-z]{3}-(\d{4})$")
_TITLE_YEAR = re.compile(r"\((\d{4})\)\s*$")


def _parse_movies(path: str, fmt: _Format) -> dict[str, np.ndarray]:
  """Movies file -> {"id": int [M], "year": int [M] (0 unknown), "genres": list}."""
  is_1m = fmt.name == "movielens-1m"
  names = (("movie id", "title", "genres") if is_1m else
           ("movie id", "title", "release date", "video release date", "url") +
           tuple(f"genre flag {g}" for g in GENRES))
  ids, years, genres = [], [], []
  for i, line in enumerate(_read_lines(path, "latin-1"), 1):
    f = _split(path, i, line, fmt.sep, names)
    ids.append(adapter.parse_int(path, i, "movie id", f[0]))
    m = _TITLE_YEAR.search(f[1])
    year = int(m.group(1)) if m else 0
    if is_1m:
      g = [x for x in f[2].split("|") if x and x != "(no genres listed)"]
      for x in g:
        if x not in GENRES:
          raise errors.DataError(f"{path}, line {i}: unknown genre {x!r}")
      genres.append([GENRES.index(x) + 1 for x in g])
    else:
      if f[2]:
        d = _DATE.match(f[2])
        if not d:
          raise errors.DataError(
              f"{path}, line {i}: release date {f[2]!r} is not like 01-Jan-1995")
        year = int(d.group(1))
      flags_ = f[5:]
      bad = [x for x in flags_ if x not in ("0", "1")]
      if bad:
        raise errors.DataError(f"{path}, line {i}: genre flag {bad[0]!r} is not 0 or 1")
      genres.append([k + 1 for k, x in enumerate(flags_) if x == "1"])
    years.append(year)
  adapter.check_unique(path, ids, "movie", 1)
  return {
      "id": np.asarray(ids, dtype=np.int64),
      "year": np.asarray(years, dtype=np.int64),
      "genres": genres
  }


_RATING_FIELDS = ("user id", "movie id", "rating", "timestamp")


def _parse_ratings(path: str, sep: bytes) -> np.ndarray:
  """Ratings file -> int64 [n, 4] (user, movie, rating, ts); row k = line k + 1.

  Vectorized: the whole file is checked with numpy (byte classes, separators
  per line, field lengths); only the first bad line is looked at in Python.
  """
  with open(path, "rb") as f:
    raw = f.read()
  a = np.frombuffer(raw, dtype=np.uint8)
  high = np.flatnonzero(a >= 0x80)
  if high.size:
    p = int(high[0])
    line = raw.count(b"\n", 0, p) + 1
    raise errors.DataError(
        f"{path}, line {line}: bad encoding: non-ASCII byte 0x{raw[p]:02x} "
        f"(a ratings file is plain ASCII)")
  norm = raw.replace(b"\r\n", b"\n").rstrip(b"\n")
  if not norm.strip():
    raise errors.DataError(f"{path}: empty ratings file (no rating lines)")
  text = norm + b"\n"
  bad_lines = []
  if sep != b"\t":  # a tab would pass for a separator once `sep` is replaced
    pre = np.frombuffer(text, dtype=np.uint8)
    bad_lines.append(
        np.searchsorted(np.flatnonzero(pre == 10), np.flatnonzero(pre == 9)))
    text = text.replace(sep, b"\t")
  bad_lines.append(adapter.bad_int_lines(text, ord("\t"), len(_RATING_FIELDS)))
  bad = np.concatenate(bad_lines)
  if bad.size:
    k = int(bad.min())
    line = norm.split(b"\n")[k].decode("ascii")
    fields = _split(path, k + 1, line, sep.decode(), _RATING_FIELDS)
    raise adapter.int_line_error(path, k + 1, line, fields, _RATING_FIELDS)
  values = np.array(text.replace(b"\n", b"\t").split(b"\t")[:-1])
  values = values.astype(np.int64).reshape(-1, 4)
  rating = values[:, 2]
  out = np.flatnonzero((rating < 1) | (rating > 5))
  if out.size:
    k = int(out[0])
    raise errors.DataError(f"{path}, line {k + 1}: rating {rating[k]} outside 1..5 "
                           f"({out.size} such lines)")
  return values


def _check_duplicates(path: str, user, movie, ts) -> None:
  line = np.arange(1, len(ts) + 1)
  o = np.lexsort((line, ts, movie, user))
  same = ((user[o][1:] == user[o][:-1]) & (movie[o][1:] == movie[o][:-1]) &
          (ts[o][1:] == ts[o][:-1]))
  if same.any():
    pairs = np.flatnonzero(same)
    k = pairs[np.argmin(line[o][pairs + 1])]
    a, b = line[o][k], line[o][k + 1]
    raise errors.DataError(
        f"{path}: {int(same.sum())} duplicate rating lines (same user, movie and "
        f"timestamp as an earlier line); first duplicate: line {a} and line {b} "
        f"(user {user[a - 1]}, movie {movie[a - 1]}, ts {ts[a - 1]}). Duplicates "
        f"are rejected: remove them from the file")


# ---------------------------------------------------------------------------
# Features.


def _id_vocab(n: int) -> int:
  """A power of two >= 4n + 1 (and >= 16): ids stay sparse after hashing."""
  return 1 << max(4, int(np.ceil(np.log2(4 * n + 1))))


def _sorted_ratings(fmt: _Format, paths: dict[str, str], users, movies,
                    ratings: np.ndarray) -> dict[str, np.ndarray]:
  """The ratings joined with their user and movie, sorted by (uid, ts, ins_id).

  Args:
    fmt, paths: the detected format and its file paths.
    users, movies: from `_parse_users` / `_parse_movies`.
    ratings: int64 [n, 4] (user, movie, rating, ts) in file order.

  Returns:
    {"uid", "movie", "rating", "ts", "ins", "upos", "mpos"}: int64 [n] ("ins"
    uint64), upos / mpos the row of the user / movie in its file.
  """
  rpath = paths[fmt.ratings]
  uid, movie, rating, ts = (ratings[:, k] for k in range(4))
  where = lambda k: f"{rpath}, line {k + 1}"
  upos = adapter.lookup(where, uid, users["id"], "user", fmt.users, "rating lines")
  mpos = adapter.lookup(where, movie, movies["id"], "movie", fmt.movies, "rating lines")
  _check_duplicates(rpath, uid, movie, ts)
  line = np.arange(1, len(ts) + 1)
  ins = hashing.ins_ids(uid, ts, movie, line)
  o = np.lexsort((ins, ts, uid))
  cols = dict(uid=uid, movie=movie, rating=rating, ts=ts, ins=ins, upos=upos, mpos=mpos)
  return {name: x[o] for name, x in cols.items()}


def _past(r: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Aggregates of each rating's strictly earlier ratings (the module docstring).

  Args:
    r: from `_sorted_ratings`.

  Returns:
    [n] each: "earlier" (count of the user's), "gap_s" (seconds since the
    user's previous one), "mean_prev" (their mean - 3.5), "m_count" (count of
    the movie's, by anyone), "m_mean" and "m_like" (their mean - 3.5 and like
    rate - 0.5); a mean or rate is 0 without earlier ratings.
  """
  rating = r["rating"]
  user_start, hist_end, gap_s = adapter.earlier_rows(r["uid"], r["ts"])
  earlier = hist_end - user_start
  csum = np.concatenate([[0], np.cumsum(rating)])
  mean_prev = np.where(
      earlier > 0, (csum[hist_end] - csum[user_start]) / np.maximum(earlier, 1) - 3.5,
      0.0)
  m_count, m_sums = adapter.earlier_in_group(
      r["movie"], r["ts"],
      np.stack([rating, rating >= 4], axis=1).astype(np.float64))
  m_seen = m_count > 0
  m_mean, m_like = (np.where(m_seen, m_sums[:, k] / np.maximum(m_count, 1) - c, 0.0)
                    for k, c in ((0, 3.5), (1, 0.5)))
  return dict(earlier=earlier,
              gap_s=gap_s,
              mean_prev=mean_prev,
              m_count=m_count,
              m_mean=m_mean,
              m_like=m_like)


def _genre_table(movies) -> np.ndarray:
  """Genre ids of each movie: int32 [M, max(_MIN_GENRES, most genres)], 0-padded."""
  max_genres = max(_MIN_GENRES, max(len(g) for g in movies["genres"]))
  genre_table = np.zeros((len(movies["id"]), max_genres), dtype=np.int32)
  for k, g in enumerate(movies["genres"]):
    genre_table[k, :len(g)] = g
  return genre_table


def _categorical(users, movies, genre_table: np.ndarray, r: dict[str, np.ndarray],
                 past: dict[str, np.ndarray]) -> tuple:
  """The categorical fields: (name, vocabulary size, ids int [n], group) each.

  Args:
    users, movies: from `_parse_users` / `_parse_movies`.
    genre_table: from `_genre_table`.
    r, past: from `_sorted_ratings` / `_past`.
  """
  upos, mpos, ts = r["upos"], r["mpos"], r["ts"]
  year = movies["year"][mpos]
  year_id = np.where(year > 0, np.searchsorted(_YEAR_EDGES, year, side="right") + 1, 0)
  zips = users["zip"]
  zip_vocab = _id_vocab(len(set(zips)))
  zip_ids = np.where(
      zips != "", hashing.hash_to_vocab(hashing.string_ids(zips), zip_vocab, _ZIP_SALT),
      0)
  minutes = past["gap_s"] // 60
  gap_id = np.where(past["earlier"] > 0, adapter.log2_bucket(minutes, 2, _GAP_VOCAB), 1)
  # Users and movies are closed sets: exact ids (their row in users/movies + 1),
  # since hashing 1,682 movies into even 4x as many buckets merged ~10% of them.
  user_vocab, movie_vocab = len(users["id"]) + 1, len(movies["id"]) + 1
  return (
      ("user_id", user_vocab, upos + 1, "user"),
      ("gender", 3, users["gender"][upos], "user"),
      ("age", len(AGE_CODES) + 1, users["age"][upos], "user"),
      ("occupation", 22, users["occupation"][upos], "user"),
      ("zip_prefix", zip_vocab, zip_ids[upos], "user"),
      ("movie_id", movie_vocab, (mpos + 1).astype(np.int32), "item"),
      ("release_year", len(_YEAR_EDGES) + 2, year_id, "item"),
      ("first_genre", len(GENRES) + 1, genre_table[mpos, 0], "item"),
      ("hour", 25, (ts // 3600) % 24 + 1, "context"),
      ("weekday", 8, (ts // 86400 + 3) % 7 + 1, "context"),  # 1970-01-01 was a Thursday
      ("gap", _GAP_VOCAB, gap_id, "context"),
      ("earlier_count", _COUNT_VOCAB,
       adapter.log2_bucket(past["earlier"], 1, _COUNT_VOCAB), "user"),
      ("movie_earlier_count", _COUNT_VOCAB,
       adapter.log2_bucket(past["m_count"], 1, _COUNT_VOCAB), "item"),
  )


# The dense fields, in column order (see `_dense`), and their groups.
_DENSE_GROUPS = {
    "log_earlier_count": "user",
    "log_gap_hours": "context",
    "release_year_norm": "item",
    "earlier_mean_rating": "user",
    "log_movie_earlier_count": "item",
    "movie_earlier_mean_rating": "item",
    "movie_earlier_like_rate": "item"
}


def _dense(movies, r: dict[str, np.ndarray], past: dict[str, np.ndarray]) -> np.ndarray:
  """The dense fields `_DENSE_GROUPS`: float32 [n, 7]."""
  year = movies["year"][r["mpos"]]
  dense = np.stack([
      np.log1p(past["earlier"]),
      np.log1p(past["gap_s"] / 3600.0),
      np.where(year > 0, (year - 1990) / 10.0, 0.0), past["mean_prev"],
      np.log1p(past["m_count"]), past["m_mean"], past["m_like"]
  ],
                   axis=1)
  return dense.astype(np.float32)


def _instances(fmt: _Format, paths: dict[str, str], users, movies, ratings: np.ndarray,
               seq_len: int, sources: dict[str, str],
               fingerprint: str) -> tuple[dict[str, np.ndarray], schema_lib.Schema]:
  """Joins, sorts and featurizes the ratings.

  Args:
    fmt, paths: the detected format and its file paths.
    users, movies: from `_parse_users` / `_parse_movies`.
    ratings: int64 [n, 4] (user, movie, rating, ts) in file order.
    seq_len, sources, fingerprint: copied into the schema.

  Returns:
    columns: {name: [n, ...]} as `dataset.row_shapes`, sorted by
      (uid, ts, ins_id).
    schema: the dataset's `schema.Schema`.
  """
  r = _sorted_ratings(fmt, paths, users, movies, ratings)
  past = _past(r)
  genre_table = _genre_table(movies)
  fields = _categorical(users, movies, genre_table, r, past)
  ids = {name: v for name, _, v, _ in fields}
  rating = r["rating"]
  cols = {
      "uid": r["uid"],
      "ts": r["ts"],
      "ins_id": r["ins"],
      "cat": np.stack([v for _, _, v, _ in fields], axis=1).astype(np.int32),
      "dense": _dense(movies, r, past),
      "labels": np.stack([rating >= 4, rating == 5], axis=1).astype(np.float32),
      "mh_genres": genre_table[r["mpos"]],
      "item": ids["movie_id"].astype(np.int32),
      "category": ids["first_genre"].astype(np.int32),
      "action": rating.astype(np.int32),
  }
  multi_hot = schema_lib.MultiHot("genres", len(GENRES) + 1, genre_table.shape[1])
  schema = schema_lib.Schema(dataset=fmt.name,
                             **adapter.schema_features(fields, multi_hot,
                                                       _DENSE_GROUPS),
                             tasks=("like", "love"),
                             seq_len=seq_len,
                             seq_item_field="movie_id",
                             seq_category_field="first_genre",
                             num_actions=6,
                             sources=dict(sources),
                             fingerprint=fingerprint)
  return cols, schema


def build(data_dir: str, out_dir: str, seq_len: int = 50) -> str:
  """Builds the instance dataset of the MovieLens files in `data_dir`.

  Args:
    data_dir: directory with the ML-100K or ML-1M files (see module docstring).
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
  fmt = detect_format(data_dir)
  names = (fmt.ratings, fmt.users, fmt.movies)
  paths, sources, fp = adapter.hash_sources(data_dir, names, seq_len, VERSION)
  if adapter.is_up_to_date(out_dir, fp):
    return out_dir
  users = _parse_users(paths[fmt.users], fmt)
  movies = _parse_movies(paths[fmt.movies], fmt)
  ratings = _parse_ratings(paths[fmt.ratings], fmt.rating_sep)
  cols, schema = _instances(fmt, paths, users, movies, ratings, seq_len, sources, fp)
  adapter.write(out_dir, schema, cols)
  return out_dir


def main(argv: list[str]) -> None:
  adapter.main(argv, "give --download=ml-100k|ml-1m and/or --out_dir",
               lambda f: ARCHIVES[f.download], build)


def _define_flags() -> None:
  flags.DEFINE_enum("download", None, sorted(ARCHIVES), "MovieLens archive to fetch.")
  adapter.define_flags("Directory of the GroupLens files.")
  flags.adopt_module_key_flags(adapter)


if __name__ == "__main__":
  _define_flags()
  app.run(main)
