"""InsEmb table: uint64 InsID -> d values, in one TensorStore OCDBT database.

Layout (keys of the OCDBT database at `path`, over any base kvstore: a local
directory, or gs:// / s3:// URLs):

  meta                        JSON: d, dtype, num_rows, source, source_step,
                              source_config, dataset, created, checksum, uuid,
                              shard_bits, block_rows, and per shard the list of
                              its segments, oldest first
  seg/<shard:03x>/<id>/...    immutable sorted segments (`segments.py`): an
                              index (first key + row count of every block) and
                              blocks of `block_rows` rows (keys | int8 scales |
                              values)
  export/<id>/<shard:03x>     merge markers of a running export (transient)

and, beside it, `staging/<export id>/p<process>/`: one scratch OCDBT database
per exporting process, removed by `publish`.

Versions. Every publish (write, upsert, export publish) is one atomic OCDBT
commit that writes `meta` (conditional on the `meta` it started from, so a
concurrent writer fails instead of losing an update) and deletes the keys of
the segments the new version no longer names. Segment blocks are written
before that commit, so a version never names a half-written segment, and no
reader ever sees half a write. A `Table` pins the OCDBT generation it opened
(`Table.version`) and reads only that version however many commits follow;
any older generation stays readable by number (`Table(path, version=g)`):
TensorStore's OCDBT has no garbage collector today, so the bytes of replaced
segments stay on disk until the table is copied or rewritten.

Sharding. A row lives in shard InsID >> (64 - shard_bits) (InsIDs are
hashes, so shards are even). A shard is an LSM-like stack of segments: an
export or `write` leaves one segment per shard; each upsert adds one per
shard it touches and then merges the newest two while the older is at most
`growth` (4) times the newer, so a shard holds O(log(rows / upsert rows))
segments and every row is rewritten O(log) times (amortized O(new rows) per
upsert). A lookup takes the newest segment holding the key.

Why blocks of sorted rows and not one OCDBT key per InsID: measured here
(2-core VM), TensorStore serves ~30,000 kvstore reads/s from Python (~35 us
each, batched or not), so 131,072 per-row reads take ~4 s, against ~20 ms for
a numpy gather of the same rows; and the B+tree would hold ~60 B of node
entry per 76 B int8 row. A block of 256 rows (19 KB at d=64 int8) makes the
per-read cost per row 256x smaller, keeps cold read amplification at one
~20 KB block per key, and the index at 12 B per 256 rows on disk.

Reader memory. A reader holds only (a) the index of each segment it touched
(16 B per block in memory: fence, count, cache slot; 0.06 B per row) and (b) a cache of decoded blocks in
one slab [slots, block_rows] whose bytes plus (a), (c) and (d) stay within
`cache_bytes` (its own accounting: `Table.memory_bytes()`); least recently
used blocks are evicted, and a batch that needs more blocks than fit is
served in pieces. (d): a fill reads min(32 MiB, cache_bytes / 8) of blocks at
a time and copies them into the slab before reading more, so the bytes read
but not yet placed stay bounded however many blocks a batch needs. A
warm lookup is vectorized numpy with no loop over shards: per level (the
j-th newest segment of every shard, fences concatenated in shard order, so
sorted) one searchsorted of the sorted queries, a batched binary search
inside the cached blocks, one gather. In front of that search, a
direct-mapped memo (c) of key -> slab position, 1/32 of `cache_bytes`,
answers the keys recent lookups found (consecutive batches share most of
their users' histories), checked by the key and by the generation of its
slab slot, which every refill of the slot bumps; only the rest are sorted
and searched. A version is immutable, so cached blocks and memo entries
never go stale while their slot keeps its block.

At 1e11 rows (3e8/day x 730 days; shard_bits=8: 256 shards of ~4e8 rows):
values are 6.4 TB at d=64 int8 (+ 1.2 TB keys/scales, + index 12 B/256 rows);
an export is P processes each writing its slice in bounded chunks to its own
staging database (no gather), then each merging 256 / P shards (a streaming
k-way merge, memory ~piece_rows), then one commit by process 0; a daily
upsert of 3e8 rows writes ~1.2e6 rows per shard plus its share of merges; a
reader touching every shard holds ~6 GB of segment indexes, one touching a day's
worth of segments or a subset of shards holds proportionally less (a second
index level, fences of index pages, would cut this to KBs; not needed below
~1e10 rows). A run's reader (`tables.open_checked`) is refused at start when
the indexes of every shard would take more than half its cache_bytes, so
such a reader needs --config.store.cache_bytes >= ~12 GB there.

Precision of the stored dtypes (what a lookup returns vs. what was written):
  float32   exact;
  bfloat16  round-to-nearest-even, relative error <= 2**-8 per element;
  int8      symmetric per-row scale = max|row| / 127, absolute error
            <= max|row| / 254 per element (half a quantization step), times
            (1 + 2**-15) for the float32 rounding of the scale, the division
            and the dequantizing product.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import threading
import uuid
from typing import Any, Iterable, Iterator

import ml_collections
import numpy as np
import tensorstore as ts

from iat_jax import errors
from iat_jax.store import segments
from iat_jax.store.segments import DTYPES, quantize  # pylint: disable=unused-import

FORMAT = "iat-insemb-ocdbt/1"
DEFAULT_SHARD_BITS = 6
DEFAULT_BLOCK_ROWS = 256
DEFAULT_CACHE_BYTES = 1 << 30
DEFAULT_CHUNK_ROWS = 1 << 18
_TS_CACHE_BYTES = 32 << 20  # TensorStore's own cache (OCDBT B+tree nodes)
# The position memo (`Table._recall`) takes at most 1/_MEMO_SHARE of cache_bytes.
_MEMO_SHARE = 32
_MEMO_ENTRY_BYTES = 24  # key uint64 + slab position int64 + slot generation uint64
# A fill reads at most min(_READ_BYTES, cache_bytes / _READ_SHARE) of blocks at
# a time (`Table._fill`), kept out of the slab's share of the budget.
_READ_BYTES = 32 << 20
_READ_SHARE = 8
_FIBONACCI = np.uint64(0x9E3779B97F4A7C15)  # multiplicative hash of a key
_GROWTH = 4
_MAX_SEGMENTS = 16

# ---------------------------------------------------------------------------
# Opening the database.


def _base(path: str, sub: str = "") -> dict | str:
  """Base kvstore spec of the table at `path` (a directory or a URL)."""
  if "://" in path:
    return path.rstrip("/") + "/" + (sub + "/" if sub else "")
  return {
      "driver": "file",
      "path": os.path.join(os.path.abspath(path), sub).rstrip("/") + "/"
  }


def _open(path: str,
          version: int | None = None,
          sub: str = "",
          context: ts.Context | None = None) -> ts.KvStore:
  spec = {"driver": "ocdbt", "base": _base(path, sub)}
  if version is not None:
    spec["version"] = int(version)
  try:
    return ts.KvStore.open(spec, context=context).result()
  except ValueError as e:
    raise errors.StoreError(f"InsEmb store {path}: cannot open the OCDBT database "
                     f"({e})") from e


def _latest_generation(path: str, sub: str = "") -> int | None:
  """The newest OCDBT generation at `path`, or None if there is no database."""
  base = ts.KvStore.open(_base(path, sub)).result()
  try:
    if base.read("manifest.ocdbt").result().state != "value":
      return None
    return int(ts.ocdbt.dump(base).result()["versions"][-1]["generation_number"])
  except (ValueError, KeyError, IndexError) as e:
    raise errors.StoreError(f"InsEmb store {path}: unreadable OCDBT manifest ({e})") from e


def _fmt(meta: dict) -> segments.Format:
  return segments.Format(int(meta["d"]), meta["dtype"], int(meta["block_rows"]))


def _check_values(path: str, keys, values, d: int | None = None):
  """-> (keys uint64 [n] sorted, values float32 [n, d] in key order)."""
  keys = np.asarray(keys).astype(np.uint64, copy=False).reshape(-1)
  values = np.asarray(values, np.float32)
  if values.ndim != 2 or len(values) != len(keys):
    raise errors.StoreError(f"{path}: values {values.shape} do not match keys "
                     f"[{len(keys)}]; expected [num_keys, d]")
  if d is not None and values.shape[1] != d:
    raise errors.StoreError(f"{path}: values have width {values.shape[1]}, the table d={d}")
  if not np.isfinite(values).all():
    raise errors.StoreError(f"{path}: non-finite InsEmb values")
  if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    if (keys[1:] == keys[:-1]).any():
      raise errors.StoreError(f"{path}: duplicate InsIDs in the rows being written")
    values = np.take(values, order, axis=0)
  return keys, values


def _shard_bounds(keys: np.ndarray, shard_bits: int) -> np.ndarray:
  """Sorted keys [n] -> int64 [2**shard_bits + 1]: shard s is [b[s], b[s+1])."""
  shard = keys >> np.uint64(64 - shard_bits)
  return np.searchsorted(shard, np.arange(2**shard_bits + 1, dtype=np.uint64))


def _sorted_distinct(x: np.ndarray) -> np.ndarray:
  """The distinct values of a sorted array (np.unique without its sort)."""
  keep = np.ones(len(x), bool)
  keep[1:] = x[1:] != x[:-1]
  return x[keep]


def _check_block_rows(block_rows: int) -> None:
  if block_rows < 2 or block_rows & (block_rows - 1):
    raise errors.StoreError(f"block_rows={block_rows} is not a power of two >= 2")


def _new_meta(*, d, dtype, source, source_step, source_config, dataset, shard_bits,
              block_rows) -> dict:
  if dtype not in DTYPES:
    raise errors.StoreError(f"store dtype {dtype!r} is not one of {sorted(DTYPES)}")
  if not 1 <= shard_bits <= 16:
    raise errors.StoreError(f"shard_bits={shard_bits} is not in 1..16")
  _check_block_rows(block_rows)
  if isinstance(source_config, ml_collections.ConfigDict):
    source_config = json.loads(source_config.to_json_best_effort())
  return {
      "format": FORMAT,
      "d": int(d),
      "dtype": dtype,
      "num_rows": 0,
      "source": source,
      "source_step": int(source_step),
      "dataset": dataset,
      "source_config": source_config,
      "shard_bits": int(shard_bits),
      "block_rows": int(block_rows),
      "shards": [[] for _ in range(2**shard_bits)]
  }


def _read_meta(kv: ts.KvStore, path: str) -> tuple[dict | None, bytes]:
  """-> (meta or None if no version was published, its storage generation)."""
  try:
    r = kv.read("meta").result()
  except ValueError as e:
    raise errors.StoreError(f"InsEmb store {path}: cannot read its metadata ({e})") from e
  if r.state != "value":
    return None, r.stamp.generation
  try:
    meta = json.loads(r.value)
  except ValueError as e:
    raise errors.StoreError(f"InsEmb store {path}: corrupt metadata ({e})") from e
  if meta.get("format") != FORMAT:
    raise errors.StoreError(f"InsEmb store {path}: format {meta.get('format')!r}, this "
                     f"code reads {FORMAT!r}; re-export it")
  return meta, r.stamp.generation


def _prefix_range(prefix: str) -> ts.KvStore.KeyRange:
  return ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))


def _commit(path: str, kv: ts.KvStore, meta: dict, based_on: bytes,
            drop: Iterable[str]) -> int:
  """Publishes `meta` in one atomic commit; returns its OCDBT generation.

  Args:
    path: the table (for messages and to find the generation).
    kv: the database, opened at its latest version.
    meta: the new metadata (a fresh "uuid" and "created" are set here).
    based_on: storage generation of the `meta` key this version replaces; the
      commit fails if another writer published since.
    drop: key prefixes (segments, markers) the new version no longer has.
  """
  meta["uuid"] = uuid.uuid4().hex
  meta["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
  txn = ts.Transaction(atomic=True)
  t = kv.with_transaction(txn)
  t.write("meta", json.dumps(meta, sort_keys=True).encode(), if_equal=based_on)
  for prefix in drop:
    t.delete_range(_prefix_range(prefix))
  try:
    txn.commit_sync()
  except ValueError as e:
    if "mismatch" in str(e).lower():
      raise errors.StoreError(f"InsEmb store {path}: another writer published a "
                       f"version meanwhile; redo this write on top of it") from e
    raise errors.StoreError(f"InsEmb store {path}: commit failed ({e})") from e
  gen = _latest_generation(path)
  while gen and gen > 0:  # the commit is the newest or just below later ones
    got, _ = _read_meta(_open(path, gen), path)
    if got and got["uuid"] == meta["uuid"]:
      return gen
    gen -= 1
  raise errors.StoreError(f"InsEmb store {path}: the committed version vanished")


def _segment_name(shard: int, tag: str) -> str:
  return f"seg/{shard:03x}/{tag}"


def _segment_prefixes(meta: dict | None) -> set[str]:
  if not meta:
    return set()
  return {s["name"] + "/" for shard in meta["shards"] for s in shard}


# ---------------------------------------------------------------------------
# Whole-table write.


def write(path: str,
          keys: np.ndarray,
          values: np.ndarray,
          *,
          source: str,
          source_step: int,
          source_config: ml_collections.ConfigDict | dict | None,
          dtype: str = "float32",
          dataset: str = "",
          shard_bits: int = DEFAULT_SHARD_BITS,
          block_rows: int = DEFAULT_BLOCK_ROWS) -> int:
  """Writes a whole new version of the table (all in memory) and publishes it.

  For tables that do not fit in one process's memory use `ExportWriter`.

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
    The OCDBT generation of the published version (`Table.version`).

  Raises:
    errors.StoreError: bad dtype, shapes, duplicate keys, non-finite values, or a
      concurrent writer published first.
  """
  values = np.asarray(values, np.float32)
  meta = _new_meta(d=values.shape[-1] if values.ndim == 2 else 0,
                   dtype=dtype,
                   source=source,
                   source_step=source_step,
                   source_config=source_config,
                   dataset=dataset,
                   shard_bits=shard_bits,
                   block_rows=block_rows)
  keys, values = _check_values(path, keys, values)
  fmt = _fmt(meta)
  kv = _open(path)
  old, based_on = _read_meta(kv, path)
  tag = uuid.uuid4().hex[:16]
  bounds = _shard_bounds(keys, shard_bits)
  total, batch = (0, 0), segments.Batch(kv)
  for s in range(2**shard_bits):
    lo, hi = int(bounds[s]), int(bounds[s + 1])
    if lo == hi:
      continue
    builder = segments.SegmentBuilder(batch, _segment_name(s, tag), fmt)
    for start in range(lo, hi, DEFAULT_CHUNK_ROWS):
      end = min(start + DEFAULT_CHUNK_ROWS, hi)
      stored, scales = quantize(values[start:end], dtype)
      builder.add(keys[start:end], stored, scales)
      total = segments.add_checksums(
          total, segments.row_checksum(keys[start:end], stored, scales))
    meta["shards"][s] = [builder.finish()]
  batch.flush()
  meta["num_rows"] = int(len(keys))
  meta["checksum"] = segments.checksum_hex(total)
  return _commit(path, kv, meta, based_on, _segment_prefixes(old))


# ---------------------------------------------------------------------------
# Reading.


@dataclasses.dataclass
class _Level:
  """The j-th newest segment of every loaded shard that has one, in shard
  order. Shards partition the key space in order, so the concatenated fences
  are sorted and one searchsorted places every key of a batch; a key's block
  is valid only inside its own shard's range [base[s], base[s + 1]). Each
  segment's fences and cache slots are views into `fences` / `slot_of` (held
  once, as the index's memory accounting assumes).

  Attributes:
    fences: uint64 [blocks] first key of each block.
    slot_of: int32 [blocks] cache slot of each block, -1 = not cached.
    base: int64 [shards + 1] global block range of each shard's segment.
    entries: the segment entries, in order; starts: int64 [len(entries)]
      the first global block of each.
  """
  fences: np.ndarray
  slot_of: np.ndarray
  base: np.ndarray
  entries: list
  starts: np.ndarray

  @classmethod
  def of(cls, segs: list, loaded: np.ndarray, j: int) -> "_Level":
    have = [s for s, shard in enumerate(segs) if loaded[s] and len(shard) > j]
    entries = [segs[s][j] for s in have]
    sizes = np.zeros(len(segs), np.int64)
    sizes[have] = [len(e[1]) for e in entries]
    base = np.concatenate([[0], np.cumsum(sizes)])
    starts = base[have]
    fences = np.concatenate([e[0].index.fences for e in entries] or
                            [np.zeros(0, np.uint64)])
    slot_of = np.concatenate([e[1] for e in entries] or [np.zeros(0, np.int32)])
    for e, lo in zip(entries, starts.tolist()):
      hi = lo + len(e[1])
      e[0].index.fences, e[1] = fences[lo:hi], slot_of[lo:hi]
    return cls(fences, slot_of, base, entries, starts)


class Table:
  """Read side: one pinned version; `lookup` is vectorized, memory bounded.

  Attributes:
    path: the table directory or URL.
    version: the OCDBT generation this object reads; it stays the same while
      writers publish newer ones.
    metadata: the version's metadata (see the module docstring).
    cache_bytes: the reader's memory budget (block cache + segment indexes).
  """

  def __init__(self,
               path: str,
               version: int | None = None,
               cache_bytes: int = DEFAULT_CACHE_BYTES):
    self.path = path
    self.cache_bytes = int(cache_bytes)
    if version is None:
      version = _latest_generation(path)
      if version is None:
        raise errors.StoreError(f"no InsEmb table at {path} (no OCDBT database); run "
                         f"--mode=export first")
    self.version = int(version)
    ctx = ts.Context({"cache_pool": {"total_bytes_limit": _TS_CACHE_BYTES}})
    self._kv = _open(path, self.version, context=ctx)
    meta, _ = _read_meta(self._kv, path)
    if meta is None:
      raise errors.StoreError(f"InsEmb store {path}: version {self.version} has no "
                       f"published table (missing metadata); run --mode=export")
    self.metadata: dict[str, Any] = meta
    self._fmt = _fmt(meta)
    self._shift = np.uint64(64 - meta["shard_bits"])
    # Per shard, its segments newest first, as [Source, slot_of or None].
    self._segs = [[[segments.Source(self._kv, s), None]
                   for s in reversed(shard)]
                  for shard in meta["shards"]]
    self._loaded = np.zeros(len(self._segs), bool)  # shards with indexes in memory
    self._levels: list[_Level] = []
    self._lock = threading.Lock()
    self._slab = None
    self._index_bytes = 0
    self._tick = 0

  def __getstate__(self):  # TensorStore handles are re-opened in workers
    return {"path": self.path, "version": self.version, "cache_bytes": self.cache_bytes}

  def __setstate__(self, state):
    self.__init__(state["path"], state["version"], state["cache_bytes"])

  @property
  def dim(self) -> int:
    return self.metadata["d"]

  def __len__(self) -> int:
    return self.metadata["num_rows"]

  def check(self, *, d: int, source: str, dataset: str | None = None) -> None:
    """Raises errors.StoreError unless the table has width d, came from `source` and
    (if given) was exported from the dataset with fingerprint `dataset`."""
    m = self.metadata
    if dataset is not None and m.get("dataset") != dataset:
      raise errors.StoreError(
          f"InsEmb store {self.path} was exported from dataset "
          f"{m.get('dataset')!r}, not the one this run reads ({dataset!r}): its "
          f"InsIDs would all be missing; re-export it (--mode=export)")
    if m["d"] != d or m["source"] != source:
      raise errors.StoreError(
          f"InsEmb store {self.path} holds d={m['d']} from {m['source']!r}, but "
          f"the downstream config expects d={d} (--config.model.insemb_dim) from "
          f"{source!r} (--config.store.source)")

  def verify(self) -> None:
    """Re-reads every segment and checks the version's row count and checksum.

    Streams the whole table (memory ~DEFAULT_CHUNK_ROWS rows); use it after a
    copy or in a test, not per step.

    Raises:
      errors.StoreError: the content differs from what the writers hashed.
    """
    total, rows = (0, 0), 0
    for shard in self._segs:
      sources = [segments.Source(self._kv, e[0].seg) for e in reversed(shard)]
      for keys, stored, scales, _ in segments.merged(sources, self._fmt):
        total = segments.add_checksums(total,
                                       segments.row_checksum(keys, stored, scales))
        rows += len(keys)
    want = self.metadata["checksum"]
    if rows != len(self) or segments.checksum_hex(total) != want:
      raise errors.StoreError(f"InsEmb store {self.path} (version {self.version}): "
                       f"content checksum {segments.checksum_hex(total)} of "
                       f"{rows:,} rows does not match the metadata ({want}, "
                       f"{len(self):,} rows)")

  def full_index_bytes(self) -> int:
    """Bytes of the segment indexes a reader holds once it has read every
    shard (16 per block: fence, row count, cache slot)."""
    return 16 * sum(s["blocks"] for shard in self.metadata["shards"] for s in shard)

  def bytes_on_disk(self) -> int:
    """Bytes of the database's files (all kept versions; local tables), or
    the bytes of this version's segments for URLs."""
    if "://" in self.path:
      return sum(s["rows"] * self._fmt.row_bytes + 12 * s["blocks"]
                 for shard in self.metadata["shards"]
                 for s in shard)
    total = 0
    for root, dirs, files in os.walk(self.path):
      if root == self.path:
        dirs[:] = [x for x in dirs if x != "staging"]
      total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total

  def memory_bytes(self) -> int:
    """The reader's own accounting: cached blocks + loaded segment indexes +
    the position memo + the blocks a fill reads at a time."""
    slab = self._slab
    if slab is None:
      return self._index_bytes
    filled = int((slab["owner"] >= 0).sum()) + self._read_blocks()
    return filled * self._slot_bytes() + self._index_bytes + self._memo_bytes()

  # -- cache ------------------------------------------------------------------

  def _slot_bytes(self) -> int:
    b = self._fmt.block_rows
    return b * self._fmt.row_bytes + 16

  def _memo_bits(self) -> int:
    """log2 of the memo's entries: the largest power of two >= 2 within
    cache_bytes / _MEMO_SHARE."""
    entries = self.cache_bytes // (_MEMO_SHARE * _MEMO_ENTRY_BYTES)
    return max(int(entries).bit_length() - 1, 1)

  def _memo_bytes(self) -> int:
    return (1 << self._memo_bits()) * _MEMO_ENTRY_BYTES

  def _read_blocks(self) -> int:
    """Blocks a fill reads at a time (at least one)."""
    share = min(_READ_BYTES, self.cache_bytes // _READ_SHARE)
    return max(1, share // self._slot_bytes())

  def _init_slab(self) -> dict:
    b, d = self._fmt.block_rows, self._fmt.d
    spare = self.cache_bytes - self._memo_bytes() - self._read_blocks() * self._slot_bytes()
    slots = max(spare // self._slot_bytes(), 1)
    memo = 1 << self._memo_bits()
    return {
        "keys": np.empty((slots, b), np.uint64),
        "vals": np.empty((slots * b, d), self._fmt.numpy_dtype),
        "scales": np.empty(slots * b, np.float32) if self._fmt.has_scales else None,
        "count": np.zeros(slots, np.int64),
        "used": np.zeros(slots, np.int64),  # tick of last use
        "owner": np.full(slots, -1, np.int64),  # segment id, -1 = free
        "block": np.zeros(slots, np.int64),
        "gen": np.ones(slots, np.uint64),  # bumped by every refill of the slot
        "segs": [],  # segment id -> [Source, slot_of]
        # The memo: entry h(key) -> (key, slab position, its slot's gen). An
        # entry never written holds gen 0, which no slot ever has.
        "memo_key": np.zeros(memo, np.uint64),
        "memo_pos": np.zeros(memo, np.int64),
        "memo_gen": np.zeros(memo, np.uint64),
    }

  def _load(self, shards: np.ndarray) -> None:
    """Loads the indexes of every segment of `shards` not loaded yet, then
    rebuilds the levels (a copy of the loaded indexes, once per call that
    loaded any). InsIDs are hashes, so a batch of a few thousand keys touches
    every shard: the first lookup loads them all and later ones rebuild
    nothing (at 1e11 rows, one ~3 GB copy of the fences once per reader)."""
    new = shards[~self._loaded[shards]]
    if not len(new):
      return
    for s in new.tolist():
      for entry in self._segs[s]:
        idx = entry[0].load()
        entry[1] = np.full(len(idx.fences), -1, np.int32)
        entry.append(len(self._slab["segs"]))
        self._slab["segs"].append(entry)
        self._index_bytes += idx.nbytes + entry[1].nbytes
      self._loaded[s] = True
    self._levels = [
        _Level.of(self._segs, self._loaded, j)
        for j in range(max(len(shard) for shard in self._segs))
    ]

  def _capacity(self) -> int:
    """Slots usable now: the budget left by the indexes, the memo and the
    blocks a fill reads at a time (at least one)."""
    slots = len(self._slab["owner"])
    free = (self.cache_bytes - self._index_bytes - self._memo_bytes() -
            self._read_blocks() * self._slot_bytes())
    return max(1, min(slots, free // self._slot_bytes()))

  def _fill(self, wanted: list[tuple[list, np.ndarray]]) -> None:
    """Reads the blocks [(segment entry, block ids)] into free or LRU slots."""
    slab = self._slab
    n = sum(len(b) for _, b in wanted)
    if not n:
      return
    owner = slab["owner"]
    live = np.flatnonzero(owner >= 0)
    need = len(live) + n - self._capacity()  # slots to free first
    if need > 0:
      old = live[slab["used"][live] < self._tick]
      victims = old[np.argsort(slab["used"][old], kind="stable")[:need]]
      for sid in np.unique(owner[victims]).tolist():
        sel = victims[owner[victims] == sid]
        slab["segs"][sid][1][slab["block"][sel]] = -1
      owner[victims] = -1
    free = np.flatnonzero(owner < 0)[:n]
    per, i = self._read_blocks(), 0
    for entry, blocks in wanted:
      for lo in range(0, len(blocks), per):  # bounded bytes in flight
        part = blocks[lo:lo + per].tolist()
        self._place(entry, part, segments.read_blocks(entry[0], self._fmt, part),
                    free[i:i + len(part)].tolist())
        i += len(part)

  def _place(self, entry: list, blocks: list[int], got: list[tuple],
             slots: list[int]) -> None:
    """Copies decoded blocks of a segment into the given free slots."""
    slab, owner, b_rows = self._slab, self._slab["owner"], self._fmt.block_rows
    for blk, (k, v, s), slot in zip(blocks, got, slots):
      r = len(k)
      slab["keys"][slot, :r] = k
      slab["keys"][slot, r:] = np.uint64(2**64 - 1)  # padding, never a hit
      slab["count"][slot] = r
      slab["vals"][slot * b_rows:slot * b_rows + r] = v
      if s is not None:
        slab["scales"][slot * b_rows:slot * b_rows + r] = s
      slab["used"][slot] = self._tick
      slab["gen"][slot] += 1
      owner[slot] = entry[2]
      slab["block"][slot] = blk
      entry[1][blk] = slot

  def _pieces(self, sk: np.ndarray, start: int = 0) -> Iterator[tuple[int, np.ndarray]]:
    """Sorted query keys [m] -> yields (start, pos) for consecutive pieces
    sk[start:start + len(pos)]: pos is the int64 row of each key in the slab's
    flat arrays (slot * block_rows + offset), -1 where absent, valid until
    the next piece is asked for (it may evict the blocks).

    Vectorized over shards: per level, one searchsorted of all the keys over
    the level's fences (`_Level`), whatever the number of shards.
    """
    slab = self._slab
    self._tick += 1
    shard = (sk >> self._shift).astype(np.int64)
    self._load(_sorted_distinct(shard))
    runs = []  # per level: (level, query rows, global block of each)
    wanted, total = [], 0
    for lev in self._levels:
      g = np.searchsorted(lev.fences, sk, "right") - 1
      rows = np.flatnonzero((g >= lev.base[shard]) & (g < lev.base[shard + 1]))
      g = g[rows]  # ascending, as sk is
      runs.append((lev, rows, g))
      b = _sorted_distinct(g)
      slots = lev.slot_of[b]
      slab["used"][slots[slots >= 0]] = self._tick
      miss = b[slots < 0]
      total += len(b)
      if len(miss):
        e = np.searchsorted(lev.starts, miss, "right") - 1
        for i in np.unique(e).tolist():
          wanted.append((lev.entries[i], miss[e == i] - lev.starts[i]))
    if total > self._capacity():  # more blocks than fit: two halves in turn
      if len(sk) == 1:
        raise errors.StoreError(f"InsEmb store {self.path}: cache_bytes="
                         f"{self.cache_bytes} cannot hold one block per segment")
      half = len(sk) // 2
      yield from self._pieces(sk[:half], start)
      yield from self._pieces(sk[half:], start + half)
      return
    self._fill(wanted)
    b_rows = self._fmt.block_rows
    flat_keys = slab["keys"].reshape(-1)
    pos = np.full(len(sk), -1, np.int64)
    # Newest level first: a key takes its newest row.
    for j, (lev, rows, g) in enumerate(runs):
      slots = lev.slot_of[g]
      if j:
        keep = pos[rows] < 0
        rows, slots = rows[keep], slots[keep]
      q = sk[rows]
      base = slots.astype(np.int64) * b_rows
      off = np.zeros(len(q), np.int64)
      step = b_rows >> 1
      while step:  # branchless binary search in each (padded) block
        off += step * (flat_keys[base + off + (step - 1)] < q)
        step >>= 1
      at = base + off
      hit = (flat_keys[at] == q) & (off < slab["count"][slots])
      pos[rows[hit]] = at[hit]
    yield start, pos

  def _memo_index(self, keys: np.ndarray) -> np.ndarray:
    """uint64 keys [n] -> their memo entries [n] (a multiplicative hash)."""
    return ((keys * _FIBONACCI) >> np.uint64(64 - self._memo_bits())).astype(np.intp)

  def _recall(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """keys [n] -> (memoized slab positions [n], valid [n]): valid where the
    entry holds the key and its slot still holds the block it was found in.

    Their slots are marked used now: the least recently used blocks go first
    when the other keys' blocks are read, but these may go too (`_gather`
    checks).
    """
    slab = self._slab
    h = self._memo_index(keys)
    pos = slab["memo_pos"].take(h)
    slots = pos // self._fmt.block_rows
    ok = (slab["memo_key"].take(h) == keys) & (slab["memo_gen"].take(h)
                                               == slab["gen"].take(slots))
    slab["used"][slots[ok]] = self._tick
    return pos, ok

  def _remember(self, keys: np.ndarray, pos: np.ndarray) -> None:
    """Memoizes the slab positions pos [n] of keys [n] (-1: absent, skipped)."""
    slab = self._slab
    hit = pos >= 0
    keys, pos = keys[hit], pos[hit]
    h = self._memo_index(keys)
    slab["memo_key"][h] = keys
    slab["memo_pos"][h] = pos
    slab["memo_gen"][h] = slab["gen"].take(pos // self._fmt.block_rows)

  def _unsorted(self, keys: np.ndarray, order: np.ndarray,
                pos: np.ndarray) -> np.ndarray:
    """Positions pos [n] of the sorted keys[order] -> in the keys' own order
    [n] (-1: absent), memoized."""
    unsorted = np.empty(len(keys), np.int64)
    unsorted[order] = pos
    self._remember(keys, unsorted)
    return unsorted

  def _find(self, keys: np.ndarray) -> np.ndarray | None:
    """Slab positions of keys [n] (-1: absent, memoized otherwise), valid
    until the next fill; None if their blocks do not fit the cache at once."""
    order = np.argsort(keys)
    _, pos = next(self._pieces(keys[order]))
    return self._unsorted(keys, order, pos) if len(pos) == len(keys) else None

  def _gather(self, keys: np.ndarray, emit) -> np.ndarray:
    """Finds keys [n] (call with the lock); -> found bool [n].

    Calls emit(idx, pos) with positions of keys[idx] in the slab's flat
    arrays (-1: absent) while they are valid: once with idx=None (all keys,
    in their order) when the blocks of the batch fit the cache, else once per
    piece of the batch. Memoized keys skip the search; the others are sorted
    and searched, unless that evicts a memoized key's block (then all are).
    """
    if self._slab is None:
      self._slab = self._init_slab()
    pos, ok = self._recall(keys)
    if not ok.all():
      gen = self._slab["gen"]
      kept = pos[ok] // self._fmt.block_rows
      before = gen.take(kept)
      miss = np.flatnonzero(~ok)
      found = self._find(keys[miss])
      if found is None or (gen.take(kept) != before).any():
        return self._gather_sorted(keys, emit)
      pos[miss] = found
    emit(None, pos)
    return pos >= 0

  def _gather_sorted(self, keys: np.ndarray, emit) -> np.ndarray:
    """`_gather` without the memo: every key sorted and searched."""
    order = np.argsort(keys)
    found = np.zeros(len(keys), bool)
    for start, pos in self._pieces(keys[order]):
      if start == 0 and len(pos) == len(keys):
        unsorted = self._unsorted(keys, order, pos)
        emit(None, unsorted)
        return unsorted >= 0
      idx = order[start:start + len(pos)]
      hit = pos >= 0
      found[idx[hit]] = True
      emit(idx[hit], pos[hit])
    return found

  def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys [n] (any shape, order, repeats) -> (float32 [n, d], bool [n]).

    Missing keys give zero rows and found=False.
    """
    keys = np.asarray(keys).astype(np.uint64, copy=False).reshape(-1)
    if not len(self) or not len(keys):
      return np.zeros((len(keys), self.dim), np.float32), np.zeros(len(keys), bool)
    out = np.empty((len(keys), self.dim), np.float32)

    # Positions are in the slab by construction: take's mode="clip" skips
    # the bounds check, and with out= the copy that mode="raise" makes of
    # the output (2-3x the time of the gather itself).
    def emit(idx, pos):
      vals, scales = self._slab["vals"], self._slab["scales"]
      if idx is None and (pos >= 0).all():  # the common case: one gather
        if vals.dtype == np.float32:
          np.take(vals, pos, axis=0, out=out, mode="clip")
        else:
          np.copyto(out, vals.take(pos, axis=0, mode="clip"), casting="unsafe")
        if scales is not None:
          np.multiply(out, scales.take(pos, mode="clip")[:, None], out=out)
        return
      if idx is None:
        idx = np.flatnonzero(pos >= 0)
        pos = pos[idx]
      rows = vals.take(pos, axis=0, mode="clip").astype(np.float32)
      if scales is not None:
        rows *= scales.take(pos, mode="clip")[:, None]
      out[idx] = rows

    with self._lock:
      found = self._gather(keys, emit)
    out[~found] = 0
    return out, found

  def lookup_stored(
      self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """uint64 keys [n] -> (stored [n, d], scales [n] or None, found [n]); rows
    of missing keys are zero. What upserts need to update the checksum."""
    keys = np.asarray(keys).astype(np.uint64, copy=False).reshape(-1)
    stored = np.zeros((len(keys), self.dim), self._fmt.numpy_dtype)
    scales = np.zeros(len(keys), np.float32) if self._fmt.has_scales else None
    if not len(self) or not len(keys):
      return stored, scales, np.zeros(len(keys), bool)

    def emit(idx, pos):
      if idx is None:
        idx = np.flatnonzero(pos >= 0)
        pos = pos[idx]
      stored[idx] = self._slab["vals"][pos]
      if scales is not None:
        scales[idx] = self._slab["scales"][pos]

    with self._lock:
      found = self._gather(keys, emit)
    return stored, scales, found


# ---------------------------------------------------------------------------
# Upserts.


class Writer:
  """Adds or replaces rows of an existing table, one version per `upsert`.

  Attributes:
    table: a reader of the newest version this writer published (or found),
      so rows it just wrote are visible to it.
  """

  def __init__(self, path: str, cache_bytes: int = 256 << 20):
    self.path = path
    self._cache_bytes = cache_bytes
    self.table = Table(path, cache_bytes=cache_bytes)

  def upsert(self,
             keys: np.ndarray,
             values: np.ndarray,
             *,
             source_step: int | None = None) -> int:
    """Writes rows keys [n] -> values float32 [n, d] (new keys are added,
    existing ones replaced); O(n) work plus amortized merges.

    Returns:
      The OCDBT generation of the new version.

    Raises:
      errors.StoreError: bad shapes, duplicate or non-finite rows, or another writer
        published since this writer's version.
    """
    t = self.table
    meta = json.loads(json.dumps(t.metadata))
    fmt = t._fmt  # pylint: disable=protected-access
    keys, values = _check_values(self.path, keys, values, d=fmt.d)
    stored, scales = quantize(values, fmt.dtype)
    old_stored, old_scales, found = t.lookup_stored(keys)
    total = segments.add_checksums(segments.parse_checksum(meta["checksum"]),
                                   segments.row_checksum(keys, stored, scales))
    total = segments.add_checksums(
        total,
        segments.row_checksum(keys[found], old_stored[found],
                              None if old_scales is None else old_scales[found]),
        sign=-1)
    meta["num_rows"] += int((~found).sum())
    meta["checksum"] = segments.checksum_hex(total)
    if source_step is not None:
      meta["source_step"] = int(source_step)
    kv = _open(self.path)
    _, based_on = _read_meta(t._kv, self.path)  # pylint: disable=protected-access
    drop, batch = [], segments.Batch(kv)
    tag = uuid.uuid4().hex[:16]
    bounds = _shard_bounds(keys, meta["shard_bits"])
    touched = np.flatnonzero(np.diff(bounds)).tolist()
    for s in touched:
      lo, hi = int(bounds[s]), int(bounds[s + 1])
      b = segments.SegmentBuilder(batch, _segment_name(s, tag), fmt)
      b.add(keys[lo:hi], stored[lo:hi], None if scales is None else scales[lo:hi])
      meta["shards"][s] = meta["shards"][s] + [b.finish()]
    batch.flush()
    for s in touched:  # merges, each read back: flushed one by one
      segs = meta["shards"][s]
      n = 0
      while len(segs) >= 2 and (segs[-2]["rows"] <= _GROWTH * segs[-1]["rows"] or
                                len(segs) > _MAX_SEGMENTS):
        n += 1
        merged = segments.SegmentBuilder(batch, _segment_name(s, f"{tag}m{n}"), fmt)
        for k, v, sc, _ in segments.merged([segments.Source(kv, x) for x in segs[-2:]],
                                           fmt):
          merged.add(k, v, sc)
        drop += [x["name"] + "/" for x in segs[-2:]]
        segs = segs[:-2] + [merged.finish()]
        batch.flush()
      meta["shards"][s] = segs
    gen = _commit(self.path, kv, meta, based_on, drop)
    self.table = Table(self.path, gen, cache_bytes=self._cache_bytes)
    return gen


def upsert(path: str,
           keys: np.ndarray,
           values: np.ndarray,
           *,
           source_step: int | None = None) -> int:
  """One `Writer(path).upsert(keys, values)`; returns the new generation."""
  return Writer(path).upsert(keys, values, source_step=source_step)


# ---------------------------------------------------------------------------
# Parallel, streaming, resumable export.


class ExportWriter:
  """One process's slice of an export, written in durable chunks as it goes.

  Protocol (P processes, each with a disjoint slice of the InsIDs, fed in a
  deterministic order):

    w = ExportWriter(path, export_id, process_index=p, process_count=P, d=...)
    for keys, values in my_batches():   # may skip w.done_rows rows (resume)
      w.add(keys, values)
    w.close()
    <barrier>
    merge_export(path, export_id, process_index=p, process_count=P)
    <barrier>
    if p == 0: publish(path, export_id, process_count=P, source=..., ...)

  Rows are buffered up to `chunk_rows`, then sorted, quantized and written as
  one run per shard into this process's staging OCDBT database, followed by a
  "done" marker, so memory is O(chunk_rows) and a killed process loses at
  most one chunk. On restart (same arguments) `done_chunks` / `done_rows`
  say what is durable; `add` drops the first `done_rows` rows it is given
  (after `skip(n)`, the first done_rows - n), so a rerun that feeds the same
  stream from the start, or from row n, ends with the same chunks. The final
  table depends only on the rows, not on P, chunk_rows or restarts.
  """

  def __init__(self,
               path: str,
               export_id: str,
               *,
               process_index: int = 0,
               process_count: int = 1,
               d: int,
               dtype: str = "float32",
               chunk_rows: int = DEFAULT_CHUNK_ROWS,
               shard_bits: int = DEFAULT_SHARD_BITS,
               block_rows: int = DEFAULT_BLOCK_ROWS):
    if dtype not in DTYPES:
      raise errors.StoreError(f"store dtype {dtype!r} is not one of {sorted(DTYPES)}")
    _check_block_rows(block_rows)
    self.path, self.export_id = path, export_id
    self.config = {
        "d": int(d),
        "dtype": dtype,
        "chunk_rows": int(chunk_rows),
        "shard_bits": int(shard_bits),
        "block_rows": int(block_rows),
        "process_count": int(process_count)
    }
    self._fmt = segments.Format(int(d), dtype, int(block_rows))
    self._kv = _open(path, sub=_staging(export_id, process_index))
    r = self._kv.read("config").result()
    if r.state == "value":
      if json.loads(r.value) != self.config:
        raise errors.StoreError(f"InsEmb export {export_id} at {path} was started with "
                         f"{json.loads(r.value)}, not {self.config}")
    else:
      self._kv.write("config", json.dumps(self.config).encode()).result()
    self.done_chunks, self.done_rows = 0, 0
    while True:
      r = self._kv.read(f"c{self.done_chunks:06d}/done").result()
      if r.state != "value":
        break
      self.done_chunks += 1
      self.done_rows += json.loads(r.value)["rows"]
    self.closed = self._kv.read("final").result().state == "value"
    self._drop = self.done_rows
    self._buf: list[tuple[np.ndarray, np.ndarray]] = []
    self._buf_rows = 0

  def skip(self, rows: int) -> None:
    """Says the caller starts feeding at row `rows` (<= done_rows) of its stream."""
    if not 0 <= rows <= self.done_rows:
      raise errors.StoreError(f"skip({rows}): only {self.done_rows} rows are durable")
    self._drop = self.done_rows - rows

  def add(self, keys: np.ndarray, values: np.ndarray) -> None:
    """Appends rows keys uint64 [n] -> values float32 [n, d] to this slice
    (rows already durable from an earlier run are dropped, see the class)."""
    keys = np.asarray(keys).astype(np.uint64, copy=False).reshape(-1)
    values = np.asarray(values, np.float32)
    if values.shape != (len(keys), self._fmt.d):
      raise errors.StoreError(f"{self.path}: values {values.shape} do not match keys "
                       f"[{len(keys)}] x d={self._fmt.d}")
    drop = min(self._drop, len(keys))
    self._drop -= drop
    if drop == len(keys):
      return
    if self.closed:
      raise errors.StoreError(f"InsEmb export {self.export_id}: this process's slice "
                       f"was closed after {self.done_rows} rows; more were given")
    self._buf.append((keys[drop:], values[drop:]))
    self._buf_rows += len(keys) - drop
    chunk = self.config["chunk_rows"]
    while self._buf_rows >= chunk:
      self._flush(chunk)

  def _flush(self, rows: int) -> None:
    keys = np.concatenate([b[0] for b in self._buf])
    values = np.concatenate([b[1] for b in self._buf])
    self._buf = [(keys[rows:], values[rows:])] if rows < len(keys) else []
    self._buf_rows = len(keys) - rows
    keys, values = _check_values(self.path, keys[:rows], values[:rows])
    c = self.done_chunks
    bounds = _shard_bounds(keys, self.config["shard_bits"])
    runs, batch = {}, segments.Batch(self._kv)
    for s in np.flatnonzero(np.diff(bounds)).tolist():
      lo, hi = int(bounds[s]), int(bounds[s + 1])
      stored, scales = quantize(values[lo:hi], self._fmt.dtype)
      b = segments.SegmentBuilder(batch, f"c{c:06d}/{s:03x}", self._fmt)
      b.add(keys[lo:hi], stored, scales)
      runs[s] = b.finish()
    batch.flush()
    self._kv.write(f"c{c:06d}/done",
                   json.dumps({
                       "rows": int(len(keys)),
                       "runs": runs
                   }).encode()).result()
    self.done_chunks += 1
    self.done_rows += len(keys)

  def close(self) -> None:
    """Flushes the last partial chunk and marks this slice complete."""
    if self.closed:
      return
    if self._buf_rows:
      self._flush(self._buf_rows)
    self._kv.write(
        "final",
        json.dumps({
            "chunks": self.done_chunks,
            "rows": self.done_rows
        }).encode()).result()
    self.closed = True


def _staging(export_id: str, process_index: int) -> str:
  return f"staging/{export_id}/p{process_index}"


def _export_runs(path: str, export_id: str, process_count: int):
  """-> (config, per shard the [Source] of all processes' runs in (p, c) order)."""
  config, per_shard = None, None
  for p in range(process_count):
    if _latest_generation(path, _staging(export_id, p)) is None:
      raise errors.StoreError(f"InsEmb export {export_id} at {path}: process {p} never "
                       f"started (no staging database)")
    kv = _open(path, sub=_staging(export_id, p))
    cfg = segments.read_json(kv, "config", f"export {export_id} process {p} config")
    if config is None:
      config = cfg
      per_shard = [[] for _ in range(2**cfg["shard_bits"])]
    elif cfg != config:
      raise errors.StoreError(f"InsEmb export {export_id}: processes disagree on "
                       f"{cfg} vs {config}")
    if kv.read("final").result().state != "value":
      raise errors.StoreError(f"InsEmb export {export_id} at {path}: process {p} has "
                       f"not closed its slice (ExportWriter.close)")
    final = segments.read_json(kv, "final", f"export {export_id} process {p}")
    for c in range(final["chunks"]):
      done = segments.read_json(kv, f"c{c:06d}/done", f"chunk {c} of process {p}")
      for s, seg in done["runs"].items():
        per_shard[int(s)].append(segments.Source(kv, seg))
  if config is None or config["process_count"] != process_count:
    raise errors.StoreError(
        f"InsEmb export {export_id}: process_count={process_count} "
        f"does not match the writers' {config and config['process_count']}")
  return config, per_shard


def merge_export(path: str,
                 export_id: str,
                 *,
                 process_index: int = 0,
                 process_count: int = 1) -> None:
  """Merges the runs of shards s with s % process_count == process_index
  (from every process's staging database) into one segment each.

  Call on every process once all processes have closed their ExportWriter.
  Streaming (memory ~DEFAULT_CHUNK_ROWS rows) and resumable: a shard whose
  merge marker is durable is skipped.
  """
  config, per_shard = _export_runs(path, export_id, process_count)
  fmt = segments.Format(config["d"], config["dtype"], config["block_rows"])
  kv = _open(path)
  for s in range(process_index, len(per_shard), process_count):
    marker = f"export/{export_id}/{s:03x}"
    if kv.read(marker).result().state == "value":
      continue
    total, dups, seg = (0, 0), 0, None
    if per_shard[s]:
      batch = segments.Batch(kv)
      b = segments.SegmentBuilder(batch, _segment_name(s, export_id), fmt)
      for keys, stored, scales, dropped in segments.merged(per_shard[s], fmt):
        b.add(keys, stored, scales)
        total = segments.add_checksums(total,
                                       segments.row_checksum(keys, stored, scales))
        dups += dropped
      seg = b.finish()
      batch.flush()
    kv.write(
        marker,
        json.dumps({
            "segment": seg,
            "duplicates": dups,
            "checksum": segments.checksum_hex(total)
        }).encode()).result()


def publish(path: str,
            export_id: str,
            *,
            process_count: int = 1,
            source: str,
            source_step: int,
            source_config: ml_collections.ConfigDict | dict | None,
            dataset: str = "") -> int:
  """Makes a merged export visible as ONE new version, then drops its staging.

  Call on one process (process 0) after every process's `merge_export`.
  Idempotent: if the export was already published, returns that version.

  Returns:
    The OCDBT generation of the published version.

  Raises:
    errors.StoreError: some shard was not merged, or the export has duplicate InsIDs.
  """
  kv = _open(path)
  old, based_on = _read_meta(kv, path)
  if old is not None and old.get("export_id") == export_id:
    return _latest_generation(path)
  config, _ = _export_runs(path, export_id, process_count)
  meta = _new_meta(d=config["d"],
                   dtype=config["dtype"],
                   source=source,
                   source_step=source_step,
                   source_config=source_config,
                   dataset=dataset,
                   shard_bits=config["shard_bits"],
                   block_rows=config["block_rows"])
  total, unmerged = (0, 0), []
  for s in range(2**config["shard_bits"]):
    r = kv.read(f"export/{export_id}/{s:03x}").result()
    if r.state != "value":
      unmerged.append(s)
      continue
    marker = json.loads(r.value)
    if marker["duplicates"]:
      raise errors.StoreError(f"{path}: duplicate InsIDs in export {export_id} "
                       f"({marker['duplicates']} in shard {s})")
    if marker["segment"]:
      meta["shards"][s] = [marker["segment"]]
      meta["num_rows"] += marker["segment"]["rows"]
    total = segments.add_checksums(total, segments.parse_checksum(marker["checksum"]))
  if unmerged:
    raise errors.StoreError(f"InsEmb export {export_id} at {path}: shards {unmerged} "
                     f"are not merged yet (merge_export on every process)")
  meta["checksum"] = segments.checksum_hex(total)
  meta["export_id"] = export_id
  keep = _segment_prefixes(meta)
  drop = (_segment_prefixes(old) - keep) | {f"export/{export_id}/"}
  gen = _commit(path, kv, meta, based_on, drop)
  ts.KvStore.open(_base(path, f"staging/{export_id}")).result().delete_range(
      ts.KvStore.KeyRange()).result()
  return gen
