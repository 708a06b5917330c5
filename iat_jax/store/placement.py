"""Where a table places an instance's row: its store key, from (InsID, user).

Tables are sorted by a uint64 key. The InsID is a hash, so keyed by InsID
alone one user's instances scatter over the whole table and the downstream,
which reads a user's newest L instances for each request, reads about one
block per history slot (at 10M rows, 19 rows read per slot used;
docs/benchmarks.md#store-reads-at-the-downstreams-access-pattern). The
"user" placement keys a row by

    store key = (mix(uid) & ~(2**32 - 1)) | (InsID & (2**32 - 1))

the high 32 bits of the user's hash (the user-history index's hash,
`user_index.user_hashes`) over the InsID's low 32 bits: a user's rows are
adjacent in the key order, in the same shard (shards are the high bits), so a
batch of requests reads each user's rows as a few whole blocks (0.05 rows
read per slot at 10M rows). The InsID stays the logical key: every caller
looks rows up, writes and exports them by (InsID, user) through `keys`, and
the rest of the store is unchanged (the LSM segments, upserts, the parallel
export and their costs). "insid" keys by the InsID itself.

The price: two instances of one user whose InsIDs agree in their low 32 bits
share a key (the newer row wins, as for equal InsIDs). A user with n
instances has about n^2 / 2^33 such pairs (2314 instances, ML-1M's longest
history: 6e-4); at the paper's 2e11 instances over ~1e9 users (E[n^2] ~ 1e5)
about 1e4 rows, 5e-8 of them, against ~1e3 for 64-bit InsIDs alone. Users
whose hashes share their high 32 bits interleave (1e9 users over 4.3e9
values: ~12% of users share with another); a user whose history is much
longer than L still reads all its rows (time is not in the key).
"""

from __future__ import annotations

import numpy as np

from iat_jax.data import hashing

PLACEMENTS = ("user", "insid")
_LOW = np.uint64(2**32 - 1)


def keys(placement: str, ins_id: np.ndarray, uid: np.ndarray) -> np.ndarray:
  """Store keys (uint64, shape of ins_id) of InsIDs of users uid (int64,
  broadcast to ins_id's shape); InsID 0 (no instance) stays 0.

  Raises:
    ValueError: an unknown placement.
  """
  ins_id = np.asarray(ins_id, np.uint64)
  if placement == "insid":
    return ins_id
  if placement != "user":
    raise ValueError(f"placement {placement!r} is not one of {PLACEMENTS}")
  user = hashing.mix(np.broadcast_to(np.asarray(uid), ins_id.shape))
  out = (user & ~_LOW) | (ins_id & _LOW)
  return np.where(ins_id == 0, np.uint64(0), out)
