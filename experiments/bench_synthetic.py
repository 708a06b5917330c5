r"""Benchmark: build N synthetic instances x F categorical fields.

Times `iat_jax.data.synthetic.build` into a temporary directory (deleted
afterwards) and prints instances/s, the output size, the peak RSS and the peak
anonymous RSS. The peak RSS (`getrusage`) also counts the file-backed pages of
the dataset memmaps the writer touched, which the kernel can drop at will; the
anonymous peak (sampled from /proc/self/status) is the memory the generator
really holds. For comparison it then times numpy writing the same number of
bytes sequentially to disk (with fsync, as the writer's memmap flush syncs):
the ceiling for any builder.

  python experiments/bench_synthetic.py --num_instances=1000000
"""

from __future__ import annotations

import os
import resource
import shutil
import tempfile
import threading
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np

from iat_jax.data import synthetic

_N = flags.DEFINE_integer("num_instances", 10_000_000, "Instances N.")
_F = flags.DEFINE_integer("num_categorical", 100, "Categorical fields F.")
_USERS = flags.DEFINE_integer("num_users", 0, "Users (0: num_instances // 100).")
_CHUNK = flags.DEFINE_integer("chunk_rows", 500_000, "Rows per write chunk.")
_DIR = flags.DEFINE_string("tmp_dir", None,
                           "Parent of the temporary directory (default: TMPDIR).")
_CEILING = flags.DEFINE_bool("ceiling", True,
                             "Also time a plain sequential write of the bytes.")


class _AnonPeak:
  """Samples RssAnon of this process in a thread; `peak` in bytes."""

  def __init__(self, period_s: float = 0.05):
    self.peak = 0
    self._stop = threading.Event()
    self._period = period_s
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self) -> None:
    while not self._stop.is_set():
      with open("/proc/self/status") as f:
        for line in f:
          if line.startswith("RssAnon:"):
            self.peak = max(self.peak, int(line.split()[1]) * 1024)
      self._stop.wait(self._period)

  def __enter__(self) -> _AnonPeak:
    self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()


def _dir_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def _sequential_write(path: str, nbytes: int, block: int = 64 << 20) -> float:
  """Seconds numpy needs to write `nbytes` to `path` sequentially + fsync."""
  buf = np.random.default_rng(0).integers(0, 255, block, dtype=np.uint8)
  t0 = time.perf_counter()
  with open(path, "wb") as f:
    left = nbytes
    while left > 0:
      buf[:min(block, left)].tofile(f)
      left -= block
    f.flush()
    os.fsync(f.fileno())
  return time.perf_counter() - t0


def main(argv) -> None:
  del argv
  n, fc = _N.value, _F.value
  users = _USERS.value or max(n // 100, 1)
  tmp = tempfile.mkdtemp(prefix="bench_synthetic-", dir=_DIR.value)
  try:
    out = os.path.join(tmp, "ds")
    with _AnonPeak() as anon:
      t0 = time.perf_counter()
      synthetic.build(out,
                      num_instances=n,
                      num_categorical=fc,
                      num_users=users,
                      chunk_rows=_CHUNK.value)
      build_s = time.perf_counter() - t0
    nbytes = _dir_bytes(out)
    shutil.rmtree(out)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(f"build: {n:,} instances x {fc} categorical fields, {users:,} users")
    print(f"  time {build_s:.1f} s, {n / build_s:,.0f} instances/s, "
          f"{nbytes / 2**30:.2f} GiB written ({nbytes / 2**20 / build_s:.0f} MiB/s)")
    print(f"  peak RSS {peak_rss / 2**30:.2f} GiB (incl. dataset memmap pages), "
          f"peak anonymous RSS {anon.peak / 2**30:.2f} GiB")
    if _CEILING.value:
      write_s = _sequential_write(os.path.join(tmp, "ceiling.bin"), nbytes)
      print(f"ceiling: numpy sequential write of the same {nbytes / 2**30:.2f} GiB "
            f"+ fsync: {write_s:.1f} s ({nbytes / 2**20 / write_s:.0f} MiB/s, "
            f"{n / write_s:,.0f} instances/s); build / ceiling = "
            f"{build_s / write_s:.1f}x")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main)
