"""Shared parts of the real-data adapters (`movielens`, `kuairand`).

File hashing and fingerprints, value parsing that names file:line, id lookups,
each row's earlier rows of its user, writing whole users in chunks, the
download/build command line. Every check raises `errors.DataError` naming
the file and the 1-based line.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import numpy as np

from iat_jax import errors
from iat_jax.data import dataset
from iat_jax.data import download as download_lib
from iat_jax.data import history
from iat_jax.data import schema as schema_lib

MAX_DIGITS = 15  # keeps every parsed integer exact and far from int64 limits
CHUNK_ROWS = 250_000
_NEWLINE = 10

# ---------------------------------------------------------------------------
# Files and fingerprints.


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def hash_sources(data_dir: str, names: list[str], seq_len: int,
                 version: str) -> tuple[dict[str, str], dict[str, str], str]:
  """The source files, their hashes and the dataset's fingerprint.

  Args:
    data_dir: directory of the source files.
    names: their file names.
    seq_len, version: the build's seq_len and the adapter version.

  Returns:
    paths: {name: path}.
    sources: {name: hex sha256 of the file} (`schema.Schema.sources`).
    fingerprint: hash of sources, seq_len and version.
  """
  paths = {name: os.path.join(data_dir, name) for name in names}
  sources = {name: _sha256(p) for name, p in paths.items()}
  key = json.dumps({
      "sources": sources,
      "seq_len": seq_len,
      "version": version
  },
                   sort_keys=True)
  return paths, sources, hashlib.sha256(key.encode()).hexdigest()


def is_up_to_date(out_dir: str, fp: str) -> bool:
  """Whether `out_dir` already holds the complete dataset of fingerprint `fp`."""
  if dataset.is_complete(out_dir, fp):
    logging.info("%s is up to date (fingerprint %s)", out_dir, fp[:12])
    return True
  return False


def check_data_dir(data_dir: str, source: str, find: Callable[[str], object]) -> None:
  """The check of --config.data.dir of a source read from files (its
  `Source.validate`): a directory that holds the source's files.

  Args:
    data_dir: the value of --config.data.dir.
    source: the source's name (--config.data.source).
    find: the adapter's check of the files in a directory; raises
      errors.DataError naming what is missing.

  Raises:
    errors.ConfigError: naming --config.data.dir.
  """
  if not data_dir:
    raise errors.ConfigError("data.dir", f"required for data.source={source}")
  if not os.path.isdir(data_dir):
    raise errors.ConfigError("data.dir", f"{data_dir!r} is not a directory")
  try:
    find(data_dir)
  except errors.DataError as e:
    raise errors.ConfigError("data.dir", str(e)) from None


def read_text(path: str, encoding: str) -> str:
  """A small text file, "\\r\\n" -> "\\n" and trailing newlines dropped.

  `encoding` is also how the error for an undecodable byte names it.
  """
  with open(path, "rb") as f:
    raw = f.read()
  try:
    text = raw.decode(encoding)
  except UnicodeDecodeError as e:
    line = raw.count(b"\n", 0, e.start) + 1
    raise errors.DataError(
        f"{path}, line {line}: bad encoding: byte 0x{raw[e.start]:02x} is not "
        f"valid {encoding}") from None
  return text.replace("\r\n", "\n").rstrip("\n")


# ---------------------------------------------------------------------------
# Values.


def _is_int(s: str) -> bool:
  return s.isascii() and s.isdigit() and len(s) <= MAX_DIGITS


def _int_error(path: str, lineno: int, what: str, s: str) -> errors.DataError:
  return errors.DataError(
      f"{path}, line {lineno}: {what} {s!r} is not a non-negative integer")


def parse_int(path: str, lineno: int, what: str, s: str) -> int:
  """The non-negative integer `s` (at most MAX_DIGITS digits), field `what`."""
  if not _is_int(s):
    raise _int_error(path, lineno, what, s)
  return int(s)


def bad_int_lines(text: bytes, sep: int, num_fields: int) -> np.ndarray:
  """Lines of `text` that are not `num_fields` integers separated by `sep`.

  Vectorized: a line is bad if it has a byte other than a digit, `sep` or
  newline, other than num_fields - 1 separators, or an empty field or one
  longer than MAX_DIGITS.

  Args:
    text: lines, each ending in b"\\n".
    sep: the separator byte.
    num_fields: fields per line.

  Returns:
    int64 [k]: 0-based indices of the bad lines, unsorted, with repeats.
  """
  allowed = np.zeros(256, dtype=bool)
  allowed[[_NEWLINE, sep] + list(range(ord("0"), ord("9") + 1))] = True
  b = np.frombuffer(text, dtype=np.uint8)
  nl = np.flatnonzero(b == _NEWLINE)
  count = np.concatenate([[0], np.cumsum(b == sep)])
  starts = np.concatenate([[0], nl[:-1] + 1])
  seps = np.flatnonzero((b == sep) | (b == _NEWLINE))
  field_len = np.diff(np.concatenate([[-1], seps])) - 1
  return np.concatenate([
      np.searchsorted(nl, np.flatnonzero(~allowed[b])),
      np.flatnonzero(count[nl] - count[starts] != num_fields - 1),
      np.searchsorted(nl, seps[(field_len == 0) | (field_len > MAX_DIGITS)])
  ])


def int_line_error(path: str, lineno: int, line: str, fields: list[str],
                   names: tuple[str, ...]) -> errors.DataError:
  """The error for a line of integer fields that failed `bad_int_lines`.

  Args:
    path, lineno: where the line is.
    line: the line.
    fields: the line split at its separator, one per name (the caller has
      checked the count).
    names: the fields' names.
  """
  for what, s in zip(names, fields):
    if not _is_int(s):
      return _int_error(path, lineno, what, s)
  return errors.DataError(f"{path}, line {lineno}: malformed line {line[:100]!r}")


# ---------------------------------------------------------------------------
# Ids.


def check_unique(path: str, ids, what: str, first_line: int) -> None:
  """Errors on the second line listing an id already listed.

  Args:
    path: the file.
    ids: int [n], one per row; row k is line k + first_line.
    what: what an id names ("user", "movie").
    first_line: line number of row 0.
  """
  ids = np.asarray(ids, dtype=np.int64)
  uniq, counts = np.unique(ids, return_counts=True)
  if (counts > 1).any():
    dup = uniq[counts > 1][0]
    lines = np.flatnonzero(ids == dup)[:2] + first_line
    raise errors.DataError(f"{path}, line {lines[1]}: {what} {dup} already "
                           f"listed on line {lines[0]}")


def lookup(where: Callable[[int], str], values: np.ndarray, known: np.ndarray,
           what: str, other: str, rows: str) -> np.ndarray:
  """Row of each value in `known`; errors on unknown ones.

  Args:
    where: row index of `values` -> its "file, line n" string.
    values: int64 [n] ids to look up.
    known: int64 [m] distinct ids, any order (the rows of file `other`).
    what: what an id names ("user").
    other: the file that lists `known`.
    rows: what the rows of `values` are, plural ("log rows").

  Returns:
    int64 [n]: index into `known` of each value.
  """
  order = np.argsort(known)
  pos = np.searchsorted(known[order], values)
  pos = np.minimum(pos, len(known) - 1)
  ok = known[order][pos] == values
  if not ok.all():
    k = int(np.flatnonzero(~ok)[0])
    raise errors.DataError(
        f"{where(k)}: unknown {what} {values[k]} (not in {other}); "
        f"{int((~ok).sum())} {rows} refer to {what}s missing from {other}")
  return order[pos]


# ---------------------------------------------------------------------------
# Per-user history.


def earlier_rows(uid: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, ...]:
  """Each row's strictly earlier rows of the same user (`history.history_end`).

  Args:
    uid, ts: int64 [n], rows sorted by (uid, ts).

  Returns:
    user_start: int64 [n], the first row of the row's user.
    hist_end: int64 [n]; rows user_start..hist_end - 1 are the earlier ones.
    gap_s: int64 [n], ts minus that of the latest earlier row (0 if none).
  """
  new_user = np.ones(len(uid), dtype=bool)
  new_user[1:] = uid[1:] != uid[:-1]
  user_index = np.cumsum(new_user) - 1
  user_start = np.flatnonzero(new_user)[user_index]
  hist_end = history.history_end(user_index, ts)
  has_prev = hist_end > user_start
  gap_s = np.where(has_prev, ts - ts[np.maximum(hist_end - 1, 0)], 0)
  return user_start, hist_end, gap_s


def log2_bucket(x: np.ndarray, offset: int, vocab: int) -> np.ndarray:
  """floor(log2(1 + x)) + offset, capped at vocab - 1: int64 [...]."""
  return np.minimum(np.floor(np.log2(1.0 + x)).astype(np.int64) + offset, vocab - 1)


def earlier_in_group(group: np.ndarray, ts: np.ndarray,
                     values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Count and sums of `values` over the rows of each row's group (any user)
  with a strictly earlier timestamp (`earlier_rows` on the group).

  Args:
    group: int [n], e.g. the item of each row; rows in any order.
    ts: int64 [n].
    values: float [n, k], e.g. the row's labels.

  Returns:
    count: int64 [n]; sums: float64 [n, k] (0 where count is 0).
  """
  o = np.lexsort((ts, group))
  start, end, _ = earlier_rows(group[o], ts[o])
  csum = np.concatenate([np.zeros((1, values.shape[1])), np.cumsum(values[o], axis=0)])
  count, sums = np.empty(len(o), np.int64), np.empty((len(o), values.shape[1]))
  count[o] = end - start
  sums[o] = csum[end] - csum[start]
  return count, sums


# ---------------------------------------------------------------------------
# Writing.


def schema_features(fields, multi_hot: schema_lib.MultiHot,
                    dense_groups: dict[str, str]) -> dict:
  """The feature part of an adapter's `Schema` (its keyword arguments).

  Args:
    fields: (name, vocabulary size, column, group) per categorical field.
    multi_hot: the one multi-hot field, an item feature.
    dense_groups: {dense field name: group}, in column order.

  Returns:
    {categorical, multi_hot, dense, field_groups} for `schema_lib.Schema`.
  """
  return dict(categorical=tuple(
      schema_lib.Categorical(name, int(v)) for name, v, _, _ in fields),
              multi_hot=(multi_hot,),
              dense=tuple(dense_groups),
              field_groups={
                  **{
                      name: group for name, _, _, group in fields
                  }, multi_hot.name: "item",
                  **dense_groups
              })


def write(out_dir: str, schema: schema_lib.Schema, cols: dict[str, np.ndarray]) -> None:
  """Writes `cols` as the dataset `out_dir`, in chunks of whole users.

  Args:
    out_dir: dataset directory (atomically replaced).
    schema: the dataset's schema.
    cols: {name: [n, ...]} as `dataset.row_shapes`, sorted by (uid, ts,
      ins_id); each chunk holds ~CHUNK_ROWS rows.
  """
  uid = cols["uid"]
  bounds = [0]
  starts = np.flatnonzero(np.diff(uid, prepend=uid[0] - 1))
  while bounds[-1] < len(uid):
    k = np.searchsorted(starts, bounds[-1] + CHUNK_ROWS)
    bounds.append(int(starts[k]) if k < len(starts) else len(uid))
  with dataset.Writer(out_dir, schema, len(uid)) as w:
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      w.append({k: v[lo:hi] for k, v in cols.items()})


# ---------------------------------------------------------------------------
# Command line.


def define_flags(data_help: str) -> None:
  """Defines --data_dir (required), --out_dir, --seq_len and --timeout.

  The caller defines --download (and what else its download needs) and
  adopts these flags as its own (`flags.adopt_module_key_flags`), so that
  --help lists them.
  """
  flags.DEFINE_string("data_dir", None, data_help)
  flags.DEFINE_string("out_dir", None, "If set, build the instance dataset here.")
  flags.DEFINE_integer("seq_len", 50, "Behaviour sequence length.")
  flags.DEFINE_float("timeout", 60.0, "Download timeout in seconds.")
  flags.mark_flag_as_required("data_dir")


def main(argv: list[str], usage: str, archive: Callable[[flags.FlagValues], tuple[str,
                                                                                  str]],
         build: Callable[[str, str, int], str]) -> None:
  """Downloads (if --download) and builds (if --out_dir) a dataset.

  Args:
    argv: the command line left after the flags (only the program name).
    usage: the usage error when neither --download nor --out_dir is given.
    archive: flags -> (url, marker file) for `download.download`.
    build: the adapter's build(data_dir, out_dir, seq_len).
  """
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if not f.download and not f.out_dir:
    raise app.UsageError(usage)
  try:
    if f.download:
      url, marker = archive(f)
      download_lib.download(url, f.data_dir, marker=marker, timeout=f.timeout)
    if f.out_dir:
      build(f.data_dir, f.out_dir, f.seq_len)
  except (errors.DownloadError, errors.DataError) as e:
    raise SystemExit(f"error: {e}") from None
