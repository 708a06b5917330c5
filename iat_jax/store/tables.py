"""The store contract the rest of the package uses: where a source's InsEmb
table lives, opening it checked against the run, publishing a new version,
and the lookup protocol the input pipeline consumes.

The engine behind it is `insemb_table`; callers outside `iat_jax/store/` use
only this module (and `StoreError`).
"""

from __future__ import annotations

import os
from typing import Protocol

import ml_collections
import numpy as np

from iat_jax.store import insemb_table

DTYPES = tuple(insemb_table.DTYPES)
StoreError = insemb_table.StoreError
Table = insemb_table.Table


class Lookup(Protocol):
  """What the input pipeline needs from an InsEmb table."""

  def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys [n] -> (float32 values [n, d], bool found [n])."""


def path(config: ml_collections.ConfigDict, workdir: str, source: str) -> str:
  """Directory of source stage `source`'s table: --config.store.path, or
  <workdir>/stores/<source>."""
  return config.store.path or os.path.join(workdir, "stores", source)


def open_checked(config: ml_collections.ConfigDict, workdir: str, source: str,
                 fingerprint: str) -> insemb_table.Table:
  """The published table of `source`, checked to hold config.model.insemb_dim
  wide InsEmbs from `source` of the dataset with `fingerprint`.

  Raises:
    StoreError: missing, corrupt, or not the table this run expects.
  """
  table = insemb_table.Table(path(config, workdir, source))
  table.check(d=config.model.insemb_dim, source=source, dataset=fingerprint)
  return table


def is_published(table_path: str, source: str, step: int) -> bool:
  """Whether `table_path` holds a version exported from `source` at `step`."""
  try:
    meta = insemb_table.Table(table_path).metadata
  except StoreError:
    return False
  return meta["source"] == source and meta["source_step"] == step


def publish(config: ml_collections.ConfigDict, table_path: str, keys: np.ndarray,
            values: np.ndarray, *, source: str, step: int,
            fingerprint: str) -> str:
  """Writes InsEmbs (uint64 keys [n], float32 values [n, d]) of `source` at
  checkpoint `step` as a new version, in --config.store.dtype; returns it."""
  return insemb_table.write(table_path, keys, values, source=source,
                            source_step=step, source_config=config.model,
                            dtype=config.store.dtype, dataset=fingerprint)
