r"""Synthetic industrial ranking instances: the package's embedded dataset.

`build(out_dir)` writes a dataset (see `iat_jax.data.dataset`) without any
download. It imitates an industrial ranking log in which a user's *whole past
instances* carry signal that the thin hand-crafted behaviour sequence (item id,
category, action) does not, so IAT has something to gain over the base model.

Generative process (all draws from numpy PCG64 streams keyed by the seed):

* Items. `num_items` items, each in one of `num_categories` categories
  (every category non-empty, Zipf-like sizes). Category c has a latent centre
  m_c ~ N(0, I_16); item j has a latent vector v_j = (m_{c(j)} + 0.7 eps) /
  sqrt(1.49), a popularity (Zipf, exponent 0.9), a quality bias
  b_j ~ N(0, 0.5^2), a log price (per-category mean + noise), a seller, a
  brand and 1-4 tags drawn from its category's 8 tags.
* Users. User u gets an activity weight ~ LogNormal(0, 1); the
  `num_instances` instances are split over users by a multinomial on these
  weights (each user gets at least one when num_instances >= num_users). 30% of
  users join late (first active day uniform in the first half of the span).
  Each user has a profile (age, gender, city, segment), a favourite surface and
  a main device, an interest vector z_u(t) that starts at N(0, I_16) and drifts
  as a Brownian motion (scale 0.8 over the whole span), a click bias
  ~ N(0, 0.4^2), a price sensitivity ~ N(0.6, 0.4^2) and -- the part only the
  user's past instances reveal -- a persistent context preference: one weight
  ~ N(0, 0.45^2) per value of each of 4 request-context fields (surface,
  device, campaign, hour-of-day bucket of 6 hours).
* Requests. A user's instances are grouped into requests (slates; a new request
  starts with probability 0.45 per instance, mean slate 2.2). Each request has a
  time (a uniform day in the user's active span, a diurnal hour peaking at
  20:00, a uniform second), a surface (the favourite one 40% of the time), a
  device (the main one 60% of the time), an OS (follows the device), a
  network. Instances of one request share the timestamp (so histories have
  ties); their position is their rank in the (user, ts) run.
* Instances. Each shown item is chosen by the "upstream recommender": 70% of
  the time a category ~ softmax(1.5 z_u(t).m_c / 4), else a category by
  popularity; then an item of that category by popularity. Context fields:
  a campaign (16, Zipf), 0-4 query terms (mostly from the shown item's
  category), a discount (30% of instances, U(0, 0.5)).
* Labels. With aff = z_u(t).v_j / 4 and the user's context preference
  pref_u(ctx) = sum over the 4 fields of the user's weight for the instance's
  value:
      logit(click) = -2.5 + aff + 0.5 b_j + 0.8 pref_u(ctx) + bias_u
                     + global context effects (surface, device, campaign,
                       hour, position, age)
      logit(conv | click) = -2.4 + 0.6 aff + 1.2 pref_u(ctx)
                            - price_sens_u * price_z + 0.5 bias_u + 1.6 disc
  click ~ Bernoulli, conversion = click and Bernoulli. Extra tasks (task k >= 2)
  are click and Bernoulli(sigmoid(a_k + w_k [aff, pref_u(ctx), price term]
  + 0.5 (logit(conv | click) + 2.4))) with random per-task weights. The
  behaviour action is 1 impression, 2 click, 3 conversion (num_actions = 5).
* Label delay. Clicks (and the extra tasks) are known at once; a conversion
  label only `conversion_delay` seconds after the impression (default one
  day: an e-commerce attribution window; the label, positive or negative, is
  final when the window closes). Against this data's time scale (30 days, a
  user's consecutive requests 13.5 h apart on average, median 5 h) it hides
  the conversion of 85% of the newest past instances and of 47% of a 16-slot
  history (6 h would hide 54% / 17%): the recent past loses its conversions,
  as in a real log. Until then a clicked instance's behaviour action is 4
  ("click, conversion not yet known"), an unclicked one's 1, and its
  conversion is unknown in the IAT history (`iat_jax.data.history`). With
  num_tasks = 1 conversion is no task, so it has no delay.
  pref_u and price_sens_u are never features: the base model can only average
  them out, while a model reading the user's past instances (context fields,
  price and labels) can estimate them. With the defaults, CTR is about 0.27
  and CVR given click about 0.38; an oracle that knows every latent scores
  AUC 0.83 (click) / 0.89 (conversion over impressions), and 0.79 / 0.81 when
  pref_u is withheld: the head-room history-reading models compete for.

Columns. Categorical fields (`num_categorical` >= 2), in this order, as many as
asked: item_id (id j + 1, vocab num_items + 1), category (id c + 1, vocab
num_categories + 1), then surface, device, campaign, position, hour, age,
gender, city, seller, brand, price_bucket, weekday, network, os, segment, then
generic fields: half request-noise fields (a skewed value over 2..1024 raw
values), a quarter crosses of a request-context field (surface, device,
campaign, position, hour, network) with noise, a quarter item attributes (a
random value per item bucket; items fall in 4096 buckets). Every field but
item_id and category is hashed with `hashing.hash_to_vocab` into
[1, vocab_size), so ids are never 0. Multi-hot: item_tags and query_terms
(max_len 4, vocab_size, 0-padded at the end). Dense (`num_dense`, in this
order): price_z, discount, relevance (aff plus unit noise, scaled), item_pop,
hour_sin, hour_cos, log_position, tenure, then noisy copies of these.
Behaviour columns item/category use the item_id/category ids.

Determinism. Users are processed in fixed blocks of users (the block size is a
function of num_instances / num_users only); block k draws from
`default_rng([seed, stream, k])`, so columns do not depend on `chunk_rows`.
Named fields, labels and named dense values come from streams that do not
depend on num_categorical, num_dense or num_tasks. InsIDs are
`hashing.ins_ids(uid, ts, item index, request_id)` with request_id the global
instance counter before the within-tie sort; uid is the user index.

Code. This module holds the knobs (`Config`; the run config's block
data.synthetic, `default_config`, and its check, `validate_config`), the
schema and the driver (`build`, the command line); `synthetic_world` draws
what all user blocks share and `synthetic_rows` the rows of one block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Callable

from absl import app
from absl import flags
from absl import logging
import ml_collections
import numpy as np

from iat_jax import errors
from iat_jax.data import dataset
from iat_jax.data import schema as schema_lib
from iat_jax.data import synthetic_rows as rows_lib
from iat_jax.data import synthetic_world as world_lib

VERSION = "synthetic-v2"  # v2: conversion label delay, action 4
_ROWS_PER_BLOCK = 32_768  # Target rows of one user block.
# Fields of the 'user' and 'item' groups (schema.GROUPS; by name, generic kind
# or dense source, see `make_schema`); all others are 'context'.
_USER, _ITEM = ("age", "gender", "city", "segment",
                "tenure"), ("item_id", "category", "seller", "brand", "price_bucket",
                            "item_tags", "price_z", "discount", "item_pop", "item_attr")


@dataclasses.dataclass(frozen=True)
class Config:
  """The generator's knobs (see `build`)."""
  seed: int = 0
  num_users: int = 2000
  num_instances: int = 200_000
  num_categorical: int = 32
  num_dense: int = 8
  num_tasks: int = 2
  num_items: int = 5000
  num_categories: int = 50
  days: int = 30
  seq_len: int = 32
  vocab_size: int = 1000
  conversion_delay: int = 86400

  def validate(self, flag: Callable[[str], str] = "--{}".format) -> None:
    """Raises errors.ConfigError on a knob the generator cannot honour.

    Args:
      flag: knob name -> the flag that set it, named by the error; by default
        the module's own command-line flag (--num_users). A run config's
        knobs are checked by `validate_config`.
    """

    def need(ok: bool, knob: str, rule: str) -> None:
      if not ok:
        raise errors.ConfigError(flag(knob), f"{rule}, got {getattr(self, knob)}")

    need(self.seed >= 0, "seed", "must be >= 0")
    for knob in ("num_users", "num_instances", "num_tasks", "num_categories", "days",
                 "seq_len"):
      need(getattr(self, knob) > 0, knob, "must be > 0")
    need(self.num_categorical >= 2, "num_categorical",
         "must be >= 2 (item_id and category)")
    need(self.num_dense >= 0, "num_dense", "must be >= 0")
    need(self.num_items >= self.num_categories, "num_items",
         f"must be >= num_categories ({self.num_categories})")
    need(self.vocab_size >= 2, "vocab_size", "must be >= 2")
    need(self.conversion_delay >= 0, "conversion_delay",
         "seconds until a conversion label is known; must be >= 0")
    need(self.days <= 40_000, "days",
         "must be <= 40000 (relative times are packed into 32 bits)")

  def fingerprint(self) -> str:
    """sha256 of the knobs and the generator version (not of chunk_rows)."""
    blob = json.dumps({"version": VERSION, **dataclasses.asdict(self)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()

  def users_per_block(self) -> int:
    """Users per random-stream block (about _ROWS_PER_BLOCK rows each)."""
    mean = max(self.num_instances / self.num_users, 1.0)
    return int(np.clip(round(_ROWS_PER_BLOCK / mean), 1, 1 << 16))


# The knobs a run config sets, as --config.data.synthetic.<knob>; the others
# keep their defaults, the seed is --config.seed and seq_len --config.data.seq_len.
RUN_KNOBS = ("num_users", "num_instances", "num_categorical", "num_dense", "num_tasks",
             "num_items", "vocab_size", "conversion_delay", "days")


def default_config() -> ml_collections.ConfigDict:
  """The run config's block data.synthetic: RUN_KNOBS at their `Config` defaults."""
  return ml_collections.ConfigDict({knob: getattr(Config, knob) for knob in RUN_KNOBS})


def validate_config(data: ml_collections.ConfigDict) -> None:
  """The synthetic source's check of the run config's data block (`Source.validate`).

  Raises errors.ConfigError naming the flag, e.g.
  "--config.data.synthetic.num_users: must be > 0, got 0".
  """
  flag = lambda knob: "data.seq_len" if knob == "seq_len" else f"data.synthetic.{knob}"
  Config(seq_len=data.seq_len, **data.synthetic).validate(flag)


def make_schema(cfg: Config,
                tables: world_lib.World | None = None) -> schema_lib.Schema:
  """The schema of the dataset `build` writes for `cfg` (writer fields 0)."""
  tables = tables or world_lib.World(cfg)
  named = world_lib.NAMED[:cfg.num_categorical]
  cats = [schema_lib.Categorical(n, cfg.vocab_size) for n in named]
  cats[0] = schema_lib.Categorical("item_id", cfg.num_items + 1)
  cats[1] = schema_lib.Categorical("category", cfg.num_categories + 1)
  cats += [schema_lib.Categorical(n, cfg.vocab_size) for n in tables.gen_names]
  dense = world_lib.DENSE[:cfg.num_dense] + tuple(
      f"dense_{k:03d}" for k in range(len(world_lib.DENSE), cfg.num_dense))
  tasks = ("click", "conversion") + tuple(f"task_{k}" for k in range(2, cfg.num_tasks))
  multi_hot = (schema_lib.MultiHot("item_tags", cfg.vocab_size, 4),
               schema_lib.MultiHot("query_terms", cfg.vocab_size, 4))
  # Each field's group follows its name, a generic field's its kind, a noisy
  # dense copy's its source.
  keys = (named + tuple(n.rsplit("_", 1)[0] for n in tables.gen_names) +
          tuple(f.name for f in multi_hot) + world_lib.DENSE[:cfg.num_dense] +
          tuple(world_lib.DENSE[k] for k in tables.dense_src))
  names = tuple(f.name for f in cats + list(multi_hot)) + dense
  groups = {
      n: "user" if k in _USER else "item" if k in _ITEM else "context"
      for n, k in zip(names, keys, strict=True)
  }
  sources = {"generator": VERSION}
  sources.update({k: str(v) for k, v in dataclasses.asdict(cfg).items()})
  return schema_lib.Schema(dataset="synthetic",
                           categorical=tuple(cats),
                           multi_hot=multi_hot,
                           dense=dense,
                           tasks=tasks[:cfg.num_tasks],
                           label_delay=(0, cfg.conversion_delay,
                                        *[0] * (cfg.num_tasks - 2))[:cfg.num_tasks],
                           seq_len=cfg.seq_len,
                           seq_item_field="item_id",
                           seq_category_field="category",
                           num_actions=5,
                           field_groups=groups,
                           sources=sources,
                           fingerprint=cfg.fingerprint())


def user_counts(cfg: Config) -> np.ndarray:
  """Instances per user: int64 [num_users], summing to num_instances."""
  rng = np.random.default_rng([cfg.seed, 1])
  w = rng.lognormal(0.0, 1.0, cfg.num_users)
  if cfg.num_instances >= cfg.num_users:
    return 1 + rng.multinomial(cfg.num_instances - cfg.num_users, w / w.sum())
  return rng.multinomial(cfg.num_instances, w / w.sum())


def _chunk_spans(block_rows: np.ndarray, chunk_rows: int) -> list[tuple[int, int, int]]:
  """Consecutive user blocks grouped into write chunks of at most `chunk_rows`
  rows (a block bigger than that is a chunk of its own).

  Args:
    block_rows: int64 [num_blocks] rows of each user block.
    chunk_rows: the target rows per chunk.

  Returns:
    (first block, end block, rows) of each chunk.
  """
  spans, blk, nblocks = [], 0, len(block_rows)
  while blk < nblocks:
    end, rows = blk + 1, int(block_rows[blk])
    while end < nblocks and rows + block_rows[end] <= chunk_rows:
      rows += int(block_rows[end])
      end += 1
    spans.append((blk, end, rows))
    blk = end
  return spans


def _gen_chunk(t: world_lib.World, counts: np.ndarray, span: tuple[int, int, int],
               row0: int, shapes: dict) -> dict[str, np.ndarray]:
  """The columns {name: [rows, ...]} of the user blocks of one `_chunk_spans` span.

  Args:
    t: shared tables.
    counts: int64 [num_users] rows per user (`user_counts`).
    span: (first block, end block, rows).
    row0: global row number of the chunk's first row.
    shapes: `dataset.row_shapes` of the schema.
  """
  first, end, rows = span
  upb = t.cfg.users_per_block()
  chunk = {
      name: np.empty((rows,) + shape, dtype) for name, (shape, dtype) in shapes.items()
  }
  lo = 0
  for b in range(first, end):
    users = np.arange(b * upb, min((b + 1) * upb, t.cfg.num_users))
    c = counts[users]
    users, c = users[c > 0], c[c > 0]
    hi = lo + int(c.sum())
    if hi > lo:
      rows_lib.gen_block(t, b, users, c, row0 + lo, {
          name: col[lo:hi] for name, col in chunk.items()
      })
    lo = hi
  return chunk


def build(out_dir: str,
          *,
          seed: int = 0,
          num_users: int = 2000,
          num_instances: int = 200_000,
          num_categorical: int = 32,
          num_dense: int = 8,
          num_tasks: int = 2,
          num_items: int = 5000,
          num_categories: int = 50,
          days: int = 30,
          seq_len: int = 32,
          vocab_size: int = 1000,
          conversion_delay: int = 86400,
          chunk_rows: int = 500_000) -> str:
  """Writes a synthetic dataset to `out_dir` (a no-op if already built).

  Args:
    out_dir: dataset directory (created or atomically replaced).
    seed: random seed; the dataset is a deterministic function of the knobs.
    num_users: users (those drawing no instance have no rows).
    num_instances: rows N.
    num_categorical: categorical fields Fc >= 2 (see the module docstring).
    num_dense: dense fields Fd.
    num_tasks: binary tasks (click, conversion, then further outcomes).
    num_items: items (item_id vocab is num_items + 1).
    num_categories: item categories (category vocab is num_categories + 1).
    days: time span of the log.
    seq_len: length S of the hand-crafted behaviour sequence.
    vocab_size: vocabulary of the hashed fields and the multi-hot fields.
    conversion_delay: seconds from an impression until its conversion label
      is known (see the module docstring; 0 = at once).
    chunk_rows: rows per write chunk (bounds memory; does not change data).
      A chunk holds at least one user block of about 32k rows.

  Returns:
    out_dir.

  Raises:
    errors.ConfigError: a knob the generator cannot honour (`Config.validate`).
  """
  cfg = Config(seed=seed,
               num_users=num_users,
               num_instances=num_instances,
               num_categorical=num_categorical,
               num_dense=num_dense,
               num_tasks=num_tasks,
               num_items=num_items,
               num_categories=num_categories,
               days=days,
               seq_len=seq_len,
               vocab_size=vocab_size,
               conversion_delay=conversion_delay)
  cfg.validate()
  if dataset.is_complete(out_dir, cfg.fingerprint()):
    logging.info("synthetic dataset %s is up to date", out_dir)
    return out_dir
  _write(cfg, out_dir, chunk_rows)
  return out_dir


def _write(cfg: Config, out_dir: str, chunk_rows: int) -> None:
  """Generates the dataset of `cfg` chunk by chunk into `out_dir` (see `build`)."""
  t0 = time.time()
  tables = world_lib.World(cfg)
  schema = make_schema(cfg, tables)
  shapes = dataset.row_shapes(schema)
  counts = user_counts(cfg)
  block_rows = np.add.reduceat(counts, np.arange(0, cfg.num_users,
                                                 cfg.users_per_block()))
  done, next_log = 0, 0.0
  with dataset.Writer(out_dir, schema, cfg.num_instances) as writer:
    for span in _chunk_spans(block_rows, chunk_rows):
      writer.append(_gen_chunk(tables, counts, span, done, shapes))
      done += span[2]
      elapsed = time.time() - t0
      if elapsed >= next_log or done == cfg.num_instances:
        rate = done / max(elapsed, 1e-9)
        logging.info("synthetic: %d / %d instances (%.0f /s, ETA %.0f s)", done,
                     cfg.num_instances, rate,
                     (cfg.num_instances - done) / max(rate, 1e-9))
        next_log = elapsed + 10.0
  logging.info("synthetic: built %s in %.1f s", out_dir, time.time() - t0)


_KNOBS = tuple(f.name for f in dataclasses.fields(Config))


def main(argv) -> None:
  """absl main: builds the dataset the flags describe (see `run`); a knob the
  generator cannot honour ends it with one line `error: --<knob>: ...`."""
  del argv
  fl = flags.FLAGS
  try:
    build(fl.out,
          chunk_rows=fl.chunk_rows,
          **{name: getattr(fl, name) for name in _KNOBS})
  except errors.UserError as e:
    raise SystemExit(f"error: {e}") from None


def run() -> None:
  """Defines the flags (one per knob, plus --out, --chunk_rows); runs `main`."""
  flags.DEFINE_string("out", None, "Output dataset directory.")
  for f in dataclasses.fields(Config):
    flags.DEFINE_integer(f.name, f.default, f"Generator knob {f.name}.")
  flags.DEFINE_integer("chunk_rows", 500_000, "Rows per write chunk.")
  flags.mark_flag_as_required("out")
  app.run(main)


if __name__ == "__main__":
  run()
