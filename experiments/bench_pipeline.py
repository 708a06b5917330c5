r"""Benchmark: dataset preprocessing and Grain input-pipeline throughput.

1. Times `movielens.build` of ML-100K and `synthetic.build` of N instances x F
   categorical fields, each into a fresh temporary directory (deleted
   afterwards), and prints instances/s.
2. For both datasets, times each input pipeline over the train split with
   `input_pipeline.iterate` (in-process, worker_count=0) for a time budget,
   counting only real instances (the `mask` sum):
     temporal      batch 512, shuffle_window 4096
     user_ordered  32 users x T=64, chunks shuffled
     history       temporal + downstream history L=64
     history+emb   the same + `LookupInsEmb` on an in-memory `MemoryTable`
                   holding random d=64 InsEmbs for every ins_id
     history+store the same InsEmbs from the on-disk `insemb_table.Table`
     hist+emb/uniq, hist+store/uniq  the same, the InsEmbs deduplicated
                   (`LookupInsEmb(compact=True)`, as single-process training
                   reads them): distinct rows [U, d] + an index [B, L]
     hist+store/uniq/user  the same from a store keyed by user
                   (--config.store.placement=user, the default; the stores
                   above are keyed by InsID); readers hold --cache_bytes
3. The ceiling: numpy reading the columns `read_rows` gathers (features,
   labels, ins_id, uid, ts) sequentially through the memmaps, in blocks, with a
   warm page cache, as instances/s; each pipeline's ratio to it.
The process runs with `iat_jax.allocator`'s malloc settings, as training
does. A pipeline below --target instances/s is profiled with cProfile on a few
batches (top functions by own time).

  python experiments/bench_pipeline.py [--synthetic_instances=1000000]
"""

from __future__ import annotations

import cProfile
import functools
import os
import pstats
import shutil
import tempfile
import time

if __name__ == "__main__":
  from iat_jax import allocator
  allocator.ensure()  # the malloc settings training runs with (iat_jax.main)

from absl import app
from absl import flags
from absl import logging
import numpy as np

from iat_jax.data import dataset as dataset_lib
from iat_jax.data import input_pipeline
from iat_jax.data import movielens
from iat_jax.data import synthetic
from iat_jax.store import insemb_table
from iat_jax.store import memory_table
from iat_jax.store import tables

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_ML_DIR = flags.DEFINE_string("movielens_dir",
                              os.path.join(_ROOT, "..", "shared", "data", "ml-100k"),
                              "Directory of the ML-100K files (skipped if absent).")
_N = flags.DEFINE_integer("synthetic_instances", 1_000_000, "Synthetic instances N.")
_F = flags.DEFINE_integer("synthetic_fields", 100, "Synthetic categorical fields F.")
_BUDGET = flags.DEFINE_float("budget_s", 5.0, "Timed seconds per pipeline.")
_MAX_BATCHES = flags.DEFINE_integer("max_batches", 100_000,
                                    "Cap on timed batches per pipeline.")
_TARGET = flags.DEFINE_float("target", 100_000.0,
                             "Pipelines below this instances/s are profiled.")
_PROFILE = flags.DEFINE_integer("profile_batches", 20,
                                "Batches profiled per slow pipeline (0: none).")
_DATASETS = flags.DEFINE_list("datasets", ["movielens", "synthetic"],
                              "Datasets to build and benchmark.")
_PIPES = flags.DEFINE_list("pipelines", None, "Pipelines to time (default: all).")
_CACHE = flags.DEFINE_integer("cache_bytes", 1 << 30,
                              "Budget of each on-disk store's reader.")
_DIR = flags.DEFINE_string("tmp_dir", None,
                           "Parent of the temporary directory (default: TMPDIR).")

_BATCH, _WINDOW, _USERS, _T, _L, _D = 512, 4096, 32, 64, 64, 64
# Store placements; the pipelines reading the "user" one end in "/user".
_PLACED = ("insid", "user")


def _load() -> str:
  return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def _build_movielens(tmp: str) -> dataset_lib.Dataset | None:
  if not os.path.exists(os.path.join(_ML_DIR.value, "u.data")):
    print(f"movielens: {_ML_DIR.value} has no u.data, skipped")
    return None
  out = os.path.join(tmp, "ml-100k")
  t0 = time.perf_counter()
  movielens.build(_ML_DIR.value, out)
  s = time.perf_counter() - t0
  ds = dataset_lib.Dataset(out)
  print(f"build movielens (ML-100K): {ds.num_rows:,} instances in {s:.2f} s, "
        f"{ds.num_rows / s:,.0f} instances/s  [{_load()}]")
  return ds


def _build_synthetic(tmp: str) -> dataset_lib.Dataset:
  n, f = _N.value, _F.value
  out = os.path.join(tmp, "synthetic")
  t0 = time.perf_counter()
  synthetic.build(out, num_instances=n, num_categorical=f, num_users=max(n // 100, 1))
  s = time.perf_counter() - t0
  print(f"build synthetic: {n:,} instances x {f} categorical fields, "
        f"{max(n // 100, 1):,} users in {s:.1f} s, {n / s:,.0f} instances/s  "
        f"[{_load()}]")
  return dataset_lib.Dataset(out)


def _sequential_read(ds: dataset_lib.Dataset, names, block: int = 65_536) -> float:
  """Seconds to read every row of `names` sequentially, block by block."""
  t0 = time.perf_counter()
  for name in names:
    col = ds[name]
    for lo in range(0, len(col), block):
      np.asarray(col[lo:lo + block]).sum()
  return time.perf_counter() - t0


def _ceiling(ds: dataset_lib.Dataset) -> float:
  names = ds.feature_columns() + ("labels", "ins_id", "uid", "ts")
  nbytes = sum(ds[n].nbytes for n in names)
  first = _sequential_read(ds, names)  # pages mostly cached since the build
  warm = min(_sequential_read(ds, names) for _ in range(3))
  rate = ds.num_rows / warm
  print(f"  ceiling: sequential numpy read of {len(names)} columns "
        f"({nbytes / ds.num_rows:,.0f} B/instance, {nbytes / 2**20:.0f} MiB): "
        f"first pass {first:.2f} s, warm {warm:.2f} s = {rate:,.0f} instances/s "
        f"({nbytes / 2**30 / warm:.2f} GiB/s, page cache warm)  [{_load()}]")
  return rate


def _pipelines(ds: dataset_lib.Dataset, tmp: str) -> dict:
  keys = np.asarray(ds["ins_id"])
  values = np.random.default_rng(0).standard_normal((len(keys), _D), np.float32)
  table = memory_table.MemoryTable(keys, values)
  # The on-disk store keyed by InsID, and by user (--config.store.placement).
  stores = {p: os.path.join(tmp, f"store-{ds.schema.dataset}-{p}") for p in _PLACED}
  for p, path in stores.items():
    if not _PIPES.value or any(
        "store" in k and (k.endswith("/user") == (p == "user")) for k in _PIPES.value):
      insemb_table.write(path,
                         tables.store_keys(p, keys, ds["uid"]),
                         values,
                         source="bench",
                         source_step=0,
                         source_config=None)
  store = lambda p: insemb_table.Table(stores[p], cache_bytes=_CACHE.value)
  epochs = 1000  # never runs out within the budget
  # The downstream history pipeline over the train split; variants add a table.
  history = functools.partial(input_pipeline.temporal,
                              ds,
                              "train",
                              _BATCH,
                              shuffle_window=_WINDOW,
                              num_epochs=epochs,
                              history_len=_L)
  pipes = {
      "temporal":
          lambda: input_pipeline.temporal(
              ds, "train", _BATCH, shuffle_window=_WINDOW, num_epochs=epochs),
      "user_ordered":
          lambda: input_pipeline.user_ordered(
              ds, "train", _USERS, _T, num_epochs=epochs),
      "history":
          history,
      "history+emb":
          lambda: history(table=table),
      "history+store":
          lambda: history(table=store("insid")),
      # As training reads them (one batch shard): distinct InsEmbs + an index.
      "hist+emb/uniq":
          lambda: history(table=table, compact=True),
      "hist+store/uniq":
          lambda: history(table=store("insid"), compact=True),
      "hist+store/uniq/user":
          lambda: history(table=store("user"), compact=True, placement="user"),
  }
  return {k: v for k, v in pipes.items() if not _PIPES.value or k in _PIPES.value}


def _throughput(make) -> tuple[float, int, float, float]:
  """(instances/s, timed batches, setup s, instances per CPU-s) of one pipeline.

  CPU seconds (all threads of this process) are less sensitive to a loaded
  machine than wall seconds.
  """
  t0 = time.perf_counter()
  it = input_pipeline.iterate(make())
  next(it)  # untimed: epoch order, first touches
  setup = time.perf_counter() - t0
  n = b = 0
  t0, c0 = time.perf_counter(), time.process_time()
  while b < _MAX_BATCHES.value and time.perf_counter() - t0 < _BUDGET.value:
    n += int(next(it)["mask"].sum())
    b += 1
  cpu = time.process_time() - c0
  return n / (time.perf_counter() - t0), b, setup, n / max(cpu, 1e-9)


def _lookup_before(table, batch: dict) -> dict:
  """LookupInsEmb before issue 15: every real slot looked up, boolean scatter."""
  mask = batch["hist_mask"]
  values, found = table.lookup(batch["hist_ins_id"][mask])
  out = np.zeros(mask.shape + values.shape[1:], np.float32)
  out[mask] = values
  hit = np.zeros_like(mask)
  hit[mask] = found
  batch.update(hist_insemb=out,
               hist_mask=hit,
               hist_missing=np.int64(len(found) - found.sum()))
  return batch


def _lookup_ratio(ds: dataset_lib.Dataset, tables: dict, batches: int = 20) -> None:
  """LookupInsEmb alone, before vs after, interleaved on the same batches."""
  data = input_pipeline.temporal(ds,
                                 "train",
                                 _BATCH,
                                 shuffle_window=_WINDOW,
                                 history_len=_L)
  hist = [data[i] for i in range(min(batches, len(data)))]
  for name, table in tables.items():
    after = input_pipeline.LookupInsEmb(table)
    uniq_map = input_pipeline.LookupInsEmb(table, compact=True)
    best = {"before": float("inf"), "after": float("inf"), "uniq": float("inf")}
    for _ in range(3):
      for v, fn in (("before", lambda b: _lookup_before(table, b)),
                    ("after", after.map), ("uniq", uniq_map.map)):
        t0 = time.perf_counter()
        for b in hist:
          fn(dict(b))
        best[v] = min(best[v], (time.perf_counter() - t0) / len(hist))
    uniq = np.mean([len(np.unique(b["hist_ins_id"][b["hist_mask"]])) for b in hist])
    slots = np.mean([b["hist_mask"].sum() for b in hist])
    print(f"  LookupInsEmb alone ({name}, {slots:,.0f} real slots, {uniq:,.0f} "
          f"distinct per batch): before {best['before'] * 1e3:.2f} ms, after "
          f"{best['after'] * 1e3:.2f} ms = {best['after'] / best['before']:.2f}x, "
          f"compact {best['uniq'] * 1e3:.2f} ms = {best['uniq'] / best['before']:.2f}x"
          f" per batch  [{_load()}]")


def _profile(make, batches: int) -> None:
  """cProfile of `batches` batches, run in this thread (no Grain prefetch)."""
  data = make()
  data[0]
  prof = cProfile.Profile()
  prof.enable()
  for i in range(1, batches + 1):
    data[i]
  prof.disable()
  st = pstats.Stats(prof).stats
  total = sum(v[2] for v in st.values())
  print(f"    cProfile, {batches} batches, {total:.3f} s own time; top by own time:")
  top = sorted(st.items(), key=lambda kv: -kv[1][2])[:8]
  for (path, line, func), (_, calls, own, cum, _) in top:
    where = f"{os.path.basename(path)}:{line}({func})" if line else func
    print(f"      {own / total:5.1%} own {own:.3f} s cum {cum:.3f} s "
          f"{calls:6d} calls  {where}")
  ours = [(k, v)
          for k, v in st.items()
          if os.path.basename(k[0]) in ("input_pipeline.py", "history.py")]
  print("    cumulative, input_pipeline.py / history.py:")
  for (path, line, func), (_, calls, own, cum,
                           _) in sorted(ours, key=lambda kv: -kv[1][3])[:8]:
    print(f"      {cum / total:5.1%} cum {cum:.3f} s  "
          f"{os.path.basename(path)}:{line}({func})")


def _trim_potential(ds: dataset_lib.Dataset) -> None:
  """Prints what trimming each train batch's L to its longest real history
  (rounded up to a power of two >= 8) would save, against the real slots."""
  rows = ds.split_rows("train")
  earlier = np.asarray(ds["hist_end"])[rows] - ds.user_start(rows)
  n = len(rows) // _BATCH * _BATCH
  for l in (16, _L, 256):
    real = np.minimum(earlier[:n], l).reshape(-1, _BATCH)
    longest = np.maximum(real.max(axis=1), 1)
    trimmed = np.minimum(l, np.maximum(8, 2**np.ceil(np.log2(longest))))
    print(f"  L={l}: real slots {real.mean() / l:.1%} of B x L; batches trimmed "
          f"to their longest history keep {trimmed.mean() / l:.1%} of the slots")


def _bench(name: str, ds: dataset_lib.Dataset, rows: list, tmp: str) -> None:
  s = ds.schema
  print(f"\n{name}: {ds.num_rows:,} rows, {s.num_users:,} users, train "
        f"{s.split_sizes[0]:,}, {len(s.categorical)} cat, {len(s.dense)} dense, "
        f"{len(s.multi_hot)} multi-hot, seq_len {s.seq_len}")
  ceiling = _ceiling(ds)
  _trim_potential(ds)
  pipes = _pipelines(ds, tmp)
  if "history+emb" in pipes:
    keys = np.asarray(ds["ins_id"])
    values = np.random.default_rng(0).standard_normal((len(keys), _D), np.float32)
    tabs = {"MemoryTable": memory_table.MemoryTable(keys, values)}
    store = os.path.join(tmp, f"store-{ds.schema.dataset}")
    if os.path.exists(store):
      tabs["Table"] = insemb_table.Table(store)
    _lookup_ratio(ds, tabs)
  for pipe, make in pipes.items():
    rate, batches, setup, per_cpu = _throughput(make)
    print(f"  {pipe:13s} {rate:12,.0f} instances/s, {per_cpu:12,.0f} per CPU-s "
          f"({batches} batches in {_BUDGET.value:.0f} s, setup+first batch "
          f"{setup:.2f} s, ratio to ceiling {rate / ceiling:.3f})  [{_load()}]")
    rows.append((name, pipe, rate, ceiling))
    if rate < _TARGET.value and _PROFILE.value:
      _profile(make, _PROFILE.value)


def main(argv) -> None:
  del argv
  tmp = tempfile.mkdtemp(prefix="bench_pipeline-", dir=_DIR.value)
  rows = []
  try:
    ml = _build_movielens(tmp) if "movielens" in _DATASETS.value else None
    syn = _build_synthetic(tmp) if "synthetic" in _DATASETS.value else None
    if ml is not None:
      _bench("movielens", ml, rows, tmp)
    if syn is not None:
      _bench(f"synthetic-{_F.value}f", syn, rows, tmp)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  print(f"\n{'dataset':15s} {'pipeline':13s} {'instances/s':>12s} "
        f"{'ceiling/s':>12s} {'ratio':>7s}")
  for name, pipe, rate, ceiling in rows:
    print(f"{name:15s} {pipe:13s} {rate:12,.0f} {ceiling:12,.0f} "
          f"{rate / ceiling:7.3f}")
  print(f"[{_load()}]")


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
