r"""Benchmark: the OCDBT InsEmb store (`iat_jax.store.insemb_table`) at scale.

For each --sizes (rows; d=--dim, --dtype), in a fresh subprocess per phase so
peak RSS (ru_maxrss) is that phase's own:

1. export: one `export.ExportWriter` fed synthetic rows in batches of 65,536 (keys
   are random hashes, values generated per batch, never all in memory), then
   `merge_export` and `publish`: rows/s of each phase and the writer's peak
   RSS (target < 2 GiB, independent of size).
2. lookup of one downstream batch (--batch x --hist_len = 131,072 random
   present keys) on a `reader.Table` with --cache_bytes: cold (a fresh reader, the
   files evicted from the page cache with posix_fadvise) and warm (median of
   --repeats calls after --warmup calls, new keys each), and the reader's
   peak RSS (target: within 2x between sizes). Beside it, in the same
   process, the numpy ceiling: `values[rows]` of the same number of random
   rows of an in-memory float32 [1M, d] array (target ratio >= 0.25 warm).
3. `writer.upsert` of --upsert_rows (random: half replaced, half new):
   seconds and bytes written, vs the table's bytes (what a full rewrite
   writes).

With several --block_rows, each size is exported once per layout (1-3 per
layout), and then one process opens every layout's table and times their
warm lookups interleaved (the same keys for each in a round), printing each
layout's median and its ratio to the first layout's.

With --downstream, the downstream's access pattern instead: rows belong to
users of --per_user instances each, and a batch is --batch requests, 16
consecutive instances of each of --batch/16 random users, each reading its
user's previous --hist_len instances (the distinct keys of the batch, as
`LookupInsEmb` asks for them). The same rows are exported under two key
placements (`iat_jax.store.placement`): "insid" (the InsID, a hash: a
user's rows scatter over the table) and "user" (the high 32 bits of the
user's hash over the InsID's low 32 bits, so a user's rows are adjacent; the
default --config.store.placement). One process opens both tables with
--cache_bytes each and alternates them batch by batch: cold (--cold_batches
on fresh readers, the files evicted from the page cache), then
--warm_batches after --warmup_batches batches of warm-up, printing requests/s and rows read per history slot (blocks read x
block_rows / (requests x hist_len)); and the same cold with one block read
in flight at a time ("serial"). Then --upsert_rows (half replaced, half new
rows of new users) into each placement's table: seconds and bytes written
vs the table's.

  python experiments/bench_store.py --downstream --sizes=10000000 \
      --per_user=256 --hist_len=64 --cache_bytes=27262976 --upsert_rows=1000000

With --s3, the tables are in a fresh bucket (one per size) of a local S3
server instead of under --tmp_dir: moto's, from `tests/s3_fixtures.py`
(moto[server], the `test` extra), in this process, with the AWS environment
pointing at it so the phases reach it through `database.s3_spec`; the
figures are the object-store ones to print beside the local-disk ones of
the same flags. There is no page cache on the reader side to evict, so
"cold" is fresh readers only (the lines say so); bytes are the objects'
under the table's prefix; the last line is this process's peak RSS (the
server keeps objects under ~5 MiB in memory, larger ones in temporary
files). The server serves one request at a time over HTTP on 127.0.0.1:
its per-request latency, not a real bucket's, bounds the cold figures.

  python experiments/bench_store.py --downstream --s3 --sizes=10000000 \
      --per_user=256 --hist_len=64 --cache_bytes=27262976 --upsert_rows=1000000

The machine load (os.getloadavg) is printed with each figure.

  python experiments/bench_store.py --sizes=1000000,10000000 --dtype=int8
  python experiments/bench_store.py --sizes=10000000 --block_rows=256,32 \
      --cache_bytes=26843545 --upsert_rows=0
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np
import tensorstore as ts

from iat_jax.store import backend
from iat_jax.store import cache as cache_lib
from iat_jax.store import database
from iat_jax.store import placement
from iat_jax.store import export
from iat_jax.store import reader
from iat_jax.store import writer

_SIZES = flags.DEFINE_list("sizes", ["1000000", "10000000"], "Table rows N.")
_D = flags.DEFINE_integer("dim", 64, "InsEmb width d.")
_DTYPE = flags.DEFINE_string("dtype", "int8", "Stored dtype.")
_BATCH = flags.DEFINE_integer("batch", 512, "Downstream batch size.")
_L = flags.DEFINE_integer("hist_len", 256, "History length L (keys per example).")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed warm lookups.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed lookups before them.")
_CACHE = flags.DEFINE_integer("cache_bytes", 1 << 30, "Reader cache budget.")
_UPSERT = flags.DEFINE_integer("upsert_rows", 1_000_000, "Rows of the upsert.")
_BLOCK_ROWS = flags.DEFINE_list("block_rows", [str(backend.DEFAULT_BLOCK_ROWS)],
                                "Rows per stored block: one table layout each.")
_DIR = flags.DEFINE_string("tmp_dir", "/tmp", "Parent of the tables.")
_S3 = flags.DEFINE_bool(
    "s3", False, "The tables in a bucket of a local S3 server (moto) instead of "
    "under --tmp_dir.")
_DOWNSTREAM = flags.DEFINE_bool("downstream", False,
                                "Time the downstream's access pattern instead.")
_PER_USER = flags.DEFINE_integer("per_user", 100, "--downstream: instances per user.")
_COLD = flags.DEFINE_integer("cold_batches", 10, "--downstream: cold batches.")
_WARM = flags.DEFINE_integer("warm_batches", 20, "--downstream: timed warm batches.")
_WARMUP_BATCHES = flags.DEFINE_integer("warmup_batches", 100,
                                       "--downstream: untimed batches before them.")
_PLACEMENTS = ("insid", "user")
_SESSION = 16  # consecutive requests of a user in one batch
_PHASE = flags.DEFINE_string("phase", None, "Internal: run one phase.")
_PLACEMENT = flags.DEFINE_enum("placement", "insid", _PLACEMENTS,
                               "Internal: the keys an export writes.")
_PATH = flags.DEFINE_list("path", None, "Internal: the table(s).")
_ROWS = flags.DEFINE_integer("rows", 0, "Internal: rows of the table.")

_BATCH_ROWS = 65_536
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_GIB = 2.0**30


def _load() -> str:
  return "load %.2f %.2f %.2f (%d cores)" % (*os.getloadavg(), os.cpu_count())


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _values(start: int, n: int, d: int) -> np.ndarray:
  return np.random.default_rng(start).standard_normal((n, d), dtype=np.float32)


def _evict(path: str) -> None:
  """Drops the (clean) pages of every file under `path` from the page cache;
  nothing for a URL (no page cache on the reader side)."""
  if "://" in path:
    return
  for root, _, files in os.walk(path):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def _dir_bytes(path: str) -> int:
  """Bytes of every file under directory `path`, or of every object under
  URL `path` (each read whole, 16 at a time: a kvstore lists no sizes)."""
  if "://" not in path:
    return sum(
        os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)
  kv = ts.KvStore.open(database.base_spec(path)).result()
  keys = kv.list().result()
  total = 0
  for i in range(0, len(keys), 16):
    total += sum(len(f.result().value) for f in [kv.read(k) for k in keys[i:i + 16]])
  return total


def _phase_export(path: str, n: int) -> dict:
  d = _D.value
  t0 = time.perf_counter()
  w = export.ExportWriter(path,
                          "bench",
                          d=d,
                          dtype=_DTYPE.value,
                          block_rows=int(_BLOCK_ROWS.value[0]))
  for start in range(0, n, _BATCH_ROWS):
    m = min(_BATCH_ROWS, n - start)
    rows = np.arange(start, start + m)
    w.add(_placed_keys(rows, _PLACEMENT.value), _values(start, m, d))
  w.close()
  t1 = time.perf_counter()
  w.merge()
  t2 = time.perf_counter()
  w.publish(source="bench", source_step=0, source_config=None)
  t3 = time.perf_counter()
  return {
      "write_s": t1 - t0,
      "merge_s": t2 - t1,
      "publish_s": t3 - t2,
      "bytes": _dir_bytes(path),
      "rss": _peak_rss(),
      "load": _load()
  }


def _phase_lookup(path: str, n: int) -> dict:
  q = _BATCH.value * _L.value
  rng = np.random.default_rng(1)
  ref = _values(0, 1_000_000, _D.value)  # the numpy ceiling, in this process
  ref_rows = [rng.integers(0, len(ref), q) for _ in range(_REPEATS.value)]
  base_rss = _peak_rss()
  _evict(path)
  t = time.perf_counter()
  table = reader.Table(path, cache_bytes=_CACHE.value)
  open_s = time.perf_counter() - t
  rows = rng.integers(0, n, q)
  t = time.perf_counter()
  got, found = table.lookup(_sample_keys(rows))
  cold = time.perf_counter() - t
  assert found.all(), "every benchmark key is in the table"
  for _ in range(_WARMUP.value):
    table.lookup(_sample_keys(rng.integers(0, n, q)))
  warm, gather = [], []
  for r in ref_rows:
    keys = _sample_keys(rng.integers(0, n, q))
    t = time.perf_counter()
    table.lookup(keys)
    warm.append(time.perf_counter() - t)
    t = time.perf_counter()
    ref[r]  # pylint: disable=pointless-statement
    gather.append(time.perf_counter() - t)
  del got
  return {
      "open_s": open_s,
      "cold_s": cold,
      "warm_s": statistics.median(warm),
      "gather_s": statistics.median(gather),
      "keys": q,
      "reader_bytes": table.memory_bytes(),
      "rss": _peak_rss(),
      "rss_before_reader": base_rss,
      "load": _load()
  }


def _phase_compare(paths: list[str], n: int) -> dict:
  """Warm lookups of the same random keys on each table, interleaved."""
  q = _BATCH.value * _L.value
  rng = np.random.default_rng(3)
  tabs = [reader.Table(p, cache_bytes=_CACHE.value) for p in paths]
  times = [[] for _ in tabs]
  for i in range(_WARMUP.value + _REPEATS.value):
    keys = _sample_keys(rng.integers(0, n, q))
    for j in (range(len(tabs)) if i % 2 else reversed(range(len(tabs)))):
      t = time.perf_counter()
      tabs[j].lookup(keys)
      if i >= _WARMUP.value:
        times[j].append(time.perf_counter() - t)
  return {"warm_s": [statistics.median(t) for t in times], "keys": q, "load": _load()}


def _placed_keys(rows: np.ndarray, how: str) -> np.ndarray:
  """Row i (InsID `_sample_keys(i)`, user i // --per_user) -> its store key
  placed `how` (`placement.keys`, as --config.store.placement places it)."""
  return placement.keys(how, _sample_keys(rows), rows // _PER_USER.value)


def _downstream_batches(n: int, count: int, seed: int):
  """Yields `count` batches of the downstream pattern: the distinct rows
  (int64) the histories of --batch requests read. --batch / 16 users are
  active at once, each adding its next 16 instances per batch (users in time
  order, as consecutive training batches share users) until its rows run
  out; then a random user takes its place."""
  per, hist = _PER_USER.value, _L.value
  if per < hist + _SESSION:
    raise ValueError(f"--per_user={per} < --hist_len + {_SESSION}")
  rng = np.random.default_rng(seed)
  users = n // per
  active = rng.integers(0, users, _BATCH.value // _SESSION)
  at = rng.integers(hist, per - _SESSION + 1, len(active))  # staggered
  for _ in range(count):
    req = (active * per + at)[:, None] + np.arange(_SESSION)  # [users, 16]
    yield np.unique(req[..., None] - np.arange(1, hist + 1))  # previous L rows
    at += _SESSION
    done = at > per - _SESSION
    active[done] = rng.integers(0, users, int(done.sum()))
    at[done] = hist


def _phase_downstream(paths: list[str], n: int) -> dict:
  """Both placements' tables, batch by batch: cold, one read in flight, warm."""
  reqs = _BATCH.value
  slots = reqs * _L.value

  def run(tables, batches):
    secs = [0.0] * len(tables)
    before = [t.counters()["rows_read"] for t in tables]
    for rows in batches:
      for j, t in enumerate(tables):
        keys = _placed_keys(rows, _PLACEMENTS[j])
        s = time.perf_counter()
        _, found = t.lookup(keys)
        secs[j] += time.perf_counter() - s
        assert found.all(), "every benchmark key is in the table"
    m = len(batches)
    return [{
        "req_s": m * reqs / s,
        "rows_per_slot": (t.counters()["rows_read"] - b) / (m * slots)
    } for t, s, b in zip(tables, secs, before)]

  def fresh(window: int | None = None):
    for p in paths:
      _evict(p)
    tables = [reader.Table(p, cache_bytes=_CACHE.value) for p in paths]
    if window:  # one read in flight: the cache made before the first lookup
      for t in tables:
        t._cache = cache_lib.BlockCache(t.format, t.cache_bytes)  # pylint: disable=protected-access
        t._cache.read_blocks = window  # pylint: disable=protected-access
    return tables

  cold_batches = list(_downstream_batches(n, _COLD.value, 5))
  serial = run(fresh(window=1), cold_batches)
  tables = fresh()
  cold = run(tables, cold_batches)
  run(tables, list(_downstream_batches(n, _WARMUP_BATCHES.value, 6)))
  warm = run(tables, list(_downstream_batches(n, _WARM.value, 7)))
  return {
      "cold": cold,
      "serial": serial,
      "warm": warm,
      "rss": _peak_rss(),
      "reader_bytes": [t.memory_bytes() for t in tables],
      "load": _load()
  }


def _sample_keys(rows: np.ndarray) -> np.ndarray:
  """Row i's InsID: a bijective 64-bit hash of i (unique, uniform)."""
  k = rows.astype(np.uint64) + np.uint64(1)
  k *= np.uint64(0x9E3779B97F4A7C15)
  k ^= k >> np.uint64(29)
  k *= np.uint64(0xBF58476D1CE4E5B9)
  k ^= k >> np.uint64(32)
  return k


def _phase_upsert(path: str, n: int) -> dict:
  m = _UPSERT.value
  rng = np.random.default_rng(2)
  old = rng.choice(n, m // 2, replace=False)
  keys = _placed_keys(np.concatenate([old, np.arange(n, n + m - m // 2)]),
                      _PLACEMENT.value)
  values = _values(n, m, _D.value)
  before = _dir_bytes(path)
  t = time.perf_counter()
  table = writer.upsert(reader.Table(path, cache_bytes=256 << 20), keys, values)
  secs = time.perf_counter() - t
  assert len(table) == n + m - m // 2
  return {
      "upsert_s": secs,
      "written": _dir_bytes(path) - before,
      "table_bytes": before,
      "rss": _peak_rss(),
      "load": _load(),
      "segments": max(len(s) for s in table.metadata["shards"])
  }


def _run_phase(phase: str,
               path: str,
               n: int,
               block_rows: int = 0,
               placement: str = "insid") -> dict:
  out = subprocess.run([
      sys.executable, __file__, f"--phase={phase}", f"--path={path}", f"--rows={n}",
      f"--block_rows={block_rows or _BLOCK_ROWS.value[0]}", f"--dim={_D.value}",
      f"--dtype={_DTYPE.value}", f"--batch={_BATCH.value}", f"--hist_len={_L.value}",
      f"--repeats={_REPEATS.value}", f"--warmup={_WARMUP.value}",
      f"--cache_bytes={_CACHE.value}", f"--upsert_rows={_UPSERT.value}",
      f"--placement={placement}", f"--per_user={_PER_USER.value}",
      f"--cold_batches={_COLD.value}", f"--warm_batches={_WARM.value}",
      f"--warmup_batches={_WARMUP_BATCHES.value}"
  ],
                       check=True,
                       capture_output=True,
                       text=True,
                       env=dict(os.environ, PYTHONPATH=_REPO))
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _PHASE.value:
    fn = {
        "export": _phase_export,
        "lookup": _phase_lookup,
        "upsert": _phase_upsert,
        "compare": _phase_compare,
        "downstream": _phase_downstream
    }[_PHASE.value]
    paths = _PATH.value if _PHASE.value in ("compare", "downstream") else _PATH.value[0]
    print(json.dumps(fn(paths, _ROWS.value)))
    return
  print(
      f"InsEmb store benchmark: d={_D.value} {_DTYPE.value}, lookup "
      f"{_BATCH.value}x{_L.value}, cache {_CACHE.value / _GIB:.2f} GiB; {_load()}",
      flush=True)
  with _s3_server() as server:
    for n in map(int, _SIZES.value):
      root = (server.bucket() if server else tempfile.mkdtemp(prefix="bench_store_",
                                                              dir=_DIR.value))
      layouts = [int(b) for b in _BLOCK_ROWS.value]
      paths = [os.path.join(root, f"t{b}") for b in layouts]
      try:
        print(f"\nN={n:,}:", flush=True)
        if _DOWNSTREAM.value:
          _downstream(root, n)
          continue
        for b, path in zip(layouts, paths):
          _layout(path, n, b)
        if len(paths) > 1:
          c = _run_phase("compare", ",".join(paths), n)
          first = c["warm_s"][0]
          print(f"  warm lookups of {c['keys']:,} keys interleaved: " + "; ".join(
              f"{b} rows/block {t * 1e3:.0f} ms ({first / t:.2f}x {layouts[0]})"
              for b, t in zip(layouts, c["warm_s"])) + f"; {c['load']}",
                flush=True)
      finally:
        database.drop(root)
    if server:
      print(f"\nS3 server (this process) peak RSS {_peak_rss() / _GIB:.2f} GiB",
            flush=True)


@contextlib.contextmanager
def _s3_server():
  """With --s3: a running local S3 server (os.environ pointing at it, for the
  phases too); else None."""
  if not _S3.value:
    yield None
    return
  sys.path.insert(0, _REPO)
  from tests import s3_fixtures  # pylint: disable=import-outside-toplevel
  if not s3_fixtures.AVAILABLE:
    sys.exit(f"--s3: {s3_fixtures.MISSING}")
  with s3_fixtures.running() as server:
    print(f"Tables in buckets of a local S3 server (moto) at {server.endpoint}",
          flush=True)
    yield server


def _downstream(root: str, n: int) -> None:
  """--downstream: both placements of n rows, exported, then timed together."""
  paths = [os.path.join(root, p) for p in _PLACEMENTS]
  _per_placement(
      "export", paths, n, lambda e: f"exported in "
      f"{e['write_s'] + e['merge_s'] + e['publish_s']:.0f} s, "
      f"{e['bytes'] / n:.1f} B/row")
  r = _run_phase("downstream", ",".join(paths), n)
  s3 = "://" in root
  print(
      f"  downstream pattern, {_BATCH.value} requests x L={_L.value} per batch, "
      f"{_PER_USER.value} instances/user, cache {_CACHE.value / 2**20:.0f} MiB per "
      f"reader{'; tables in ' + root if s3 else ''}; {r['load']}",
      flush=True)
  for what in ("cold", "serial", "warm"):
    note = " (fresh readers; no page cache to evict)" if s3 and what != "warm" else ""
    print(
        f"   {what:6s} " +
        "; ".join(f"{p}: {_rate(x['req_s'])} requests/s, {x['rows_per_slot']:.2f} rows "
                  f"read per history slot"
                  for p, x in zip(_PLACEMENTS, r[what])) + note,
        flush=True)
  print(f"  reader peak RSS {r['rss'] / _GIB:.2f} GiB (both readers); own "
        f"accounting " + ", ".join(f"{b / 2**20:.0f}" for b in r["reader_bytes"]) +
        " MiB",
        flush=True)
  if _UPSERT.value and _UPSERT.value < n:
    _per_placement(
        "upsert", paths, n, lambda u: f"upsert {_UPSERT.value:,} rows (half "
        f"replaced, half new) {u['upsert_s']:.1f} s, "
        f"{u['written'] / u['table_bytes']:.4f}x a full rewrite")


def _per_placement(phase: str, paths: list[str], n: int, line) -> None:
  """Runs `phase` on each placement's table; prints line(its result dict)."""
  for how, path in zip(_PLACEMENTS, paths):
    r = _run_phase(phase, path, n, placement=how)
    print(f"  {how} placement: {line(r)}; {r['load']}", flush=True)


def _rate(per_s: float) -> str:
  """Requests/s -> "12.3k", or "12.3" under 50 (which "k" would print as 0.0k)."""
  return f"{per_s / 1e3:.1f}k" if per_s >= 50 else f"{per_s:.1f}"


def _layout(path: str, n: int, block_rows: int) -> None:
  """Phases 1-3 on a table of n rows in blocks of block_rows."""
  e = _run_phase("export", path, n, block_rows)
  total = e["write_s"] + e["merge_s"] + e["publish_s"]
  print(
      f" {block_rows} rows/block: export {n / total / 1e6:.2f} M rows/s ({total:.1f} "
      f"s: write {e['write_s']:.1f}, merge {e['merge_s']:.1f}, publish "
      f"{e['publish_s']:.1f}); writer peak RSS {e['rss'] / _GIB:.2f} GiB; "
      f"{e['bytes'] / n:.1f} B/row on disk; {e['load']}",
      flush=True)
  lk = _run_phase("lookup", path, n, block_rows)
  q = lk["keys"]
  print(
      f"  lookup {q:,} keys: cold {q / lk['cold_s'] / 1e6:.2f} M keys/s "
      f"({lk['cold_s'] * 1e3:.0f} ms, open {lk['open_s'] * 1e3:.0f} ms); "
      f"warm {q / lk['warm_s'] / 1e6:.2f} M keys/s ({lk['warm_s'] * 1e3:.1f} "
      f"ms); numpy gather at 1M rows {lk['gather_s'] * 1e3:.1f} ms -> warm "
      f"ratio {lk['gather_s'] / lk['warm_s']:.2f}",
      flush=True)
  print(
      f"  reader: peak RSS {lk['rss'] / _GIB:.2f} GiB (process before the "
      f"reader {lk['rss_before_reader'] / _GIB:.2f} GiB, incl. the 1M-row "
      f"numpy reference); own accounting {lk['reader_bytes'] / 2**20:.0f} "
      f"MiB; {lk['load']}",
      flush=True)
  if _UPSERT.value and _UPSERT.value < n:
    u = _run_phase("upsert", path, n, block_rows)
    print(
        f"  upsert {_UPSERT.value:,} rows: {u['upsert_s']:.1f} s, "
        f"{u['written'] / 2**20:.0f} MiB written vs {u['table_bytes'] / 2**20:.0f} "
        f"MiB table ({u['written'] / u['table_bytes']:.3f}x a full rewrite); "
        f"max {u['segments']} segments/shard; peak RSS {u['rss'] / _GIB:.2f} "
        f"GiB; {u['load']}",
        flush=True)


if __name__ == "__main__":
  app.run(main)
