"""Which dataset rows make up each global batch, and this process's part.

  EpochBatches    instance batches [B] of a split, cut from a per-epoch order
                  (time order, optionally window-shuffled: `window_shuffle`);
  chunk_batches   user-chunk batches [B_users], sampled by Grain itself;
  UserChunks      each user's rows of a split cut into chunks (with leading
                  context rows for evaluation);
  ProcessSlice    the blocks of a global batch a process reads.

Elements are ids (rows or chunks), -1 padding a last partial batch; the
transforms of `iat_jax.data.input_pipeline` read their columns. Memory is
O(rows of one split) per epoch order (int64 ids), never the data itself.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Callable

import grain
import numpy as np

from iat_jax import sharding
from iat_jax.data import dataset as dataset_lib
from iat_jax.data import schema as schema_lib


class EpochBatches:
  """Grain random-access source: element i = instance rows of one global batch.

  Element `e * batches_per_epoch + b` holds items `order(e)[b*B:(b+1)*B]`,
  padded with -1 to B. `order(e)` is computed once per epoch and kept for
  the two newest epochs (Grain's read threads straddle an epoch boundary),
  under a lock: Grain calls `__getitem__` from several threads, and every
  call must read its own epoch's order.

  Why not Grain's own `shuffle`/`batch`/`repeat` here (as `user_ordered`
  does for chunks): instance batches are large (B = 256..1024+) and Grain
  batches element by element through its Python chain (~3.5 ms per 256
  indices, against ~1 ms to read the batch's columns on the test fixture),
  while one numpy slice cuts a batch; and the time-order window shuffle has
  no Grain equivalent (`WindowShuffleMapDataset` reads past the end of a
  partial last window, duplicating some rows and dropping others, and its
  windows straddle epochs).
  """

  def __init__(self, num_items: int, batch_size: int, num_epochs: int,
               order: Callable[[int], np.ndarray]):
    self.num_items = num_items
    self.batch_size = batch_size
    self.batches_per_epoch = -(-num_items // batch_size)
    self.num_epochs = num_epochs
    self._order = order
    self._fresh_cache()

  def __len__(self) -> int:
    return self.batches_per_epoch * self.num_epochs

  def epoch_order(self, epoch: int) -> np.ndarray:
    """`order(epoch)` [num_items], computed once (thread-safe)."""
    with self._lock:
      if epoch not in self._orders:
        if len(self._orders) == 2:
          del self._orders[min(self._orders)]
        self._orders[epoch] = self._order(epoch)
      return self._orders[epoch]

  def __getitem__(self, i: int) -> np.ndarray:
    epoch, b = divmod(i, self.batches_per_epoch)
    part = self.epoch_order(epoch)[b * self.batch_size:(b + 1) * self.batch_size]
    return _padded(part, self.batch_size)

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_orders")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._fresh_cache()

  def _fresh_cache(self):
    self._lock = threading.Lock()
    self._orders: dict[int, np.ndarray] = {}


def _padded(items, size: int) -> np.ndarray:
  """Item ids [<= size] -> int64 [size], padded with -1."""
  out = np.full(size, -1, dtype=np.int64)
  out[:len(items)] = items
  return out


def chunk_batches(num_chunks: int, batch_size: int, num_epochs: int, seed: int,
                  fixed: np.ndarray | None) -> grain.MapDataset:
  """Grain's sampling of chunk ids: element i = one global batch int64 [B].

  Grain's `shuffle` permutes the chunk ids anew each epoch (its seed + epoch;
  `fixed` keeps that order instead), `batch` cuts each epoch separately and
  `repeat` makes the epochs; only the padding of an epoch's last batch to B
  with -1 is ours (Grain's last batch is shorter). `seed` is hashed into
  Grain's 32-bit seed, so runs with seeds s and s + 1 do not share epochs.
  Chunks are few per batch (B_users), so Grain's per-element chain is cheap.
  """
  if fixed is None:
    grain_seed = int(np.random.SeedSequence(seed).generate_state(1)[0])
    ids = grain.MapDataset.range(num_chunks).shuffle(seed=grain_seed)
  else:
    ids = grain.MapDataset.source(fixed)
  return ids.batch(batch_size,
                   batch_fn=functools.partial(_padded,
                                              size=batch_size)).repeat(num_epochs)


def window_shuffle(items: np.ndarray, window: int, seed: int, epoch: int) -> np.ndarray:
  """Permutes `items` inside consecutive windows of `window` (0/1 = keep order)."""
  if window <= 1:
    return items
  rng = np.random.default_rng([seed, epoch])
  keys = np.arange(len(items)) // window + rng.random(len(items))
  return items[np.argsort(keys, kind="stable")]


@dataclasses.dataclass(frozen=True)
class ProcessSlice:
  """This process's part of each global batch: of its `count` equal blocks,
  those in `blocks` (default: block `index` alone, the contiguous index-th
  1/count). `of_mesh` gives the blocks a process's devices need, so a mesh
  whose data rows span processes is fed the rows each device computes."""
  index: int = 0
  count: int = 1
  blocks: tuple[int, ...] | None = None

  @classmethod
  def of_mesh(cls, mesh) -> ProcessSlice:
    """The blocks of this process's devices (`sharding.process_blocks`)."""
    return cls(count=mesh.shape["data"], blocks=sharding.process_blocks(mesh))

  def __call__(self, items: np.ndarray) -> np.ndarray:
    if self.blocks == tuple(range(self.count)):  # all of it (one process)
      return items
    if len(items) % self.count:
      raise ValueError(f"global batch {len(items)} is not divisible into "
                       f"{self.count} blocks (process_count={self.count})")
    b = len(items) // self.count
    blocks = (self.index,) if self.blocks is None else self.blocks
    if len(blocks) == 1:
      return items[blocks[0] * b:(blocks[0] + 1) * b]
    return np.concatenate([items[k * b:(k + 1) * b] for k in blocks])


@dataclasses.dataclass
class UserChunks:
  """Each user's rows of one split cut into chunks of at most `chunk_len`.

  A chunk is `context[c]` context rows followed by up to chunk_len - context
  evaluated rows of the split. The context rows are the user's rows right
  before the chunk's first evaluated row, of any split (fewer at the start of
  the user's history): the SIT of an evaluated row sees its user's newest
  earlier instances as it would in production, not only the rows of its own
  split, while only the evaluated rows count (`ReadChunks`' mask: loss,
  metrics, export). This (chunks spanning the split boundary) rather than the
  streaming form over an exported table keeps evaluation one forward pass of
  the batch model with the parameters being evaluated, and a context row
  with the same timestamp as an evaluated one is hidden by the SIT's tie mask.
  Each evaluated row is in exactly one chunk, so nothing counts twice. The
  context overlaps the previous chunk's rows: evaluation reads ~T / (T -
  context) times the rows. Training uses context 0 (plain chunks of the
  train rows, each trained on once per epoch).

  Attributes:
    start: int64 [C] first row of each chunk (context included).
    length: int64 [C] number of real rows in each chunk (1..chunk_len).
    chunk_len: T.
    user: int64 [C] user index of each chunk (chunks are in user order).
    context: int64 [C] leading context rows of each chunk (< length).
  """
  start: np.ndarray
  length: np.ndarray
  chunk_len: int
  user: np.ndarray
  context: np.ndarray

  @classmethod
  def build(cls,
            ds: dataset_lib.Dataset,
            split: str,
            chunk_len: int,
            context: int = 0) -> UserChunks:
    """Chunks of the split's rows, each after up to `context` (< chunk_len)
    earlier rows of its user; rows are contiguous within each user."""
    if not 0 <= context < chunk_len:
      raise ValueError(f"context {context} must be in [0, chunk_len={chunk_len})")
    per_chunk = chunk_len - context
    offsets = np.asarray(ds["user_offsets"])
    in_split = np.asarray(ds["split"]) == schema_lib.SPLITS.index(split)
    counts = np.add.reduceat(in_split, offsets[:-1])
    first = np.where(in_split, np.arange(ds.num_rows), ds.num_rows)
    first = np.minimum.reduceat(first, offsets[:-1])
    n_chunks = -(-counts // per_chunk)
    user = np.repeat(np.arange(len(counts)), n_chunks)
    k = np.arange(n_chunks.sum()) - np.repeat(np.cumsum(n_chunks) - n_chunks, n_chunks)
    evaluated = first[user] + k * per_chunk
    ctx = np.minimum(context, evaluated - offsets[user])
    length = ctx + np.minimum(per_chunk, counts[user] - k * per_chunk)
    return cls((evaluated - ctx).astype(np.int64), length.astype(np.int64), chunk_len,
               user.astype(np.int64), ctx.astype(np.int64))
