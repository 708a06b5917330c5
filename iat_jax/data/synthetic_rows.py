"""The rows of one user block of the synthetic generator: `gen_block`.

Each step draws from the block's random streams in a fixed order (the
generative process in `iat_jax.data.synthetic`): users, their requests, the
items shown, the instance context, the labels, the query terms and the
relevance, then the generic categorical fields and the noisy dense copies
from streams of their own.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from iat_jax.data import hashing
from iat_jax.data import history
from iat_jax.data import synthetic_world as world_lib

_SLAB_CELLS = 1 << 21  # Generic-field cells generated at once.
_SLATE_NEW = 0.45  # Probability that an instance starts a new request.
_DRIFT = 0.8  # Scale of the interest's Brownian motion over the whole span.
# Context fields with a hidden per-user preference: (name, cardinality).
_SENSITIVE = (("surface", 6), ("device", 4), ("campaign", 16), ("hour6", 4))
_PREF_SIZE = sum(c for _, c in _SENSITIVE)
_PREF_OFFSET = np.cumsum([0] + [c for _, c in _SENSITIVE])[:-1]


def _sigmoid(x: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-x))


def _cdf_sample(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
  """Inverse-CDF sampling: cdf [k] ending at 1, u [...] in [0, 1) -> [...]."""
  return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def _segment_starts(lu: np.ndarray) -> np.ndarray:
  """Bool [n]: True where a new run of equal values starts."""
  new = np.ones(len(lu), dtype=bool)
  new[1:] = lu[1:] != lu[:-1]
  return new


@dataclasses.dataclass(frozen=True)
class _Users:
  """The b users of a block: latent state and profile (`iat_jax.data.synthetic`)."""
  z0: np.ndarray  # float64 [b, LATENT]: interest at the start
  pref: np.ndarray  # float64 [b, _PREF_SIZE]: hidden context preference
  price_sens: np.ndarray  # float64 [b]
  bias: np.ndarray  # float64 [b]: click bias
  start_day: np.ndarray  # int64 [b]: first active day
  fav_surface: np.ndarray  # int64 [b]
  main_device: np.ndarray  # int64 [b]
  age: np.ndarray  # int64 [b]; age, gender, city, segment: raw profile values
  gender: np.ndarray
  city: np.ndarray
  segment: np.ndarray


def _draw_users(t: world_lib.World, rng: np.random.Generator, b: int) -> _Users:
  """The first draws of a block's stream: its b users."""
  z0 = rng.standard_normal((b, world_lib.LATENT))
  pref = 0.45 * rng.standard_normal((b, _PREF_SIZE))
  price_sens = 0.6 + 0.4 * rng.standard_normal(b)
  bias = 0.4 * rng.standard_normal(b)
  late = rng.random(b) < 0.3
  start_day = np.where(late, rng.integers(0, t.cfg.days // 2 + 1, b), 0)
  # Keyword arguments are evaluated in order: the draws below keep theirs.
  return _Users(z0=z0,
                pref=pref,
                price_sens=price_sens,
                bias=bias,
                start_day=start_day,
                fav_surface=rng.integers(0, 6, b),
                main_device=rng.integers(0, 4, b),
                age=_cdf_sample(t.age_cdf, rng.random(b)),
                gender=rng.integers(0, 3, b),
                city=_cdf_sample(t.city_cdf, rng.random(b)),
                segment=rng.integers(0, 16, b))


@dataclasses.dataclass(frozen=True)
class _Requests:
  """The r requests (slates) of a block, sorted by (user, time)."""
  of_row: np.ndarray  # int64 [n]: request of each row (rows in generation order)
  ts_rel: np.ndarray  # int64 [r]: seconds after world_lib.EPOCH
  surface: np.ndarray  # int64 [r]; surface, device, os, network: raw values
  device: np.ndarray
  os: np.ndarray
  network: np.ndarray
  z: np.ndarray  # float64 [r, LATENT]: the user's interest at the request


def _draw_requests(t: world_lib.World, rng: np.random.Generator, u: _Users,
                   lu: np.ndarray) -> _Requests:
  """Groups a block's rows (block-local users `lu`, int64 [n]) into requests."""
  new_req = rng.random(len(lu)) < _SLATE_NEW
  new_req |= _segment_starts(lu)
  ru = lu[new_req]
  r = len(ru)
  days_left = t.cfg.days - u.start_day[ru]
  day = u.start_day[ru] + (rng.random(r) * days_left).astype(np.int64)
  r_hour = _cdf_sample(t.hour_cdf, rng.random(r))
  ts_rel = day * 86400 + r_hour * 3600 + rng.integers(0, 3600, r)
  ts_rel = np.sort((ru.astype(np.int64) << 32) | ts_rel) & 0xFFFFFFFF
  surface = np.where(rng.random(r) < 0.4, u.fav_surface[ru], rng.integers(0, 6, r))
  device = np.where(rng.random(r) < 0.6, u.main_device[ru], rng.integers(0, 4, r))
  # Keyword arguments are evaluated in order: the draws below keep theirs.
  return _Requests(of_row=np.cumsum(new_req) - 1,
                   ts_rel=ts_rel,
                   surface=surface,
                   device=device,
                   os=(device + (rng.random(r) < 0.1) * rng.integers(1, 4, r)) % 4,
                   network=_cdf_sample(t.network_cdf, rng.random(r)),
                   z=_interest(t, rng, u, ru, ts_rel))


def _interest(t: world_lib.World, rng: np.random.Generator, u: _Users, ru: np.ndarray,
              ts_rel: np.ndarray) -> np.ndarray:
  """Interest drift: each user's Brownian motion from z0 at its first day,
  sampled at its requests (user ru, int64 [r]; time ts_rel): float64 [r, LATENT]."""
  first = _segment_starts(ru)
  prev = np.where(first, u.start_day[ru] * 86400, np.roll(ts_rel, 1))
  scale = _DRIFT * np.sqrt((ts_rel - prev) / (t.cfg.days * 86400))
  incr = scale[:, None] * rng.standard_normal((len(ru), world_lib.LATENT))
  cs = np.cumsum(incr, axis=0)
  base = (cs - incr)[first]  # Cumulative sum before each user's first request.
  return u.z0[ru] + cs - base[np.cumsum(first) - 1]


def _pick_items(t: world_lib.World, rng: np.random.Generator,
                req: _Requests) -> np.ndarray:
  """The upstream recommender's item of each row: int64 [n], generation order.

  A category by the inverse CDF of its request's softmax (the CDF rows are
  offset by the request number so that one searchsorted serves all rows), or
  by popularity, then an item of it by popularity.
  """
  c, r, n = t.cfg.num_categories, len(req.ts_rel), len(req.of_row)
  logits = (1.5 / np.sqrt(world_lib.LATENT)) * (req.z @ t.cat_mean.T)
  cdf = np.cumsum(np.exp(logits - logits.max(axis=1, keepdims=True)), axis=1)
  cdf /= cdf[:, -1:]
  cdf += np.arange(r)[:, None]
  cat = np.searchsorted(cdf.reshape(-1), req.of_row + rng.random(n),
                        side="right") - req.of_row * c
  cat = np.clip(cat, 0, c - 1)
  explore = rng.random(n) < 0.3
  cat = np.where(explore, _cdf_sample(t.cat_cdf, rng.random(n)), cat)
  target = t.cat_cum0[cat] + rng.random(n) * t.cat_total[cat]
  pos = np.clip(np.searchsorted(t.pop_cum, target, side="right"), t.cat_start[cat],
                t.cat_end[cat] - 1)
  return t.item_order[pos]


def _context(
    t: world_lib.World, rng: np.random.Generator, u: _Users, req: _Requests,
    rows: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """The instance context of the rows (`rows` as `gen_block` orders them).

  Returns:
    raw: {name: int64 [n]}, the raw value of each named field (`world_lib.NAMED`).
    num: {"discount", "price_z"}: float64 [n].
  """
  lu, ts, item, of_row = rows["lu"], rows["ts"], rows["item"], rows["of_row"]
  n = len(lu)
  position = np.minimum(np.arange(n) - history.history_end(lu, ts), 9)
  campaign = _cdf_sample(t.campaign_cdf, rng.random(n))
  discount = np.where(rng.random(n) < 0.3, 0.5 * rng.random(n), 0.0)
  logprice = t.item_logprice[item] + np.log1p(-discount)
  raw = {
      "item_id": item,
      "category": t.item_cat[item],
      "surface": req.surface[of_row],
      "device": req.device[of_row],
      "campaign": campaign,
      "position": position,
      "hour": (ts // 3600) % 24,
      "age": u.age[lu],
      "gender": u.gender[lu],
      "city": u.city[lu],
      "seller": t.item_seller[item],
      "brand": t.item_brand[item],
      "price_bucket": np.clip(((logprice - 1.0) * 4).astype(np.int64), 0, 19),
      "weekday": (ts // 86400 + 3) % 7,  # Monday = 0.
      "network": req.network[of_row],
      "os": req.os[of_row],
      "segment": u.segment[lu]
  }
  return raw, {"discount": discount, "price_z": (logprice - 3.0) / 1.15}


def _outcomes(t: world_lib.World, block: int, rng: np.random.Generator, u: _Users,
              z: np.ndarray, lu: np.ndarray, raw: dict[str, np.ndarray],
              num: dict[str, np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
  """The labels of the rows (the formulas in `iat_jax.data.synthetic`).

  Args:
    t, block, rng: the world, the block and its stream.
    u: the block's users; lu: int64 [n] the row's user.
    z: float64 [n, LATENT], the user's interest at the row's request.
    raw, num: from `_context`.

  Returns:
    aff: float64 [n], the user-item affinity.
    outcomes: bool [n] each: click, conversion, then the extra tasks; the
      dataset's tasks are the first num_tasks.
  """
  n, item, hour = len(lu), raw["item_id"], raw["hour"]
  aff = np.einsum("nk,nk->n", z, t.item_vec[item]) / np.sqrt(world_lib.LATENT)
  ctx_vals = (raw["surface"], raw["device"], raw["campaign"], hour // 6)
  pref_u = sum(u.pref[lu, off + v] for off, v in zip(_PREF_OFFSET, ctx_vals))
  logit_click = (-2.5 + aff + 0.5 * t.item_bias[item] + 0.8 * pref_u + u.bias[lu] +
                 t.g_surface[raw["surface"]] + t.g_device[raw["device"]] +
                 t.g_campaign[raw["campaign"]] + t.g_hour[hour] +
                 t.g_pos[raw["position"]] + t.g_age[raw["age"]])
  logit_conv = (-2.4 + 0.6 * aff + 1.2 * pref_u - u.price_sens[lu] * num["price_z"] +
                0.5 * u.bias[lu] + 1.6 * num["discount"])
  click = rng.random(n) < _sigmoid(logit_click)
  conv = click & (rng.random(n) < _sigmoid(logit_conv))
  outcomes = [click, conv]
  if t.cfg.num_tasks > 2:
    trng = np.random.default_rng([t.cfg.seed, 13, block])
    feats = np.stack([aff, pref_u, -u.price_sens[lu] * num["price_z"]], axis=1)
    extra = (t.task_bias + feats @ t.task_w.T + 0.5 * (logit_conv + 2.4)[:, None])
    outcomes += list((click[:, None] & (trng.random(extra.shape) < _sigmoid(extra))).T)
  return aff, outcomes


def _query_terms(t: world_lib.World, rng: np.random.Generator,
                 cat: np.ndarray) -> np.ndarray:
  """Query terms, mostly from the shown item's category (cat, int64 [n]):
  int64 [n, 4], 0-padded."""
  n = len(cat)
  nterms = np.where(rng.random(n) < 0.4, 0, rng.integers(1, 5, n))
  from_cat = rng.random((n, 4)) < 0.6
  term_raw = np.where(
      from_cat,
      cat[:, None] * world_lib.NUM_TAGS + rng.integers(0, world_lib.NUM_TAGS, (n, 4)),
      t.cfg.num_categories * world_lib.NUM_TAGS +
      rng.integers(0, world_lib.NUM_TERMS, (n, 4)))
  return np.where(np.arange(4) < nterms[:, None], t.term_table[term_raw], 0)


def _named_dense(t: world_lib.World, u: _Users, rows: dict[str, np.ndarray],
                 raw: dict[str, np.ndarray], num: dict[str, np.ndarray],
                 relevance: np.ndarray) -> np.ndarray:
  """The named dense values (`world_lib.DENSE`) of the rows: float32 [n, 8].

  Args:
    t, u: the world and the block's users.
    rows, raw, num: as `gen_block` passes them to `_outcomes`.
    relevance: float64 [n], the affinity plus unit noise, scaled.
  """
  cfg, hour, position = t.cfg, raw["hour"], raw["position"]
  tenure = (rows["ts"] - world_lib.EPOCH -
            u.start_day[rows["lu"]] * 86400) / (cfg.days * 86400)
  named = np.stack([
      num["price_z"], 2.0 * num["discount"], relevance,
      np.log(t.item_pop[rows["item"]] * cfg.num_items) / 2.0,
      np.sin(2 * np.pi * hour / 24),
      np.cos(2 * np.pi * hour / 24),
      np.log1p(position), tenure
  ],
                   axis=1)
  return named.astype(np.float32)


def _gen_dense(t: world_lib.World, block: int, out: np.ndarray,
               named: np.ndarray) -> None:
  """Fills the dense fields: out float32 [n, Fd] from the named dense values
  `named` float32 [n, len(world_lib.DENSE)] (their first Fd, then noisy copies)."""
  cfg = t.cfg
  nd = min(cfg.num_dense, len(world_lib.DENSE))
  out[:, :nd] = named[:, :nd]
  if cfg.num_dense > nd:
    drng = np.random.default_rng([cfg.seed, 12, block])
    w = t.dense_w
    noise = drng.standard_normal((len(named), len(w)), np.float32)
    out[:, nd:] = w * named[:, t.dense_src] + np.sqrt(1 - w * w) * noise


def gen_block(t: world_lib.World, block: int, users: np.ndarray, counts: np.ndarray,
              row0: int, out: dict[str, np.ndarray]) -> None:
  """Generates the rows of one user block into `out` (views [n, ...]).

  Args:
    t: the world (`synthetic_world.World`).
    block: block number (keys the random streams).
    users: int64 [b] global user indices of the block.
    counts: int64 [b] rows per user (> 0).
    row0: global row number of the block's first row.
    out: column name -> array [n, ...] to fill, n = counts.sum().
  """
  cfg = t.cfg
  rng = np.random.default_rng([cfg.seed, 10, block])
  lu = np.repeat(np.arange(len(users)), counts)
  u = _draw_users(t, rng, len(users))
  req = _draw_requests(t, rng, u, lu)
  item = _pick_items(t, rng, req)
  # InsIDs, then the final row order (uid, ts, ins_id).
  uid, ts = users[lu], world_lib.EPOCH + req.ts_rel[req.of_row]
  ins = hashing.ins_ids(uid, ts, item, row0 + np.arange(len(lu)))
  perm = np.lexsort((ins, ts, lu))
  rows = {"lu": lu, "ts": ts, "item": item, "of_row": req.of_row}
  rows = {name: a[perm] for name, a in rows.items()}
  raw, num = _context(t, rng, u, req, rows)
  aff, outcomes = _outcomes(t, block, rng, u, req.z[rows["of_row"]], rows["lu"], raw,
                            num)
  item, cat, click = rows["item"], raw["category"], outcomes[0]
  out["uid"][:] = uid[perm]
  out["ts"][:] = rows["ts"]
  out["ins_id"][:] = ins[perm]
  out["item"][:] = item + 1
  out["category"][:] = cat + 1
  out["action"][:] = 1 + click + outcomes[1]
  if "action_now" in out:  # the action while the conversion is unknown
    out["action_now"][:] = np.where(click, 4, 1)
  out["mh_item_tags"][:] = t.item_tags[item]
  out["mh_query_terms"][:] = _query_terms(t, rng, cat)
  f_named = min(cfg.num_categorical, len(world_lib.NAMED))
  for f, name in enumerate(world_lib.NAMED[:f_named]):
    out["cat"][:, f] = t.table[name][raw[name]]
  _gen_generic(t, block, out["cat"][:, f_named:], item, raw)
  relevance = (aff + rng.standard_normal(len(lu))) / np.sqrt(2.0)
  _gen_dense(t, block, out["dense"], _named_dense(t, u, rows, raw, num, relevance))
  out["labels"][:] = np.stack(outcomes[:cfg.num_tasks], axis=1)


def _gen_generic(t: world_lib.World, block: int, out: np.ndarray, item: np.ndarray,
                 raw: dict[str, np.ndarray]) -> None:
  """Fills the generic categorical fields: out int32 [n, G], in row slabs."""
  n, g = out.shape
  if g == 0:
    return
  rng = np.random.default_rng([t.cfg.seed, 11, block])
  nn, nc = t.gen_noise, t.gen_cross
  nr = nn + nc  # Fields that draw random bits.
  ib = t.item_bucket[item]
  src_bounds = np.searchsorted(t.cross_src, np.arange(len(world_lib.CROSS_BASES) + 1))
  slab = max(1, _SLAB_CELLS // g)
  for lo in range(0, n, slab):
    hi = min(lo + slab, n)
    o = out[lo:hi]
    bits = rng.bit_generator.random_raw(-(-(hi - lo) * nr // 4))
    bits = bits.view(np.uint16)[:(hi - lo) * nr].reshape(hi - lo, nr)
    if nn:
      idx = (bits[:, :nn] & np.uint16(world_lib.NOISE_BINS - 1)) + t.gen_offset[:nn]
      np.take(t.gen_table, idx, out=o[:, :nn], mode="clip")
    for s, name in enumerate(world_lib.CROSS_BASES):
      a, b = nn + src_bounds[s], nn + src_bounds[s + 1]
      if b > a:
        base = (raw[name][lo:hi] * world_lib.CROSS_BINS).astype(np.uint32)
        idx = (bits[:, a:b] & np.uint16(world_lib.CROSS_BINS - 1)) + t.gen_offset[a:b]
        idx += base[:, None]
        np.take(t.gen_table, idx, out=o[:, a:b], mode="clip")
    if g > nr:
      idx = ib[lo:hi, None] + t.gen_offset[nr:]
      np.take(t.gen_table, idx, out=o[:, nr:], mode="clip")
