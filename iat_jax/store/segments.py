"""Immutable sorted segments of InsEmb rows inside an OCDBT key-value store.

A segment is one sorted run of rows of one shard (the table layout, and why
blocks: docs/store.md). It is stored as

  <name>/index          fences uint64 [blocks] (first key of each block), then
                        row counts uint32 [blocks]
  <name>/<block:08x>    one block of up to `block_rows` rows, sorted by key:
                        keys uint64 [r] | scales float32 [r] (int8 only) |
                        values [r, d] in the stored dtype | CRC-32 of all
                        that (uint32), checked on every read

Segments are written once and never modified; a table version names the
segments it is made of. This module holds the block codec, the segment
index, the segment builder and the streaming k-way merge (newest segment wins
on equal keys). At 1e11 rows (256 shards) a segment of ~4e8 rows has ~1.5e6
blocks and an 18 MB index; a merge streams it in pieces of ~2.6e5 rows.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import json
from typing import Iterator, Sequence
import zlib

import numpy as np
import tensorstore as ts

from iat_jax import errors
from iat_jax.store import rows

_TXN_BYTES = 64 << 20  # blocks per OCDBT commit while a segment is written
_MERGE_WINDOW = 64  # block reads in flight while a merge reads a piece


def encode_block(keys: np.ndarray, stored: np.ndarray,
                 scales: np.ndarray | None) -> bytes:
  parts = [np.ascontiguousarray(keys, np.uint64).tobytes()]
  if scales is not None:
    parts.append(np.ascontiguousarray(scales, np.float32).tobytes())
  parts.append(np.ascontiguousarray(stored).tobytes())
  payload = b"".join(parts)
  return payload + zlib.crc32(payload).to_bytes(4, "little")


def decode_block(blob: bytes, fmt: rows.Format, r: int,
                 where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """Block bytes -> (keys [r], stored [r, d], scales [r] or None).

  Raises:
    errors.StoreError: the block is not r rows long or its CRC-32 does not
      match (a flipped bit anywhere in it); `where` names it.
  """
  size = r * fmt.row_bytes
  if len(blob) != size + 4:
    raise errors.StoreError(f"{where}: {len(blob)} bytes, expected {r} rows x "
                            f"{fmt.row_bytes} B + a 4 B CRC (truncated or corrupt)")
  buf = np.frombuffer(blob, np.uint8)
  if zlib.crc32(buf[:size]) != int.from_bytes(blob[size:], "little"):
    raise errors.StoreError(f"{where}: CRC-32 mismatch (corrupt); re-export the "
                            f"table, or restore it from a copy")
  keys = buf[:8 * r].view(np.uint64)
  off = 8 * r
  scales = None
  if fmt.has_scales:
    scales = buf[off:off + 4 * r].view(np.float32)
    off += 4 * r
  stored = buf[off:size].view(fmt.numpy_dtype).reshape(r, fmt.d)
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

  def __init__(self, batch: Batch, name: str, fmt: rows.Format):
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
  """A segment to read: the kvstore holding it and its metadata entry.

  Attributes:
    kv: the table's OCDBT database, at the version being read.
    seg: the segment's metadata entry ({"name", "rows", "blocks"}).
    table: the table's path, for error messages.
    index: its block index once loaded.
  """
  kv: ts.KvStore
  seg: dict
  table: str
  index: Index | None = None

  def load(self) -> Index:
    if self.index is None:
      self.index = read_index(self.kv, self.seg["name"], self.seg["blocks"])
    return self.index

  def where(self, block: int) -> str:
    """Names a block for errors: table, segment and block."""
    return f"InsEmb store {self.table}: block {block:08x} of segment {self.seg['name']}"


def stream_blocks(
    items: Sequence[tuple[Source, int]], fmt: rows.Format,
    window: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
  """Reads blocks [(segment, block id)] of any segments with at most `window`
  reads in flight; yields (keys [r], stored [r, d], scales [r] or None) of each
  in the given order. TensorStore serves the reads concurrently on its own
  threads while the caller decodes and places the earlier ones, so a batch
  of blocks costs about one read latency per `window` blocks, not one each;
  the bytes read but not yet consumed stay under `window` blocks.

  Raises:
    errors.StoreError: a block is missing, unreadable, or not the size its
      segment index says (naming the table, segment and block).
  """
  pending: collections.deque = collections.deque()
  it = iter(items)

  def issue() -> None:
    for src, b in itertools.islice(it, window - len(pending)):
      pending.append((src, b, src.kv.read(f"{src.seg['name']}/{b:08x}")))

  issue()
  while pending:
    src, b, future = pending.popleft()
    issue()
    try:
      r = future.result()
    except ValueError as e:
      raise errors.StoreError(f"{src.where(b)}: cannot be read ({e})") from e
    if r.state != "value":
      raise errors.StoreError(f"{src.where(b)}: missing")
    yield decode_block(r.value, fmt, int(src.load().counts[b]), src.where(b))


def merged(
    sources: Sequence[Source],
    fmt: rows.Format,
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
    items, ranks = [], []
    for rank, (src, f) in enumerate(zip(sources, fences)):
      first = 0 if lo is None else max(
          int(np.searchsorted(f, np.uint64(lo), "right")) - 1, 0)
      last = len(f) if hi is None else int(np.searchsorted(f, np.uint64(hi), "left"))
      items += [(src, b) for b in range(first, last)]
      ranks += [rank] * (last - first)
    parts = []
    for rank, (k, v, s) in zip(ranks, stream_blocks(items, fmt, _MERGE_WINDOW)):
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
