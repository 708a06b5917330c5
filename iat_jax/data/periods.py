"""Periods of a log: the units continuous training runs in (`iat_jax.continuous`).

`--config.data.period` cuts a dataset's instances, in time order, into
consecutive periods:

  "<n><unit>"  by time, unit s, m, h, d or w ("1d": one period a calendar day,
               UTC; a period starts at a multiple of its length since the
               epoch, so a replay and a growing log cut the same periods);
  "rows:<n>"   by row count: about n instances each, a boundary moved back
               to the start of its timestamp so that equal timestamps never
               straddle two periods (ML-1M: 87% of its timestamps fall in
               2000, so days would give a few huge periods).

Every period's rows are a contiguous run of `temporal_order` (sorted by
(ts, ins_id)), so a period is two integers and reading one is O(its rows).
Cutting reads the timestamps once in time order (8 bytes a row, once per
run); at 1e11 rows the log's writer records each period's bounds as it
appends, and `Periods` is those bounds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re

import numpy as np

from iat_jax import errors

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_TIME = re.compile(r"^(\d+)([smhdw])$")
_ROWS = re.compile(r"^rows:(\d+)$")


def duration(text: str, flag: str) -> int:
  """Seconds of a duration "0" or "<n><unit>" (see the module docstring);
  ConfigError naming `flag` otherwise."""
  text = str(text).strip()
  if text == "0":
    return 0
  m = _TIME.match(text)
  if not m:
    raise errors.ConfigError(
        flag, f"{text!r} is not a duration: use 0 or <n><unit> with unit "
        f"one of {tuple(UNITS)}, e.g. 6h or 1d")
  return int(m.group(1)) * UNITS[m.group(2)]


def check_spec(text: str) -> tuple[int, int]:
  """(seconds, rows) of a data.period value, one of them 0; ConfigError
  naming --config.data.period when it is neither form or not positive."""
  m = _ROWS.match(str(text).strip())
  if m:
    rows = int(m.group(1))
    if rows <= 0:
      raise errors.ConfigError("data.period", f"{text!r}: rows must be > 0")
    return 0, rows
  m = _TIME.match(str(text).strip())
  if not m:
    raise errors.ConfigError(
        "data.period", f"{text!r} is neither <n><unit> (unit one of "
        f"{tuple(UNITS)}, e.g. 1d) nor rows:<n> (e.g. rows:25000)")
  seconds = int(m.group(1)) * UNITS[m.group(2)]
  if seconds <= 0:
    raise errors.ConfigError("data.period", f"{text!r}: a period must be longer than 0")
  return seconds, 0


@dataclasses.dataclass(frozen=True)
class Periods:
  """A dataset's periods.

  Attributes:
    order: int64 [N] dataset rows in time order (`temporal_order`, a memmap).
    bounds: int64 [P + 1]: period p is order[bounds[p]:bounds[p + 1]].
    start: int64 [P]: the first moment of each period (a row at time t is in
      the last period with start <= t).
  """
  order: np.ndarray
  bounds: np.ndarray
  start: np.ndarray

  def __len__(self) -> int:
    return len(self.start)

  def rows(self, p: int) -> np.ndarray:
    """int64 [n_p]: dataset rows of period p, in time order."""
    return np.asarray(self.order[self.bounds[p]:self.bounds[p + 1]])

  def of_time(self, ts: np.ndarray) -> np.ndarray:
    """int64 [...]: the period of each moment (-1 before the first)."""
    return np.searchsorted(self.start, np.asarray(ts), side="right") - 1

  def digest(self, ins_id: np.ndarray, p: int) -> str:
    """A fingerprint of period p's instances (their InsIDs in time order): a
    resumed run checks that the periods it already trained on are unchanged."""
    ids = np.ascontiguousarray(np.asarray(ins_id)[self.rows(p)])
    return hashlib.sha256(ids.tobytes()).hexdigest()[:16]


def build(ts_sorted: np.ndarray, order: np.ndarray, spec: str, where: str) -> Periods:
  """The periods of a log.

  Args:
    ts_sorted: int64 [N] timestamps in time order (ts[temporal_order]).
    order: int64 [N] the rows in time order.
    spec: the data.period value.
    where: the dataset path, for errors.

  Raises:
    ConfigError: the spec is bad, or yields fewer than 2 periods of data.
  """
  seconds, rows = check_spec(spec)
  ts_sorted = np.asarray(ts_sorted)
  n = len(ts_sorted)
  if n and seconds:
    first = int(ts_sorted[0]) // seconds * seconds
    start = np.arange(first, int(ts_sorted[-1]) + 1, seconds, dtype=np.int64)
    bounds = np.searchsorted(ts_sorted, start, side="left")
  elif n:
    cut = np.unique(
        np.searchsorted(ts_sorted, ts_sorted[np.arange(0, n, rows)], side="left"))
    bounds, start = cut, ts_sorted[cut].astype(np.int64)
  else:
    bounds = start = np.zeros(0, np.int64)
  bounds = np.append(bounds, n).astype(np.int64)
  if len(start) < 2:
    raise errors.ConfigError(
        "data.period", f"{spec!r} cuts the {n} instances of {where} into "
        f"{len(start)} period(s); continuous training needs at least 2: use a "
        f"shorter period")
  return Periods(order=order, bounds=bounds, start=start)


def of_dataset(ds, spec: str) -> Periods:
  """The periods of dataset `ds` (`iat_jax.data.dataset.Dataset`)."""
  order = ds["temporal_order"]
  ts_sorted = np.asarray(ds["ts"])[np.asarray(order)]
  return build(ts_sorted, order, spec, ds.path)
