"""InsEmb table in TensorStore, keyed by the uint64 hashed InsID.

Layout of a table directory:

  MANIFEST.json        {"version": "v000003"}; replaced atomically (os.replace)
  v000003/
    keys/              zarr3 uint64 [N], sorted ascending
    values/            zarr3 [N, d] float32 | bfloat16 | int8, chunks [4096, d]
    scales/            zarr3 float32 [N] (int8 only: value = int8 * scale)
    metadata.json      d, dtype, num_rows, source kind/config/step, created,
                       sha256 of keys and stored values

Why this layout: rows sorted by key make a lookup one `searchsorted` over the
in-memory key column (8 bytes a row) plus one TensorStore `oindex` read of the
sorted unique row positions; whole-width row chunks of 4,096 rows (1 MiB at
d=64 float32) keep the chunk count small and a warm cache pool turns
scattered reads into memory copies. Writers never touch a published version:
each write creates a new version directory and publishes it by swapping the
manifest, so readers see the old table or the new one, never half of one.
Versions other than the newest two are removed after a publish.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
from typing import Any

import ml_collections
import numpy as np
import tensorstore as ts

DTYPES = {"float32": ts.float32, "bfloat16": ts.bfloat16, "int8": ts.int8}
_CHUNK_ROWS = 4096
_CACHE_BYTES = 1 << 30


class StoreError(ValueError):
  """A store that is missing or does not match what the reader expects."""


def _spec(path: str) -> dict:
  return {"driver": "zarr3", "kvstore": {"driver": "file", "path": path}}


def _write_array(path: str, data: np.ndarray, dtype, chunk_rows: int) -> None:
  chunk = [min(chunk_rows, max(len(data), 1))] + list(data.shape[1:])
  arr = ts.open(_spec(path), create=True, dtype=dtype, shape=data.shape,
                chunk_layout=ts.ChunkLayout(chunk_shape=chunk)).result()
  if len(data):
    arr.write(data).result()


def quantize(values: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
  """float32 [n, d] -> (stored values, per-row scales for int8 else None).

  int8 uses symmetric per-row scaling: scale = max|v| / 127, so the absolute
  error per element is at most scale / 2 = max|v| / 254.
  """
  if dtype == "int8":
    scale = np.abs(values).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.round(values / scale[:, None]).astype(np.int8), scale
  if dtype == "bfloat16":
    return values.astype(ts.bfloat16.numpy_dtype), None
  return values.astype(np.float32), None


def write(path: str, keys: np.ndarray, values: np.ndarray, *, source: str,
          source_step: int, source_config: ml_collections.ConfigDict | dict | None,
          dtype: str = "float32") -> str:
  """Writes a new version of the table and publishes it atomically.

  Args:
    path: table directory (created if missing).
    keys: uint64 [n] unique InsIDs.
    values: float32 [n, d].
    source: kind of the source model ("source_temporal", "source_user", ...).
    source_step: checkpoint step of the source model.
    source_config: the source model's config (stored as JSON).
    dtype: "float32", "bfloat16" or "int8".

  Returns:
    The published version name.
  """
  if dtype not in DTYPES:
    raise StoreError(f"store dtype {dtype!r} is not one of {sorted(DTYPES)}")
  keys = np.asarray(keys, dtype=np.uint64)
  if len(np.unique(keys)) != len(keys):
    raise StoreError(f"{path}: duplicate InsIDs in the table being written")
  order = np.argsort(keys)
  keys, values = keys[order], np.asarray(values, np.float32)[order]
  stored, scales = quantize(values, dtype)
  os.makedirs(path, exist_ok=True)
  current = _current_version(path)
  number = int(current[1:]) + 1 if current else 1
  version = f"v{number:06d}"
  vdir = os.path.join(path, version)
  if os.path.exists(vdir):  # leftover of a killed write: never published
    shutil.rmtree(vdir)
  _write_array(os.path.join(vdir, "keys"), keys, ts.uint64, 1 << 16)
  _write_array(os.path.join(vdir, "values"), stored, DTYPES[dtype], _CHUNK_ROWS)
  if scales is not None:
    _write_array(os.path.join(vdir, "scales"), scales, ts.float32, 1 << 16)
  digest = hashlib.sha256(keys.tobytes())
  digest.update(np.ascontiguousarray(stored).view(np.uint8).tobytes())
  if scales is not None:
    digest.update(scales.tobytes())
  if isinstance(source_config, ml_collections.ConfigDict):
    source_config = json.loads(source_config.to_json_best_effort())
  meta = {"d": int(values.shape[1]), "dtype": dtype, "num_rows": int(len(keys)),
          "source": source, "source_step": int(source_step),
          "source_config": source_config,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
          "sha256": digest.hexdigest()}
  with open(os.path.join(vdir, "metadata.json"), "w") as f:
    json.dump(meta, f, indent=1, sort_keys=True)
  tmp = os.path.join(path, "MANIFEST.json.tmp")
  with open(tmp, "w") as f:
    json.dump({"version": version}, f)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(path, "MANIFEST.json"))
  _prune(path, keep=(version, current))
  return version


def _current_version(path: str) -> str | None:
  try:
    with open(os.path.join(path, "MANIFEST.json")) as f:
      return json.load(f)["version"]
  except FileNotFoundError:
    return None


def _prune(path: str, keep) -> None:
  for name in os.listdir(path):
    if name.startswith("v") and name not in keep:
      shutil.rmtree(os.path.join(path, name), ignore_errors=True)


class Table:
  """Read side: the published version, opened once; `lookup` is vectorized.

  Attributes:
    metadata: the version's metadata.json.
  """

  def __init__(self, path: str):
    version = _current_version(path)
    if version is None:
      raise StoreError(f"no InsEmb table at {path} (no MANIFEST.json); run "
                       f"--mode=export first")
    vdir = os.path.join(path, version)
    with open(os.path.join(vdir, "metadata.json")) as f:
      self.metadata: dict[str, Any] = json.load(f)
    self.path = path
    self.version = version
    self._open(vdir)

  def _open(self, vdir: str) -> None:
    ctx = ts.Context({"cache_pool": {"total_bytes_limit": _CACHE_BYTES}})
    self.keys = ts.open(_spec(os.path.join(vdir, "keys"))).result().read().result()
    self._values = ts.open(_spec(os.path.join(vdir, "values")), context=ctx).result()
    self._scales = None
    if self.metadata["dtype"] == "int8":
      self._scales = ts.open(_spec(os.path.join(vdir, "scales"))).result().read().result()

  def __getstate__(self):  # TensorStore handles are re-opened in workers
    return {"path": self.path}

  def __setstate__(self, state):
    self.__init__(state["path"])

  @property
  def dim(self) -> int:
    return self.metadata["d"]

  def check(self, *, d: int, source: str) -> None:
    """Raises StoreError unless the table has width d and came from `source`."""
    m = self.metadata
    if m["d"] != d or m["source"] != source:
      raise StoreError(
          f"InsEmb store {self.path} holds d={m['d']} from {m['source']!r}, but "
          f"the downstream config expects d={d} (--config.model.insemb_dim) from "
          f"{source!r} (--config.store.source)")

  def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys [n] -> (float32 values [n, d], bool found [n]); 0 if missing."""
    keys = np.asarray(keys, dtype=np.uint64)
    n = len(self.keys)
    pos = np.minimum(np.searchsorted(self.keys, keys), max(n - 1, 0))
    found = (self.keys[pos] == keys) if n else np.zeros(len(keys), bool)
    out = np.zeros((len(keys), self.dim), np.float32)
    if found.any():
      uniq, inv = np.unique(pos[found], return_inverse=True)
      rows = self._values.oindex[uniq].read().result().astype(np.float32)
      if self._scales is not None:
        rows *= self._scales[uniq][:, None]
      out[found] = rows[inv]
    return out, found
