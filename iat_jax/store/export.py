"""The parallel, streaming, resumable export of an OCDBT table.

P processes, each with a disjoint slice of the InsIDs fed in a deterministic
order:

  w = ExportWriter(path, export_id, process_index=p, process_count=P, d=...)
  for keys, values in my_batches():   # may skip w.done_rows rows (resume)
    w.add(keys, values)
  w.close()
  <barrier>
  w.merge()          # merge_export: this process's shards
  <barrier>
  if p == 0: w.publish(source=..., ...)   # one commit

A slice is written in chunks of `chunk_rows` into the process's own staging
database (one sorted run per shard each, then a "done" marker), so memory is
O(chunk_rows) and a killed process loses at most one chunk; a merge is a
streaming k-way merge of a shard's runs into one segment. The table depends
only on the rows, not on P, chunk_rows or restarts. At 1e11 rows and 256
shards each of P processes writes 1e11 / P rows and merges 256 / P shards of
~4e8 rows in memory ~2.6e5 rows; nothing is ever gathered. See docs/store.md.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from iat_jax import errors
from iat_jax.store import backend
from iat_jax.store import database
from iat_jax.store import rows
from iat_jax.store import segments


class ExportWriter:
  """One process's slice of an export, written in durable chunks as it goes.

  On restart (same arguments) `done_chunks` / `done_rows` say what is
  durable; `add` drops the first `done_rows` rows it is given (after
  `skip(n)`, the first done_rows - n), so a rerun that feeds the same stream
  from the start, or from row n, ends with the same chunks.
  """

  def __init__(self,
               path: str,
               export_id: str,
               *,
               process_index: int = 0,
               process_count: int = 1,
               d: int,
               dtype: str = "float32",
               chunk_rows: int = backend.DEFAULT_CHUNK_ROWS,
               shard_bits: int = backend.DEFAULT_SHARD_BITS,
               block_rows: int = backend.DEFAULT_BLOCK_ROWS):
    database.check_layout(dtype, shard_bits, block_rows)
    self.path, self.export_id = path, export_id
    self.process_index, self.process_count = process_index, process_count
    self.config = {
        "d": int(d),
        "dtype": dtype,
        "chunk_rows": int(chunk_rows),
        "shard_bits": int(shard_bits),
        "block_rows": int(block_rows),
        "process_count": int(process_count)
    }
    self._fmt = rows.Format(int(d), dtype, int(block_rows))
    self._kv = database.open_kv(path, sub=database.staging(export_id, process_index))
    r = self._kv.read("config").result()
    if r.state == "value":
      if json.loads(r.value) != self.config:
        raise errors.StoreError(f"InsEmb export {export_id} at {path} was started "
                                f"with {json.loads(r.value)}, not {self.config}")
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

  def skip(self, n: int) -> None:
    """Says the caller starts feeding at row n (<= done_rows) of its stream."""
    if not 0 <= n <= self.done_rows:
      raise errors.StoreError(f"skip({n}): only {self.done_rows} rows are durable")
    self._drop = self.done_rows - n

  def add(self, keys: np.ndarray, values: np.ndarray) -> None:
    """Appends rows keys uint64 [n] -> values float32 [n, d] to this slice
    (rows already durable from an earlier run are dropped, see the class)."""
    keys = np.asarray(keys).astype(np.uint64, copy=False).reshape(-1)
    values = np.asarray(values, np.float32)
    if values.shape != (len(keys), self._fmt.d):
      raise errors.StoreError(f"{self.path}: values {values.shape} do not match "
                              f"keys [{len(keys)}] x d={self._fmt.d}")
    drop = min(self._drop, len(keys))
    self._drop -= drop
    if drop == len(keys):
      return
    if self.closed:
      raise errors.StoreError(f"InsEmb export {self.export_id}: this process's "
                              f"slice was closed after {self.done_rows} rows; more "
                              f"were given")
    self._buf.append((keys[drop:], values[drop:]))
    self._buf_rows += len(keys) - drop
    chunk = self.config["chunk_rows"]
    while self._buf_rows >= chunk:
      self._flush(chunk)

  def _flush(self, n: int) -> None:
    """Writes the first n buffered rows as one durable chunk."""
    keys = np.concatenate([b[0] for b in self._buf])
    values = np.concatenate([b[1] for b in self._buf])
    self._buf = [(keys[n:], values[n:])] if n < len(keys) else []
    self._buf_rows = len(keys) - n
    keys, values = rows.check_rows(self.path, keys[:n], values[:n])
    c = self.done_chunks
    bounds = database.shard_bounds(keys, self.config["shard_bits"])
    runs, batch = {}, segments.Batch(self._kv)
    for s in np.flatnonzero(np.diff(bounds)).tolist():
      lo, hi = int(bounds[s]), int(bounds[s + 1])
      stored, scales = rows.quantize(values[lo:hi], self._fmt.dtype)
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

  def merge(self) -> None:
    """`merge_export` of this process's shards."""
    merge_export(self.path,
                 self.export_id,
                 process_index=self.process_index,
                 process_count=self.process_count)

  def publish(self,
              *,
              source: str,
              source_step: int,
              source_config: Any,
              dataset: str = "") -> int:
    """`publish` of this export (on one process, after every `merge`)."""
    return publish(self.path,
                   self.export_id,
                   process_count=self.process_count,
                   source=source,
                   source_step=source_step,
                   source_config=source_config,
                   dataset=dataset)


def _slice_runs(path: str, export_id: str, p: int, per_shard: list | None,
                config: dict | None) -> tuple[dict, list]:
  """Adds process p's runs to per_shard (made from its config if None);
  -> (its config, per_shard)."""
  if database.latest_generation(path, database.staging(export_id, p)) is None:
    raise errors.StoreError(f"InsEmb export {export_id} at {path}: process {p} "
                            f"never started (no staging database)")
  kv = database.open_kv(path, sub=database.staging(export_id, p))
  cfg = segments.read_json(kv, "config", f"export {export_id} process {p} config")
  if config is not None and cfg != config:
    raise errors.StoreError(f"InsEmb export {export_id}: processes disagree on "
                            f"{cfg} vs {config}")
  if per_shard is None:
    per_shard = [[] for _ in range(2**cfg["shard_bits"])]
  if kv.read("final").result().state != "value":
    raise errors.StoreError(f"InsEmb export {export_id} at {path}: process {p} has "
                            f"not closed its slice (ExportWriter.close)")
  final = segments.read_json(kv, "final", f"export {export_id} process {p}")
  for c in range(final["chunks"]):
    done = segments.read_json(kv, f"c{c:06d}/done", f"chunk {c} of process {p}")
    for s, seg in done["runs"].items():
      per_shard[int(s)].append(segments.Source(kv, seg, path))
  return cfg, per_shard


def _export_runs(path: str, export_id: str,
                 process_count: int) -> tuple[dict, list[list[segments.Source]]]:
  """-> (config, per shard the [Source] of all processes' runs in (p, c) order)."""
  config, per_shard = None, None
  for p in range(process_count):
    config, per_shard = _slice_runs(path, export_id, p, per_shard, config)
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
  fmt = rows.Format(config["d"], config["dtype"], config["block_rows"])
  kv = database.open_kv(path)
  for s in range(process_index, len(per_shard), process_count):
    marker = f"export/{export_id}/{s:03x}"
    if kv.read(marker).result().state == "value":
      continue
    total, dups, seg = (0, 0), 0, None
    if per_shard[s]:
      batch = segments.Batch(kv)
      b = segments.SegmentBuilder(batch, database.segment_name(s, export_id), fmt)
      for keys, stored, scales, dropped in segments.merged(per_shard[s], fmt):
        b.add(keys, stored, scales)
        total = rows.add_checksums(total, rows.row_checksum(keys, stored, scales))
        dups += dropped
      seg = b.finish()
      batch.flush()
    kv.write(
        marker,
        json.dumps({
            "segment": seg,
            "duplicates": dups,
            "checksum": rows.checksum_hex(total)
        }).encode()).result()


def publish(path: str,
            export_id: str,
            *,
            process_count: int = 1,
            source: str,
            source_step: int,
            source_config: Any,
            dataset: str = "") -> int:
  """Makes a merged export visible as ONE new version, then drops its staging.

  Call on one process (process 0) after every process's `merge_export`.
  Idempotent: if the export was already published, returns that version.

  Returns:
    The OCDBT generation of the published version.

  Raises:
    errors.StoreError: some shard was not merged, or the export has duplicate
      InsIDs.
  """
  kv = database.open_kv(path)
  old, based_on = database.read_meta(kv, path)
  if old is not None and old.get("export_id") == export_id:
    return database.latest_generation(path)
  config, _ = _export_runs(path, export_id, process_count)
  meta = database.new_meta(d=config["d"],
                           dtype=config["dtype"],
                           source=source,
                           source_step=source_step,
                           source_config=source_config,
                           dataset=dataset,
                           shard_bits=config["shard_bits"],
                           block_rows=config["block_rows"])
  _take_markers(kv, path, export_id, meta)
  meta["export_id"] = export_id
  keep = database.segment_prefixes(meta)
  drop = (database.segment_prefixes(old) - keep) | {f"export/{export_id}/"}
  gen = database.commit(path, kv, meta, based_on, drop)
  database.drop_staging(path, export_id)
  return gen


def _take_markers(kv, path: str, export_id: str, meta: dict) -> None:
  """Sets meta's shards, num_rows and checksum from the export's merge markers.

  Raises:
    errors.StoreError: a shard is not merged, or holds duplicate InsIDs.
  """
  total, unmerged = (0, 0), []
  for s in range(len(meta["shards"])):
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
    total = rows.add_checksums(total, rows.parse_checksum(marker["checksum"]))
  if unmerged:
    raise errors.StoreError(f"InsEmb export {export_id} at {path}: shards "
                            f"{unmerged} are not merged yet (merge_export on every "
                            f"process)")
  meta["checksum"] = rows.checksum_hex(total)
