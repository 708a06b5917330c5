"""Starting a continuous run from a finished batch pipeline (`continuous.init_from`).

The batch pipeline's models were trained on its train split (the first
`train_fraction` of the log in time order) and its sources exported every
instance's InsEmb. The periods that lie wholly in that split are taken from
it, not trained again, and count as warm-up; every later period is trained
continuously from the batch models' best parameters.
"""

from __future__ import annotations

from absl import logging
import numpy as np

from iat_jax import checkpointing
from iat_jax import errors
from iat_jax import workdir as workdir_lib
from iat_jax.continuous import history as history_lib
from iat_jax.continuous import report
from iat_jax.store import tables


def from_batch(st, workdir: str) -> int:
  """Starts the fresh continuous run `st` (a `loop.Run`) from the finished
  batch pipeline in `workdir` (same data): the
  periods that lie wholly in its train split are taken from it, not
  trained -- their rows go to the index and their InsEmbs, as its sources
  exported them, to the period tables -- and every model starts from its
  best parameters there (fresh optimizer state). Returns the first period
  to train.

  Raises:
    ConfigError naming --config.continuous.init_from: no such pipeline, a
      model or store missing there, another dataset, or no whole period in
      its train split.
  """
  flag = "continuous.init_from"
  split = np.asarray(st.ds["split"])
  batch = 0
  while batch < len(st.periods) and (split[st.periods.rows(batch)] == 0).all():
    batch += 1
  if not batch:
    raise errors.ConfigError(
        flag, f"no period of {st.ds.path} lies wholly in the train split "
        f"the batch pipeline in {workdir} trained on; use shorter periods")
  try:
    stores = {
        n: tables.open_checked(st.config, workdir, n, st.ds.schema.fingerprint)
        for n in st.tables
    }
  except errors.StoreError as e:
    raise errors.ConfigError(flag, f"{workdir}: {e}") from e
  for n, lr in st.learners.items():
    directory = workdir_lib.stage_dir(workdir, n)
    if not workdir_lib.is_complete(directory):
      raise errors.ConfigError(
          flag, f"{directory} is not a finished model of a "
          f"batch pipeline (run --mode=pipeline there first)")
    ckpts = checkpointing.Checkpoints(directory, 1, f"auc/{st.tasks[0]}")
    try:
      _, params = ckpts.restore_best(checkpointing.abstract(lr.state.params))
    finally:
      ckpts.close()
    lr.state = lr.state.replace(params=params)
  ins_id = np.asarray(st.ds["ins_id"])
  for p in range(batch):
    rows = st.periods.rows(p)
    keys = tables.store_keys(st.config.store.placement, ins_id[rows], st.uid[rows])
    for n, table in st.tables.items():
      values, found = stores[n].lookup(keys)
      if not found.all():
        raise errors.ConfigError(
            flag, f"{stores[n].path} lacks {int((~found).sum())} "
            f"InsEmbs of period {p}")
      table.begin(p)
      table.put(keys, values)
      table.end()
    nan = {f"{m}/{t}": float("nan") for m in ("auc", "logloss") for t in st.tasks}
    row = report.period_row(p, int(st.periods.start[p]), len(rows), True,
                            {n: nan for n in st.names})
    generations = st.index.append(st.uid[rows], history_lib.entries(st.ds, rows),
                                  st.cutoff(p + 1), st.expired_users(p))
    st.commit(p, row, generations)
  logging.info("continuous: periods 0-%d taken from the batch pipeline in %s",
               batch - 1, workdir)
  return batch
