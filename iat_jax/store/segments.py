"""Immutable sorted segments of InsEmb rows inside an OCDBT key-value store.

A segment is one sorted run of rows of one shard (see `insemb_table` for the
table layout and why). It is stored as

  <name>/index          fences uint64 [blocks] (first key of each block), then
                        row counts uint32 [blocks]
  <name>/<block:08x>    one block of up to `block_rows` rows, sorted by key:
                        keys uint64 [r] | scales float32 [r] (int8 only) |
                        values [r, d] in the stored dtype

Segments are written once and never modified; a table version names the
segments it is made of. This module holds the block codec, the segment
builder, the streaming k-way merge (newest segment wins on equal keys) and
the order-independent row checksum.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Iterator, Sequence

import numpy as np
import tensorstore as ts

from iat_jax import errors

DTYPES = {"float32": ts.float32, "bfloat16": ts.bfloat16, "int8": ts.int8}
_TXN_BYTES = 64 << 20  # blocks per OCDBT commit while a segment is written
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


def encode_block(keys: np.ndarray, stored: np.ndarray,
                 scales: np.ndarray | None) -> bytes:
  parts = [np.ascontiguousarray(keys, np.uint64).tobytes()]
  if scales is not None:
    parts.append(np.ascontiguousarray(scales, np.float32).tobytes())
  parts.append(np.ascontiguousarray(stored).tobytes())
  return b"".join(parts)


def decode_block(blob: bytes, fmt: Format, rows: int,
                 where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Block bytes -> (keys [r], stored [r, d], scales [r] or None)."""
  if len(blob) != rows * fmt.row_bytes:
    raise errors.StoreError(f"InsEmb store: block {where} has {len(blob)} bytes, "
                     f"expected {rows} rows x {fmt.row_bytes} B (corrupt or "
                     f"truncated)")
  buf = np.frombuffer(blob, np.uint8)
  keys = buf[:8 * rows].view(np.uint64)
  off = 8 * rows
  scales = None
  if fmt.has_scales:
    scales = buf[off:off + 4 * rows].view(np.float32)
    off += 4 * rows
  stored = buf[off:].view(fmt.numpy_dtype).reshape(rows, fmt.d)
  return keys, stored, scales


def read_value(kv: ts.KvStore, key: str, what: str) -> bytes:
  try:
    r = kv.read(key).result()
  except ValueError as e:
    raise errors.StoreError(f"InsEmb store: cannot read {what} ({e})") from e
  if r.state != "value":
    raise errors.StoreError(f"InsEmb store: {what} is missing (key {key!r})")
  return r.value


def read_json(kv: ts.KvStore, key: str, what: str) -> dict:
  try:
    return json.loads(read_value(kv, key, what))
  except (ValueError, UnicodeDecodeError) as e:
    if isinstance(e, errors.StoreError):
      raise
    raise errors.StoreError(f"InsEmb store: {what} is not valid JSON ({e})") from e


@dataclasses.dataclass
class Index:
  """A segment's block index: fences uint64 [b] and counts int32 [b]."""
  fences: np.ndarray
  counts: np.ndarray

  @property
  def nbytes(self) -> int:
    return self.fences.nbytes + self.counts.nbytes


def read_index(kv: ts.KvStore, name: str, blocks: int) -> Index:
  blob = read_value(kv, f"{name}/index", f"index of segment {name}")
  if len(blob) != 12 * blocks:
    raise errors.StoreError(f"InsEmb store: index of segment {name} has {len(blob)} "
                     f"bytes, expected {blocks} blocks x 12 B (corrupt)")
  buf = np.frombuffer(blob, np.uint8)
  return Index(buf[:8 * blocks].view(np.uint64).copy(),
               buf[8 * blocks:].view(np.uint32).astype(np.int32))


class Batch:
  """Writes to one kvstore gathered in (non-atomic) transactions, committed
  every _TXN_BYTES: one OCDBT commit per ~64 MB instead of one per key.

  Nothing written is durable (or readable) before `flush` returns.
  """

  def __init__(self, kv: ts.KvStore):
    self.kv = kv
    self._txn = None
    self._bytes = 0

  def put(self, key: str, value: bytes) -> None:
    if self._txn is None:
      self._txn = ts.Transaction()
    self.kv.with_transaction(self._txn).write(key, value)
    self._bytes += len(value)
    if self._bytes >= _TXN_BYTES:
      self.flush()

  def flush(self) -> None:
    if self._txn is not None:
      try:
        self._txn.commit_sync()
      except ValueError as e:
        raise errors.StoreError(f"InsEmb store: write failed ({e})") from e
    self._txn, self._bytes = None, 0


class SegmentBuilder:
  """Writes one segment from rows given in ascending key order, in pieces.

  Blocks go to `batch`; `finish` adds the index and returns the segment's
  entry for the table metadata: {"name", "rows", "blocks"} (durable once the
  batch is flushed). A segment is visible to readers only once a published
  version names it.
  """

  def __init__(self, batch: Batch, name: str, fmt: Format):
    self.batch, self.name, self.fmt = batch, name, fmt
    self._fences: list[int] = []
    self._counts: list[int] = []
    self._buf: list[tuple] = []
    self._buf_rows = 0
    self.rows = 0

  def add(self, keys: np.ndarray, stored: np.ndarray,
          scales: np.ndarray | None) -> None:
    """Appends rows: keys uint64 [n] ascending (and above earlier ones)."""
    if not len(keys):
      return
    self._buf.append((keys, stored, scales))
    self._buf_rows += len(keys)
    if self._buf_rows >= self.fmt.block_rows:
      self._emit(final=False)

  def _emit(self, final: bool) -> None:
    keys = np.concatenate([b[0] for b in self._buf])
    stored = np.concatenate([b[1] for b in self._buf])
    scales = (np.concatenate([b[2] for b in self._buf])
              if self.fmt.has_scales else None)
    b = self.fmt.block_rows
    full = len(keys) if final else len(keys) // b * b
    for start in range(0, full, b):
      end = min(start + b, full)
      self._write_block(keys[start:end], stored[start:end],
                        None if scales is None else scales[start:end])
    rest = slice(full, None)
    self._buf = ([(keys[rest], stored[rest], None if scales is None else scales[rest])]
                 if full < len(keys) else [])
    self._buf_rows = len(keys) - full

  def _write_block(self, keys, stored, scales) -> None:
    i = len(self._fences)
    self._fences.append(int(keys[0]))
    self._counts.append(len(keys))
    self.rows += len(keys)
    self.batch.put(f"{self.name}/{i:08x}", encode_block(keys, stored, scales))

  def finish(self) -> dict:
    if self._buf_rows:
      self._emit(final=True)
    fences = np.array(self._fences, np.uint64)
    counts = np.array(self._counts, np.uint32)
    self.batch.put(f"{self.name}/index", fences.tobytes() + counts.tobytes())
    return {"name": self.name, "rows": self.rows, "blocks": len(fences)}


@dataclasses.dataclass
class Source:
  """A segment to read: the kvstore holding it and its metadata entry."""
  kv: ts.KvStore
  seg: dict
  index: Index | None = None

  def load(self) -> Index:
    if self.index is None:
      self.index = read_index(self.kv, self.seg["name"], self.seg["blocks"])
    return self.index


def read_blocks(src: Source, fmt: Format, blocks: Sequence[int]) -> list[tuple]:
  """Reads (keys, stored, scales) of the given blocks of a segment, concurrently."""
  idx = src.load()
  name = src.seg["name"]
  futures = [src.kv.read(f"{name}/{b:08x}") for b in blocks]
  out = []
  for b, f in zip(blocks, futures):
    try:
      r = f.result()
    except ValueError as e:
      raise errors.StoreError(f"InsEmb store: cannot read block {name}/{b:08x} ({e})") from e
    if r.state != "value":
      raise errors.StoreError(f"InsEmb store: block {name}/{b:08x} is missing")
    out.append(decode_block(r.value, fmt, int(idx.counts[b]), f"{name}/{b:08x}"))
  return out


def merged(
    sources: Sequence[Source],
    fmt: Format,
    piece_rows: int = 1 << 18
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None, int]]:
  """Streams the union of segments in key order; later sources win on equal keys.

  Memory is about `piece_rows` rows (plus one block per source per piece):
  the key space is cut at fences into pieces of ~piece_rows rows, and each
  piece reads only the blocks that overlap it.

  Yields:
    (keys uint64 [m] ascending, stored [m, d], scales [m] or None, number of
    rows dropped as shadowed duplicates in this piece).
  """
  if not sources:
    return
  fences = [s.load().fences for s in sources]
  every = np.sort(np.concatenate(fences))
  step = max(1, piece_rows // fmt.block_rows)
  cuts = [None] + [int(c) for c in np.unique(every[step::step])] + [None]
  for lo, hi in zip(cuts[:-1], cuts[1:]):
    parts = []
    for rank, (src, f) in enumerate(zip(sources, fences)):
      first = 0 if lo is None else max(
          int(np.searchsorted(f, np.uint64(lo), "right")) - 1, 0)
      last = len(f) if hi is None else int(np.searchsorted(f, np.uint64(hi), "left"))
      for k, v, s in read_blocks(src, fmt, range(first, last)):
        keep = np.ones(len(k), bool)
        if lo is not None:
          keep &= k >= np.uint64(lo)
        if hi is not None:
          keep &= k < np.uint64(hi)
        if keep.any():
          parts.append((k[keep], v[keep], None if s is None else s[keep],
                        np.full(int(keep.sum()), rank, np.int32)))
    if not parts:
      continue
    keys = np.concatenate([p[0] for p in parts])
    stored = np.concatenate([p[1] for p in parts])
    scales = np.concatenate([p[2] for p in parts]) if fmt.has_scales else None
    rank = np.concatenate([p[3] for p in parts])
    order = np.lexsort((rank, keys))
    keys = keys[order]
    last = np.ones(len(keys), bool)  # the newest (highest rank) of equal keys
    last[:-1] = keys[1:] != keys[:-1]
    order = order[last]
    yield (keys[last], stored[order], None if scales is None else scales[order],
           int(len(last) - last.sum()))
