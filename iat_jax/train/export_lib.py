"""Export: a trained source model's InsEmbs of every instance -> the store."""

from __future__ import annotations

import os

from absl import logging
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from iat_jax import stages
from iat_jax.data import dataset as dataset_lib
from iat_jax.data import schema as schema_lib
from iat_jax.store import tables
from iat_jax.train import predict
from iat_jax.train import train_lib
from iat_jax.train import two_pass_lib


def export(config: ml_collections.ConfigDict, workdir: str, name: str,
           ds: dataset_lib.Dataset) -> str:
  """Writes the InsEmb of every instance (train, valid, test) of `ds`.

  Runs the best checkpoint of stage `name` (config.stage must be a source
  stage) forward over all splits, sharded like evaluation, and publishes one
  new table version (two-pass source_user: merged with the InsEmbs the passes
  stored, see `two_pass_lib`). Returns the store path.
  """
  if not stages.get(config.stage).exports:
    raise ValueError(f"--config.stage={config.stage!r}: export needs a source stage "
                     f"(one of {stages.SOURCES})")
  two_pass = config.stage == "source_user" and config.two_pass
  model_dir = os.path.join(name, two_pass_lib.PASSES[0][0]) if two_pass else name
  st, step, params = train_lib.load_best(config, workdir, model_dir, ds)
  path = tables.path(config, workdir, config.stage)
  if tables.is_published(path, config.stage, step):
    logging.info("export %s: already done (step %d)", path, step)
    return path
  keys, values = [], []
  for split in schema_lib.SPLITS:
    data = train_lib.batches(config, ds, config.stage, split, train=False)
    res = predict.predict(st.eval_step, params, data, st.mesh, keys=("insemb",))
    keys.append(res["ins_id"])
    values.append(res["insemb"])
    logging.info("export %s: %s split, %d instances", name, split, len(res["ins_id"]))
  keys, values = np.concatenate(keys), np.concatenate(values)
  if two_pass:  # train rows from the passes that kept them, in row order
    by_row = np.zeros((ds.num_rows, values.shape[1]), np.float32)
    by_row[_rows_of(ds, keys)] = values
    keys = np.asarray(ds["ins_id"])
    values = two_pass_lib.merged_insembs(config, workdir, name, ds, by_row)
  if jax.process_index() == 0:
    tables.publish(config, path, keys, values, source=config.stage, step=step,
                   fingerprint=ds.schema.fingerprint)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("export")
  return path


def _rows_of(ds: dataset_lib.Dataset, keys: np.ndarray) -> np.ndarray:
  """Dataset rows of InsIDs [n] (every key must be in the dataset)."""
  ins = np.asarray(ds["ins_id"])
  order = np.argsort(ins)
  return order[np.searchsorted(ins, keys, sorter=order)]
