"""Preprocessed instance datasets: a directory of memory-mapped `.npy` columns.

Layout of a dataset directory (N rows, U users, S = schema.seq_len):

  schema.json               `schema.Schema`, written last (marks completeness)
  uid.npy         int64   [N]      raw user id
  user_index.npy  int32   [N]      dense user index 0..U-1
  ts.npy          int64   [N]      request time, seconds
  ins_id.npy      uint64  [N]      hashed InsID (`hashing.ins_ids`)
  cat.npy         int32   [N, Fc]  categorical ids
  mh_<name>.npy   int32   [N, M]   one per multi-hot field, 0-padded
  dense.npy       float32 [N, Fd]
  labels.npy      float32 [N, num_tasks]
  item.npy, category.npy, action.npy  int32 [N]  this instance as a behaviour
  action_now.npy  int32   [N]      only if schema.action_delay > 0: the action
                                   as known before all its labels are
  seq_item.npy, seq_category.npy, seq_action.npy  int32 [N, S]  the user's
                                   last S behaviours strictly before ts, newest
                                   first, 0-padded; a slot's action is
                                   action_now until ts_past + action_delay < ts
  hist_end.npy    int64   [N]      see `history.history_end`
  user_offsets.npy int64  [U+1]    rows of user k: [offsets[k], offsets[k+1])
  temporal_order.npy int64 [N]     rows sorted by (ts, ins_id)
  split.npy       int8    [N]      0 train, 1 valid, 2 test

Rows are in user order, sorted by (uid, ts, ins_id), so a user's history is a
contiguous slice and any row is one O(1) memmap read. The temporal order is a
permutation, not a copy. Splits are global in time: the first
`train_fraction` of `temporal_order` is train, the next `valid_fraction` valid,
the rest test.

Writing is atomic: `Writer` fills a temporary sibling directory in chunks of
whole users and, only when every check passed, renames it over the target.
A failure at any point removes the temporary directory and leaves a previous
dataset at the target untouched.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Mapping

from absl import logging
import numpy as np

from iat_jax import errors
from iat_jax.data import history
from iat_jax.data import schema as schema_lib

_SEQ = ("item", "category", "action")


def row_shapes(schema: schema_lib.Schema) -> dict[str, tuple[tuple[int, ...], type]]:
  """Per-row shape and dtype of every column a data source must provide."""
  shapes = {
      "uid": ((), np.int64),
      "ts": ((), np.int64),
      "ins_id": ((), np.uint64),
      "cat": ((len(schema.categorical),), np.int32),
      "dense": ((len(schema.dense),), np.float32),
      "labels": ((schema.num_tasks,), np.float32),
  }
  for f in schema.multi_hot:
    shapes[f"mh_{f.name}"] = ((f.max_len,), np.int32)
  for name in _SEQ:
    shapes[name] = ((), np.int32)
  if schema.action_delay > 0:
    shapes["action_now"] = ((), np.int32)
  return shapes


def is_complete(path: str, fingerprint: str) -> bool:
  """True if `path` holds a finished dataset built from the same inputs."""
  try:
    return schema_lib.Schema.load(
        schema_lib.schema_path(path)).fingerprint == fingerprint
  except (OSError, ValueError, KeyError, TypeError):
    return False


class Writer:
  """Writes a dataset in chunks of whole users; publishes it atomically.

  Creating a Writer allocates the full-size column files in a temporary
  directory, so data sources validate their input before constructing one.

  Usage:
    with Writer(path, schema, num_rows) as w:
      for chunk in chunks:   # dict column -> array [n, ...], see `row_shapes`
        w.append(chunk)
  On a clean exit the dataset appears at `path`; on an exception nothing
  changes at `path`.
  """

  def __init__(self,
               path: str,
               schema: schema_lib.Schema,
               num_rows: int,
               train_fraction: float = 0.8,
               valid_fraction: float = 0.1):
    self.path = os.path.abspath(path)
    self.schema = schema
    self.num_rows = num_rows
    self.fractions = (train_fraction, valid_fraction)
    parent = os.path.dirname(self.path)
    os.makedirs(parent, exist_ok=True)
    self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.path) + ".tmp-",
                                dir=parent)
    shapes = row_shapes(schema)
    shapes.update({f"seq_{n}": ((schema.seq_len,), np.int32) for n in _SEQ})
    shapes.update({"user_index": ((), np.int32), "hist_end": ((), np.int64)})
    self.cols = {
        name:
            np.lib.format.open_memmap(os.path.join(self.tmp, name + ".npy"),
                                      mode="w+",
                                      dtype=dtype,
                                      shape=(num_rows,) + shape)
        for name, (shape, dtype) in shapes.items()
    }
    self.written = 0
    self.num_users = 0
    self.last = None  # (uid, ts, ins_id) of the last row written

  def __enter__(self) -> Writer:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if exc_type is None:
        self._finalize()
    finally:
      self.cols.clear()
      if os.path.exists(self.tmp):
        shutil.rmtree(self.tmp, ignore_errors=True)

  def append(self, chunk: Mapping[str, np.ndarray]) -> None:
    """Appends rows of whole users, sorted by (uid, ts, ins_id)."""
    n = len(chunk["uid"])
    if n == 0:
      return
    if self.written + n > self.num_rows:
      raise errors.DataError(f"more rows than the {self.num_rows} announced")
    for name, (shape, _) in row_shapes(self.schema).items():
      if name not in chunk or np.shape(chunk[name]) != (n,) + shape:
        raise errors.DataError(f"column {name!r}: expected shape {(n,) + shape}, got "
                               f"{np.shape(chunk.get(name))}")
    uid, ts, ins = (np.asarray(chunk[k]) for k in ("uid", "ts", "ins_id"))
    self._check_order(uid, ts, ins)
    self._check_ids(chunk)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = uid[1:] != uid[:-1]
    user_index = self.num_users + np.cumsum(new_user) - 1
    hist_end = history.history_end(user_index, ts)
    starts = np.flatnonzero(new_user)
    user_start = starts[np.cumsum(new_user) - 1]
    rows, mask = history.earlier_rows(hist_end, user_start, self.schema.seq_len)
    sl = slice(self.written, self.written + n)
    for name in row_shapes(self.schema):
      self.cols[name][sl] = chunk[name]
    for name in ("item", "category"):
      self.cols[f"seq_{name}"][sl] = history.gather(np.asarray(chunk[name]), rows, mask)
    self.cols["seq_action"][sl] = self._seq_actions(chunk, rows, mask)
    self.cols["user_index"][sl] = user_index
    self.cols["hist_end"][sl] = hist_end + self.written
    self.written += n
    self.num_users += int(new_user.sum())
    self.last = (uid[-1], ts[-1], ins[-1])

  def _seq_actions(self, chunk, rows: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """seq_action [n, S] of sequence slots rows/mask [n, S] (chunk rows).

    A past row's action once known at the request's time (`history.label_known`
    with `Schema.action_delay`), its action_now before. action_now is absent
    only when action_delay is 0, where every real slot is known.
    """
    ts = np.asarray(chunk["ts"])
    known = history.label_known(ts, history.gather(ts, rows, mask), mask,
                                [self.schema.action_delay])[..., 0]
    now = chunk.get("action_now", chunk["action"])
    return np.where(known, history.gather(np.asarray(chunk["action"]), rows, mask),
                    history.gather(np.asarray(now), rows, mask))

  def _check_order(self, uid, ts, ins) -> None:
    if self.last is not None and uid[0] <= self.last[0]:
      raise errors.DataError(f"user {uid[0]} starts a chunk but is not after user "
                             f"{self.last[0]}: chunks must hold whole users in order")
    key_ok = (uid[1:] > uid[:-1]) | ((uid[1:] == uid[:-1]) & ((ts[1:] > ts[:-1]) |
                                                              ((ts[1:] == ts[:-1]) &
                                                               (ins[1:] > ins[:-1]))))
    if not key_ok.all():
      bad = int(np.flatnonzero(~key_ok)[0]) + 1
      raise errors.DataError(f"rows not strictly sorted by (uid, ts, ins_id) at chunk "
                             f"row {bad} (uid {uid[bad]}, ts {ts[bad]}): duplicate "
                             f"InsID or unsorted input")

  def _check_ids(self, chunk) -> None:
    cat = np.asarray(chunk["cat"])
    if cat.size:
      vocab = np.array([f.vocab_size for f in self.schema.categorical])
      lo, hi = cat.min(axis=0), cat.max(axis=0)  # per field, no [n, F] temporaries
      bad = np.flatnonzero((lo < 0) | (hi >= vocab))
      if len(bad):
        c = bad[0]
        value = lo[c] if lo[c] < 0 else hi[c]
        raise errors.DataError(f"field {self.schema.categorical[c].name}: id {value} "
                               f"outside [0, {vocab[c]})")
    limits = [(f"mh_{f.name}", f.vocab_size) for f in self.schema.multi_hot] + [
        ("item", self.schema.vocab_size(self.schema.seq_item_field)),
        ("category", self.schema.vocab_size(self.schema.seq_category_field)),
    ] + [(name, self.schema.num_actions)
         for name in ("action", "action_now")
         if name in row_shapes(self.schema)]
    for name, vocab in limits:
      v = np.asarray(chunk[name])
      if v.size and (v.min() < 0 or v.max() >= vocab):
        raise errors.DataError(f"column {name}: ids outside [0, {vocab})")

  def _finalize(self) -> None:
    if self.written != self.num_rows:
      raise errors.DataError(f"{self.written} rows written, {self.num_rows} announced")
    n = self.num_rows
    ts, ins = self.cols["ts"], self.cols["ins_id"]
    if len(np.unique(ins)) != n:
      raise errors.DataError("InsIDs are not unique (duplicate instances)")
    order = np.lexsort((ins, ts))
    n_train = int(round(n * self.fractions[0]))
    n_valid = int(round(n * self.fractions[1]))
    split = np.full(n, 2, dtype=np.int8)
    split[order[:n_train]] = 0
    split[order[n_train:n_train + n_valid]] = 1
    np.save(os.path.join(self.tmp, "temporal_order.npy"), order)
    np.save(os.path.join(self.tmp, "split.npy"), split)
    counts = np.bincount(self.cols["user_index"], minlength=self.num_users)
    np.save(os.path.join(self.tmp, "user_offsets.npy"),
            np.concatenate([[0], np.cumsum(counts)]).astype(np.int64))
    bounds = tuple((int(ts[order[k]]), int(ins[order[k]]))
                   for k in (n_train, n_train + n_valid)
                   if k < n)
    for col in self.cols.values():
      col.flush()
    self.cols.clear()
    schema = self.schema.__class__(
        **{
            **self.schema.__dict__, "num_rows": n,
            "num_users": self.num_users,
            "split_sizes": (n_train, n_valid, n - n_train - n_valid),
            "split_boundaries": bounds
        })
    schema.save(schema_lib.schema_path(self.tmp))
    _publish(self.tmp, self.path)
    logging.info("wrote dataset %s: %d rows, %d users, splits %s", self.path, n,
                 self.num_users, schema.split_sizes)


def _publish(tmp: str, path: str) -> None:
  """Moves the finished `tmp` to `path`, replacing an older dataset there."""
  old = None
  if os.path.exists(path):
    old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-",
                           dir=os.path.dirname(path))
    os.rename(path, os.path.join(old, "d"))
  os.rename(tmp, path)
  if old:
    shutil.rmtree(old, ignore_errors=True)


class Dataset:
  """Read-only view of a dataset directory; columns are memory-mapped.

  Attributes:
    path: the directory.
    schema: its `schema.Schema`.
  """

  def __init__(self, path: str):
    self.path = path
    spath = schema_lib.schema_path(path)
    if not os.path.exists(spath):
      raise FileNotFoundError(f"{path} is not a complete dataset (no schema.json)")
    self.schema = schema_lib.Schema.load(spath)
    self._cols: dict[str, np.ndarray] = {}

  def __getitem__(self, name: str) -> np.ndarray:
    if name not in self._cols:
      self._cols[name] = np.load(os.path.join(self.path, name + ".npy"), mmap_mode="r")
    return self._cols[name]

  def __getstate__(self):  # memmaps are re-opened in worker processes
    return {"path": self.path, "schema": self.schema, "_cols": {}}

  @property
  def num_rows(self) -> int:
    return self.schema.num_rows

  def user_start(self, rows: np.ndarray) -> np.ndarray:
    """First row of each row's user: int64 [...] -> int64 [...]."""
    return self["user_offsets"][self["user_index"][rows]]

  def earlier_count(self, rows: np.ndarray) -> np.ndarray:
    """How many of its user's instances are strictly earlier in time than
    each row (the rows [user start, hist_end); same-timestamp rows do not
    count): int64 [...] -> int64 [...]."""
    return np.asarray(self["hist_end"]).take(rows) - self.user_start(rows)

  def split_rows(self, split: str) -> np.ndarray:
    """Rows of one split in time order (ts, ins_id): int64 [n_split]."""
    k = schema_lib.SPLITS.index(split)
    lo = sum(self.schema.split_sizes[:k])
    return np.asarray(self["temporal_order"][lo:lo + self.schema.split_sizes[k]])

  def feature_columns(self) -> tuple[str, ...]:
    """Names of the per-row columns a model reads."""
    return (("cat", "dense") + tuple(f"mh_{f.name}" for f in self.schema.multi_hot) +
            tuple(f"seq_{n}" for n in _SEQ))

  def read(self, rows: np.ndarray, names) -> dict[str, np.ndarray]:
    """Gathers columns at `rows` (int [...]): {name: [..., per-row shape]}."""
    flat = np.asarray(rows).reshape(-1)
    return {
        n: np.asarray(self[n][flat]).reshape(np.shape(rows) + self[n].shape[1:])
        for n in names
    }
