"""What a stored InsEmb row is, whatever the engine: dtypes, quantization,
validation of the rows a write is given, and the order-independent checksum.

A row is (uint64 InsID, d values) stored as float32, bfloat16 or int8 (with a
float32 per-row scale). Every backend quantizes with `quantize` and hashes
with `row_checksum`, so two backends holding the same rows in the same dtype
give the same lookups and the same `metadata["checksum"]`. At 1e11 rows the
checksum is updated by upserts with O(changed rows) work and recomputed only
by `verify`. See docs/store.md.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorstore as ts

from iat_jax import errors

DTYPES = {"float32": ts.float32, "bfloat16": ts.bfloat16, "int8": ts.int8}
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_SEEDS = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xD6E8FEB86659FD93))


@dataclasses.dataclass(frozen=True)
class Format:
  """How rows are stored: width, dtype and block size."""
  d: int
  dtype: str
  block_rows: int

  @property
  def numpy_dtype(self) -> np.dtype:
    return np.dtype(DTYPES[self.dtype].numpy_dtype)

  @property
  def has_scales(self) -> bool:
    return self.dtype == "int8"

  @property
  def row_bytes(self) -> int:
    """Bytes of one stored row: key, scale (int8) and values."""
    return 8 + 4 * self.has_scales + self.d * self.numpy_dtype.itemsize


def check_dtype(dtype: str) -> None:
  """Raises errors.StoreError unless `dtype` is one of DTYPES."""
  if dtype not in DTYPES:
    raise errors.StoreError(f"store dtype {dtype!r} is not one of {sorted(DTYPES)}")


def quantize(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
  """float32 [n, d] -> (stored values [n, d], per-row scales [n] for int8 else None).

  int8 uses symmetric per-row scaling: scale = max|v| / 127, so the absolute
  error per element is at most scale / 2 = max|v| / 254, up to float32
  rounding (a factor 1 + 2**-15: the scale, the division and the dequantizing
  product each round by <= 2**-24 relative, on values up to 127.5 steps);
  all-zero rows get scale 1 and are stored exactly. bfloat16 rounds to
  nearest even (relative error <= 2**-8); float32 is exact.
  """
  if dtype == "int8":
    values = np.asarray(values, np.float32)
    scale = np.abs(values).max(axis=1, initial=0.0) / np.float32(127)
    scale = np.where(scale > 0, scale, 1).astype(np.float32)
    q = np.divide(values, scale[:, None])
    np.rint(q, out=q)
    return q.astype(np.int8), scale
  if dtype == "bfloat16":
    return np.asarray(values).astype(DTYPES["bfloat16"].numpy_dtype), None
  return np.asarray(values, np.float32), None


def check_rows(path: str,
               keys: np.ndarray,
               values: np.ndarray,
               d: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Rows to write -> (keys uint64 [n] sorted, values float32 [n, d] in key order).

  Raises:
    errors.StoreError: values not [len(keys), d], non-finite, or duplicate keys.
  """
  keys = np.asarray(keys).astype(np.uint64, copy=False).reshape(-1)
  values = np.asarray(values, np.float32)
  if values.ndim != 2 or len(values) != len(keys):
    raise errors.StoreError(f"{path}: values {values.shape} do not match keys "
                            f"[{len(keys)}]; expected [num_keys, d]")
  if d is not None and values.shape[1] != d:
    raise errors.StoreError(
        f"{path}: values have width {values.shape[1]}, the table d={d}")
  if not np.isfinite(values).all():
    raise errors.StoreError(f"{path}: non-finite InsEmb values")
  if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    if (keys[1:] == keys[:-1]).any():
      raise errors.StoreError(f"{path}: duplicate InsIDs in the rows being written")
    values = np.take(values, order, axis=0)
  return keys, values


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finalizer, in place on a uint64 array."""
  x ^= x >> np.uint64(30)
  x *= _M1
  x ^= x >> np.uint64(27)
  x *= _M2
  x ^= x >> np.uint64(31)
  return x


def row_checksum(keys: np.ndarray, stored: np.ndarray,
                 scales: np.ndarray | None) -> tuple[int, int]:
  """Two 64-bit sums over rows of per-row hashes of (key, scale, stored bytes).

  A sum does not depend on the order or grouping of rows, so a table's
  checksum is the same however its rows were chunked, sharded or merged, and
  an upsert updates it with O(changed rows) work (add new rows' hashes,
  subtract replaced ones').

  Args:
    keys: uint64 [n].
    stored: [n, d] stored values (any dtype).
    scales: float32 [n] or None.

  Returns:
    (sum of lane-1 hashes, sum of lane-2 hashes), each mod 2**64.
  """
  n = len(keys)
  if not n:
    return 0, 0
  raw = np.ascontiguousarray(stored).reshape(n, -1).view(np.uint8)
  pad = -raw.shape[1] % 8
  if pad:
    raw = np.concatenate([raw, np.zeros((n, pad), np.uint8)], axis=1)
  words = raw.view(np.uint64)  # [n, w]
  col = np.arange(words.shape[1], dtype=np.uint64)[None, :]
  out = []
  for seed in _SEEDS:
    h = _mix(np.asarray(keys, np.uint64) ^ seed)
    if scales is not None:
      h = _mix(h ^ np.asarray(scales, np.float32).view(np.uint32).astype(np.uint64))
    m = _mix((words ^ h[:, None]) + col * seed)  # [n, w], order of columns kept
    h = _mix(h + m.sum(axis=1, dtype=np.uint64))
    out.append(int(h.sum(dtype=np.uint64)))
  return out[0], out[1]


def add_checksums(*sums: tuple[int, int], sign: int = 1) -> tuple[int, int]:
  """Component-wise sum mod 2**64 (sign=-1 subtracts all but the first)."""
  a, b = sums[0]
  for x, y in sums[1:]:
    a, b = a + sign * x, b + sign * y
  return a % 2**64, b % 2**64


def checksum_hex(s: tuple[int, int]) -> str:
  return f"{s[0]:016x}{s[1]:016x}"


def parse_checksum(h: str) -> tuple[int, int]:
  return int(h[:16], 16), int(h[16:], 16)


def upserted_checksum(checksum: str, keys: np.ndarray, stored: np.ndarray,
                      scales: np.ndarray | None, old: tuple) -> str:
  """A table's checksum after rows keys [n] -> (stored, scales) were written
  over it, where old = (stored [n, d], scales [n] or None, found bool [n]):
  what the table held at those keys before (rows of found keys are replaced)."""
  old_stored, old_scales, found = old
  total = add_checksums(parse_checksum(checksum), row_checksum(keys, stored, scales))
  total = add_checksums(total,
                        row_checksum(keys[found], old_stored[found],
                                     None if old_scales is None else old_scales[found]),
                        sign=-1)
  return checksum_hex(total)
