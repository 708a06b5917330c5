"""The OCDBT database of one table: its keys, its metadata, versioned commits.

Keys of the database at `path` (a local directory, or a gs:// / s3:// URL):
"meta" (JSON: `new_meta`'s keys, "checksum", "uuid", "created" and per shard
its segments, oldest first), "seg/<shard:03x>/<id>/..." (`segments`) and
"export/<id>/<shard:03x>" (merge markers of a running export); beside it,
"staging/<export id>/p<process>/" holds one scratch database per exporting
process. Every publish is one atomic commit of "meta", conditional on the
"meta" it started from, so a version never names a half-written segment and
concurrent writers cannot lose an update; older generations stay readable by
number. At 1e11 rows "meta" lists 256 shards' few segments (KBs); a commit
costs the same at any size. See docs/store.md.
"""

from __future__ import annotations

import datetime
import json
import os
import shutil
from typing import Any, Iterable
import uuid

import numpy as np
import tensorstore as ts

from iat_jax import errors
from iat_jax.store import backend
from iat_jax.store import rows

FORMAT = "iat-insemb-ocdbt/2"  # /2: a CRC-32 ends every block
TS_CACHE_BYTES = 32 << 20  # TensorStore's own cache (OCDBT B+tree nodes)
# A table reader's TensorStore cache: 1/TS_CACHE_SHARE of its cache_bytes, at
# most TS_CACHE_BYTES (so the many small readers of a continuous run's period
# tables hold a share of their budget each, not 32 MiB each).
TS_CACHE_SHARE = 8


def ts_cache_bytes(cache_bytes: int) -> int:
  """TensorStore's cache pool of a reader with budget `cache_bytes`."""
  return min(TS_CACHE_BYTES, max(int(cache_bytes) // TS_CACHE_SHARE, 1 << 20))


def base_spec(path: str, sub: str = "") -> dict | str:
  """Base kvstore spec of the table at `path` (a directory or a URL)."""
  if "://" in path:
    url = path.rstrip("/") + "/" + (sub + "/" if sub else "")
    return s3_spec(url) if url.startswith("s3://") else url
  return {
      "driver": "file",
      "path": os.path.join(os.path.abspath(path), sub).rstrip("/") + "/"
  }


def s3_spec(url: str) -> dict | str:
  """The kvstore of an s3://bucket/prefix/ URL, at the endpoint and region
  the AWS environment names.

  TensorStore's s3 driver reads only the credentials from the environment
  (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE,
  ~/.aws/credentials, then the instance's metadata service); it takes an S3
  endpoint other than AWS's, and the region, only from the spec. Here they
  come from AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL) and AWS_REGION (or
  AWS_DEFAULT_REGION), as in the AWS CLI; with neither set, the URL itself
  (AWS, the bucket's region looked up).
  """
  endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
  region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
  if not endpoint and not region:
    return url
  bucket, _, prefix = url[len("s3://"):].partition("/")
  spec = {"driver": "s3", "bucket": bucket, "path": prefix}
  if endpoint:
    spec["endpoint"] = endpoint.rstrip("/")
  if region:
    spec["aws_region"] = region
  return spec


def open_kv(path: str,
            version: int | None = None,
            sub: str = "",
            context: ts.Context | None = None) -> ts.KvStore:
  """The OCDBT database at `path` (or its subdirectory `sub`), at its newest
  generation or at `version`."""
  spec = {"driver": "ocdbt", "base": base_spec(path, sub)}
  if version is not None:
    spec["version"] = int(version)
  try:
    return ts.KvStore.open(spec, context=context).result()
  except ValueError as e:
    raise errors.StoreError(f"InsEmb store {path}: cannot open the OCDBT database "
                            f"({e})") from e


def latest_generation(path: str, sub: str = "") -> int | None:
  """The newest OCDBT generation at `path`, or None if there is no database."""
  base = ts.KvStore.open(base_spec(path, sub)).result()
  try:
    if base.read("manifest.ocdbt").result().state != "value":
      return None
    return int(ts.ocdbt.dump(base).result()["versions"][-1]["generation_number"])
  except (ValueError, KeyError, IndexError) as e:
    raise errors.StoreError(
        f"InsEmb store {path}: unreadable OCDBT manifest ({e})") from e


def drop(path: str) -> None:
  """Deletes the database at `path` and everything beside it (its staging)."""
  if "://" in path:
    base = ts.KvStore.open(base_spec(path)).result()
    base.delete_range(ts.KvStore.KeyRange()).result()
  else:
    shutil.rmtree(path, ignore_errors=True)


def layout_format(meta: dict) -> rows.Format:
  """How the rows of the version with metadata `meta` are stored."""
  return rows.Format(int(meta["d"]), meta["dtype"], int(meta["block_rows"]))


def check_layout(dtype: str, shard_bits: int, block_rows: int) -> None:
  """Raises errors.StoreError for a dtype, shard count or block size the
  format cannot hold."""
  rows.check_dtype(dtype)
  if not 1 <= shard_bits <= 16:
    raise errors.StoreError(f"shard_bits={shard_bits} is not in 1..16")
  if block_rows < 2 or block_rows & (block_rows - 1):
    raise errors.StoreError(f"block_rows={block_rows} is not a power of two >= 2")


def shard_bounds(keys: np.ndarray, shard_bits: int) -> np.ndarray:
  """Sorted keys [n] -> int64 [2**shard_bits + 1]: shard s is [b[s], b[s+1])."""
  shard = keys >> np.uint64(64 - shard_bits)
  return np.searchsorted(shard, np.arange(2**shard_bits + 1, dtype=np.uint64))


def new_meta(*, d: int, dtype: str, source: str, source_step: int, source_config: Any,
             dataset: str, shard_bits: int, block_rows: int) -> dict:
  """The metadata of an empty version (no rows, no segments)."""
  check_layout(dtype, shard_bits, block_rows)
  return {
      **backend.base_metadata(d=d,
                              dtype=dtype,
                              source=source,
                              source_step=source_step,
                              source_config=source_config,
                              dataset=dataset), "format":
          FORMAT,
      "shard_bits":
          int(shard_bits),
      "block_rows":
          int(block_rows),
      "shards": [[] for _ in range(2**shard_bits)]
  }


def read_meta(kv: ts.KvStore, path: str) -> tuple[dict | None, bytes]:
  """-> (meta or None if no version was published, its storage generation)."""
  try:
    r = kv.read("meta").result()
  except ValueError as e:
    raise errors.StoreError(
        f"InsEmb store {path}: cannot read its metadata ({e})") from e
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


def commit(path: str, kv: ts.KvStore, meta: dict, based_on: bytes,
           drop: Iterable[str]) -> int:
  """Publishes `meta` in one atomic commit; returns its OCDBT generation.

  Args:
    path: the table (for messages and to find the generation).
    kv: the database, opened at its latest version.
    meta: the new metadata (a fresh "uuid" and "created" are set here).
    based_on: storage generation of the `meta` key this version replaces; the
      commit fails if another writer published since.
    drop: key prefixes (segments, markers) the new version no longer has.

  Raises:
    errors.StoreError: another writer published first, or the commit failed.
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
  gen = latest_generation(path)
  while gen and gen > 0:  # the commit is the newest or just below later ones
    got, _ = read_meta(open_kv(path, gen), path)
    if got and got["uuid"] == meta["uuid"]:
      return gen
    gen -= 1
  raise errors.StoreError(f"InsEmb store {path}: the committed version vanished")


def segment_name(shard: int, tag: str) -> str:
  return f"seg/{shard:03x}/{tag}"


def segment_prefixes(meta: dict | None) -> set[str]:
  """The key prefixes of every segment a version names."""
  if not meta:
    return set()
  return {s["name"] + "/" for shard in meta["shards"] for s in shard}


def staging(export_id: str, process_index: int) -> str:
  """Subdirectory of the scratch database of one process of an export."""
  return f"staging/{export_id}/p{process_index}"


def drop_staging(path: str, export_id: str) -> None:
  """Deletes every process's scratch database of export `export_id`."""
  ts.KvStore.open(base_spec(path, f"staging/{export_id}")).result().delete_range(
      ts.KvStore.KeyRange()).result()
