"""The batch orders a stage trains and evaluates on: one table.

(Work in progress: the table itself lands with the batch-order redesign.)
"""

from __future__ import annotations

import ml_collections
import numpy as np

from iat_jax import stages
from iat_jax.data import input_pipeline


def validate_data(config: ml_collections.ConfigDict, ds, stage_names) -> None:
  """Raises ValueError naming the flag and the limit when a train batch of one
  of `stage_names` is larger than what it batches: a batch of more instances
  than the train split (or user chunks than it has) would train a single,
  mostly padding step. Evaluation batches may be larger (padding is fine
  there). Cheap: call right after `sources.prepare`, before any training."""
  orders = {stages.get(name).order for name in stage_names}
  train_rows = int(ds.schema.split_sizes[0])
  if orders & {"temporal", "history"} and config.batch_size > train_rows:
    raise ValueError(f"--config.batch_size: {config.batch_size} is larger than the "
                     f"train split ({train_rows} instances of {ds.path}); use at "
                     f"most {train_rows}")
  if "stream" in orders:
    rows = sum(len(ds.split_rows(s)) for s in config.stream.splits)
    if config.batch_size > rows:
      raise ValueError(f"--config.batch_size: {config.batch_size} is larger than "
                       f"the streamed splits {tuple(config.stream.splits)} ({rows} "
                       f"instances); use at most {rows}")
  if "user_chunks" in orders:
    chunks = input_pipeline.UserChunks.build(ds, "train", config.data.user_chunk_len)
    n, users = len(chunks.start), len(np.unique(chunks.user))
    if config.users_per_batch > n:
      raise ValueError(f"--config.users_per_batch: {config.users_per_batch} is "
                       f"larger than the {n} train chunks (of --config.data."
                       f"user_chunk_len={config.data.user_chunk_len}) of the "
                       f"{users} users with train rows; use at most {n}")
