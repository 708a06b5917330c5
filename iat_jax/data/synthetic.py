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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
import zlib

from absl import app
from absl import flags
from absl import logging
import numpy as np

from iat_jax.data import dataset
from iat_jax.data import hashing
from iat_jax.data import history
from iat_jax.data import schema as schema_lib

VERSION = "synthetic-v2"  # v2: conversion label delay, action 4
EPOCH = 1_700_000_000  # 2023-11-14 22:13:20 UTC.
_LATENT = 16
_ROWS_PER_BLOCK = 32_768  # Target rows of one user block.
_SLAB_CELLS = 1 << 21  # Generic-field cells generated at once.
_NOISE_BINS = 1024  # Random-index bins of a request-noise field (2^k).
_CROSS_BINS = 64  # Noise bins of a cross field (2^k, >= its multiplier).
_ITEM_BUCKETS = 4096  # Item buckets the item-attribute fields are defined on.
_SLATE_NEW = 0.45
_DRIFT = 0.8

# name -> raw cardinality (None: depends on the knobs, see `_Tables`).
_NAMED_CARD = {
    "item_id": None,
    "category": None,
    "surface": 6,
    "device": 4,
    "campaign": 16,
    "position": 10,
    "hour": 24,
    "age": 8,
    "gender": 3,
    "city": 200,
    "seller": None,
    "brand": None,
    "price_bucket": 20,
    "weekday": 7,
    "network": 5,
    "os": 4,
    "segment": 16
}
_NAMED = tuple(_NAMED_CARD)
# Context fields with a hidden per-user preference: (name, cardinality).
_SENSITIVE = (("surface", 6), ("device", 4), ("campaign", 16), ("hour6", 4))
_PREF_SIZE = sum(c for _, c in _SENSITIVE)
_PREF_OFFSET = np.cumsum([0] + [c for _, c in _SENSITIVE])[:-1]
_DENSE = ("price_z", "discount", "relevance", "item_pop", "hour_sin", "hour_cos",
          "log_position", "tenure")
# Request-context bases of the generic cross fields.
_CROSS_BASES = ("surface", "device", "campaign", "position", "hour", "network")
_GENERIC_KINDS = ("req_noise", "req_noise", "req_cross", "item_attr")  # Mix.
# Fields of the 'user' and 'item' groups (schema.GROUPS; by name, generic kind
# or dense source, see `make_schema`); all others are 'context'.
_USER, _ITEM = ("age", "gender", "city", "segment",
                "tenure"), ("item_id", "category", "seller", "brand", "price_bucket",
                            "item_tags", "price_z", "discount", "item_pop", "item_attr")
_NUM_TAGS = 8  # Tags per category.
_NUM_TERMS = 500  # General query-term pool.


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

  def validate(self) -> None:
    """Raises ValueError on knobs the generator cannot honour."""
    if self.seed < 0:
      raise ValueError("seed must be >= 0")
    if min(self.num_users, self.num_instances, self.num_tasks, self.num_categories,
           self.days, self.seq_len) < 1:
      raise ValueError(f"knobs must be positive: {self}")
    if self.num_categorical < 2:
      raise ValueError("num_categorical must be >= 2 (item_id and category)")
    if self.num_dense < 0:
      raise ValueError("num_dense must be >= 0")
    if self.num_items < self.num_categories:
      raise ValueError("num_items must be >= num_categories")
    if self.vocab_size < 2:
      raise ValueError("vocab_size must be >= 2")
    if self.conversion_delay < 0:
      raise ValueError("conversion_delay must be >= 0")
    if self.days > 40_000:  # Relative times are packed into 32 bits.
      raise ValueError("days must be <= 40000")

  def fingerprint(self) -> str:
    """sha256 of the knobs and the generator version (not of chunk_rows)."""
    blob = json.dumps({"version": VERSION, **dataclasses.asdict(self)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()

  def users_per_block(self) -> int:
    """Users per random-stream block (about _ROWS_PER_BLOCK rows each)."""
    mean = max(self.num_instances / self.num_users, 1.0)
    return int(np.clip(round(_ROWS_PER_BLOCK / mean), 1, 1 << 16))


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def _zipf(n: int, a: float) -> np.ndarray:
  p = 1.0 / (np.arange(n) + 1.0)**a
  return p / p.sum()


def _salt(seed: int, name: str) -> int:
  return int(hashing.mix(np.uint64(seed) ^ np.uint64(zlib.crc32(name.encode()))))


def _cdf_sample(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
  """Inverse-CDF sampling: cdf [k] ending at 1, u [...] in [0, 1) -> [...]."""
  return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


class _Tables:
  """Everything shared by all user blocks (items, effects, hash tables)."""

  def __init__(self, cfg: Config):
    self.cfg = cfg
    c, i, k = cfg.num_categories, cfg.num_items, _LATENT
    rng = np.random.default_rng([cfg.seed, 0])
    self.cat_mean = rng.standard_normal((c, k))
    item_cat = np.concatenate([np.arange(c), rng.choice(c, i - c, p=_zipf(c, 0.7))])
    self.item_cat = rng.permutation(item_cat)
    self.item_vec = (self.cat_mean[self.item_cat] + 0.7 * rng.standard_normal(
        (i, k))) / np.sqrt(1.49)
    self.item_bias = 0.5 * rng.standard_normal(i)
    self.item_pop = rng.permutation(_zipf(i, 0.9))
    cat_logprice = 3.0 + rng.standard_normal(c)
    self.item_logprice = cat_logprice[self.item_cat] + 0.5 * rng.standard_normal(i)
    self.raw_card = dict(_NAMED_CARD,
                         item_id=i,
                         category=c,
                         seller=i // 20 + 1,
                         brand=i // 50 + 1)
    self.item_seller = rng.integers(0, self.raw_card["seller"], i)
    self.item_brand = rng.integers(0, self.raw_card["brand"], i)
    ntags = rng.integers(1, 5, i)
    tag_off = np.argsort(rng.random((i, _NUM_TAGS)), axis=1)[:, :4]
    tag_raw = self.item_cat[:, None] * _NUM_TAGS + tag_off
    tag_ids = hashing.hash_to_vocab(tag_raw, cfg.vocab_size,
                                    _salt(cfg.seed, "item_tags"))
    self.item_tags = np.where(np.arange(4) < ntags[:, None], tag_ids, 0)
    self.term_table = hashing.hash_to_vocab(np.arange(c * _NUM_TAGS + _NUM_TERMS),
                                            cfg.vocab_size,
                                            _salt(cfg.seed, "query_terms"))
    # Popularity-weighted item sampling within a category.
    self.item_order = np.argsort(self.item_cat, kind="stable")
    pop_sorted = self.item_pop[self.item_order]
    self.pop_cum = np.cumsum(pop_sorted)
    self.cat_start = np.searchsorted(self.item_cat[self.item_order], np.arange(c))
    self.cat_end = np.append(self.cat_start[1:], i)
    self.cat_cum0 = self.pop_cum[self.cat_start] - pop_sorted[self.cat_start]
    self.cat_total = self.pop_cum[self.cat_end - 1] - self.cat_cum0
    self.cat_cdf = np.cumsum(self.cat_total) / self.cat_total.sum()
    # Global effects and marginal distributions.
    self.g_surface = 0.3 * rng.standard_normal(6)
    self.g_device = 0.2 * rng.standard_normal(4)
    self.g_campaign = 0.3 * rng.standard_normal(16)
    self.g_age = 0.2 * rng.standard_normal(8)
    hours = np.arange(24)
    self.g_hour = 0.2 * np.cos(2 * np.pi * (hours - 20) / 24)
    self.g_pos = -0.12 * np.arange(10)
    self.hour_cdf = np.cumsum(
        _normalize(0.3 + np.exp(np.cos(2 * np.pi * (hours - 20) / 24))))
    self.age_cdf = np.cumsum(_zipf(8, 0.3))
    self.city_cdf = np.cumsum(_zipf(200, 1.0))
    self.campaign_cdf = np.cumsum(_zipf(16, 0.8))
    self.network_cdf = np.cumsum(_zipf(5, 1.2))
    # Hash tables of the named fields (item_id and category are not hashed).
    self.table = {
        name:
            hashing.hash_to_vocab(np.arange(self.raw_card[name]), cfg.vocab_size,
                                  _salt(cfg.seed, name)) for name in _NAMED[2:]
    }
    self.table["item_id"] = np.arange(1, i + 1, dtype=np.int32)
    self.table["category"] = np.arange(1, c + 1, dtype=np.int32)
    self._generic_fields(cfg)
    self._extra_tasks(cfg)

  def _generic_fields(self, cfg: Config) -> None:
    """Specs and lookup tables of the generic categorical and dense fields.

    Generic field values are lookups `gen_table[offset_f + index]`, with the
    index a cheap function of per-row random bits, a request-context field or
    the item's attribute bucket (see `_gen_generic`).
    """
    rng = np.random.default_rng([cfg.seed, 3])
    g = max(cfg.num_categorical - len(_NAMED), 0)
    counts = np.bincount(np.arange(g) % len(_GENERIC_KINDS),
                         minlength=len(_GENERIC_KINDS))
    self.gen_noise = int(counts[0] + counts[1])
    self.gen_cross = int(counts[2])
    self.gen_item = int(counts[3])
    names, tables = [], []
    col = len(_NAMED)
    for _ in range(self.gen_noise):  # A skewed value over card raw values.
      card = int(np.exp(rng.uniform(np.log(2), np.log(_NOISE_BINS))))
      skew = rng.uniform(1.0, 3.0)
      bins = (np.arange(_NOISE_BINS) + 0.5) / _NOISE_BINS
      names.append(f"req_noise_{col:04d}")
      tables.append((card * bins**skew).astype(np.int64))
      col += 1
    # Cross fields, grouped by their base field: base * m + U[0, m).
    self.cross_src = np.arange(self.gen_cross) * len(_CROSS_BASES) // max(
        self.gen_cross, 1)
    for j in range(self.gen_cross):
      base_card = self.raw_card[_CROSS_BASES[self.cross_src[j]]]
      m = int(rng.integers(1, _CROSS_BINS + 1))
      names.append(f"req_cross_{col:04d}")
      tables.append((np.arange(base_card)[:, None] * m +
                     np.arange(_CROSS_BINS) * m // _CROSS_BINS).reshape(-1))
      col += 1
    # Item attributes: a random value per item bucket.
    self.item_bucket = rng.integers(0, _ITEM_BUCKETS, cfg.num_items, dtype=np.uint32)
    for _ in range(self.gen_item):
      card = int(np.exp(rng.uniform(np.log(2), np.log(1000))))
      names.append(f"item_attr_{col:04d}")
      tables.append(rng.integers(0, card, _ITEM_BUCKETS))
      col += 1
    self.gen_names = tuple(names)
    sizes = np.array([len(x) for x in tables], dtype=np.int64)
    self.gen_offset = np.concatenate([[0], np.cumsum(sizes)])[:-1].astype(np.uint32)
    self.gen_table = np.concatenate([
        hashing.hash_to_vocab(x, cfg.vocab_size, _salt(cfg.seed, name))
        for x, name in zip(tables, names)
    ] or [np.zeros(1, np.int32)])
    gd = max(cfg.num_dense - len(_DENSE), 0)
    self.dense_src = rng.integers(0, len(_DENSE), gd)
    self.dense_w = rng.uniform(0.0, 1.0, gd).astype(np.float32)

  def _extra_tasks(self, cfg: Config) -> None:
    rng = np.random.default_rng([cfg.seed, 4])
    extra = max(cfg.num_tasks - 2, 0)
    self.task_bias = rng.normal(-0.5, 0.5, extra)
    self.task_w = rng.normal(0.0, 0.7, (extra, 3))


def _normalize(p: np.ndarray) -> np.ndarray:
  return p / p.sum()


def make_schema(cfg: Config, tables: _Tables | None = None) -> schema_lib.Schema:
  """The schema of the dataset `build` writes for `cfg` (writer fields 0)."""
  tables = tables or _Tables(cfg)
  named = _NAMED[:cfg.num_categorical]
  cats = [schema_lib.Categorical(n, cfg.vocab_size) for n in named]
  cats[0] = schema_lib.Categorical("item_id", cfg.num_items + 1)
  cats[1] = schema_lib.Categorical("category", cfg.num_categories + 1)
  cats += [schema_lib.Categorical(n, cfg.vocab_size) for n in tables.gen_names]
  dense = _DENSE[:cfg.num_dense] + tuple(
      f"dense_{k:03d}" for k in range(len(_DENSE), cfg.num_dense))
  tasks = ("click", "conversion") + tuple(f"task_{k}" for k in range(2, cfg.num_tasks))
  multi_hot = (schema_lib.MultiHot("item_tags", cfg.vocab_size, 4),
               schema_lib.MultiHot("query_terms", cfg.vocab_size, 4))
  # Each field's group follows its name, a generic field's its kind, a noisy
  # dense copy's its source.
  keys = (named + tuple(n.rsplit("_", 1)[0] for n in tables.gen_names) +
          tuple(f.name for f in multi_hot) + _DENSE[:cfg.num_dense] +
          tuple(_DENSE[k] for k in tables.dense_src))
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


def _segment_starts(lu: np.ndarray) -> np.ndarray:
  """Bool [n]: True where a new run of equal values starts."""
  new = np.ones(len(lu), dtype=bool)
  new[1:] = lu[1:] != lu[:-1]
  return new


def _gen_block(t: _Tables, block: int, users: np.ndarray, counts: np.ndarray, row0: int,
               out: dict[str, np.ndarray]) -> None:
  """Generates the rows of one user block into `out` (views [n, ...]).

  Args:
    t: shared tables.
    block: block number (keys the random streams).
    users: int64 [b] global user indices of the block.
    counts: int64 [b] rows per user (> 0).
    row0: global row number of the block's first row.
    out: column name -> array [n, ...] to fill, n = counts.sum().
  """
  cfg = t.cfg
  rng = np.random.default_rng([cfg.seed, 10, block])
  b, n, k = len(users), int(counts.sum()), _LATENT
  span = cfg.days * 86400
  lu = np.repeat(np.arange(b), counts)
  # Per-user latent state.
  z0 = rng.standard_normal((b, k))
  pref = 0.45 * rng.standard_normal((b, _PREF_SIZE))
  price_sens = 0.6 + 0.4 * rng.standard_normal(b)
  ubias = 0.4 * rng.standard_normal(b)
  late = rng.random(b) < 0.3
  start_day = np.where(late, rng.integers(0, cfg.days // 2 + 1, b), 0)
  fav_surface = rng.integers(0, 6, b)
  main_device = rng.integers(0, 4, b)
  age = _cdf_sample(t.age_cdf, rng.random(b))
  gender = rng.integers(0, 3, b)
  city = _cdf_sample(t.city_cdf, rng.random(b))
  segment = rng.integers(0, 16, b)
  # Requests (slates) and their sorted times.
  new_req = rng.random(n) < _SLATE_NEW
  new_req |= _segment_starts(lu)
  req_of_row = np.cumsum(new_req) - 1
  ru = lu[new_req]
  r = len(ru)
  days_left = cfg.days - start_day[ru]
  day = start_day[ru] + (rng.random(r) * days_left).astype(np.int64)
  r_hour = _cdf_sample(t.hour_cdf, rng.random(r))
  ts_rel = day * 86400 + r_hour * 3600 + rng.integers(0, 3600, r)
  ts_rel = np.sort((ru.astype(np.int64) << 32) | ts_rel) & 0xFFFFFFFF
  r_surface = np.where(rng.random(r) < 0.4, fav_surface[ru], rng.integers(0, 6, r))
  r_device = np.where(rng.random(r) < 0.6, main_device[ru], rng.integers(0, 4, r))
  r_os = (r_device + (rng.random(r) < 0.1) * rng.integers(1, 4, r)) % 4
  r_network = _cdf_sample(t.network_cdf, rng.random(r))
  # Interest drift: Brownian motion sampled at the request times.
  first = _segment_starts(ru)
  prev = np.where(first, start_day[ru] * 86400, np.roll(ts_rel, 1))
  incr = (_DRIFT * np.sqrt((ts_rel - prev) / span))[:, None] * (rng.standard_normal(
      (r, k)))
  cs = np.cumsum(incr, axis=0)
  base = (cs - incr)[first]  # Cumulative sum before each user's first request.
  z_req = z0[ru] + cs - base[np.cumsum(first) - 1]
  # The upstream recommender picks a category (inverse CDF of each request's
  # softmax; the CDF rows are offset by the request number so that one
  # searchsorted serves all rows), then an item by popularity.
  c = cfg.num_categories
  logits = (1.5 / np.sqrt(k)) * (z_req @ t.cat_mean.T)
  cdf = np.cumsum(np.exp(logits - logits.max(axis=1, keepdims=True)), axis=1)
  cdf /= cdf[:, -1:]
  cdf += np.arange(r)[:, None]
  cat = np.searchsorted(cdf.reshape(-1), req_of_row + rng.random(n),
                        side="right") - req_of_row * c
  cat = np.clip(cat, 0, c - 1)
  explore = rng.random(n) < 0.3
  cat = np.where(explore, _cdf_sample(t.cat_cdf, rng.random(n)), cat)
  target = t.cat_cum0[cat] + rng.random(n) * t.cat_total[cat]
  pos = np.clip(np.searchsorted(t.pop_cum, target, side="right"), t.cat_start[cat],
                t.cat_end[cat] - 1)
  item = t.item_order[pos]
  # InsIDs, then the final row order (uid, ts, ins_id).
  uid = users[lu]
  ts = EPOCH + ts_rel[req_of_row]
  ins = hashing.ins_ids(uid, ts, item, row0 + np.arange(n))
  perm = np.lexsort((ins, ts, lu))
  uid, ts, ins, item, req_of_row, lu = (
      a[perm] for a in (uid, ts, ins, item, req_of_row, lu))
  z = z_req[req_of_row]
  cat = t.item_cat[item]
  # Instance context.
  position = np.minimum(np.arange(n) - history.history_end(lu, ts), 9)
  hour = (ts // 3600) % 24
  weekday = (ts // 86400 + 3) % 7  # Monday = 0.
  surface, device = r_surface[req_of_row], r_device[req_of_row]
  campaign = _cdf_sample(t.campaign_cdf, rng.random(n))
  discount = np.where(rng.random(n) < 0.3, 0.5 * rng.random(n), 0.0)
  logprice = t.item_logprice[item] + np.log1p(-discount)
  price_z = (logprice - 3.0) / 1.15
  price_bucket = np.clip(((logprice - 1.0) * 4).astype(np.int64), 0, 19)
  # Labels.
  aff = np.einsum("nk,nk->n", z, t.item_vec[item]) / np.sqrt(k)
  ctx_vals = (surface, device, campaign, hour // 6)
  pref_u = sum(pref[lu, off + v] for off, v in zip(_PREF_OFFSET, ctx_vals))
  logit_click = (-2.5 + aff + 0.5 * t.item_bias[item] + 0.8 * pref_u + ubias[lu] +
                 t.g_surface[surface] + t.g_device[device] + t.g_campaign[campaign] +
                 t.g_hour[hour] + t.g_pos[position] + t.g_age[age[lu]])
  logit_conv = (-2.4 + 0.6 * aff + 1.2 * pref_u - price_sens[lu] * price_z +
                0.5 * ubias[lu] + 1.6 * discount)
  click = rng.random(n) < _sigmoid(logit_click)
  conv = click & (rng.random(n) < _sigmoid(logit_conv))
  # Query terms: mostly from the shown item's category.
  nterms = np.where(rng.random(n) < 0.4, 0, rng.integers(1, 5, n))
  from_cat = rng.random((n, 4)) < 0.6
  term_raw = np.where(
      from_cat, cat[:, None] * _NUM_TAGS + rng.integers(0, _NUM_TAGS, (n, 4)),
      cfg.num_categories * _NUM_TAGS + rng.integers(0, _NUM_TERMS, (n, 4)))
  relevance = (aff + rng.standard_normal(n)) / np.sqrt(2.0)
  # Write the columns.
  out["uid"][:] = uid
  out["ts"][:] = ts
  out["ins_id"][:] = ins
  out["item"][:] = item + 1
  out["category"][:] = cat + 1
  out["action"][:] = 1 + click + conv
  if "action_now" in out:  # the action while the conversion is unknown
    out["action_now"][:] = np.where(click, 4, 1)
  out["mh_item_tags"][:] = t.item_tags[item]
  out["mh_query_terms"][:] = np.where(
      np.arange(4) < nterms[:, None], t.term_table[term_raw], 0)
  raw = {
      "item_id": item,
      "category": cat,
      "surface": surface,
      "device": device,
      "campaign": campaign,
      "position": position,
      "hour": hour,
      "age": age[lu],
      "gender": gender[lu],
      "city": city[lu],
      "seller": t.item_seller[item],
      "brand": t.item_brand[item],
      "price_bucket": price_bucket,
      "weekday": weekday,
      "network": r_network[req_of_row],
      "os": r_os[req_of_row],
      "segment": segment[lu]
  }
  f_named = min(cfg.num_categorical, len(_NAMED))
  for f, name in enumerate(_NAMED[:f_named]):
    out["cat"][:, f] = t.table[name][raw[name]]
  _gen_generic(t, block, out["cat"][:, f_named:], item, raw)
  tenure = (ts - EPOCH - start_day[lu] * 86400) / span
  dense = np.stack([
      price_z, 2.0 * discount, relevance,
      np.log(t.item_pop[item] * cfg.num_items) / 2.0,
      np.sin(2 * np.pi * hour / 24),
      np.cos(2 * np.pi * hour / 24),
      np.log1p(position), tenure
  ],
                   axis=1).astype(np.float32)
  nd = min(cfg.num_dense, len(_DENSE))
  out["dense"][:, :nd] = dense[:, :nd]
  if cfg.num_dense > nd:
    drng = np.random.default_rng([cfg.seed, 12, block])
    w = t.dense_w
    out["dense"][:, nd:] = (w * dense[:, t.dense_src] +
                            np.sqrt(1 - w * w) * drng.standard_normal(
                                (n, len(w)), np.float32))
  labels = [click, conv]
  if cfg.num_tasks > 2:
    trng = np.random.default_rng([cfg.seed, 13, block])
    feats = np.stack([aff, pref_u, -price_sens[lu] * price_z], axis=1)
    extra = (t.task_bias + feats @ t.task_w.T + 0.5 * (logit_conv + 2.4)[:, None])
    labels += list((click[:, None] & (trng.random(extra.shape) < _sigmoid(extra))).T)
  out["labels"][:] = np.stack(labels[:cfg.num_tasks], axis=1)


def _gen_generic(t: _Tables, block: int, out: np.ndarray, item: np.ndarray,
                 raw: dict[str, np.ndarray]) -> None:
  """Fills the generic categorical fields: out int32 [n, G], in row slabs."""
  n, g = out.shape
  if g == 0:
    return
  rng = np.random.default_rng([t.cfg.seed, 11, block])
  nn, nc = t.gen_noise, t.gen_cross
  nr = nn + nc  # Fields that draw random bits.
  ib = t.item_bucket[item]
  src_bounds = np.searchsorted(t.cross_src, np.arange(len(_CROSS_BASES) + 1))
  slab = max(1, _SLAB_CELLS // g)
  for lo in range(0, n, slab):
    hi = min(lo + slab, n)
    o = out[lo:hi]
    bits = rng.bit_generator.random_raw(-(-(hi - lo) * nr // 4))
    bits = bits.view(np.uint16)[:(hi - lo) * nr].reshape(hi - lo, nr)
    if nn:
      idx = (bits[:, :nn] & np.uint16(_NOISE_BINS - 1)) + t.gen_offset[:nn]
      np.take(t.gen_table, idx, out=o[:, :nn], mode="clip")
    for s, name in enumerate(_CROSS_BASES):
      a, b = nn + src_bounds[s], nn + src_bounds[s + 1]
      if b > a:
        base = (raw[name][lo:hi] * _CROSS_BINS).astype(np.uint32)
        idx = (bits[:, a:b] & np.uint16(_CROSS_BINS - 1)) + t.gen_offset[a:b]
        idx += base[:, None]
        np.take(t.gen_table, idx, out=o[:, a:b], mode="clip")
    if g > nr:
      idx = ib[lo:hi, None] + t.gen_offset[nr:]
      np.take(t.gen_table, idx, out=o[:, nr:], mode="clip")


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
  t0 = time.time()
  tables = _Tables(cfg)
  schema = make_schema(cfg, tables)
  shapes = dataset.row_shapes(schema)
  counts = user_counts(cfg)
  upb = cfg.users_per_block()
  nblocks = -(-cfg.num_users // upb)
  block_rows = np.add.reduceat(counts, np.arange(0, cfg.num_users, upb))
  done, next_log = 0, 0.0
  with dataset.Writer(out_dir, schema, cfg.num_instances) as writer:
    blk = 0
    while blk < nblocks:
      end, rows = blk + 1, int(block_rows[blk])
      while end < nblocks and rows + block_rows[end] <= chunk_rows:
        rows += int(block_rows[end])
        end += 1
      chunk = {
          name: np.empty((rows,) + shape, dtype)
          for name, (shape, dtype) in shapes.items()
      }
      lo = 0
      for b in range(blk, end):
        users = np.arange(b * upb, min((b + 1) * upb, cfg.num_users))
        c = counts[users]
        users, c = users[c > 0], c[c > 0]
        hi = lo + int(c.sum())
        if hi > lo:
          _gen_block(tables, b, users, c, done + lo, {
              name: col[lo:hi] for name, col in chunk.items()
          })
        lo = hi
      writer.append(chunk)
      del chunk
      done += rows
      blk = end
      elapsed = time.time() - t0
      if elapsed >= next_log or done == cfg.num_instances:
        rate = done / max(elapsed, 1e-9)
        logging.info("synthetic: %d / %d instances (%.0f /s, ETA %.0f s)", done,
                     cfg.num_instances, rate,
                     (cfg.num_instances - done) / max(rate, 1e-9))
        next_log = elapsed + 10.0
  logging.info("synthetic: built %s in %.1f s", out_dir, time.time() - t0)
  return out_dir


_KNOBS = tuple(f.name for f in dataclasses.fields(Config))


def main(argv) -> None:
  """absl main: builds the dataset the flags describe (see `run`)."""
  del argv
  fl = flags.FLAGS
  build(fl.out, chunk_rows=fl.chunk_rows, **{name: getattr(fl, name) for name in _KNOBS})


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
