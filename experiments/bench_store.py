r"""Benchmark: the InsEmb store (`iat_jax.store.insemb_table`).

1. Export-like write: `insemb_table.write` of N x d float32 InsEmbs whose keys
   come in random order (as an export produces them), per stored dtype:
   rows/s, and bytes on disk per row (beside the raw d x bytes_per_value).
2. Batched lookup of one downstream batch of history keys (batch x L, default
   512 x 256 = 131,072 keys, all present, drawn at random): keys/s of
   `Table.lookup` for each --lookup_dtypes, cold (a fresh `Table` whose files
   were just evicted from the page cache with posix_fadvise, so the first call
   reads them from disk) and warm (the best and the median of --repeats calls,
   each on a new batch). Beside it, in the same run and on the same batches,
   two in-memory numpy ceilings over the float32 rows:
     numpy lookup:  `SortedKeyTable.lookup` (searchsorted + fancy-index
                    gather): the same job as the store, all in RAM;
     numpy gather:  `values[rows]` with the row of each key already known:
                    the memory-copy floor of any lookup.
   The ratio printed is store keys/s / ceiling keys/s (target >= 0.25).

The machine is usually shared: the load average is printed with the figures.

  python experiments/bench_store.py --num_rows=1000000 --dim=64
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time

from absl import app
from absl import flags
import numpy as np

from iat_jax.data import input_pipeline
from iat_jax.store import insemb_table

_N = flags.DEFINE_integer("num_rows", 1_000_000, "Rows N in the table.")
_D = flags.DEFINE_integer("dim", 64, "InsEmb width d.")
_BATCH = flags.DEFINE_integer("batch", 512, "Downstream batch size.")
_L = flags.DEFINE_integer("hist_len", 256, "History length L (keys per example).")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Warm lookup calls per variant.")
_WRITE_DTYPES = flags.DEFINE_list("write_dtypes", ["float32", "bfloat16", "int8"],
                                  "Dtypes whose write is timed.")
_LOOKUP_DTYPES = flags.DEFINE_list("lookup_dtypes", ["float32", "int8"],
                                   "Dtypes whose lookup is timed.")
_DIR = flags.DEFINE_string("tmp_dir", None,
                           "Parent of the temporary directory (default: TMPDIR).")

_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1}


def _load() -> str:
  return "load average %.2f %.2f %.2f (%d cores)" % (*os.getloadavg(), os.cpu_count())


def _evict(path: str) -> None:
  """Drops the (clean) pages of every file under `path` from the page cache."""
  for root, _, files in os.walk(path):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def _timed(fn, *args):
  t = time.perf_counter()
  out = fn(*args)
  return time.perf_counter() - t, out


def _rate(n: int, seconds: float) -> str:
  return f"{n / seconds / 1e6:7.2f} M keys/s ({seconds * 1e3:7.1f} ms)"


def main(argv):
  del argv
  n, d, q = _N.value, _D.value, _BATCH.value * _L.value
  rng = np.random.default_rng(0)
  keys = np.unique(rng.integers(1, 2**64 - 1, int(n * 1.01) + 16, dtype=np.uint64))
  keys = rng.permutation(keys)[:n]
  values = rng.standard_normal((n, d), dtype=np.float32)
  root = tempfile.mkdtemp(prefix="bench_store_", dir=_DIR.value)
  print(f"store: {n:,} x {d} rows; lookup batch {_BATCH.value} x {_L.value} = "
        f"{q:,} keys; {_load()}")
  try:
    print("\nwrite (keys in random order; includes sort, quantize, sha256, fsync)")
    for dtype in _WRITE_DTYPES.value:
      path = os.path.join(root, dtype)
      secs, _ = _timed(lambda: insemb_table.write(  # pylint: disable=cell-var-from-loop
          path, keys, values, source="bench", source_step=0, source_config=None,
          dtype=dtype))
      disk = insemb_table.Table(path).bytes_on_disk()
      print(f"  {dtype:9s} {n / secs / 1e6:6.2f} M rows/s ({secs:5.2f} s)   "
            f"{disk / n:6.1f} B/row on disk (values alone {d * _BYTES[dtype]} B, "
            f"key 8 B{', scale 4 B' if dtype == 'int8' else ''})")

    batches = [keys[rng.integers(0, n, q)] for _ in range(_REPEATS.value + 1)]
    mem = input_pipeline.SortedKeyTable(keys, values)
    rows = [np.searchsorted(mem.keys, b) for b in batches]
    np_lookup = [_timed(mem.lookup, b)[0] for b in batches[1:]]
    np_gather = [_timed(lambda r: mem.values[r], r)[0] for r in rows[1:]]
    print(f"\nlookup of {q:,} keys; {_load()}")
    print(f"  numpy lookup (in RAM)    warm best {_rate(q, min(np_lookup))}  "
          f"median {_rate(q, statistics.median(np_lookup))}")
    print(f"  numpy gather (rows known) warm best {_rate(q, min(np_gather))}  "
          f"median {_rate(q, statistics.median(np_gather))}")
    for dtype in _LOOKUP_DTYPES.value:
      path = os.path.join(root, dtype)
      if not os.path.exists(path):
        insemb_table.write(path, keys, values, source="bench", source_step=0,
                           source_config=None, dtype=dtype)
      _evict(path)
      open_s, table = _timed(insemb_table.Table, path)
      cold, (got, found) = _timed(table.lookup, batches[0])
      ref, _ = mem.lookup(batches[0])
      assert found.all(), "every benchmark key is in the table"
      err = float(np.abs(got - ref).max())
      warm = [_timed(table.lookup, b)[0] for b in batches[1:]]
      best, med = min(warm), statistics.median(warm)
      print(f"  store {dtype:8s} open {open_s * 1e3:6.1f} ms  cold "
            f"{_rate(q, cold)}  max |err| {err:.2g}")
      print(f"  store {dtype:8s} warm best {_rate(q, best)}  median {_rate(q, med)}")
      print(f"    ratio to numpy lookup: best {min(np_lookup) / best:.2f}  median "
            f"{statistics.median(np_lookup) / med:.2f};  to numpy gather: best "
            f"{min(np_gather) / best:.2f}  median "
            f"{statistics.median(np_gather) / med:.2f}")
    print(f"\n{_load()}")
  finally:
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  app.run(main)
