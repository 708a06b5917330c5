"""The world of the synthetic generator: everything all user blocks share.

Items (category, latent vector, popularity, quality, price, seller, brand,
tags), the global effects of context values and their marginal distributions,
the hash tables of the named fields, the specs and lookup tables of the
generic fields and the weights of the extra tasks: `World(cfg)`, drawn from
the seed alone (see the generative process in `iat_jax.data.synthetic`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING
import zlib

import numpy as np

from iat_jax.data import hashing

if TYPE_CHECKING:
  from iat_jax.data import synthetic

EPOCH = 1_700_000_000  # 2023-11-14 22:13:20 UTC.
# Width of the latent interest and item vectors.
LATENT = 16
NOISE_BINS = 1024  # Random-index bins of a request-noise field (2^k).
CROSS_BINS = 64  # Noise bins of a cross field (2^k, >= its multiplier).
_ITEM_BUCKETS = 4096  # Item buckets the item-attribute fields are defined on.

# name -> raw cardinality (None: depends on the knobs, see `World`).
NAMED_CARD = {
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
# The named categorical fields and the named dense fields, in column order.
NAMED = tuple(NAMED_CARD)
DENSE = ("price_z", "discount", "relevance", "item_pop", "hour_sin", "hour_cos",
         "log_position", "tenure")
# Request-context bases of the generic cross fields.
CROSS_BASES = ("surface", "device", "campaign", "position", "hour", "network")
_GENERIC_KINDS = ("req_noise", "req_noise", "req_cross", "item_attr")  # Mix.
NUM_TAGS = 8  # Tags per category.
NUM_TERMS = 500  # General query-term pool.


def _zipf(n: int, a: float) -> np.ndarray:
  p = 1.0 / (np.arange(n) + 1.0)**a
  return p / p.sum()


def _salt(seed: int, name: str) -> int:
  return int(hashing.mix(np.uint64(seed) ^ np.uint64(zlib.crc32(name.encode()))))


def _normalize(p: np.ndarray) -> np.ndarray:
  return p / p.sum()


class World:
  """Everything shared by all user blocks (items, effects, hash tables)."""

  def __init__(self, cfg: synthetic.Config):
    self.cfg = cfg
    c, i, k = cfg.num_categories, cfg.num_items, LATENT
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
    self.raw_card = dict(NAMED_CARD,
                         item_id=i,
                         category=c,
                         seller=i // 20 + 1,
                         brand=i // 50 + 1)
    self.item_seller = rng.integers(0, self.raw_card["seller"], i)
    self.item_brand = rng.integers(0, self.raw_card["brand"], i)
    ntags = rng.integers(1, 5, i)
    tag_off = np.argsort(rng.random((i, NUM_TAGS)), axis=1)[:, :4]
    tag_raw = self.item_cat[:, None] * NUM_TAGS + tag_off
    tag_ids = hashing.hash_to_vocab(tag_raw, cfg.vocab_size,
                                    _salt(cfg.seed, "item_tags"))
    self.item_tags = np.where(np.arange(4) < ntags[:, None], tag_ids, 0)
    self.term_table = hashing.hash_to_vocab(np.arange(c * NUM_TAGS + NUM_TERMS),
                                            cfg.vocab_size,
                                            _salt(cfg.seed, "query_terms"))
    self._item_sampling()
    self._global_effects(rng)
    # Hash tables of the named fields (item_id and category are not hashed).
    self.table = {
        name:
            hashing.hash_to_vocab(np.arange(self.raw_card[name]), cfg.vocab_size,
                                  _salt(cfg.seed, name)) for name in NAMED[2:]
    }
    self.table["item_id"] = np.arange(1, i + 1, dtype=np.int32)
    self.table["category"] = np.arange(1, c + 1, dtype=np.int32)
    self._generic_fields(cfg)
    self._extra_tasks(cfg)

  def _item_sampling(self) -> None:
    """Cumulative popularities for sampling an item within a category."""
    c, i = self.cfg.num_categories, self.cfg.num_items
    self.item_order = np.argsort(self.item_cat, kind="stable")
    pop_sorted = self.item_pop[self.item_order]
    self.pop_cum = np.cumsum(pop_sorted)
    self.cat_start = np.searchsorted(self.item_cat[self.item_order], np.arange(c))
    self.cat_end = np.append(self.cat_start[1:], i)
    self.cat_cum0 = self.pop_cum[self.cat_start] - pop_sorted[self.cat_start]
    self.cat_total = self.pop_cum[self.cat_end - 1] - self.cat_cum0
    self.cat_cdf = np.cumsum(self.cat_total) / self.cat_total.sum()

  def _global_effects(self, rng: np.random.Generator) -> None:
    """Global label effects of context values and their marginal distributions."""
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

  def _generic_fields(self, cfg: synthetic.Config) -> None:
    """Specs and lookup tables of the generic categorical and dense fields.

    Generic field values are lookups `gen_table[offset_f + index]`, with the
    index a cheap function of per-row random bits, a request-context field or
    the item's attribute bucket (see `_gen_generic`).
    """
    rng = np.random.default_rng([cfg.seed, 3])
    g = max(cfg.num_categorical - len(NAMED), 0)
    counts = np.bincount(np.arange(g) % len(_GENERIC_KINDS),
                         minlength=len(_GENERIC_KINDS))
    self.gen_noise = int(counts[0] + counts[1])
    self.gen_cross = int(counts[2])
    self.gen_item = int(counts[3])
    names, tables = [], []
    col = len(NAMED)
    for _ in range(self.gen_noise):  # A skewed value over card raw values.
      card = int(np.exp(rng.uniform(np.log(2), np.log(NOISE_BINS))))
      skew = rng.uniform(1.0, 3.0)
      bins = (np.arange(NOISE_BINS) + 0.5) / NOISE_BINS
      names.append(f"req_noise_{col:04d}")
      tables.append((card * bins**skew).astype(np.int64))
      col += 1
    # Cross fields, grouped by their base field: base * m + U[0, m).
    self.cross_src = np.arange(self.gen_cross) * len(CROSS_BASES) // max(
        self.gen_cross, 1)
    for j in range(self.gen_cross):
      base_card = self.raw_card[CROSS_BASES[self.cross_src[j]]]
      m = int(rng.integers(1, CROSS_BINS + 1))
      names.append(f"req_cross_{col:04d}")
      tables.append((np.arange(base_card)[:, None] * m +
                     np.arange(CROSS_BINS) * m // CROSS_BINS).reshape(-1))
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
    gd = max(cfg.num_dense - len(DENSE), 0)
    self.dense_src = rng.integers(0, len(DENSE), gd)
    self.dense_w = rng.uniform(0.0, 1.0, gd).astype(np.float32)

  def _extra_tasks(self, cfg: synthetic.Config) -> None:
    rng = np.random.default_rng([cfg.seed, 4])
    extra = max(cfg.num_tasks - 2, 0)
    self.task_bias = rng.normal(-0.5, 0.5, extra)
    self.task_w = rng.normal(0.0, 0.7, (extra, 3))
