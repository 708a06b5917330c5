"""The OCDBT engine (TensorStore) as a store backend: tables.BACKENDS["ocdbt"].

A table is one OCDBT database per path (a local directory, or gs:// / s3://)
of sorted segments per shard, published in atomic versioned commits. The
engine's seams: `database` (keys, metadata, commit), `segments` (blocks,
merge), `cache` and `levels` (a reader's cache and search), `reader`
(lookups of one pinned version), `writer` (whole versions, LSM upserts) and
`export` (parallel, resumable export). At 1e11 rows (256 shards of ~4e8
rows) it holds 7.6 TB at d=64 int8, exports over P processes with no gather,
and serves lookups within each reader's cache_bytes (>= ~12 GB to hold every
index). See docs/store.md.
"""

from __future__ import annotations

from iat_jax.store import database
from iat_jax.store import export as export_lib
from iat_jax.store import reader
from iat_jax.store import writer

# The engine's entry points, for code that drives it without `tables`
# (benchmarks, tests).
Table = reader.Table
write = writer.write


class Backend:
  """The `backend.Backend` of OCDBT tables (versions are OCDBT generations)."""
  open = staticmethod(reader.Table)
  publish = staticmethod(writer.write)
  upsert = staticmethod(writer.upsert)
  export = staticmethod(export_lib.ExportWriter)
  drop = staticmethod(database.drop)
