"""Grain input pipelines over a preprocessed dataset.

Three pipelines, all deterministic from a seed and checkpointable mid-epoch
(`iterate` gives a Grain iterator whose `get_state()` / `set_state()`
Orbax saves):

  * temporal: a split's instances in time order (optionally shuffled inside a
    window of W instances), batches [B]; the last partial batch is padded with
    dummy instances whose `mask` is False.
  * user-ordered: each user's instances of a split in time order cut into
    chunks of T, chunks shuffled, batches [B_users, T] with a padding `mask`.
    Every instance of the split is in exactly one chunk per epoch. Evaluation
    chunks also carry earlier context rows (`batching.UserChunks`).
  * downstream history: either of the above plus, per instance, its user's
    newest L strictly-earlier instances (`history.earlier_rows`): their InsIDs,
    labels and time-gap buckets, masked; `LookupInsEmb` then adds their InsEmbs
    with one batched lookup call per batch.
  * stream: the instances of some splits in time order (no shuffle), each with
    its user's K newest strictly-earlier instances that were processed in an
    *earlier* batch (or precede the stream): the rows a streaming source model
    may fetch InsEmbs of (`ReadStream`). The InsEmbs themselves are fetched by
    the train loop, after the previous step wrote its own back.

Grain elements are whole global batches of item ids, and the transforms
gather all columns of a batch with one vectorized memmap read. Chunk batches
are sampled by Grain itself (`batching.chunk_batches`: shuffle, batch, repeat); instance
batches are cut by `batching.EpochBatches`, as Grain's per-element chain would cap
throughput below the column reads and has no time-order window shuffle (see
there). A process keeps only the blocks of every global batch its devices
compute (`batching.ProcessSlice.of_mesh`), so P processes see complete parts
of exactly the batches one process would see (a 2-process run trains the
same model as a 1-process run; processes whose devices share a data row of
the mesh read the same block); Grain's sharding cannot do this, as it gives
each process whole elements (batches) of its own.

Batch keys (leading dims [b] or [b_users, T], b = this process's blocks of B):
  model inputs: cat, dense, mh_<name>, seq_item, seq_category, seq_action,
    labels, mask (the rows that count); user chunks and stream also tie_group
    (`tie_group`), user chunks token_mask, stream past_tie_group; with history:
    hist_mask, hist_labels, hist_label_known, hist_gap
    (+ hist_insemb, or hist_insemb_unique and hist_index, after `LookupInsEmb`);
  host-only (`HOST_KEYS`): row, ins_id, uid, ts, hist_row, hist_ins_id, hist_ts,
    past_row, past_ins_id, hist_missing, hist_unique.
"""

from __future__ import annotations

import grain
import numpy as np

from iat_jax.data import batching
from iat_jax.data import dataset as dataset_lib
from iat_jax.data import history
from iat_jax.data import user_history
from iat_jax.store import tables

HOST_KEYS = ("row", "ins_id", "uid", "ts", "hist_row", "hist_ins_id", "hist_ts",
             "past_row", "past_ins_id", "hist_missing", "hist_unique")

# A deduplicated history goes dense (hist_insemb [B, L, d]) when its U
# would exceed this share of a batch shard's B / G x L slots: past it the
# distinct rows (the ladder rounds U up) outnumber the slots. Below it the
# deduplicated step measured as fast as or faster than the dense one, up to
# U = 0.875 of the slots
# (docs/benchmarks.md#train-steps-on-representative-batches).
DENSE_ABOVE = 1.0


class ReadInstances(grain.transforms.Map):
  """Row ids [b] (-1 = padding) -> batch dict with leading dims [b]."""

  def __init__(self, ds: dataset_lib.Dataset, part: batching.ProcessSlice):
    self.ds = ds
    self.part = part

  def map(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    rows = self.part(rows)
    return read_rows(self.ds, np.maximum(rows, 0), rows >= 0)


class ReadChunks(grain.transforms.Map):
  """Chunk ids [b_users] (-1 = padding) -> batch dict [b_users, T].

  token_mask marks every real row (context included), mask the evaluated rows
  only; row, ins_id, ts and labels are set at every token.
  """

  def __init__(self, ds: dataset_lib.Dataset, chunks: batching.UserChunks,
               part: batching.ProcessSlice):
    self.ds = ds
    self.chunks = chunks
    self.part = part

  def map(self, ids: np.ndarray) -> dict[str, np.ndarray]:
    ids = self.part(ids)
    valid = ids >= 0
    start, length, context = (np.where(valid, a[np.maximum(ids, 0)], 0)
                              for a in (self.chunks.start, self.chunks.length,
                                        self.chunks.context))
    t = np.arange(self.chunks.chunk_len)
    tokens = t < length[:, None]
    rows = np.where(tokens, start[:, None] + t, 0)
    out = read_rows(self.ds, rows, tokens)
    out["mask"] = tokens & (t >= context[:, None])
    out["token_mask"] = tokens
    out["tie_group"] = tie_group(self.ds, rows, tokens)
    return out


def tie_group(ds: dataset_lib.Dataset, rows: np.ndarray,
              mask: np.ndarray) -> np.ndarray:
  """int32 [...]: the within-user index of the first row of each row's (user,
  ts) run (-1 where masked): equal exactly for one user's same-timestamp rows,
  the key of the SIT's strictly-earlier mask (`attention.tie_mask`)."""
  return np.where(mask, ds.earlier_count(rows), -1).astype(np.int32)


def read_rows(ds: dataset_lib.Dataset, rows: np.ndarray, mask: np.ndarray) -> dict:
  """Gathers model inputs and host keys at `rows` [...]; masked slots zeroed."""
  names = ds.feature_columns() + ("labels", "ins_id", "uid", "ts")
  out = {n: history.gather(ds[n], rows, mask) for n in names}
  out["row"] = np.where(mask, rows, -1)
  out["mask"] = mask
  return out


class AddHistory(grain.transforms.Map):
  """Adds each instance's newest L strictly-earlier instances of its user.

  Adds hist_row, hist_ins_id, hist_ts [..., L] (host), hist_mask [..., L],
  hist_labels and hist_label_known [..., L, tasks], hist_gap [..., L] int32
  (`UserHistory`: labels only once known at the request's time).
  """

  def __init__(self, ds: dataset_lib.Dataset, length: int, num_gap_buckets: int):
    self.index = user_history.UserHistory(ds)
    self.length = length
    self.num_gap_buckets = num_gap_buckets

  def map(self, batch: dict) -> dict:
    hist = self.index.before_rows(np.maximum(batch["row"], 0), self.length)
    hist["hist_mask"] &= batch["mask"][..., None]
    batch.update(hist)
    batch["hist_gap"] = history.gap_bucket(batch["ts"], hist["hist_ts"],
                                           hist["hist_mask"], self.num_gap_buckets)
    return batch


class LookupInsEmb(grain.transforms.Map):
  """Adds hist_insemb [..., L, d] with ONE lookup call for the whole batch.

  Missing keys give zero vectors and are dropped from hist_mask;
  `hist_missing` counts them (a scalar per batch, for metrics).

  The lookup asks for each distinct past row once (a batch's histories
  overlap: instances of one user share most of their past), numbered by
  `history.distinct` without sorting the B x L slots; one `take` spreads the
  rows over the [..., L] slots, masked slots reading an appended zero row.

  With `compact`, the batch gets the distinct InsEmbs instead, per batch
  shard: the local batch is cut into `groups` equal blocks of rows (the
  blocks `jax.make_array_from_process_local_data` gives this process's
  devices along the batch axis, `sharding.local_batch_shards`), and each
  block gets its own distinct rows: hist_insemb_unique [groups, U, d] (U =
  the largest block's distinct rows + 1 zero row, rounded up the ladder of
  `unique_rows`, so a run compiles a bounded set of shapes) and hist_index
  int32 [..., L] indexing its block's rows (masked slots point at a zero
  row). The model gathers after its per-token adapt MLP (`iat.IATBranch`),
  which then runs groups x U times instead of B x L times, and each device
  gathers from its own block: nothing crosses devices. hist_insemb =
  hist_insemb_unique[block of the row][hist_index] exactly. When U exceeds
  `dense_above` (default `DENSE_ABOVE`) of a block's slots, the batch gets
  that hist_insemb instead (`fit_unique`). Either way hist_unique (host) holds
  U, on which several processes must agree (`fit_unique` at the largest, in
  `steps.to_device`).
  """

  def __init__(self,
               table: tables.Lookup,
               compact: bool = False,
               groups: int = 1,
               dense_above: float | None = None,
               placement: str = "insid"):
    self.table = table
    self.compact = compact
    self.groups = groups
    self.dense_above = dense_above
    self.placement = placement

  def map(self, batch: dict) -> dict:
    mask = batch["hist_mask"]
    if self.compact and len(mask) % self.groups:
      raise ValueError(f"a local batch of {len(mask)} rows does not split into "
                       f"{self.groups} batch shards")
    index, counts = history.distinct(batch["hist_row"], mask,
                                     self.groups if self.compact else 1)
    n, flat = int(counts.sum()), mask.reshape(-1)
    keys = np.zeros(n, np.uint64)
    uid = np.broadcast_to(batch["uid"][..., None], mask.shape)  # a history's user
    keys[index.reshape(-1)[flat]] = tables.store_keys(self.placement,
                                                      batch["hist_ins_id"][mask],
                                                      uid[mask])
    values, found = self.table.lookup(keys)
    d = values.shape[1:]
    if self.compact:
      u = unique_rows(int(counts.max()))
      rows = np.empty((self.groups, u) + d, np.float32)  # only the tails zeroed
      start = np.concatenate([[0], np.cumsum(counts)])
      for g in range(self.groups):
        rows[g, :counts[g]] = values[start[g]:start[g + 1]]
        rows[g, counts[g]:] = 0
      blocks = index.reshape(self.groups, -1)
      local = np.where(blocks < n, blocks - start[:-1, None], counts[:, None])
      batch["hist_insemb_unique"] = rows
      batch["hist_index"] = local.astype(np.int32).reshape(mask.shape)
      batch["hist_unique"] = np.int64(u)
      batch = fit_unique(batch, u, self.dense_above)
    else:
      rows = np.zeros((n + 1,) + d, np.float32)
      rows[:n] = values
      batch["hist_insemb"] = rows.take(index, axis=0)
    hit = np.append(found, False).take(index)
    batch["hist_missing"] = np.int64(flat.sum() - hit.sum())
    batch["hist_mask"] = hit
    return batch


def unique_rows(distinct: int) -> int:
  """U of a batch shard with `distinct` InsEmbs: >= distinct + 1 (a zero row),
  rounded up to a ladder of 8 sizes per octave (k * 2^(e - 3), k = 8..15;
  at least 16), so padding is under 1/8 of U while a run compiles at most 8
  shapes per doubling of its distinct counts (`LookupInsEmb`)."""
  n = int(distinct) + 1
  step = _ladder_step(n)
  return max(16, -(-n // step) * step)


def _ladder_step(n: int) -> int:
  """The spacing of `unique_rows`' ladder in the octave (2^(e-1), 2^e] of n."""
  return 1 << max((n - 1).bit_length() - 4, 0)


def fit_unique(batch: dict, u: int, dense_above: float | None = None) -> dict:
  """A deduplicated batch at U = u >= its own (the U processes agreed on).

  Its hist_insemb_unique [G, U', d] zero-padded to [G, u, d]; or, when u
  exceeds `dense_above` (default `DENSE_ABOVE`) of a block's slots (B / G x
  L), spread to hist_insemb [B, L, d] = rows[block of the row][hist_index]
  (hist_index dropped). A batch already spread stays so (the dense rule is
  monotone in u, so every process reaches the same layout). hist_unique = u.
  """
  limit = DENSE_ABOVE if dense_above is None else dense_above
  batch = {**batch, "hist_unique": np.int64(u)}
  if "hist_insemb_unique" not in batch:
    return batch
  rows, index = batch["hist_insemb_unique"], batch["hist_index"]
  g = rows.shape[0]
  if u > limit * (index.size // g):
    blocks = index.reshape(g, -1)
    batch["hist_insemb"] = rows[np.arange(g)[:, None],
                                blocks].reshape(index.shape + rows.shape[2:])
    del batch["hist_insemb_unique"], batch["hist_index"]
  elif rows.shape[1] < u:
    pad = np.zeros((g, u - rows.shape[1]) + rows.shape[2:], rows.dtype)
    batch["hist_insemb_unique"] = np.concatenate([rows, pad], axis=1)
  return batch


def compact_shapes(shapes: dict, groups: int) -> dict:
  """The shapes (jax.ShapeDtypeStruct) of a history batch with hist_insemb
  [B, L, d] -> those `LookupInsEmb(compact=True, groups)` gives it with its
  largest deduplicated U (past `DENSE_ABOVE` of the slots it is dense, a
  program of about that size): hist_insemb_unique [groups, U, d], hist_index
  int32 [B, L]."""
  shapes = dict(shapes)
  full = shapes.pop("hist_insemb")
  b, l, d = full.shape
  most = int(DENSE_ABOVE * (b // groups * l))
  u = unique_rows(most - 1)  # the ladder's next size >= most; one step down if above
  if u > most:
    u = max(16, u - _ladder_step(u))
  shapes["hist_insemb_unique"] = type(full)((groups, u, d), full.dtype)
  shapes["hist_index"] = type(full)((b, l), np.int32)
  return shapes


class ReadStream(grain.transforms.Map):
  """Global row batch [B] -> this process's instances + visible past rows.

  Adds past_row (host; -1 = none), past_ins_id (host; 0 = none), past_mask
  [b, K], and the tie groups tie_group [b] and past_tie_group [b, K]
  (`tie_group`); with `features`, the
  past instances' raw features as past_<name> [b, K, ...] (Method 2).
  """

  def __init__(self, ds: dataset_lib.Dataset, past_len: int,
               part: batching.ProcessSlice, features: bool):
    self.ds = ds
    self.index = user_history.UserHistory(ds)
    self.past_len = past_len
    self.part = part
    self.features = features
    self.rank = np.empty(ds.num_rows, np.int64)
    self.rank[np.asarray(ds["temporal_order"])] = np.arange(ds.num_rows)

  def map(self, rows: np.ndarray) -> dict[str, np.ndarray]:
    batch_start = self.rank[rows[0]]  # rows are contiguous in time order
    rows = self.part(rows)
    batch = read_rows(self.ds, np.maximum(rows, 0), rows >= 0)
    past = self.index.before_rows(np.maximum(rows, 0), self.past_len)
    mask = past["hist_mask"] & batch["mask"][:, None]
    mask &= self.rank[np.maximum(past["hist_row"], 0)] < batch_start
    prow = np.where(mask, past["hist_row"], 0)
    ins = np.asarray(self.ds["ins_id"])
    batch.update(past_row=np.where(mask, prow, -1),
                 past_ins_id=np.where(mask, ins[prow], np.uint64(0)),
                 past_mask=mask,
                 tie_group=tie_group(self.ds, np.maximum(rows, 0), batch["mask"]),
                 past_tie_group=tie_group(self.ds, prow, mask))
    if self.features:
      for name in self.ds.feature_columns():
        batch[f"past_{name}"] = history.gather(self.ds[name], prow, mask)
    return batch


def stream(
    ds: dataset_lib.Dataset,
    splits: tuple[str, ...],
    batch_size: int,
    past_len: int,
    *,
    features: bool = False,
    part: batching.ProcessSlice = batching.ProcessSlice()
) -> grain.MapDataset:
  """Time-ordered batches over `splits` (consecutive in time), see ReadStream.

  Args:
    ds: the dataset.
    splits: e.g. ("valid", "test"): the instances after batch training.
    batch_size: global batch B (divisible into part.count blocks).
    past_len: K, past instances per instance.
    features: also add the past instances' raw features (recomputation).
    part: this process's blocks of each batch (`batching.ProcessSlice`).
  """
  rows = np.concatenate([ds.split_rows(s) for s in splits])
  source = batching.EpochBatches(len(rows), batch_size, 1, lambda e: rows)
  read = ReadStream(ds, past_len, part, features)
  return grain.MapDataset.source(source).map(read)


def _assemble(batches: grain.MapDataset,
              read: grain.transforms.Map,
              ds: dataset_lib.Dataset,
              history_len: int | None,
              num_gap_buckets: int,
              table: tables.Lookup | None,
              compact: bool = False,
              groups: int = 1,
              placement: str = "insid") -> grain.MapDataset:
  """`batches` (global item-id batches [B]) -> `read` -> history -> InsEmbs."""
  data = batches.map(read)
  if history_len is not None:
    data = data.map(AddHistory(ds, history_len, num_gap_buckets))
    if table is not None:
      data = data.map(LookupInsEmb(table, compact, groups, placement=placement))
  return data


def iterate(data: grain.MapDataset,
            worker_count: int = 0,
            read_threads: int = 2,
            prefetch: int = 4) -> grain.DatasetIterator:
  """A checkpointable iterator over `data`.

  Elements are whole batches, so a few prefetched ones suffice (Grain's
  default of 500 elements on 16 threads cost gigabytes and CPU time).

  Args:
    data: a pipeline from this module.
    worker_count: Grain worker processes (0 = threads of this process).
    read_threads: threads preparing batches in this process.
    prefetch: batches prepared ahead.
  """
  it = data.to_iter_dataset(
      grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch))
  if worker_count:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return iter(it)


def temporal(ds: dataset_lib.Dataset,
             split: str,
             batch_size: int,
             *,
             seed: int = 0,
             shuffle_window: int = 0,
             num_epochs: int = 1,
             part: batching.ProcessSlice = batching.ProcessSlice(),
             history_len: int | None = None,
             num_gap_buckets: int = 16,
             table: tables.Lookup | None = None,
             compact: bool = False,
             groups: int = 1,
             placement: str = "insid") -> grain.MapDataset:
  """Time-ordered batches of one split.

  Args:
    ds: the dataset.
    split: "train", "valid" or "test".
    batch_size: global batch size B (divisible into part.count blocks).
    seed: seeds the window shuffle (a new permutation each epoch).
    shuffle_window: W; instances are permuted inside windows of W (0 = none).
    num_epochs: passes over the split.
    part: this process's blocks of each batch (`batching.ProcessSlice`).
    history_len: L; if set, adds the downstream history (`AddHistory`).
    num_gap_buckets: vocabulary of the history time-gap buckets.
    table: if set (with history_len), adds hist_insemb (`LookupInsEmb`).
    compact: distinct InsEmbs + an index instead (`LookupInsEmb`), per
      each of `groups` blocks of the local batch.
    placement: how `table` keys its rows (--config.store.placement).

  Returns:
    A Grain MapDataset (one element per global batch, len = batches x epochs)
    of batch dicts with leading dim [this process's rows of B]; see `iterate`.
  """
  rows = ds.split_rows(split)
  source = batching.EpochBatches(
      len(rows), batch_size, num_epochs,
      lambda e: batching.window_shuffle(rows, shuffle_window, seed, e))
  read = ReadInstances(ds, part)
  return _assemble(grain.MapDataset.source(source), read, ds, history_len,
                   num_gap_buckets, table, compact, groups, placement)


CHUNK_ORDERS = ("shuffle", "users", "reversed")


def user_ordered(ds: dataset_lib.Dataset,
                 split: str,
                 users_per_batch: int,
                 chunk_len: int,
                 *,
                 seed: int = 0,
                 order: str = "shuffle",
                 num_epochs: int = 1,
                 part: batching.ProcessSlice = batching.ProcessSlice(),
                 history_len: int | None = None,
                 num_gap_buckets: int = 16,
                 table: tables.Lookup | None = None,
                 context: int = 0) -> grain.MapDataset:
  """User-chunk batches [this process's blocks of B_users, T] of one split.

  Args are as in `temporal`, plus users_per_batch (global B_users), chunk_len
  (T), the chunk order: "shuffle" (anew each epoch), "users" (users in
  ascending order) or "reversed" (users descending) -- a user's chunks always
  stay in time order -- and context: earlier rows leading each chunk
  (`batching.UserChunks`; 0 for training, > 0 for evaluation).
  """
  if order not in CHUNK_ORDERS:
    raise ValueError(f"chunk order {order!r} is not one of {CHUNK_ORDERS}")
  chunks = batching.UserChunks.build(ds, split, chunk_len, context)
  n = len(chunks.start)
  fixed = {
      "users": np.arange(n),
      "reversed": np.lexsort((np.arange(n), -chunks.user))
  }.get(order)
  source = batching.chunk_batches(n, users_per_batch, num_epochs, seed, fixed)
  read = ReadChunks(ds, chunks, part)
  return _assemble(source, read, ds, history_len, num_gap_buckets, table)
