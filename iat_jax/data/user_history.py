"""User history index: UID -> time-sorted (InsID, ts, labels) of past instances.

The paper's "high-performance KV storage" next to the InsEmb table. It is
derived from a user-ordered dataset without copying anything: a user's
instances are the contiguous rows `[user_offsets[k], user_offsets[k+1])`,
already sorted by (ts, ins_id), so a lookup is a binary search plus a slice.
Every query applies the strictly-earlier rule of `iat_jax.data.history`: an
instance at time t never sees an instance with timestamp >= t, and sees a past
instance's task-k label only once it has arrived (`history.label_known` with
`Schema.label_delays`). A label not yet known reads 0 in hist_labels and
False in hist_label_known, so the model can tell "unknown" from "negative".

Two ways in:
  * `before_rows(rows, L)`: for requests that are dataset rows (training and
    evaluation); uses the precomputed `hist_end` column, O(1) per request.
  * `before(uids, ts, L)`: for arbitrary (uid, timestamp) requests, e.g. a
    serving request or a streaming step; O(log n) per request.
"""

from __future__ import annotations

import numpy as np

from iat_jax.data import dataset as dataset_lib
from iat_jax.data import history


class UserHistory:
  """Read-only history index over a dataset (memory-mapped columns)."""

  def __init__(self, ds: dataset_lib.Dataset):
    self.ds = ds
    offsets = np.asarray(ds["user_offsets"])
    self._offsets = offsets
    self._uids = np.asarray(ds["uid"][offsets[:-1]]) if ds.num_rows else np.zeros(0)

  def _fields(self, rows: np.ndarray, mask: np.ndarray,
              request_ts: np.ndarray) -> dict[str, np.ndarray]:
    """History fields of slots rows/mask [..., L] for requests at request_ts [...]."""
    ds = self.ds
    past_ts = history.gather(ds["ts"], rows, mask)
    known = history.label_known(request_ts, past_ts, mask, ds.schema.label_delays)
    return {
        "hist_row": np.where(mask, rows, -1),
        "hist_mask": mask,
        "hist_ins_id": history.gather(ds["ins_id"], rows, mask),
        "hist_ts": past_ts,
        "hist_labels": history.gather(ds["labels"], rows, known),  # known <= mask
        "hist_label_known": known
    }

  def before_rows(self, rows: np.ndarray, length: int) -> dict[str, np.ndarray]:
    """Newest `length` strictly-earlier instances of each request row.

    Args:
      rows: int64 [...] dataset rows of the requests (must be >= 0).
      length: L.

    Returns:
      hist_row (int64, -1 = none), hist_mask (bool), hist_ins_id (uint64),
      hist_ts (int64): [..., L]; hist_labels float32 [..., L, tasks] (0 where
      not yet known) and hist_label_known bool [..., L, tasks]. Newest first;
      empty slots are zero.
    """
    hrows, mask = history.earlier_rows(self.ds["hist_end"][rows],
                                       self.ds.user_start(rows), length)
    return self._fields(hrows, mask, np.asarray(self.ds["ts"][rows]))

  def before(self, uids: np.ndarray, ts: np.ndarray,
             length: int) -> dict[str, np.ndarray]:
    """Newest `length` instances of user uids[i] with timestamp < ts[i].

    Args:
      uids: int64 [n] raw user ids (unknown users get an empty history).
      ts: int64 [n] request times.
      length: L.

    Returns:
      As `before_rows`, with leading dim [n].
    """
    uids, ts = np.asarray(uids), np.asarray(ts)
    n_users = len(self._uids)
    k = np.minimum(np.searchsorted(self._uids, uids), max(n_users - 1, 0))
    known = (self._uids[k] == uids) if n_users else np.zeros(len(uids), bool)
    lo = np.where(known, self._offsets[k], 0)
    hi = np.where(known, self._offsets[np.minimum(k + 1, n_users)], 0)
    start = lo.copy()
    # Vectorized binary search for the first row with ts >= request ts.
    ts_col = self.ds["ts"]
    while (active := lo < hi).any():
      mid = (lo + hi) // 2
      earlier = active & (np.asarray(ts_col[np.minimum(mid, len(ts_col) - 1)]) < ts)
      lo = np.where(earlier, mid + 1, lo)
      hi = np.where(active & ~earlier, mid, hi)
    hrows, mask = history.earlier_rows(lo, start, length)
    return self._fields(hrows, mask, ts)
