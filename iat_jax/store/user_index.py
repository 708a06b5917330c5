"""The user-history index: hashed UID -> the user's newest instances, in TensorStore.

The paper's "high-performance KV storage" beside the InsEmb table (Fig. 4):
a request reads its user's list of past InsIDs (with their time and labels)
here, then their InsEmbs from the source's store. OCDBT databases
(TensorStore's B+tree kvstore, a local directory or a gs:// / s3:// URL),
one part per process of the job, <path>/part-<k>: process k owns the users
with mix(uid) % P == k. A key is the big-endian 8 bytes of
`hashing.mix(uid)`; a value is the user's newest `capacity` entries, oldest
first, as the bytes of a numpy structured array `entry_dtype(num_tasks)`:
ins_id uint64, ts int64 and the labels float32 [T] (final values; who may
read a label and when is the reader's rule, `iat_jax.data.history.label_known`).

`append` adds one period's rows: each process takes its own users, reads
their values, merges the new entries in, drops entries older than the
retention cutoff, truncates to capacity and writes them in ONE transaction
(one OCDBT generation of its part) -- O(rows of the period) split over the
processes, whatever the log's length. Retention also rewrites the users of
the period that falls out of the window (O(its rows)), so a replay rebuilds
the same bytes. Readers name the generation of every part they read at (a
period checkpoint records them); `restore` undoes what a killed run appended
past a checkpoint: each process rewrites its users' values as they were at
the checkpoint's generation (OCDBT keeps older generations readable).

At 1e11 instances (1e9 users, capacity 256): ~40 bytes x 256 per user, 10 TB
over the parts' B+trees, whose nodes a reader caches within TS_CACHE_BYTES
per part; appends touch the period's users only.
"""

from __future__ import annotations

import jax
import numpy as np
import tensorstore as ts

from iat_jax import errors
from iat_jax.data import hashing
from iat_jax.store import database
from iat_jax.store import partitions


def entry_dtype(num_tasks: int) -> np.dtype:
  """One index entry: (ins_id uint64, ts int64, labels float32 [num_tasks])."""
  return np.dtype([("ins_id", "<u8"), ("ts", "<i8"), ("labels", "<f4", (num_tasks,))])


def user_hashes(uids: np.ndarray) -> np.ndarray:
  """uint64 [n]: the hash that keys and places a user."""
  return hashing.mix(np.asarray(uids))


class _Part:
  """One process's OCDBT database of the index."""

  def __init__(self, path: str, dtype: np.dtype):
    self.path, self.dtype = path, dtype
    self._context = ts.Context(
        {"cache_pool": {
            "total_bytes_limit": database.TS_CACHE_BYTES
        }})
    self.kv = database.open_kv(path, context=self._context)

  def generation(self) -> int:
    return database.latest_generation(self.path) or 0

  def _decode(self, value: bytes | None) -> np.ndarray:
    if not value:
      return np.zeros(0, self.dtype)
    if len(value) % self.dtype.itemsize:
      raise errors.StoreError(f"user index {self.path}: a value of {len(value)} bytes "
                              f"is not whole entries of {self.dtype.itemsize}")
    return np.frombuffer(value, self.dtype)

  def read(self, hashes: np.ndarray, generation: int | None) -> list[np.ndarray]:
    if generation == 0:  # before the first commit
      return [np.zeros(0, self.dtype) for _ in hashes]
    kv = self.kv if generation is None else database.open_kv(
        self.path, version=generation, context=self._context)
    futures = [kv.read(h.tobytes()) for h in hashes.astype(">u8")]  # all in flight
    return [self._decode(f.result().value) for f in futures]

  def write(self, hashes: np.ndarray, values: list[np.ndarray]) -> None:
    """One commit: each user's value (an empty one deletes the key)."""
    txn = ts.Transaction()
    kv = self.kv.with_transaction(txn)
    for h, value in zip(hashes.astype(">u8"), values):
      if len(value):
        kv[h.tobytes()] = value.tobytes()
      else:
        del kv[h.tobytes()]
    txn.commit_sync()


class UserIndex:
  """The index at `path`, one part per process (created empty if missing).

  Args:
    path: a directory or a URL.
    num_tasks: T, labels per entry.
    capacity: entries kept per user (>= the longest history any reader asks).
  """

  def __init__(self, path: str, num_tasks: int, capacity: int):
    self.path, self.capacity = path.rstrip("/"), capacity
    self.dtype = entry_dtype(num_tasks)
    self.part, self.parts = jax.process_index(), jax.process_count()
    self._parts = [
        _Part(f"{self.path}/part-{k:03d}", self.dtype) for k in range(self.parts)
    ]

  def generations(self) -> list[int]:
    """The newest OCDBT generation of every part (0: nothing written)."""
    return [part.generation() for part in self._parts]

  def read(self,
           uids: np.ndarray,
           generations: list[int] | None = None) -> list[np.ndarray]:
    """The entries of each user (oldest first; empty if none), as of the
    parts' `generations` (default the newest)."""
    hashes = user_hashes(uids)
    where = partitions.owner(hashes, self.parts)
    out: list = [None] * len(hashes)
    for k, part in enumerate(self._parts):
      sel = np.flatnonzero(where == k)
      if len(sel):
        gen = None if generations is None else generations[k]
        for i, value in zip(sel, part.read(hashes[sel], gen)):
          out[i] = value
    return out

  def _mine(self, uids: np.ndarray) -> np.ndarray:
    return partitions.owner(user_hashes(uids), self.parts) == self.part

  def append(self, uids: np.ndarray, entries: np.ndarray, cutoff: int,
             expired_uids: np.ndarray) -> list[int]:
    """Adds entries [n] of users uids [n] (one period's rows, in time order),
    drops every entry with ts < cutoff of these users and of `expired_uids`
    (the users of the period leaving the retention window): each process its
    own users, in one commit of its part; collective.

    Returns:
      The parts' new generations.
    """
    uids = np.asarray(uids)
    mine = self._mine(uids)
    uids, entries = uids[mine], entries[mine]
    order = np.argsort(uids, kind="stable")
    users, first = np.unique(uids[order], return_index=True)
    groups = np.split(entries[order], first[1:]) if len(users) else []
    expired = np.asarray(expired_uids)
    expired = np.setdiff1d(expired[self._mine(expired)], users)
    all_users = np.concatenate([users, expired])
    old = self.read(all_users)
    new = []
    for i, value in enumerate(old):
      merged = value if i >= len(users) else np.concatenate([value, groups[i]])
      new.append(merged[merged["ts"] >= cutoff][-self.capacity:])
    changed = [i for i, (a, b) in enumerate(zip(old, new)) if len(a) or len(b)]
    self._parts[self.part].write(user_hashes(all_users[changed]),
                                 [new[i] for i in changed])
    partitions.barrier(f"{self.path}-append")
    return self.generations()

  def restore(self, uids: np.ndarray, generations: list[int]) -> None:
    """Rewrites this process's users among `uids` as of `generations`."""
    uids = np.asarray(uids)
    uids = uids[self._mine(uids)]
    then = self.read(uids, generations)
    self._parts[self.part].write(user_hashes(uids), then)
