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

The machine load (os.getloadavg) is printed with each figure.

  python experiments/bench_store.py --sizes=1000000,10000000 --dtype=int8
  python experiments/bench_store.py --sizes=10000000 --block_rows=256,32 \
      --cache_bytes=26843545 --upsert_rows=0
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from iat_jax.store import backend
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
_PHASE = flags.DEFINE_string("phase", None, "Internal: run one phase.")
_PATH = flags.DEFINE_list("path", None, "Internal: the table(s).")
_ROWS = flags.DEFINE_integer("rows", 0, "Internal: rows of the table.")

_BATCH_ROWS = 65_536
_GIB = 2.0**30


def _load() -> str:
  return "load %.2f %.2f %.2f (%d cores)" % (*os.getloadavg(), os.cpu_count())


def _peak_rss() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _keys(start: int, n: int) -> np.ndarray:
  return _sample_keys(np.arange(start, start + n))


def _values(start: int, n: int, d: int) -> np.ndarray:
  return np.random.default_rng(start).standard_normal((n, d), dtype=np.float32)


def _evict(path: str) -> None:
  """Drops the (clean) pages of every file under `path` from the page cache."""
  for root, _, files in os.walk(path):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def _dir_bytes(path: str) -> int:
  return sum(
      os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs)


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
    w.add(_keys(start, m), _values(start, m, d))
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
  keys = np.concatenate([_sample_keys(old), _keys(n, m - m // 2)])
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


def _run_phase(phase: str, path: str, n: int, block_rows: int = 0) -> dict:
  out = subprocess.run(
      [
          sys.executable, __file__, f"--phase={phase}", f"--path={path}", f"--rows={n}",
          f"--block_rows={block_rows or _BLOCK_ROWS.value[0]}", f"--dim={_D.value}",
          f"--dtype={_DTYPE.value}", f"--batch={_BATCH.value}",
          f"--hist_len={_L.value}", f"--repeats={_REPEATS.value}",
          f"--warmup={_WARMUP.value}", f"--cache_bytes={_CACHE.value}",
          f"--upsert_rows={_UPSERT.value}"
      ],
      check=True,
      capture_output=True,
      text=True,
      env={
          **os.environ, "PYTHONPATH":
              os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
      })
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv):
  del argv
  if _PHASE.value:
    fn = {
        "export": _phase_export,
        "lookup": _phase_lookup,
        "upsert": _phase_upsert,
        "compare": _phase_compare
    }[_PHASE.value]
    paths = _PATH.value if _PHASE.value == "compare" else _PATH.value[0]
    print(json.dumps(fn(paths, _ROWS.value)))
    return
  print(
      f"InsEmb store benchmark: d={_D.value} {_DTYPE.value}, lookup "
      f"{_BATCH.value}x{_L.value}, cache {_CACHE.value / _GIB:.2f} GiB; {_load()}",
      flush=True)
  for n in map(int, _SIZES.value):
    root = tempfile.mkdtemp(prefix="bench_store_", dir=_DIR.value)
    layouts = [int(b) for b in _BLOCK_ROWS.value]
    paths = [os.path.join(root, f"t{b}") for b in layouts]
    try:
      print(f"\nN={n:,}:", flush=True)
      for b, path in zip(layouts, paths):
        _layout(path, n, b)
      if len(paths) > 1:
        c = _run_phase("compare", ",".join(paths), n)
        first = c["warm_s"][0]
        print(
            f"  warm lookups of {c['keys']:,} keys interleaved: " +
            "; ".join(f"{b} rows/block {t * 1e3:.0f} ms ({first / t:.2f}x {layouts[0]})"
                      for b, t in zip(layouts, c["warm_s"])) + f"; {c['load']}",
            flush=True)
    finally:
      shutil.rmtree(root, ignore_errors=True)


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
