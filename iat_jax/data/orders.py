"""The batch orders a stage trains and evaluates on: one table, `ORDERS`.

An order (`Stage.order` in `iat_jax.stages`) is everything the package needs
to know about how a stage's instances become batches:

  name        the key in ORDERS;
  train       (config, ds, split, ctx) -> the Grain MapDataset a stage trains
              on (one element per global batch, this process's slice);
  evaluate    the same for predict, evaluate and export (every instance of
              the split once, in a fixed order);
  size_flags  the flags that size its train batch (named by the
              out-of-memory and batch-size errors);
  rows        config -> the leading size of a global train batch
              (instances, or user chunks);
  eval_rows   (config, data shards) -> the same of an evaluation batch;
  instances   config -> instances one train step sees (progress rate);
  reads_store whether its batches carry InsEmbs looked up in a store;
  check       (config, ds) -> raises ConfigError when a train batch would be
              larger than what it batches (before any training);
  example     (config, schema, seed) -> a small random batch in its layout
              (`iat_jax.data.examples`): test inputs, and through
              `abstract_batch` the shapes of a batch of any size, without
              data.

Nothing outside this table compares an order's name: adding an order is one
`Order` entry plus its own functions.

Evaluation batches hold `eval_batch_size` rows (user order: that many rows of
chunks) per data shard of the mesh, so every device runs the same program on
the same rows however many processes and devices share the work: XLA:CPU's
result for a row depends on the shape of the batch it is computed in (a
16-row and an 8-row batch differ in the last bits), and predictions, metrics
and exported InsEmbs are then bit-identical across process counts.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import grain
import jax
import ml_collections
import numpy as np

from iat_jax import errors
from iat_jax import sharding
from iat_jax.data import batching
from iat_jax.data import dataset as dataset_lib
from iat_jax.data import examples
from iat_jax.data import input_pipeline
from iat_jax.data import schema as schema_lib

Config = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Context:
  """What a chain needs beyond the config and the split.

  table: the InsEmb store a history order looks InsEmbs up in (or None);
  chunk_order: the user-chunk order overriding the default (training:
    "shuffle", evaluation: "users"; see `input_pipeline.CHUNK_ORDERS`).
  """
  table: object = None
  chunk_order: str | None = None


Chain = Callable[[Config, dataset_lib.Dataset, str, Context], grain.MapDataset]


@dataclasses.dataclass(frozen=True)
class Order:
  """One batch order (see the module docstring)."""
  name: str
  train: Chain
  evaluate: Chain
  size_flags: tuple[str, ...]
  rows: Callable[[Config], int]
  eval_rows: Callable[[Config, int], int]
  instances: Callable[[Config], int]
  reads_store: bool
  check: Callable[[Config, dataset_lib.Dataset], None]
  example: Callable[[Config, schema_lib.Schema, int], dict]


def _mesh(config: Config) -> jax.sharding.Mesh:
  return sharding.make_mesh(tuple(config.mesh_shape), tuple(config.mesh_axes))


def data_shards(config: Config) -> int:
  """Blocks the mesh splits a batch's leading axis into (its 'data' axis)."""
  return _mesh(config).shape["data"]


def eval_context(config: Config) -> int:
  """Context rows leading each user-order evaluation chunk (data.eval_context,
  -1 = user_chunk_len // 2)."""
  c = config.data.eval_context
  return config.data.user_chunk_len // 2 if c < 0 else c


def _processes(config: Config) -> dict:
  return dict(part=batching.ProcessSlice.of_mesh(_mesh(config)))


# --- temporal: a split's instances in time order, [B, ...] -------------------


def _temporal(config: Config, ds, split: str, ctx: Context, *, train: bool,
              **history) -> grain.MapDataset:
  return input_pipeline.temporal(
      ds,
      split,
      config.batch_size if train else _eval_instances(config, data_shards(config)),
      seed=config.seed,
      shuffle_window=config.shuffle_window if train else 0,
      num_epochs=config.num_epochs if train else 1,
      **_processes(config),
      **history)


def _eval_instances(config: Config, shards: int) -> int:
  return config.eval_batch_size * shards


def _check_instances(config: Config, ds) -> None:
  train_rows = int(ds.schema.split_sizes[0])
  if config.batch_size > train_rows:
    raise errors.ConfigError(
        "batch_size", f"{config.batch_size} is larger than the train split "
        f"({train_rows} instances of {ds.path}); use at most {train_rows}")


def _example_temporal(config: Config, schema, seed: int) -> dict:
  del config
  return examples.base_batch(schema, seed=seed)


# --- history: temporal + each instance's L strictly-earlier InsEmbs ----------


def _history(config: Config, ds, split: str, ctx: Context, *,
             train: bool) -> grain.MapDataset:
  """Temporal batches + history; InsEmbs travel deduplicated per batch shard
  (`input_pipeline.LookupInsEmb(compact)`)."""
  return _temporal(config,
                   ds,
                   split,
                   ctx,
                   train=train,
                   history_len=config.model.hist_len,
                   num_gap_buckets=config.model.num_gap_buckets,
                   table=ctx.table,
                   placement=config.store.placement,
                   compact=True,
                   groups=sharding.local_batch_shards(_mesh(config)))


def _example_history(config: Config, schema, seed: int) -> dict:
  m = config.model
  return examples.downstream_batch(schema,
                                   d=m.insemb_dim,
                                   l=m.hist_len,
                                   num_gap_buckets=m.num_gap_buckets,
                                   seed=seed)


# --- user_chunks: each user's instances cut into chunks, [B_users, T, ...] ---


def _user_chunks(config: Config, ds, split: str, ctx: Context, *,
                 train: bool) -> grain.MapDataset:
  t = config.data.user_chunk_len
  users = (config.users_per_batch
           if train else _eval_users(config, data_shards(config)))
  return input_pipeline.user_ordered(ds,
                                     split,
                                     users,
                                     t,
                                     seed=config.seed,
                                     order=ctx.chunk_order or
                                     ("shuffle" if train else "users"),
                                     num_epochs=config.num_epochs if train else 1,
                                     context=0 if train else eval_context(config),
                                     **_processes(config))


def _eval_users(config: Config, shards: int) -> int:
  return max(config.eval_batch_size // config.data.user_chunk_len, 1) * shards


def _check_chunks(config: Config, ds) -> None:
  chunks = batching.UserChunks.build(ds, "train", config.data.user_chunk_len)
  n, users = len(chunks.start), len(np.unique(chunks.user))
  if config.users_per_batch > n:
    raise errors.ConfigError(
        "users_per_batch", f"{config.users_per_batch} is larger than the {n} "
        f"train chunks (of --config.data.user_chunk_len="
        f"{config.data.user_chunk_len}) of the {users} users with train rows; "
        f"use at most {n}")


def _example_user_chunks(config: Config, schema, seed: int) -> dict:
  return examples.user_batch(schema, bu=2, t=config.data.user_chunk_len, seed=seed)


# --- stream: time order over the streamed splits, each instance's K past rows


def _stream(config: Config, ds, split: str, ctx: Context) -> grain.MapDataset:
  """The streamed splits (`config.stream.splits`, after batch training) in
  time order; `split` is ignored: a stream trains and is evaluated on the
  same pass (progressive metrics)."""
  del split, ctx
  return input_pipeline.stream(ds,
                               tuple(config.stream.splits),
                               config.batch_size,
                               config.stream.k,
                               features=config.stream.mode == "recompute",
                               **_processes(config))


def _check_stream(config: Config, ds) -> None:
  rows = sum(len(ds.split_rows(s)) for s in config.stream.splits)
  if config.batch_size > rows:
    raise errors.ConfigError(
        "batch_size", f"{config.batch_size} is larger than the streamed splits "
        f"{tuple(config.stream.splits)} ({rows} instances); use at most {rows}")


def _example_stream(config: Config, schema, seed: int) -> dict:
  return examples.stream_batch(schema,
                               d=config.model.insemb_dim,
                               k=config.stream.k,
                               seed=seed)


def _batch_size(config: Config) -> int:
  return config.batch_size


ORDERS: dict[str, Order] = {}


def register(order: Order) -> Order:
  """Adds `order` to ORDERS (ValueError if its name is taken)."""
  if order.name in ORDERS:
    raise ValueError(f"batch order {order.name!r} registered twice")
  ORDERS[order.name] = order
  return order


for _order in (
    Order("temporal",
          train=lambda c, ds, split, ctx: _temporal(c, ds, split, ctx, train=True),
          evaluate=lambda c, ds, split, ctx: _temporal(c, ds, split, ctx, train=False),
          size_flags=("batch_size",),
          rows=_batch_size,
          eval_rows=_eval_instances,
          instances=_batch_size,
          reads_store=False,
          check=_check_instances,
          example=_example_temporal),
    Order(
        "user_chunks",
        train=lambda c, ds, split, ctx: _user_chunks(c, ds, split, ctx, train=True),
        evaluate=lambda c, ds, split, ctx: _user_chunks(c, ds, split, ctx, train=False),
        size_flags=("users_per_batch", "data.user_chunk_len"),
        rows=lambda c: c.users_per_batch,
        eval_rows=_eval_users,
        instances=lambda c: c.users_per_batch * c.data.user_chunk_len,
        reads_store=False,
        check=_check_chunks,
        example=_example_user_chunks),
    Order("stream",
          train=_stream,
          evaluate=_stream,
          size_flags=("batch_size", "stream.k"),
          rows=_batch_size,
          eval_rows=lambda c, shards: c.batch_size,
          instances=_batch_size,
          reads_store=False,
          check=_check_stream,
          example=_example_stream),
    Order("history",
          train=lambda c, ds, split, ctx: _history(c, ds, split, ctx, train=True),
          evaluate=lambda c, ds, split, ctx: _history(c, ds, split, ctx, train=False),
          size_flags=("batch_size", "model.hist_len"),
          rows=_batch_size,
          eval_rows=_eval_instances,
          instances=_batch_size,
          reads_store=True,
          check=_check_instances,
          example=_example_history),
):
  register(_order)


def get(name: str) -> Order:
  """The order called `name` (a stage's `order`)."""
  if name not in ORDERS:
    raise ValueError(f"batch order {name!r} is not one of {tuple(ORDERS)}")
  return ORDERS[name]


def batches(config: Config,
            ds: dataset_lib.Dataset,
            order: str,
            split: str,
            *,
            train: bool,
            table=None,
            chunk_order: str | None = None) -> grain.MapDataset:
  """The Grain MapDataset of `order` over `split`: its training chain, or its
  evaluation chain (predict, evaluate, export) when not `train`."""
  entry, ctx = get(order), Context(table=table, chunk_order=chunk_order)
  return (entry.train if train else entry.evaluate)(config, ds, split, ctx)


def abstract_batch(config: Config,
                   schema: schema_lib.Schema,
                   order: str,
                   rows: int | None = None,
                   *,
                   train: bool = True,
                   shards: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes and dtypes of a global batch of `order`, without its data: for
  ahead-of-time compilation and cost estimates.

  Args:
    config, schema: the run's.
    order: a key of ORDERS.
    rows: its leading size; default a train batch's (`train`) or an
      evaluation batch's over `shards` data shards.
    train: a train batch, else an evaluation (predict, export) batch.
    shards: the mesh's data shards (default: the config's mesh over this
      host's devices).

  Returns:
    Its example batch with the leading axis widened; an order that reads a
    store gets its InsEmbs deduplicated per data shard, at the largest U a
    batch can have (`input_pipeline.compact_shapes`).
  """
  entry = get(order)
  shards = data_shards(config) if shards is None else shards
  if rows is None:
    rows = entry.rows(config) if train else entry.eval_rows(config, shards)
  one = entry.example(config, schema, 0)
  shapes = {
      k: jax.ShapeDtypeStruct((rows,) + v.shape[1:], v.dtype) for k, v in one.items()
  }
  return input_pipeline.compact_shapes(shapes, shards) if entry.reads_store else shapes


def size_flags(order: str) -> str:
  """The flags that size a train batch of `order`, for error messages."""
  return ", ".join(f"--config.{f}" for f in get(order).size_flags)


def check_shards(config: Config, order_names, shards: int, devices: int) -> None:
  """Raises ConfigError naming the flag when a train batch of one of
  `order_names` does not split evenly over `shards` data shards (a mesh of
  `devices` devices)."""
  for name in dict.fromkeys(order_names):
    order = get(name)
    rows = order.rows(config)
    if rows % shards:
      raise errors.ConfigError(
          order.size_flags[0], f"{rows} does not split evenly over the {shards} "
          f"data shards of the mesh (--config.mesh_shape="
          f"{tuple(config.mesh_shape)} on {devices} devices); use a "
          f"multiple of {shards}")


def check_sizes(config: Config, ds: dataset_lib.Dataset, order_names) -> None:
  """Raises ConfigError naming the flag and the limit when a train batch of
  one of `order_names` does not split evenly over the mesh's data shards
  (`check_shards`), or is larger than what it batches: a batch of more
  instances than the train split (or user chunks than it has) would train a
  single, mostly padding step. Evaluation batches may be larger (padding is
  fine there). Cheap: call right after `sources.prepare`, before training."""
  check_shards(config, order_names, data_shards(config), len(jax.devices()))
  for name in dict.fromkeys(order_names):
    get(name).check(config, ds)
