"""The user-history index: hashed UID -> the user's newest instances, in TensorStore.

The paper's "high-performance KV storage" beside the InsEmb table (Fig. 4):
a request reads its user's list of past InsIDs (with their time and labels)
here, then their InsEmbs from the source's store. One OCDBT database
(TensorStore's B+tree kvstore, a local directory or a gs:// / s3:// URL),
keyed by the big-endian 8 bytes of `hashing.mix(uid)`; a value is the
user's newest `capacity` entries, oldest first, as the bytes of a numpy
structured array `entry_dtype(num_tasks)`: ins_id uint64, ts int64 and the
labels float32 [T] (final values; who may read a label and when is the
reader's rule, `iat_jax.data.history.label_known`).

`append` adds one period's rows in ONE transaction (one OCDBT generation):
it reads the values of that period's users, merges the new entries in,
drops entries older than the retention cutoff and truncates to capacity --
O(rows of the period), whatever the log's length. Retention also rewrites
the users of the period that falls out of the window (O(its rows)), so a
replay rebuilds the same bytes. `restore` undoes what a killed run appended
past a checkpoint: it rewrites the given users' values as they were at the
checkpoint's generation (OCDBT keeps older generations readable).

At 1e11 instances (1e9 users, capacity 256): ~40 bytes x 256 per user, 10 TB
over OCDBT's B+tree, whose nodes a reader caches within TS_CACHE_BYTES;
appends touch the period's users only.
"""

from __future__ import annotations

import os

import numpy as np
import tensorstore as ts

from iat_jax import errors
from iat_jax.data import hashing
from iat_jax.store import database


def entry_dtype(num_tasks: int) -> np.dtype:
  """One index entry: (ins_id uint64, ts int64, labels float32 [num_tasks])."""
  return np.dtype([("ins_id", "<u8"), ("ts", "<i8"), ("labels", "<f4", (num_tasks,))])


def user_keys(uids: np.ndarray) -> list[bytes]:
  """The index keys of raw user ids [n]: big-endian bytes of their hash."""
  return [k.tobytes() for k in hashing.mix(np.asarray(uids)).astype(">u8")]


class UserIndex:
  """The index at `path` (created empty if missing).

  Args:
    path: a directory or a URL.
    num_tasks: T, labels per entry.
    capacity: entries kept per user (>= the longest history any reader asks).
  """

  def __init__(self, path: str, num_tasks: int, capacity: int):
    self.path, self.capacity = path, capacity
    self.dtype = entry_dtype(num_tasks)
    self._context = ts.Context(
        {"cache_pool": {
            "total_bytes_limit": database.TS_CACHE_BYTES
        }})
    if "://" not in path:
      os.makedirs(path, exist_ok=True)
    self.kv = database.open_kv(path, context=self._context)

  def generation(self) -> int:
    """The newest OCDBT generation (0 while nothing was written)."""
    return database.latest_generation(self.path) or 0

  def _decode(self, value: bytes | None) -> np.ndarray:
    if not value:
      return np.zeros(0, self.dtype)
    if len(value) % self.dtype.itemsize:
      raise errors.StoreError(f"user index {self.path}: a value of {len(value)} bytes "
                              f"is not whole entries of {self.dtype.itemsize}")
    return np.frombuffer(value, self.dtype)

  def read(self, uids: np.ndarray, generation: int | None = None) -> list[np.ndarray]:
    """The entries of each user (oldest first; empty if none), as of
    `generation` (default the newest); all reads in flight at once."""
    if generation == 0:  # before the first commit
      return [np.zeros(0, self.dtype) for _ in uids]
    kv = self.kv if generation is None else database.open_kv(
        self.path, version=generation, context=self._context)
    futures = [kv.read(k) for k in user_keys(uids)]
    return [self._decode(f.result().value) for f in futures]

  def append(self, uids: np.ndarray, entries: np.ndarray, cutoff: int,
             expired_uids: np.ndarray) -> int:
    """Adds entries [n] of users uids [n] (one period's rows, in time order),
    drops every entry with ts < cutoff of these users and of `expired_uids`
    (the users of the period leaving the retention window), in one commit.

    Returns:
      The new generation.
    """
    uids = np.asarray(uids)
    order = np.argsort(uids, kind="stable")
    users, first = np.unique(uids[order], return_index=True)
    groups = np.split(entries[order], first[1:]) if len(users) else []
    expired = np.setdiff1d(np.asarray(expired_uids), users)
    all_users = np.concatenate([users, expired])
    old = self.read(all_users)
    txn = ts.Transaction()
    kv = self.kv.with_transaction(txn)
    keys = user_keys(all_users)
    for i, key in enumerate(keys):
      merged = old[i] if i >= len(users) else np.concatenate([old[i], groups[i]])
      kept = merged[merged["ts"] >= cutoff][-self.capacity:]
      if len(kept):
        kv[key] = kept.tobytes()
      elif len(old[i]):
        del kv[key]
    txn.commit_sync()
    return self.generation()

  def restore(self, uids: np.ndarray, generation: int) -> None:
    """Rewrites the values of `uids` as of `generation`, in one commit."""
    then = self.read(uids, generation)
    txn = ts.Transaction()
    kv = self.kv.with_transaction(txn)
    for key, value in zip(user_keys(uids), then):
      if len(value):
        kv[key] = value.tobytes()
      else:
        del kv[key]
    txn.commit_sync()
