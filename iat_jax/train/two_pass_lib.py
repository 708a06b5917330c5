"""Two-pass user-order source training (paper Appendix A.3).

When InsEmbs are stored while the source model trains, the users visited
first get theirs from a barely trained model. Two passes fix that: pass
"normal" visits users in ascending order and keeps the InsEmbs of the later
half of the users; pass "reversed" visits them in descending order and keeps
those of the other half, which it visits late. Every train instance gets
exactly one InsEmb, each written by the pass in which its user came late
(`keeper`). The tables of both passes live under <workdir>/<name>/<pass>/;
`export` merges them (train instances) with the normal pass's best model's
InsEmbs of the valid and test instances, and publishes one table version.
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from iat_jax import workdir as workdir_lib
from iat_jax.data import dataset as dataset_lib
from iat_jax.store import stream_table
from iat_jax.train import train_lib

# (pass name, chunk order); pass k keeps the rows whose keeper is k.
PASSES = (("normal", "users"), ("reversed", "reversed"))


def keeper(ds: dataset_lib.Dataset) -> np.ndarray:
  """int8 [N]: the pass (index into PASSES) whose InsEmb each row keeps."""
  return (np.asarray(ds["user_index"]) < ds.schema.num_users // 2).astype(np.int8)


def pass_table(workdir: str, name: str, pass_name: str, ds,
               dim: int) -> stream_table.StreamTable:
  """The InsEmbs [N, d] one pass stored (zeros for rows it does not keep)."""
  return stream_table.StreamTable.open_or_create(
      os.path.join(workdir, name, pass_name, "insembs"),
      np.zeros((ds.num_rows, dim), np.float32), ds.schema.num_tasks)


def train_user_order(config: ml_collections.ConfigDict, workdir: str, name: str,
                     ds: dataset_lib.Dataset, table=None) -> dict:
  """The user-order source's trainer: two passes with --config.two_pass, else
  the plain loop (`train_lib.train`)."""
  if not config.two_pass:
    return train_lib.train(config, workdir, name, ds, table)
  return train(config, workdir, name, ds)


def train(config: ml_collections.ConfigDict, workdir: str, name: str,
          ds: dataset_lib.Dataset) -> dict:
  """Runs both passes (each resumable); returns the normal pass's results."""
  if jax.process_count() > 1:
    raise NotImplementedError("two-pass training runs in one process")
  keep = keeper(ds)
  for k, (pass_name, order) in enumerate(PASSES):
    table = pass_table(workdir, name, pass_name, ds, config.model.insemb_dim)
    data = train_lib.batches(config, ds, config.stage, "train", train=True,
                             order=order)

    def write_back(step, state, batch, aux, table=table, k=k):
      del step, state
      rows = batch["row"]
      mine = batch["mask"] & (keep[np.maximum(rows, 0)] == k)
      table.write(rows[mine], np.asarray(aux["insemb"])[mine],
                  np.asarray(aux["probs"])[mine])

    sub = os.path.join(name, pass_name)
    if not workdir_lib.is_complete(workdir_lib.stage_dir(workdir, sub)):
      train_lib.train(config, workdir, sub, ds, train_data=data, after_step=write_back)
  out = workdir_lib.load_results(workdir_lib.stage_dir(workdir, os.path.join(name, "normal")))
  workdir_lib.write_results(workdir_lib.stage_dir(workdir, name), out)
  return out


def merged_insembs(config, workdir: str, name: str, ds, exported: np.ndarray) -> np.ndarray:
  """[N, d]: train rows from the keeping pass's table, other rows `exported`."""
  keep = keeper(ds)
  train_rows = np.asarray(ds["split"]) == 0
  out = np.array(exported, np.float32)
  for k, (pass_name, _) in enumerate(PASSES):
    rows = np.flatnonzero(train_rows & (keep == k))
    table = pass_table(workdir, name, pass_name, ds, config.model.insemb_dim)
    out[rows] = table.read(rows)
  return out
