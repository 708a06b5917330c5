"""Mutable InsEmb slots for streaming source training (paper Appendix A.2).

Streaming writes every processed instance's new InsEmb back so later
instances can fetch it; the published `insemb_table` is immutable, so the
stream keeps its working copy here: TensorStore zarr3 arrays indexed by
dataset row (the row is the slot of the instance's InsID):

  values [N, d] float32   the newest InsEmb of each instance
  preds  [N, tasks] f32   the progressive (predict-then-train) probabilities

The directory is created atomically (filled in a temporary sibling, then
renamed). Writes are synchronous: once `write` returns the rows are on disk,
so a checkpoint taken after it never refers to lost writes; a run resumed
from an earlier checkpoint rewrites the later rows with identical values
(the stream is deterministic and never reads rows of unprocessed batches).
When the stream ends, `insemb_table.write` publishes the values keyed by
InsID for downstream models.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np
import tensorstore as ts

_CHUNK_ROWS = 4096


def _open(path: str, **kw):
  return ts.open({"driver": "zarr3", "kvstore": {"driver": "file", "path": path}},
                 **kw).result()


class StreamTable:
  """values [N, d] and preds [N, tasks] slots, by dataset row."""

  def __init__(self, path: str):
    self.path = path
    self.values = _open(os.path.join(path, "values"))
    self.preds = _open(os.path.join(path, "preds"))

  @classmethod
  def open_or_create(cls, path: str, init_values: np.ndarray,
                     num_tasks: int) -> StreamTable:
    """Opens `path`, or creates it holding `init_values` [N, d]."""
    if not os.path.exists(path):
      parent = os.path.dirname(os.path.abspath(path))
      os.makedirs(parent, exist_ok=True)
      tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)
      try:
        n, d = init_values.shape
        for name, shape, data in (("values", [n, d], init_values),
                                  ("preds", [n, num_tasks], None)):
          arr = _open(os.path.join(tmp, name), create=True, dtype=ts.float32,
                      shape=shape, chunk_layout=ts.ChunkLayout(
                          chunk_shape=[min(_CHUNK_ROWS, max(n, 1)), shape[1]]))
          if data is not None and n:
            arr.write(np.asarray(data, np.float32)).result()
        os.rename(tmp, path)
      finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cls(path)

  def read(self, rows: np.ndarray) -> np.ndarray:
    """float32 [..., d] InsEmbs of dataset rows [...] (rows < 0 give zeros)."""
    flat = np.asarray(rows).reshape(-1)
    out = np.zeros((len(flat), self.values.shape[1]), np.float32)
    ok = flat >= 0
    if ok.any():
      uniq, inv = np.unique(flat[ok], return_inverse=True)
      out[ok] = self.values.oindex[uniq].read().result()[inv]
    return out.reshape(np.shape(rows) + (-1,))

  def write(self, rows: np.ndarray, values: np.ndarray, preds: np.ndarray) -> None:
    """Stores InsEmbs [n, d] and predictions [n, tasks] of distinct rows [n]."""
    if not len(rows):
      return
    order = np.argsort(rows)
    rows = np.asarray(rows)[order]
    self.values.oindex[rows] = np.asarray(values, np.float32)[order]
    self.preds.oindex[rows] = np.asarray(preds, np.float32)[order]

  def read_preds(self, rows: np.ndarray) -> np.ndarray:
    return self.preds.oindex[np.asarray(rows)].read().result()

  def read_all(self) -> np.ndarray:
    return self.values.read().result()
