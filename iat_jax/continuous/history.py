"""What a request of period p may see of its user's past, assembled per batch.

At the start of period p the user-history index (`user_index.UserIndex`, as
of the checkpoint of period p - 1) is read once for the users of p; with p's
own rows (time order) appended it gives each user a *timeline*: every entry
the user has, oldest first, held flat (`Timeline`). A request at time T of
period p then sees, newest first:

  downstream (`downstream`): the entries with ts + sync_lag < T -- strictly
    earlier (same-timestamp rows excluded), and only once the source's
    InsEmb of the entry is visible to the downstream, `sync_lag` seconds
    after the instance (0: as soon as the source processed it) -- whose ts is
    >= the retention cutoff; a past label only once known at T
    (`history.label_known` with the schema's label delays);
  stream source (`stream_past`): the entries strictly earlier than T that the
    source already processed, i.e. of an earlier period or of an earlier
    batch of this one (Eq. 8's streaming form).

Nothing else reaches a batch: no row's own outcome, nothing at or after T.
Memory: the period's users' index entries plus the period's rows, O(rows of
p) for capacity-bounded users; at 1e11 rows each process would hold its
users' slice of a period.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from iat_jax.data import history
from iat_jax.store import user_index


@dataclasses.dataclass
class Timeline:
  """Flat per-user timelines of the users of one period.

  users: int64 [U] sorted raw uids; start: int64 [U + 1] segment offsets;
  ins_id, ts, labels: the entries [E + 1] (oldest first per user; the last
  one a zero entry that masked slots read); rank: int64 [E + 1] position of
  the entry in the period's time order (-1: an index entry of an earlier
  period).
  """
  users: np.ndarray
  start: np.ndarray
  ins_id: np.ndarray
  ts: np.ndarray
  labels: np.ndarray
  rank: np.ndarray
  _keys: dict = dataclasses.field(default_factory=dict, repr=False)

  @classmethod
  def build(cls, old: list[np.ndarray], users: np.ndarray, uid: np.ndarray,
            entries: np.ndarray) -> Timeline:
    """Timelines from the index entries `old` of sorted `users` and the
    period's entries [n] of users `uid` [n], in time order."""
    seg_old = np.repeat(np.arange(len(users)), [len(o) for o in old])
    seg_new = np.searchsorted(users, uid)
    seg = np.concatenate([seg_old, seg_new])
    rank = np.concatenate([np.full(len(seg_old), -1), np.arange(len(uid))])
    flat = np.concatenate(old + [entries]) if len(users) else entries
    order = np.lexsort((rank, seg))  # stable: old entries keep their order
    flat = flat[order]
    start = np.searchsorted(seg[order], np.arange(len(users) + 1))
    flat = np.append(flat, np.zeros(1, flat.dtype))  # what masked slots read
    return cls(users, start, flat["ins_id"], flat["ts"], flat["labels"],
               np.append(rank[order], -1))

  def _segment(self, uid: np.ndarray) -> np.ndarray:
    return np.searchsorted(self.users, uid)

  def _search(self, seg: np.ndarray, column: str, value: np.ndarray) -> np.ndarray:
    """Per request, the first entry of its segment with column >= value
    (entries are sorted by (segment, column): one searchsorted of a packed
    int64 key, built once per column)."""
    if column not in self._keys:
      col = getattr(self, column)[:self.start[-1]]
      seg_of = np.repeat(np.arange(len(self.users)), np.diff(self.start))
      lo = int(col.min(initial=0))
      span = int(col.max(initial=0)) - lo + 2
      if span * (len(self.users) + 1) >= 1 << 62:
        raise OverflowError(f"timeline keys of {column} overflow int64")
      self._keys[column] = (seg_of * span + (col - lo), lo, span)
    keys, lo, span = self._keys[column]
    query = seg * span + (np.clip(value, lo, lo + span - 1) - lo)
    return np.searchsorted(keys, query, side="left")

  def _slots(self, begin: np.ndarray, end: np.ndarray, length: int):
    idx = end[:, None] - 1 - np.arange(length)
    mask = idx >= begin[:, None]
    return np.where(mask, idx, 0), mask

  def downstream(self, uid: np.ndarray, ts: np.ndarray, valid: np.ndarray, length: int,
                 sync_lag: int, cutoff: int, label_delays) -> dict[str, np.ndarray]:
    """The newest `length` visible entries of requests (uid, ts) [b].

    Returns hist_ins_id uint64, hist_ts int64, hist_mask bool [b, L],
    hist_labels float32 and hist_label_known bool [b, L, T] (0 / False where
    not yet known), newest first.
    """
    seg = self._segment(uid)
    begin = np.maximum(self.start[seg], self._search(seg, "ts",
                                                     np.full_like(ts, cutoff)))
    end = self._search(seg, "ts", ts - sync_lag)
    idx, mask = self._slots(begin, end, length)
    mask &= valid[:, None]
    return self._fields(idx, mask, ts, label_delays)

  def stream_past(self, uid: np.ndarray, ts: np.ndarray, valid: np.ndarray, length: int,
                  batch_start: int, cutoff: int) -> dict[str, np.ndarray]:
    """The newest `length` entries strictly before (uid, ts) [b] that the
    source processed before the batch starting at period rank batch_start:
    past_ins_id, past_ts, past_mask [b, K]."""
    seg = self._segment(uid)
    begin = np.maximum(self.start[seg], self._search(seg, "ts",
                                                     np.full_like(ts, cutoff)))
    end = np.minimum(self._search(seg, "ts", ts),
                     self._search(seg, "rank", np.full_like(ts, batch_start)))
    idx, mask = self._slots(begin, end, length)
    mask &= valid[:, None]
    return {
        "past_ins_id": np.where(mask, self.ins_id[idx], np.uint64(0)),
        "past_ts": np.where(mask, self.ts[idx], 0),
        "past_mask": mask
    }

  def _fields(self, idx, mask, ts, label_delays) -> dict[str, np.ndarray]:
    past_ts = np.where(mask, self.ts[idx], 0)
    known = history.label_known(ts, past_ts, mask, label_delays)
    return {
        "hist_ins_id": np.where(mask, self.ins_id[idx], np.uint64(0)),
        "hist_ts": past_ts,
        "hist_mask": mask,
        "hist_labels": np.where(known, self.labels[idx], 0.0).astype(np.float32),
        "hist_label_known": known
    }


def entries(ds, rows: np.ndarray) -> np.ndarray:
  """Index entries of dataset `rows` [n]."""
  out = np.zeros(len(rows), user_index.entry_dtype(ds.schema.num_tasks))
  out["ins_id"] = np.asarray(ds["ins_id"])[rows]
  out["ts"] = np.asarray(ds["ts"])[rows]
  out["labels"] = np.asarray(ds["labels"])[rows]
  return out


def tie_groups(past_ts: np.ndarray,
               past_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(tie_group [b], past_tie_group [b, K]) of stream requests: a past slot's
  group is the first slot of its run of equal timestamps (newest first), the
  request's own is K, so same-time past entries never see each other
  (`attention.tie_mask`)."""
  b, k = past_ts.shape
  j = np.arange(k)
  new = np.ones((b, k), bool)
  new[:, 1:] = past_ts[:, 1:] != past_ts[:, :-1]
  group = np.maximum.accumulate(np.where(new, j, 0), axis=1)
  return np.full(b, k, np.int32), np.where(past_mask, group, -1).astype(np.int32)
