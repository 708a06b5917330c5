"""A tiny random dataset with many timestamp ties, written by the real Writer."""

import dataclasses
import functools
import os
import tempfile

import numpy as np

from iat_jax.data import dataset
from iat_jax.data import hashing
from iat_jax.data import schema as schema_lib


def tiny_schema(seq_len: int = 6) -> schema_lib.Schema:
  """The schema of every test's tiny data: 3 categorical fields (item,
  category, ctx), 1 multi-hot, 2 dense, 2 tasks; the model tests use it too.
  Every feature group has a field: user (x), item (item, category, tags) and
  context (ctx, y)."""
  return schema_lib.Schema(dataset="tiny",
                           categorical=(schema_lib.Categorical("item", 50),
                                        schema_lib.Categorical("category", 8),
                                        schema_lib.Categorical("ctx", 5)),
                           multi_hot=(schema_lib.MultiHot("tags", 9, 3),),
                           dense=("x", "y"),
                           tasks=("click", "buy"),
                           seq_len=seq_len,
                           seq_item_field="item",
                           seq_category_field="category",
                           num_actions=3,
                           field_groups=dict(x="user",
                                             item="item",
                                             category="item",
                                             tags="item",
                                             ctx="context",
                                             y="context"),
                           fingerprint="tiny")


def make_dataset(path: str,
                 num_users: int = 23,
                 seed: int = 0,
                 max_rows_per_user: int = 40,
                 chunks: int = 3,
                 label_delay: tuple[int, ...] = ()) -> dataset.Dataset:
  """Writes a random dataset to `path`: users with 1..max rows, ~1/3 ts ties.

  With a positive `label_delay` (seconds per task), action_now = 3 - action:
  a delayed action always differs from the known one.
  """
  rng = np.random.default_rng(seed)
  per_user = rng.integers(1, max_rows_per_user + 1, num_users)
  uid = np.repeat(np.arange(num_users) * 7 + 3, per_user)
  n = len(uid)
  ts = rng.integers(0, 60, n) * 600  # coarse times: many equal timestamps
  item = rng.integers(1, 50, n)
  ins = hashing.ins_ids(uid, ts, item, np.arange(n))
  o = np.lexsort((ins, ts, uid))
  uid, ts, item, ins = uid[o], ts[o], item[o], ins[o]
  cols = dict(uid=uid,
              ts=ts,
              ins_id=ins,
              cat=np.stack(
                  [item, item % 7 + 1, rng.integers(0, 5, n)], 1).astype(np.int32),
              dense=rng.normal(size=(n, 2)).astype(np.float32),
              labels=(rng.random((n, 2)) < 0.3).astype(np.float32),
              mh_tags=rng.integers(0, 9, (n, 3)).astype(np.int32),
              item=item.astype(np.int32),
              category=(item % 7 + 1).astype(np.int32),
              action=rng.integers(1, 3, n).astype(np.int32))
  schema = dataclasses.replace(tiny_schema(), label_delay=label_delay)
  if schema.action_delay > 0:
    cols["action_now"] = 3 - cols["action"]
  bounds = np.searchsorted(uid, uid[np.linspace(0, n - 1, chunks + 1).astype(int)])
  bounds[-1] = n
  with dataset.Writer(path, schema, n) as w:
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      w.append({k: v[lo:hi] for k, v in cols.items()})
  return dataset.Dataset(path)


@functools.cache
def shared_dataset() -> dataset.Dataset:
  """One `make_dataset()` per test process, for tests that only read it."""
  return make_dataset(os.path.join(tempfile.mkdtemp(prefix="iat-tiny-ds-"), "d"))
