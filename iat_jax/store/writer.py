"""The write side of an OCDBT table: whole versions and LSM upserts.

`write`: keys [n] -> values float32 [n, d], all in one process's memory, as
one new version (one segment per shard). `upsert`: rows written over a
version a reader opened, as one new version; each shard it touches gets one
new segment, then its newest two merge while the older is at most `_GROWTH`
times the newer (or it holds more than `_MAX_SEGMENTS`), so a shard holds
O(log(rows / upsert rows)) segments and every row is rewritten O(log) times.
At 1e11 rows (256 shards) a daily upsert of 3e8 rows writes ~1.2e6 rows per
shard plus its share of merges; tables too big for one process's memory are
exported in parallel (`export`). See docs/store.md.
"""

from __future__ import annotations

import json
from typing import Any
import uuid

import numpy as np
import tensorstore as ts

from iat_jax.store import backend
from iat_jax.store import database
from iat_jax.store import reader
from iat_jax.store import rows
from iat_jax.store import segments

_GROWTH = 4
_MAX_SEGMENTS = 16


def write(path: str,
          keys: np.ndarray,
          values: np.ndarray,
          *,
          source: str,
          source_step: int,
          source_config: Any,
          dtype: str = "float32",
          dataset: str = "",
          shard_bits: int = backend.DEFAULT_SHARD_BITS,
          block_rows: int = backend.DEFAULT_BLOCK_ROWS) -> int:
  """Writes a whole new version of the table (all in memory) and publishes it.

  Args:
    path: table directory or URL (created if missing).
    keys: uint64 [n] unique InsIDs, in any order.
    values: float32 [n, d], finite.
    source: kind of the source model ("source_temporal", "source_user", ...).
    source_step: checkpoint step of the source model.
    source_config: the source model's config (stored as JSON).
    dtype: "float32", "bfloat16" or "int8".
    dataset: fingerprint of the dataset whose instances the keys name.
    shard_bits: 2**shard_bits shards by the InsID's high bits.
    block_rows: rows per stored block.

  Returns:
    The OCDBT generation of the published version (`reader.Table.version`).

  Raises:
    errors.StoreError: bad dtype, shapes, duplicate keys, non-finite values, or a
      concurrent writer published first.
  """
  values = np.asarray(values, np.float32)
  meta = database.new_meta(d=values.shape[-1] if values.ndim == 2 else 0,
                           dtype=dtype,
                           source=source,
                           source_step=source_step,
                           source_config=source_config,
                           dataset=dataset,
                           shard_bits=shard_bits,
                           block_rows=block_rows)
  keys, values = rows.check_rows(path, keys, values)
  kv = database.open_kv(path)
  old, based_on = database.read_meta(kv, path)
  total = _write_shards(kv, keys, values, meta)
  meta["num_rows"] = int(len(keys))
  meta["checksum"] = rows.checksum_hex(total)
  return database.commit(path, kv, meta, based_on, database.segment_prefixes(old))


def _write_shards(kv: ts.KvStore, keys: np.ndarray, values: np.ndarray,
                  meta: dict) -> tuple[int, int]:
  """Writes sorted rows as one new segment per shard, named in meta["shards"];
  returns their checksum."""
  fmt = database.layout_format(meta)
  tag = uuid.uuid4().hex[:16]
  bounds = database.shard_bounds(keys, meta["shard_bits"])
  total, batch = (0, 0), segments.Batch(kv)
  for s in range(len(meta["shards"])):
    lo, hi = int(bounds[s]), int(bounds[s + 1])
    if lo == hi:
      continue
    builder = segments.SegmentBuilder(batch, database.segment_name(s, tag), fmt)
    for start in range(lo, hi, backend.DEFAULT_CHUNK_ROWS):
      end = min(start + backend.DEFAULT_CHUNK_ROWS, hi)
      stored, scales = rows.quantize(values[start:end], fmt.dtype)
      builder.add(keys[start:end], stored, scales)
      total = rows.add_checksums(total,
                                 rows.row_checksum(keys[start:end], stored, scales))
    meta["shards"][s] = [builder.finish()]
  batch.flush()
  return total


def upsert(table: reader.Table,
           keys: np.ndarray,
           values: np.ndarray,
           *,
           source_step: int | None = None) -> reader.Table:
  """Writes rows keys [n] -> values float32 [n, d] over the version `table`
  reads (new keys are added, existing ones replaced) as one new version;
  O(n) work plus amortized merges.

  Returns:
    A reader of the new version, with `table`'s cache_bytes.

  Raises:
    errors.StoreError: bad shapes, duplicate or non-finite rows, or another
      writer published since `table`'s version.
  """
  path, fmt = table.path, table.format
  meta = json.loads(json.dumps(table.metadata))
  keys, values = rows.check_rows(path, keys, values, d=fmt.d)
  stored, scales = rows.quantize(values, fmt.dtype)
  before = table.lookup_stored(keys)
  meta["checksum"] = rows.upserted_checksum(meta["checksum"], keys, stored, scales,
                                            before)
  meta["num_rows"] += int((~before[2]).sum())
  if source_step is not None:
    meta["source_step"] = int(source_step)
  kv = database.open_kv(path)
  tag = uuid.uuid4().hex[:16]
  batch = segments.Batch(kv)
  touched = _add_segments(batch, keys, stored, scales, meta, tag)
  drop = []
  for s in touched:  # merges, each read back: flushed one by one
    meta["shards"][s], dropped = _compact(path, batch, s, meta["shards"][s], fmt, tag)
    drop += dropped
  gen = database.commit(path, kv, meta, table.meta_generation, drop)
  return reader.Table(path, gen, cache_bytes=table.cache_bytes)


def _add_segments(batch: segments.Batch, keys: np.ndarray, stored: np.ndarray,
                  scales: np.ndarray | None, meta: dict, tag: str) -> list[int]:
  """Writes sorted rows as one new segment per shard they touch, appended to
  meta["shards"] (flushed); returns those shards."""
  fmt = database.layout_format(meta)
  bounds = database.shard_bounds(keys, meta["shard_bits"])
  touched = np.flatnonzero(np.diff(bounds)).tolist()
  for s in touched:
    lo, hi = int(bounds[s]), int(bounds[s + 1])
    b = segments.SegmentBuilder(batch, database.segment_name(s, tag), fmt)
    b.add(keys[lo:hi], stored[lo:hi], None if scales is None else scales[lo:hi])
    meta["shards"][s] = meta["shards"][s] + [b.finish()]
  batch.flush()
  return touched


def _compact(path: str, batch: segments.Batch, shard: int, segs: list[dict],
             fmt: rows.Format, tag: str) -> tuple[list[dict], list[str]]:
  """Merges the newest two segments of a shard while the older is at most
  _GROWTH times the newer (or there are more than _MAX_SEGMENTS); -> (its
  segments, the key prefixes of the merged-away ones)."""
  drop, n = [], 0
  while len(segs) >= 2 and (segs[-2]["rows"] <= _GROWTH * segs[-1]["rows"] or
                            len(segs) > _MAX_SEGMENTS):
    n += 1
    merged = segments.SegmentBuilder(batch, database.segment_name(shard, f"{tag}m{n}"),
                                     fmt)
    for k, v, sc, _ in segments.merged(
        [segments.Source(batch.kv, x, path) for x in segs[-2:]], fmt):
      merged.add(k, v, sc)
    drop += [x["name"] + "/" for x in segs[-2:]]
    segs = segs[:-2] + [merged.finish()]
    batch.flush()
  return segs, drop
