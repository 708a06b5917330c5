"""The interface of a storage engine of InsEmb tables, and what they share.

A backend (`Backend`, registered by name in `tables.BACKENDS` and chosen by
--config.store.backend) publishes whole versions of a table at a path, opens
one version for reading (`Table`: lookup, verify, metadata), upserts rows
over an opened version, and runs a parallel export (`ExportSlice`). Every
backend's `Table.metadata` holds at least the keys of `base_metadata` plus
"num_rows" and "checksum" (`rows.row_checksum` of its stored rows) and, for a
published export, "export_id". `tables` alone reads those keys. At 1e11 rows
only a backend that keeps rows out of memory fits (the OCDBT one,
`insemb_table`); the in-memory one (`memory_table`) is for tests and
baselines. See docs/store.md.
"""

from __future__ import annotations

import json
from typing import Any, Protocol, runtime_checkable

import ml_collections
import numpy as np

DEFAULT_SHARD_BITS = 6
DEFAULT_BLOCK_ROWS = 256
DEFAULT_CACHE_BYTES = 1 << 30
DEFAULT_CHUNK_ROWS = 1 << 18


class Lookup(Protocol):
  """What the input pipeline needs from an InsEmb table."""

  def lookup(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """uint64 keys [n] -> (float32 values [n, d], bool found [n])."""


@runtime_checkable
class Table(Lookup, Protocol):
  """One version of a published table, opened for reading; immutable.

  Attributes:
    path: where the table lives.
    version: the number of this version (newer versions have larger ones).
    metadata: the version's metadata (see the module docstring).
  """
  path: str
  version: int
  metadata: dict[str, Any]

  @property
  def dim(self) -> int:
    """d, the width of every row."""

  def __len__(self) -> int:
    """Rows of this version."""

  def verify(self) -> None:
    """Re-reads every row; raises errors.StoreError unless the row count and
    checksum match the metadata."""

  def memory_bytes(self) -> int:
    """Bytes the reader holds now, by its own accounting."""

  def full_index_bytes(self) -> int:
    """Bytes the reader holds once it has read every row, outside the cache
    that `cache_bytes` bounds (0 if it has none)."""


class ExportSlice(Protocol):
  """One process's slice of a parallel, resumable export (`Backend.export`).

  Every process: `add` its rows, `close`; after a barrier `merge`; after a
  barrier process 0 `publish`es one new version.
  """
  done_rows: int  # rows of this slice already durable (from a killed run)

  def skip(self, n: int) -> None:
    """The caller starts feeding at row n (<= done_rows) of its stream."""

  def add(self, keys: np.ndarray, values: np.ndarray) -> None:
    """Appends uint64 keys [n] -> float32 values [n, d] (durable rows dropped)."""

  def close(self) -> None:
    """Makes the rest of this slice durable and marks it complete."""

  def merge(self) -> None:
    """Merges this process's share of every process's closed slice."""

  def publish(self, *, source: str, source_step: int, source_config: Any,
              dataset: str) -> int:
    """Publishes the merged export as one new version (idempotent)."""


class Backend(Protocol):
  """A storage engine of InsEmb tables (`tables.BACKENDS`)."""

  def open(self,
           path: str,
           *,
           version: int | None = None,
           cache_bytes: int = DEFAULT_CACHE_BYTES) -> Table:
    """The newest (or the given) version at `path`, read within cache_bytes.

    Raises:
      errors.StoreError: no published table there, or it is unreadable.
    """

  def publish(self,
              path: str,
              keys: np.ndarray,
              values: np.ndarray,
              *,
              source: str,
              source_step: int,
              source_config: Any,
              dtype: str = "float32",
              dataset: str = "",
              shard_bits: int = DEFAULT_SHARD_BITS,
              block_rows: int = DEFAULT_BLOCK_ROWS) -> int:
    """Publishes keys uint64 [n] -> values float32 [n, d] as a whole new
    version; returns its number."""

  def drop(self, path: str) -> None:
    """Deletes the table at `path`, every version (nothing there: no-op)."""

  def upsert(self,
             table: Table,
             keys: np.ndarray,
             values: np.ndarray,
             *,
             source_step: int | None = None) -> Table:
    """Writes keys [n] -> values float32 [n, d] over the version `table`
    reads (new keys added, others replaced) as a new version, and opens it.

    Raises:
      errors.StoreError: another writer published since `table`'s version.
    """

  def export(self,
             path: str,
             export_id: str,
             *,
             process_index: int = 0,
             process_count: int = 1,
             d: int,
             dtype: str = "float32",
             chunk_rows: int = DEFAULT_CHUNK_ROWS,
             shard_bits: int = DEFAULT_SHARD_BITS,
             block_rows: int = DEFAULT_BLOCK_ROWS) -> ExportSlice:
    """Starts (or resumes) this process's slice of export `export_id`."""


def base_metadata(*, d: int, dtype: str, source: str, source_step: int,
                  source_config: ml_collections.ConfigDict | dict | None,
                  dataset: str) -> dict[str, Any]:
  """The metadata keys every backend's tables carry (source_config as JSON)."""
  if isinstance(source_config, ml_collections.ConfigDict):
    source_config = json.loads(source_config.to_json_best_effort())
  return {
      "d": int(d),
      "dtype": dtype,
      "num_rows": 0,
      "source": source,
      "source_step": int(source_step),
      "dataset": dataset,
      "source_config": source_config,
  }
