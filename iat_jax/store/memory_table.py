"""An in-memory InsEmb table (sorted keys + binary search) for tests and
benchmark baselines; it satisfies `tables.Lookup`. It holds every row in
memory, so it is never the production store."""

from __future__ import annotations

import numpy as np


class MemoryTable:
  """uint64 keys [N] and float32 values [N, d], held sorted by key."""

  def __init__(self, keys: np.ndarray, values: np.ndarray):
    order = np.argsort(keys)
    self.keys = np.asarray(keys)[order]
    self.values = np.asarray(values, dtype=np.float32)[order]

  def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys [n] -> (float32 values [n, d], bool found [n])."""
    uniq, inv = np.unique(keys, return_inverse=True)  # sorted: a faster search
    pos = np.minimum(np.searchsorted(self.keys, uniq), len(self.keys) - 1)[inv]
    found = self.keys[pos] == keys
    out = self.values.take(pos, axis=0)
    out *= found[:, None]
    return out, found
