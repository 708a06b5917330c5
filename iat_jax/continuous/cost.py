"""What a continuous run's periods cost: timing.jsonl and the progress line."""

from __future__ import annotations

import json
import os
import resource

from absl import logging
import jax

from iat_jax import metrics as metrics_lib


def log(directory: str, p: int, rows: int, seconds: float, grown: int,
        cache: int) -> None:
  """Appends period p's cost to <directory>/timing.jsonl (kept apart from the
  metrics: a resumed run's results equal an uninterrupted run's, its timings
  not): wall seconds, rows/s, bytes the period added on disk (its InsEmb
  tables, the index's new generation, the new checkpoint, less what
  retention and checkpoint rotation removed), resident and peak memory, and
  the bytes the InsEmb tables' readers hold (`cache`: their block caches,
  memos and indexes; they fill up to store.cache_bytes per source, then stay
  flat, so resident memory less them is what must not grow)."""
  line = {
      "period": p,
      "rows": rows,
      "seconds": seconds,
      "rows_per_s": rows / max(seconds, 1e-9),
      "bytes_grown": grown,
      "rss_bytes": rss_bytes(),
      "store_cache_bytes": cache,
      "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  }
  if jax.process_index() == 0:
    with open(os.path.join(directory, "timing.jsonl"), "a") as f:
      f.write(json.dumps(line, sort_keys=True) + "\n")


def tree_bytes(path: str) -> int:
  """Bytes of the files under `path` (a local directory)."""
  total = 0
  for root, _, files in os.walk(path):
    for f in files:
      try:
        total += os.path.getsize(os.path.join(root, f))
      except OSError:  # removed meanwhile (checkpoint rotation)
        pass
  return total


def rss_bytes() -> int:
  """Resident memory of this process now."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class Progress:
  """Logs steps/s, instances/s and ETA over the invocation's steps."""

  def __init__(self, total: int, batch: int, every: int):
    self.inner = metrics_lib.Progress(total, batch, every)
    self.step = 0

  def __call__(self, name: str, p: int, loss: float) -> None:
    self.step += 1
    if self.step % self.inner.every == 0:
      logging.info("period %d, %s:", p, name)
    self.inner(self.step, loss)
