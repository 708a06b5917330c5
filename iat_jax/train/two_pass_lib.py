"""Two-pass user-order source training (paper Appendix A.3).

When InsEmbs are stored while the source model trains, the users visited
first get theirs from a barely trained model. Two passes fix that: pass
"normal" visits users in ascending order and keeps the InsEmbs of the later
half of the users; pass "reversed" visits them in descending order and keeps
those of the other half, which it visits late. Every train instance gets
exactly one InsEmb, each written by the pass in which its user came late
(`keeper`). Each pass upserts the InsEmbs it keeps, by store key, into its
own table <workdir>/<name>/<pass>/insembs (`tables.Upserts`, read within
--config.store.cache_bytes; flushed before every checkpoint, so a resumed
pass rewrites identical rows). `export`
streams them (train instances, looked up per batch) together with the normal
pass's best model's InsEmbs of the valid and test instances into one table
version. Without --config.two_pass, the user-order source trains and exports
as every other stage does (`train_lib.train`, `export_lib.export`).
"""

from __future__ import annotations

import os

import jax
import ml_collections
import numpy as np

from iat_jax import errors
from iat_jax import stages
from iat_jax import workdir as workdir_lib
from iat_jax.data import dataset as dataset_lib
from iat_jax.data import orders
from iat_jax.store import tables
from iat_jax.train import export_lib
from iat_jax.train import train_lib

# (pass name, chunk order); pass k keeps the rows whose keeper is k.
PASSES = (("normal", "users"), ("reversed", "reversed"))


def keeper(ds: dataset_lib.Dataset) -> np.ndarray:
  """int8 [N]: the pass (index into PASSES) whose InsEmb each row keeps."""
  return (np.asarray(ds["user_index"]) < ds.schema.num_users // 2).astype(np.int8)


def pass_table(config, workdir: str, name: str, pass_name: str, ds) -> tables.Upserts:
  """The InsEmbs one pass stored (only the rows it keeps), by store key
  (`tables.store_keys`)."""
  return tables.Upserts.open_or_create(config,
                                       os.path.join(workdir, name, pass_name,
                                                    "insembs"),
                                       d=config.model.insemb_dim,
                                       dtype="float32",
                                       source=f"{name}/{pass_name}",
                                       fingerprint=ds.schema.fingerprint)


def train_user_order(stage: stages.Stage,
                     config: ml_collections.ConfigDict,
                     workdir: str,
                     name: str,
                     ds: dataset_lib.Dataset,
                     table=None) -> dict:
  """The user-order source's trainer: two passes with --config.two_pass, else
  the plain loop (`train_lib.train`)."""
  if not config.two_pass:
    return train_lib.train(stage, config, workdir, name, ds, table)
  return train(stage, config, workdir, name, ds)


def export_user_order(stage: stages.Stage, config: ml_collections.ConfigDict,
                      workdir: str, name: str, ds: dataset_lib.Dataset) -> str:
  """The user-order source's export: with --config.two_pass, the normal
  pass's best model and the InsEmbs the passes stored for train instances."""
  if not config.two_pass:
    return export_lib.export(stage, config, workdir, name, ds)
  return export_lib.export(stage,
                           config,
                           workdir,
                           name,
                           ds,
                           model_dir=os.path.join(name, PASSES[0][0]),
                           stored=PassTables(config, workdir, name, ds))


def train(stage: stages.Stage, config: ml_collections.ConfigDict, workdir: str,
          name: str, ds: dataset_lib.Dataset) -> dict:
  """Runs both passes (each resumable); returns the normal pass's results."""
  if jax.process_count() > 1:
    raise NotImplementedError("two-pass training runs in one process")
  keep = keeper(ds)
  for k, (pass_name, order) in enumerate(PASSES):
    table = pass_table(config, workdir, name, pass_name, ds)
    data = orders.batches(config,
                          ds,
                          stage.order,
                          "train",
                          train=True,
                          chunk_order=order)

    def write_back(step, state, batch, aux, table=table, k=k):
      del step, state
      rows = batch["row"]
      mine = batch["mask"] & (keep[np.maximum(rows, 0)] == k)
      table.put(
          tables.store_keys(config.store.placement, batch["ins_id"][mine],
                            batch["uid"][mine]),
          np.asarray(aux["insemb"])[mine])

    sub = os.path.join(name, pass_name)
    if not workdir_lib.is_complete(workdir_lib.stage_dir(workdir, sub)):
      train_lib.train(stage,
                      config,
                      workdir,
                      sub,
                      ds,
                      train_data=data,
                      after_step=write_back,
                      before_checkpoint=lambda step, table=table: table.flush(step))
    table.flush()
  out = workdir_lib.load_results(
      workdir_lib.stage_dir(workdir, os.path.join(name, "normal")))
  workdir_lib.write_results(workdir_lib.stage_dir(workdir, name), out)
  return out


class PassTables:
  """Looks up train instances' InsEmbs in the table of the pass keeping each."""

  def __init__(self, config, workdir: str, name: str, ds):
    self.keep = keeper(ds)
    self.tables = [pass_table(config, workdir, name, p, ds).table for p, _ in PASSES]

  def lookup(self, keys: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """float32 [n, d] of train instances with store keys [n] at dataset rows [n].

    Raises:
      errors.StoreError: the keeping pass did not store some of them.
    """
    out = np.zeros((len(keys), self.tables[0].dim), np.float32)
    for k, table in enumerate(self.tables):
      mine = self.keep[rows] == k
      values, found = table.lookup(keys[mine])
      if not found.all():
        raise errors.StoreError(
            f"{table.path}: pass {PASSES[k][0]} stored no InsEmb for "
            f"{int((~found).sum())} of its train instances; rerun its training")
      out[mine] = values
    return out
