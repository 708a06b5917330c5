r"""Train-step cost and throughput on representative batches (prints
figures, ratios and the machine load).

  python experiments/bench_train.py --config=experiments/configs/demo.py \
      [--variants=round2,after] [--dense_above=0.5,0.75,0.9,inf] \
      [--batches=20] [--rounds=3] [--steps=1] [--workdir=/tmp/benchwd] \
      [--config.model.dtype=bfloat16] [--peak_tflops=989] [--store]
  python experiments/bench_train.py --config=experiments/configs/movielens.py \
      --config.data.dir=/work/shared/data/ml-100k

For a config (default: the demo config), in one process:
  1. the fp32 matmul peak of this machine: the best time of a big jnp.dot;
  2. for each stage (--stages: base, source_temporal, downstream) and each
     variant (--variants, `VARIANTS`):
       `before`  the issue-15 baseline: every encoder block computes every
                 token, the adapt MLP runs on every history slot
                 (hist_insemb [B, L, d]) and no linear chain is folded;
       `round2`  the previous round's code: the last block computes only the
                 token read, the history deduplicated with U the next power
                 of two >= 64 (`input_pipeline.unique_rows` as it was), never
                 dense, no folds (config.model.fold_linear=False, attention
                 projecting every key: attention.FOLD_QUERIES = inf);
       `after`   today's code: U on the ladder of `input_pipeline.unique_rows`,
                 dense past `input_pipeline.DENSE_ABOVE` of a shard's slots,
                 linear chains folded (config.model.fold_linear), few-query
                 attention folded (attention.FOLD_QUERIES);
       `after@x` `after` with DENSE_ABOVE = x (--dense_above=x,y,... turns
                 `after` into one such variant per value);
     the train step on --batches batches evenly spaced across the train
     split (the midpoints of equal segments), all on the device, each
     batch's shape compiled (lower + compile, timed) and run once, then each
     batch's step timed alone (block_until_ready), --steps times per batch in
     each of --rounds rounds, batches and variants interleaved, the best
     kept per batch. Printed per variant: the median XLA FLOPs/step over the
     batches (each batch's compiled program's `cost.compiled_flops`), the
     distinct compiled shapes and their total compile time, the history
     layouts (dense / deduplicated, U's range), the median and p90 over the
     batches of the step time, instances/s at the median, GFLOP/s (the
     batches' FLOPs over their times) as % of the matmul peak, and the
     process's sys vs user CPU time over the timed steps
     (resource.getrusage) with minor page faults per step; ratios of each
     variant to `round2` and to `before` (median FLOPs, median and p90 step
     time); and the first `after` variant's matrix products alone in one
     program (`_DotsBench`, on its median-FLOPs batch): their % of the peak,
     what a step made of them can reach at most;
  3. with --store: export throughput of a source model through the store's
     export (`tables.export_writer` ... `finish_export`) and downstream
     training with the InsEmb store (`tables.Table`) in the input pipeline
     vs the same InsEmbs in memory (`MemoryTable`): --batches consecutive
     steps each, after their shapes were compiled (on the same batches with
     InsEmbs from memory);
  4. with --malloc_compare: section 2's `after` steps in two child processes,
     with and without `iat_jax.allocator`'s malloc settings (and its XLA:CPU
     heap option, `allocator.compiler_options`), each printing its sys vs
     user time (target: sys < 5% of user with the settings).

Parameters are freshly initialized: throughput does not depend on training.
The downstream stage reads random InsEmbs from a `MemoryTable` in section 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable, ContextManager

if __name__ == "__main__":
  from iat_jax import allocator
  allocator.ensure()  # as iat_jax.main does (IAT_JAX_KEEP_MALLOC=1: not)

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np

from iat_jax import allocator
from iat_jax import stages
from iat_jax.data import dataset as dataset_lib
from iat_jax.data import input_pipeline
from iat_jax.data import orders
from iat_jax.data import sources
from iat_jax.models import attention
from iat_jax.models import sequence
from iat_jax.store import memory_table
from iat_jax.store import tables
from iat_jax.train import cost
from iat_jax.train import predict
from iat_jax.train import steps
from iat_jax.train import train_lib

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/demo.py",
                                          "Experiment config.")
_STEPS = flags.DEFINE_integer(
    "steps", 1, "Timed steps per batch in each round, each timed alone (best kept).")
_ROUNDS = flags.DEFINE_integer("rounds", 3,
                               "Interleaved rounds over batches and variants.")
_BATCHES = flags.DEFINE_integer(
    "batches", 20, "Batches evenly spaced across the train split, each timed alone.")
_STAGES = flags.DEFINE_list("stages", ["base", "source_temporal", "downstream"],
                            "Stages of section 2.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["round2", "after"],
    "Variants of section 2: before, round2, after, after@<DENSE_ABOVE>.")
_DENSE_ABOVE = flags.DEFINE_list(
    "dense_above", [], "input_pipeline.DENSE_ABOVE values (e.g. 0.5,0.75,0.9,inf): "
    "the variant `after` becomes one variant after@<value> per value.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0,
                           "Device peak TFLOP/s (default: the measured matmul).")
_STORE = flags.DEFINE_bool("store", False, "Section 3 (export, store vs memory).")
_MALLOC = flags.DEFINE_bool("malloc_compare", False, "Section 4 (child processes).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Dataset cache (default: a temp dir).")


def _load() -> str:
  return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def _rusage() -> tuple[float, float, int]:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime, r.ru_stime, r.ru_minflt


def best_flops(fn, n: int, reps: int) -> float:
  """2 n^3 / the best time of `reps` calls of fn (an n x n x n product)."""
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """Best fp32 FLOP/s of an n x n x n jnp.dot."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  return best_flops(lambda: dot(a, a).block_until_ready(), n, reps)


@contextlib.contextmanager
def _every_row():
  """The models compute as before issue 15 (`before`).

  Encoders compute every token in every block, and the history InsEmbs come
  as [B, L, d] (the adapt MLP runs on every slot, not once per distinct one).
  """
  temporal = input_pipeline.temporal
  input_pipeline.temporal = lambda *a, **k: temporal(*a, **{**k, "compact": False})
  classes = {
      "TransformerEncoder": sequence.TransformerEncoder,
      "LongerEncoder": sequence.LongerEncoder
  }
  # Same names and fields, query_only defaulting to False (make_encoder
  # constructs them by these module-level names).
  full = {
      n: type(n, (c,), {
          "__annotations__": {
              "query_only": bool
          },
          "query_only": False
      }) for n, c in classes.items()
  }
  for n, c in full.items():
    setattr(sequence, n, c)
  try:
    yield
  finally:
    input_pipeline.temporal = temporal
    for n, c in classes.items():
      setattr(sequence, n, c)


@contextlib.contextmanager
def _patched(module, **values):
  """module.<name> = value for each, restored on exit."""
  old = {k: getattr(module, k) for k in values}
  for k, v in values.items():
    setattr(module, k, v)
  try:
    yield
  finally:
    for k, v in old.items():
      setattr(module, k, v)


@contextlib.contextmanager
def _round2():
  """Round 2's history and attention: power-of-two U, never dense, and
  attention projecting every key (no query fold)."""
  with _patched(input_pipeline,
                unique_rows=_power_of_two_rows,
                DENSE_ABOVE=float("inf")), _patched(attention,
                                                    FOLD_QUERIES=float("inf")):
    yield


def _power_of_two_rows(distinct: int) -> int:
  """Round 2's `input_pipeline.unique_rows`: a power of two >= 64."""
  return max(64, 1 << int(distinct).bit_length())


@dataclasses.dataclass(frozen=True)
class Variant:
  """A way of running today's code as another version did: `patch()` is
  active while the run is built, its batches made and its steps traced;
  `model` overrides config.model."""
  patch: Callable[[], ContextManager] = contextlib.nullcontext
  model: dict = dataclasses.field(default_factory=dict)


VARIANTS = {
    "before": Variant(_every_row, {"fold_linear": False}),
    "round2": Variant(_round2, {"fold_linear": False}),
    "after": Variant(),
}


def variant(name: str) -> Variant:
  """`VARIANTS[name]`, or for 'after@x' `after` with DENSE_ABOVE = float(x)."""
  if name in VARIANTS:
    return VARIANTS[name]
  base, _, value = name.partition("@")
  if base == "after" and value:
    return Variant(lambda: _patched(input_pipeline, DENSE_ABOVE=float(value)))
  raise ValueError(f"variant {name!r}: one of {sorted(VARIANTS)} or after@<value>")


def variant_names() -> list[str]:
  """--variants, `after` expanded to after@<x> for each --dense_above x."""
  names = []
  for name in _VARIANTS.value:
    if name == "after" and _DENSE_ABOVE.value:
      names += [f"after@{x}" for x in _DENSE_ABOVE.value]
    else:
      names.append(name)
  for name in names:
    variant(name)  # raises on an unknown one
  return names


def representative(n: int, k: int) -> list[int]:
  """k indices evenly spaced over range(n): the midpoints of k equal parts."""
  k = max(1, min(k, n))
  return sorted({int((i + 0.5) * n / k) for i in range(k)})


def _shapes(n: int) -> str:
  return f"{n} shape" + ("" if n == 1 else "s")


def median_p90(x) -> tuple[float, float]:
  """(median, 90th percentile) of x."""
  return float(np.median(x)), float(np.percentile(x, 90))


class _StepBench:
  """One stage x variant: its train step compiled per batch shape, on
  representative device batches (`representative` of the train split)."""

  def __init__(self, config, workdir, stage, ds, table, name: str, batches: int):
    v = variant(name)
    c = config.copy_and_resolve_references()
    c.stage = stage
    c.model.update(v.model)
    self.patch = v.patch
    with self.patch():
      self.run = run = train_lib.Run(stages.get(stage), c, workdir, f"{stage}-{name}",
                                     ds, table)
      self.indices = representative(len(run.train_data), batches)
      self.host = [run.train_data[i] for i in self.indices]
      self.batches = [steps.to_device(b, run.mesh) for b in self.host]
      self.state = run.state
      # A jitted step of our own: each distinct shape lowered and compiled
      # here, timed (Run's already compiled its first batch's).
      self.jitted = steps.make_train_step(run.model, run.shardings, run.mesh, run.rules)
      self.compile_sec = 0.0
      compiled = {}
      keys = [train_lib.PerShape.shape_key(b) for b in self.batches]
      for key, b in zip(keys, self.batches):
        if key not in compiled:
          t = time.perf_counter()
          exe = self.jitted.lower(self.state, b).compile()
          self.compile_sec += time.perf_counter() - t
          compiled[key] = (exe, cost.compiled_flops(exe))
      self.shape_count = len(compiled)
      self.steps = [compiled[k][0] for k in keys]
      self.flops = np.array([compiled[k][1] for k in keys])
      for i in range(len(self.batches)):  # warm: each batch's step run once
        self.step(i)
    self.best = np.full(len(self.batches), np.inf)
    self.faults = self.timed = 0
    self.user = self.sys = 0.0
    self.instances = orders.get(run.stage.order).instances(c)

  def step(self, i: int) -> dict:
    """Runs batch i's step (updating the state); its outputs, ready."""
    self.state, out, _ = self.steps[i](self.state, self.batches[i])
    jax.block_until_ready(out)
    return out

  def time(self, i: int, n: int) -> float:
    """Times n steps on batch i, each alone; keeps the best; adds the CPU
    time and page faults to the totals. Returns this call's best."""
    u0, s0, f0 = _rusage()
    best = float("inf")
    for _ in range(n):
      t = time.perf_counter()
      self.step(i)
      best = min(best, time.perf_counter() - t)
    u1, s1, f1 = _rusage()
    self.user += u1 - u0
    self.sys += s1 - s0
    self.faults += f1 - f0
    self.timed += n
    self.best[i] = min(self.best[i], best)
    return best

  def median_flops(self) -> float:
    return float(np.median(self.flops))

  def median_batch(self) -> int:
    """The batch whose FLOPs are closest to the median."""
    return int(np.argmin(np.abs(self.flops - self.median_flops())))

  def layouts(self) -> str:
    """The history layouts of the batches ('' without InsEmbs)."""
    dense = sum("hist_insemb" in b for b in self.host)
    u = [int(b["hist_unique"]) for b in self.host if "hist_insemb_unique" in b]
    if not dense and not u:
      return ""
    out = f"; history {dense} dense"
    if u:
      out += f", {len(u)} deduplicated (U {min(u)}..{max(u)})"
    return out

  def trace(self, i: int):
    with self.patch():
      return self.jitted.trace(self.state, self.batches[i])

  def line(self, name: str, peak: float) -> str:
    """Section 2's line for this variant."""
    med, p90 = median_p90(self.best)
    gflops = self.flops.sum() / self.best.sum() / 1e9
    return (f"{name:10s}: {self.median_flops():9.3g} FLOPs/step (median; "
            f"{_shapes(self.shape_count)}, compiled in {self.compile_sec:.1f} s"
            f"{self.layouts()}); step median {med * 1e3:7.2f} ms, p90 "
            f"{p90 * 1e3:7.2f} ms; {self.instances / med:9,.0f} instances/s; "
            f"{gflops:7.2f} GFLOP/s = {gflops * 1e9 / peak:6.1%} of peak; "
            f"sys/user {self.sys:.2f}/{self.user:.2f} s = "
            f"{self.sys / max(self.user, 1e-9):.1%}, "
            f"{self.faults / max(self.timed, 1):,.0f} minor page faults/step")


class _DotsBench:
  """The matrix products of a `_StepBench`'s step on one batch, alone in one
  program.

  Every `dot_general` the step traces (forward and backward,
  `cost.dot_generals`), on random operands of the same shapes and dtypes,
  with the same dimension numbers and compiler options, on one device, and
  nothing else: its time is what these products cost XLA here, so its % of
  the matmul peak bounds what a step made of them can reach.
  """

  def __init__(self, bench: _StepBench, i: int):
    dots = cost.dot_generals(bench.trace(i).jaxpr)
    self.count = len(dots)
    self.flops = sum(d.flops for d in dots)
    self.step_flops = bench.flops[i]
    self.batch = i
    rng = np.random.default_rng(0)
    self.args = [
        tuple(
            jnp.asarray(rng.standard_normal(a.shape), a.dtype)
            for a in (d.lhs, d.rhs))
        for d in dots
    ]

    def products(args):
      return [
          jax.lax.dot_general(x,
                              y,
                              d.dimension_numbers,
                              preferred_element_type=d.preferred_element_type)
          for (x, y), d in zip(args, dots)
      ]

    self.fn = jax.jit(products, compiler_options=steps.compiler_options(bench.run.mesh))
    jax.block_until_ready(self.fn(self.args))

  def time(self, n: int) -> float:
    """Best seconds of n runs, each timed alone."""
    best = float("inf")
    for _ in range(n):
      t = time.perf_counter()
      jax.block_until_ready(self.fn(self.args))
      best = min(best, time.perf_counter() - t)
    return best


def prepare(config) -> tuple[str, dataset_lib.Dataset]:
  """(workdir: --workdir or a new temp dir, the config's dataset, prepared)."""
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="iat-bench-")
  if not config.data.cache_dir:
    config.data.cache_dir = os.path.join(workdir, "data")
  return workdir, sources.prepare(config, workdir)


def random_table(config, ds) -> memory_table.MemoryTable:
  """Random d-wide InsEmbs for every ins_id of ds, in memory."""
  keys = np.asarray(ds["ins_id"])
  values = np.random.default_rng(0).standard_normal(
      (len(keys), config.model.insemb_dim), np.float32)
  return memory_table.MemoryTable(keys, values)


def _ratio_line(stage: str, a: str, b: str, benches: dict) -> str:
  x, y = benches[a], benches[b]
  (xm, x9), (ym, y9) = median_p90(x.best), median_p90(y.best)
  return (f"  {stage:16s} {a}/{b}: FLOPs {x.median_flops() / y.median_flops():.3f}x, "
          f"step time median {xm / ym:.3f}x, p90 {x9 / y9:.3f}x")


def section_steps(config, workdir, ds, peak: float) -> None:
  table = random_table(config, ds)
  names = variant_names()
  print(f"\n2. train steps ({config.model.dtype}), batch {config.batch_size}: "
        f"{_BATCHES.value} batches evenly spaced over the train split, each step "
        f"timed alone, best of {_ROUNDS.value} rounds x {_STEPS.value} steps per "
        f"batch, batches and variants interleaved; median and p90 over the "
        f"batches  [{_load()}]")
  for stage in _STAGES.value:
    benches = {
        v: _StepBench(config, workdir, stage, ds, table, v, _BATCHES.value)
        for v in names
    }
    after = next((v for v in benches if v.startswith("after")), None)
    dots = (_DotsBench(benches[after], benches[after].median_batch())
            if after else None)
    dots_sec = float("inf")
    first = next(iter(benches.values()))
    for _ in range(_ROUNDS.value):
      for i in range(len(first.batches)):
        for b in benches.values():
          b.time(i, _STEPS.value)
      if dots:
        dots_sec = min(dots_sec, dots.time(max(_STEPS.value, 2)))
    print(f"  {stage}: batches {first.indices[0]}..{first.indices[-1]} of "
          f"{len(first.run.train_data)}")
    for v, b in benches.items():
      print(f"  {stage:16s} {b.line(v, peak)}  [{_load()}]")
    if dots:
      step = benches[after].best[dots.batch]
      print(f"  {stage:16s} dots of {after} (batch {first.indices[dots.batch]}): "
            f"{dots.count} dot_generals, {dots.flops:9.3g} FLOPs "
            f"({dots.flops / dots.step_flops:.0%} of the step's), alone "
            f"{dots_sec * 1e3:.2f} ms = {dots.flops / dots_sec / peak:6.1%} of "
            f"peak; the step takes {step / dots_sec:.2f}x their time  [{_load()}]")
    for ref in ("round2", "before"):
      for v in benches:
        if ref in benches and v not in (ref, "before"):
          print(_ratio_line(stage, v, ref, benches))


def section_store(config, workdir, ds) -> None:
  source = config.copy_and_resolve_references()
  source.stage = "source_temporal"
  st = train_lib.Run(stages.get(source.stage), source, workdir, "source_temporal", ds)
  path = f"{workdir}/store"
  t = time.perf_counter()
  out = tables.export_writer(source,
                             path,
                             source="source_temporal",
                             step=0,
                             fingerprint=ds.schema.fingerprint)
  n = 0
  for split in ("train", "valid", "test"):
    for batch in input_pipeline.iterate(
        orders.batches(source, ds, st.stage.order, split, train=False)):
      mask = np.asarray(batch["mask"]).reshape(-1)
      res = st.eval_step(st.state.params, steps.to_device(batch, st.mesh))
      values = predict.local_rows(res["insemb"])
      out.add(
          np.asarray(batch["ins_id"]).reshape(-1)[mask],
          values.reshape(-1, values.shape[-1])[mask])
      n += int(mask.sum())
  tables.finish_export(out)
  dt = time.perf_counter() - t
  print(f"\n3. export through the store: {n:,} instances in {dt:.1f} s = "
        f"{n / dt:,.0f} instances/s  [{_load()}]")
  keys = np.asarray(ds["ins_id"])
  values, _ = tables.open_table(source,
                                path).lookup(keys)  # the same (quantized) values
  down = config.copy_and_resolve_references()
  down.stage = "downstream"
  results = {}
  memory = memory_table.MemoryTable(keys, values)
  warm = None
  store = tables.open_table(source, path)
  for name, table in (("store", store), ("in-memory", memory)):
    st = train_lib.Run(stages.get(down.stage), down, workdir, f"downstream-{name}", ds,
                       table)
    if warm is None:  # batches 0..N with InsEmbs from memory: the shapes to come
      data = orders.batches(down, ds, st.stage.order, "train", train=True, table=memory)
      warm = [data[i] for i in range(min(_BATCHES.value + 1, len(data)))]
    state = st.state
    for batch in warm:  # compiles each shape the timed steps meet, untimed
      state, out, _ = st.train_step(state, steps.to_device(batch, st.mesh))
    jax.block_until_ready(out)
    it = input_pipeline.iterate(st.train_data)
    next(it)
    t = time.perf_counter()
    for _ in range(_BATCHES.value):
      state, out, _ = st.train_step(state, steps.to_device(next(it), st.mesh))
    jax.block_until_ready(out)
    sec = (time.perf_counter() - t) / _BATCHES.value
    results[name] = sec
    print(f"  downstream, InsEmbs from {name:9s}: {1 / sec:6.2f} steps/s "
          f"{config.batch_size / sec:9,.0f} instances/s  [{_load()}]")
  print(f"  store / in-memory throughput ratio: "
        f"{results['in-memory'] / results['store']:.2f} (target >= 0.8)")


def section_malloc(argv_flags: list[str]) -> None:
  print(f"\n4. sys vs user time, `after` train steps, with and without "
        f"{allocator.SETTINGS}  [{_load()}]")
  base = {
      k: v
      for k, v in os.environ.items()
      if k not in (*allocator.SETTINGS, allocator.MARKER, allocator.OPT_OUT)
  }
  for name, env in (("default glibc", {
      **base, allocator.OPT_OUT: "1"
  }), ("allocator.SETTINGS", allocator.environ(base))):
    cmd = [
        sys.executable,
        os.path.abspath(__file__), *argv_flags, "--variants=after", "--nostore",
        "--nomalloc_compare"
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [l for l in out.stdout.splitlines() if "sys/user" in l]
    print(f"  {name}:" + ("".join(
        f"\n  {l}" for l in lines) if lines else f" failed: {out.stderr[-2000:]}"))


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  workdir, ds = prepare(config)
  print(f"dataset {ds.schema.dataset}: {ds.num_rows:,} rows; devices {jax.devices()}; "
        f"allocator at start {allocator.at_start() or 'none'}  [{_load()}]")
  measured = matmul_peak()
  peak = _PEAK.value * 1e12 or measured
  print(f"1. fp32 matmul 2048^3: {measured / 1e9:.1f} GFLOP/s "
        f"(peak used: {peak / 1e9:.1f} GFLOP/s)  [{_load()}]")
  if _MALLOC.value:
    passed = [a for a in sys.argv[1:] if not a.startswith(("--malloc", "--nomalloc"))]
    section_malloc(passed + [f"--workdir={workdir}"])
    return
  section_steps(config, workdir, ds, peak)
  if _STORE.value:
    section_store(config, workdir, ds)


if __name__ == "__main__":
  app.run(main)
