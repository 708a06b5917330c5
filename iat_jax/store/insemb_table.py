"""InsEmb table in TensorStore, keyed by the uint64 hashed InsID.

Layout of a table directory:

  MANIFEST.json        {"version": "v000003"}; replaced atomically (os.replace)
  .lock                flock'ed by writers (one writer at a time)
  v000003/
    keys/              zarr3 uint64 [N], sorted ascending
    values/            zarr3 [N, d] float32 | bfloat16 | int8, chunks [4096, d]
    scales/            zarr3 float32 [N] (int8 only: value = int8 * scale)
    metadata.json      d, dtype, num_rows, source kind/config/step, created,
                       sha256 of keys and stored values (and scales)

Why this layout: rows sorted by key make a lookup one `searchsorted` of the
(sorted) queries over the in-memory key column (8 bytes a row) plus one
TensorStore `oindex` read of the sorted unique row positions; whole-width row
chunks of 4,096 rows (1 MiB at d=64 float32) keep the chunk count small.
Each touched chunk is read whole (TensorStore reads whole zarr3 chunks anyway)
and kept, decoded, in a per-Table LRU cache of numpy arrays (1 GiB), so a warm
lookup is numpy gathers from memory; a TensorStore `oindex` read of the rows
costs ~7 ns per element even from its cache pool, 3-4x a numpy gather. A
version is never modified once published, so nothing cached is ever stale.

Crash safety: writers never touch a published version. Each write fills a new
version directory (fsync'ed by TensorStore, plus metadata and directories
here) and publishes it by swapping the manifest, so readers see the old table
or the new one, never half of one; a write killed before the swap leaves an
unpublished directory that the next write removes. Versions other than the
newest two are removed after a publish (a reader that opened the older of the
two keeps working through one more publish).

Precision of the stored dtypes (what a lookup returns vs. what was written):
  float32   exact;
  bfloat16  round-to-nearest-even, relative error <= 2**-8 per element;
  int8      symmetric per-row scale = max|row| / 127, absolute error
            <= max|row| / 254 per element (half a quantization step), times
            (1 + 2**-15) for the float32 rounding of the scale, the division
            and the dequantizing product (each <= 2**-24 relative, on values
            up to 127.5 steps).
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
from typing import Any, Iterator

import ml_collections
import numpy as np
import tensorstore as ts

DTYPES = {"float32": ts.float32, "bfloat16": ts.bfloat16, "int8": ts.int8}
_CHUNK_ROWS = 4096
_KEY_CHUNK_ROWS = 1 << 16
_CACHE_BYTES = 1 << 30
_VERSION_RE = re.compile(r"^v\d{6}$")


class StoreError(ValueError):
  """A store that is missing, corrupt or does not match what the reader expects."""


def _spec(path: str, **kw) -> dict:
  return {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}, **kw}


def _write_array(path: str, data: np.ndarray, dtype, chunk_rows: int) -> None:
  chunk = [min(chunk_rows, max(len(data), 1))] + list(data.shape[1:])
  arr = ts.open(_spec(path), create=True, dtype=dtype, shape=data.shape,
                chunk_layout=ts.ChunkLayout(chunk_shape=chunk)).result()
  if len(data):
    arr.write(data).result()


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _bytes(a: np.ndarray) -> memoryview:
  """The raw bytes of `a` without a copy (for hashing)."""
  return memoryview(np.ascontiguousarray(a).reshape(-1).view(np.uint8))


def _digest(keys: np.ndarray, stored: np.ndarray, scales: np.ndarray | None) -> str:
  digest = hashlib.sha256(_bytes(keys))
  digest.update(_bytes(stored))
  if scales is not None:
    digest.update(_bytes(scales))
  return digest.hexdigest()


def quantize(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
  """float32 [n, d] -> (stored values [n, d], per-row scales [n] for int8 else None).

  int8 uses symmetric per-row scaling: scale = max|v| / 127, so the absolute
  error per element is at most scale / 2 = max|v| / 254, up to float32
  rounding (a factor 1 + 2**-15, see the module docstring); all-zero rows get
  scale 1 and are stored exactly.
  """
  if dtype == "int8":
    values = np.asarray(values, np.float32)
    scale = np.abs(values).max(axis=1, initial=0.0) / np.float32(127)
    scale = np.where(scale > 0, scale, 1).astype(np.float32)
    q = np.divide(values, scale[:, None])
    np.rint(q, out=q)
    return q.astype(np.int8), scale
  if dtype == "bfloat16":
    return np.asarray(values).astype(ts.bfloat16.numpy_dtype), None
  return np.asarray(values, np.float32), None


@contextlib.contextmanager
def _writer_lock(path: str) -> Iterator[None]:
  with open(os.path.join(path, ".lock"), "a") as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def write(path: str, keys: np.ndarray, values: np.ndarray, *, source: str,
          source_step: int, source_config: ml_collections.ConfigDict | dict | None,
          dtype: str = "float32", dataset: str = "") -> str:
  """Writes a new version of the table and publishes it atomically.

  Args:
    path: table directory (created if missing).
    keys: uint64 [n] unique InsIDs, in any order.
    values: float32 [n, d], finite.
    source: kind of the source model ("source_temporal", "source_user", ...).
    source_step: checkpoint step of the source model.
    source_config: the source model's config (stored as JSON).
    dtype: "float32", "bfloat16" or "int8".
    dataset: fingerprint of the dataset whose instances the keys name.

  Returns:
    The published version name.

  Raises:
    StoreError: bad dtype, shapes, duplicate keys or non-finite values.
  """
  if dtype not in DTYPES:
    raise StoreError(f"store dtype {dtype!r} is not one of {sorted(DTYPES)}")
  keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
  values = np.asarray(values, np.float32)
  if values.ndim != 2 or len(values) != len(keys):
    raise StoreError(f"{path}: values {values.shape} do not match keys "
                     f"[{len(keys)}]; expected [num_keys, d]")
  if not np.isfinite(values).all():
    raise StoreError(f"{path}: non-finite InsEmb values")
  if len(keys) > 1 and not (keys[1:] > keys[:-1]).all():
    order = np.argsort(keys, kind="stable")
    keys = keys[order]
    if (keys[1:] == keys[:-1]).any():
      raise StoreError(f"{path}: duplicate InsIDs in the table being written")
    values = np.take(values, order, axis=0)
  stored, scales = quantize(values, dtype)
  os.makedirs(path, exist_ok=True)
  with _writer_lock(path):
    current = _current_version(path)
    number = int(current[1:]) + 1 if current else 1
    version = f"v{number:06d}"
    vdir = os.path.join(path, version)
    if os.path.exists(vdir):  # leftover of a killed write: never published
      shutil.rmtree(vdir)
    _write_array(os.path.join(vdir, "keys"), keys, ts.uint64, _KEY_CHUNK_ROWS)
    _write_array(os.path.join(vdir, "values"), stored, DTYPES[dtype], _CHUNK_ROWS)
    if scales is not None:
      _write_array(os.path.join(vdir, "scales"), scales, ts.float32, _KEY_CHUNK_ROWS)
    if isinstance(source_config, ml_collections.ConfigDict):
      source_config = json.loads(source_config.to_json_best_effort())
    meta = {"d": int(values.shape[1]), "dtype": dtype, "num_rows": int(len(keys)),
            "source": source, "source_step": int(source_step), "dataset": dataset,
            "source_config": source_config,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "sha256": _digest(keys, stored, scales)}
    with open(os.path.join(vdir, "metadata.json"), "w") as f:
      json.dump(meta, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    for root, _, _ in os.walk(vdir, topdown=False):
      _fsync_dir(root)
    _fsync_dir(path)
    tmp = os.path.join(path, "MANIFEST.json.tmp")
    with open(tmp, "w") as f:
      json.dump({"version": version}, f)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, os.path.join(path, "MANIFEST.json"))
    _fsync_dir(path)
    _prune(path, keep=(version, current))
  return version


def _current_version(path: str) -> str | None:
  try:
    with open(os.path.join(path, "MANIFEST.json")) as f:
      return json.load(f)["version"]
  except FileNotFoundError:
    return None
  except (ValueError, KeyError) as e:
    raise StoreError(f"InsEmb store {path}: unreadable MANIFEST.json ({e})") from e


def _prune(path: str, keep) -> None:
  """Removes version directories not in `keep` (call with the writer lock)."""
  for name in os.listdir(path):
    if _VERSION_RE.match(name) and name not in keep:
      shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def _dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      total += os.path.getsize(os.path.join(root, name))
  return total


class Table:
  """Read side: one published version, opened once; `lookup` is vectorized.

  Attributes:
    metadata: the version's metadata.json.
    path: the table directory.
    version: the version this object reads ("v000003"); it stays the same
      while writers publish newer ones.
    keys: uint64 [N] sorted InsIDs (held in memory).
  """

  def __init__(self, path: str, version: str | None = None):
    self.path = path
    for attempt in range(3):
      self.version = version or _current_version(path)
      if self.version is None:
        raise StoreError(f"no InsEmb table at {path} (no MANIFEST.json); run "
                         f"--mode=export first")
      try:
        self._open(os.path.join(path, self.version))
        return
      except StoreError:
        raise
      except (FileNotFoundError, ValueError) as e:
        # Pruned between reading the manifest and opening it: read it again.
        if version is not None or attempt == 2:
          raise StoreError(f"InsEmb store {path}: version {self.version} is "
                           f"missing or incomplete ({e})") from e

  def _open(self, vdir: str) -> None:
    with open(os.path.join(vdir, "metadata.json")) as f:
      self.metadata: dict[str, Any] = json.load(f)
    open_ = lambda name: ts.open(_spec(os.path.join(vdir, name))).result()
    self.keys = open_("keys").read().result()
    self._values = open_("values")
    self._chunk_rows = max(int(self._values.chunk_layout.read_chunk.shape[0]), 1)
    self._cache = collections.OrderedDict()  # chunk index -> [rows, d] array
    self._cache_bytes = 0
    self._lock = threading.Lock()
    self._scales = None
    if self.metadata["dtype"] == "int8":
      self._scales = open_("scales").read().result()
    n, d = self.metadata["num_rows"], self.metadata["d"]
    if self.keys.shape != (n,) or tuple(self._values.shape) != (n, d):
      raise StoreError(f"InsEmb store {vdir}: arrays {self.keys.shape} / "
                       f"{tuple(self._values.shape)} do not match metadata "
                       f"num_rows={n}, d={d}")

  def __getstate__(self):  # TensorStore handles are re-opened in workers
    return {"path": self.path, "version": self.version}

  def __setstate__(self, state):
    self.__init__(state["path"], state.get("version"))

  @property
  def dim(self) -> int:
    return self.metadata["d"]

  def __len__(self) -> int:
    return len(self.keys)

  def check(self, *, d: int, source: str, dataset: str | None = None) -> None:
    """Raises StoreError unless the table has width d, came from `source` and
    (if given) was exported from the dataset with fingerprint `dataset`."""
    m = self.metadata
    if dataset is not None and m.get("dataset") != dataset:
      raise StoreError(
          f"InsEmb store {self.path} was exported from dataset "
          f"{m.get('dataset')!r}, not the one this run reads ({dataset!r}): its "
          f"InsIDs would all be missing; re-export it (--mode=export)")
    if m["d"] != d or m["source"] != source:
      raise StoreError(
          f"InsEmb store {self.path} holds d={m['d']} from {m['source']!r}, but "
          f"the downstream config expects d={d} (--config.model.insemb_dim) from "
          f"{source!r} (--config.store.source)")

  def verify(self) -> None:
    """Re-reads every array from disk and checks the sha256 of the metadata.

    Reads the whole table, 64 MiB at a time (use it after a copy, or in a
    test, not per step).

    Raises:
      StoreError: the content on disk differs from what the writer hashed.
    """
    vdir = os.path.join(self.path, self.version)
    names = ["keys", "values"] + (["scales"] if self._scales is not None else [])
    sha = hashlib.sha256()
    for name in names:  # in blocks of rows: memory stays bounded
      arr = ts.open(_spec(os.path.join(vdir, name))).result()
      step = max(1, (64 << 20) // max(arr.dtype.numpy_dtype.itemsize
                                      * int(np.prod(arr.shape[1:])), 1))
      rows = arr.shape[0]
      for start in range(0, rows, step):
        sha.update(_bytes(arr[start:min(start + step, rows)].read().result()))
    digest = sha.hexdigest()
    if digest != self.metadata["sha256"]:
      raise StoreError(f"InsEmb store {vdir}: sha256 {digest} of the content does "
                       f"not match metadata.json ({self.metadata['sha256']})")

  def bytes_on_disk(self) -> int:
    """Bytes of this version's files (keys, values, scales, metadata)."""
    return _dir_bytes(os.path.join(self.path, self.version))

  def _read_rows(self, uniq: np.ndarray) -> np.ndarray:
    """Sorted unique row positions [m] -> stored rows [m, d], via the cache."""
    c = self._chunk_rows
    cid = uniq // c
    starts = np.flatnonzero(np.diff(cid, prepend=-1))
    chunks = cid[starts].tolist()
    with self._lock:
      have = {k: self._cache[k] for k in chunks if k in self._cache}
      for k in have:
        self._cache.move_to_end(k)
    n = len(self.keys)
    reads = {k: self._values[k * c:min((k + 1) * c, n)].read()
             for k in chunks if k not in have}
    for k, future in reads.items():
      have[k] = future.result()
    if reads:
      with self._lock:
        for k in reads:
          if k not in self._cache:
            self._cache[k] = have[k]
            self._cache_bytes += have[k].nbytes
        while self._cache_bytes > _CACHE_BYTES and self._cache:
          self._cache_bytes -= self._cache.popitem(last=False)[1].nbytes
    out = np.empty((len(uniq), self.dim), self._values.dtype.numpy_dtype)
    ends = np.append(starts[1:], len(uniq)).tolist()
    for k, s, e in zip(chunks, starts.tolist(), ends):
      np.take(have[k], uniq[s:e] - k * c, axis=0, out=out[s:e])
    return out

  def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys [n] (any order, repeats allowed) -> (float32 [n, d], bool [n]).

    Missing keys give zero rows and found=False. The chunks holding the rows
    that are not in the cache are read in one concurrent batch of TensorStore
    reads; the rest is numpy.
    """
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
    n = len(self.keys)
    missing = lambda: (np.zeros((len(keys), self.dim), np.float32),
                       np.zeros(len(keys), bool))
    if not n or not len(keys):
      return missing()
    # Sorted queries make searchsorted walk the key column in order (several
    # times faster than random probes) and give the unique rows for free.
    order = np.argsort(keys)
    sorted_keys = keys[order]
    pos = np.searchsorted(self.keys, sorted_keys)
    np.minimum(pos, n - 1, out=pos)
    hit = self.keys[pos] == sorted_keys
    pos = pos[hit]
    if not len(pos):
      return missing()
    new = np.empty(len(pos), bool)
    new[0] = True
    np.not_equal(pos[1:], pos[:-1], out=new[1:])
    uniq = pos[new]
    inv = np.cumsum(new) - 1  # row of each hit (in sorted order) within `uniq`
    rows = self._read_rows(uniq).astype(np.float32, copy=False)
    if self._scales is not None:
      rows *= self._scales[uniq][:, None]
    if len(pos) == len(keys):  # all found: one gather straight into `out`
      src = np.empty(len(keys), np.int64)
      src[order] = inv
      out = np.empty((len(keys), self.dim), np.float32)
      np.take(rows, src, axis=0, out=out)
      return out, np.ones(len(keys), bool)
    out, found = missing()
    hit_idx = order[hit]
    found[hit_idx] = True
    out[hit_idx] = rows[inv]
    return out, found
