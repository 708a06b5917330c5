r"""Train-step cost and throughput (prints figures, ratios and the machine load).

For a config (default: the demo config), in one process:
  1. the fp32 matmul peak of this machine: the best time of a big jnp.dot;
  2. for each stage (base, source_temporal, downstream) and each variant
     (`before`: every encoder block computes every token and the adapt MLP
     runs on every history slot; `after`: the last block computes only the
     token that is read, `attention.TransformerBlock(num_queries=...)`, and
     the adapt MLP runs once per distinct InsEmb, `LookupInsEmb(compact)`),
     interleaved: XLA FLOPs of
     the compiled train step, steps/s on a fixed device batch, achieved
     FLOP/s as % of the matmul peak, and the process's sys vs user CPU time
     over the timed steps (resource.getrusage); ratios after / before; and
     the `after` step's matrix products alone in one program (`_DotsBench`):
     their % of the peak, what a step made of them can reach at most;
  3. with --store: export throughput of a source model through the store's
     export (`tables.export_writer` ... `finish_export`) and downstream
     training with the InsEmb store (`tables.Table`) in the input
     pipeline vs the same InsEmbs in memory (`MemoryTable`);
  4. with --malloc_compare: section 2's `after` steps in two child processes,
     with and without `iat_jax.allocator`'s malloc settings (and its XLA:CPU
     heap option, `allocator.compiler_options`), each printing its sys vs
     user time (target: sys < 5% of user with the settings).

  python experiments/bench_train.py --config=experiments/configs/demo.py \
      [--config.model.dtype=bfloat16] [--peak_tflops=989] [--store]
Parameters are freshly initialized: throughput does not depend on training.
The downstream stage reads random InsEmbs from a `MemoryTable` in section 2.
"""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import tempfile
import time

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
from iat_jax.models import sequence
from iat_jax.store import memory_table
from iat_jax.store import tables
from iat_jax.train import cost
from iat_jax.train import predict
from iat_jax.train import steps
from iat_jax.train import train_lib

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/demo.py",
                                          "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per measurement.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Interleaved rounds (best kept).")
_STAGES = flags.DEFINE_list("stages", ["base", "source_temporal", "downstream"],
                            "Stages of section 2.")
_VARIANTS = flags.DEFINE_list("variants", ["before", "after"], "Variants of section 2.")
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


def matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """Best fp32 FLOP/s of an n x n x n jnp.dot."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    dot(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


@contextlib.contextmanager
def every_row(enabled: bool):
  """While enabled, the models compute as before issue 15 (`before`).

  Encoders compute every token in every block, and the history InsEmbs come
  as [B, L, d] (the adapt MLP runs on every slot, not once per distinct one).
  """
  if not enabled:
    yield
    return
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


class _StepBench:
  """One stage x variant: its compiled train step on a fixed device batch."""

  def __init__(self, config, workdir, stage, ds, table, variant):
    c = config.copy_and_resolve_references()
    c.stage = stage
    with every_row(variant == "before"):
      self.run = train_lib.Run(stages.get(stage), c, workdir, f"{stage}-{variant}", ds,
                               table)
    self.flops = cost.compiled_flops(self.run.train_step)
    self.batch = steps.to_device(self.run.train_data[0], self.run.mesh)
    self.state = self.run.state
    self.faults = self.timed = 0
    self.instances = orders.get(self.run.stage.order).instances(c)
    self._step()

  def _step(self):
    self.state, out, _ = self.run.train_step(self.state, self.batch)
    jax.block_until_ready(out)

  def time(self, n: int) -> tuple[float, float, float]:
    """(seconds per step, user s, sys s) over n steps; counts page faults."""
    u0, s0, f0 = _rusage()
    t = time.perf_counter()
    for _ in range(n):
      self.state, out, _ = self.run.train_step(self.state, self.batch)
    jax.block_until_ready(out)
    sec = (time.perf_counter() - t) / n
    u1, s1, f1 = _rusage()
    self.faults += f1 - f0
    self.timed += n
    return sec, u1 - u0, s1 - s0


class _DotsBench:
  """The matrix products of a `_StepBench`'s step, alone in one program.

  Every `dot_general` the step traces (forward and backward,
  `cost.dot_generals`), on random operands of the same shapes and dtypes,
  with the same dimension numbers and compiler options, on one device, and
  nothing else: its time is what these products cost XLA here, so its % of
  the matmul peak bounds what a step made of them can reach.
  """

  def __init__(self, bench: _StepBench):
    dots = cost.dot_generals(bench.run.train_step.trace(bench.state, bench.batch).jaxpr)
    self.count = len(dots)
    self.flops = sum(d.flops for d in dots)
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
    """Seconds per run, over n runs."""
    t = time.perf_counter()
    for _ in range(n):
      out = self.fn(self.args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / n


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


def section_steps(config, workdir, ds, peak: float) -> None:
  table = random_table(config, ds)
  print(f"\n2. train steps ({config.model.dtype}), batch {config.batch_size}, "
        f"{_STEPS.value} steps x {_ROUNDS.value} interleaved rounds, best kept  "
        f"[{_load()}]")
  for stage in _STAGES.value:
    benches = {
        v: _StepBench(config, workdir, stage, ds, table, v) for v in _VARIANTS.value
    }
    dots = _DotsBench(benches["after"]) if "after" in benches else None
    dots_sec = float("inf")
    best = {v: (float("inf"), 0.0, 0.0) for v in benches}
    user = {v: 0.0 for v in benches}
    sys_t = {v: 0.0 for v in benches}
    for _ in range(_ROUNDS.value):
      for v, b in benches.items():
        sec, u, s = b.time(_STEPS.value)
        user[v] += u
        sys_t[v] += s
        if sec < best[v][0]:
          best[v] = (sec, u, s)
      if dots:
        dots_sec = min(dots_sec, dots.time(_STEPS.value))
    for v, b in benches.items():
      sec = best[v][0]
      print(f"  {stage:16s} {v:6s}: {b.flops:9.3g} FLOPs/step, {1 / sec:7.2f} "
            f"steps/s, {b.instances / sec:9,.0f} instances/s, "
            f"{b.flops / sec / 1e9:7.2f} GFLOP/s = {b.flops / sec / peak:6.1%} of "
            f"peak; sys/user {sys_t[v]:.2f}/{user[v]:.2f} s = "
            f"{sys_t[v] / max(user[v], 1e-9):.1%}, {b.faults / b.timed:,.0f} minor "
            f"page faults/step  [{_load()}]")
    if dots:
      print(f"  {stage:16s} dots of after: {dots.count} dot_generals, "
            f"{dots.flops:9.3g} FLOPs ({dots.flops / benches['after'].flops:.0%} of "
            f"the step's), alone {dots_sec * 1e3:.2f} ms = "
            f"{dots.flops / dots_sec / peak:6.1%} of peak; the step takes "
            f"{best['after'][0] / dots_sec:.2f}x their time  [{_load()}]")
    if {"before", "after"} <= set(benches):
      a, b = benches["after"], benches["before"]
      print(f"  {stage:16s} after/before: FLOPs {a.flops / b.flops:.3f}x, "
            f"step time {best['after'][0] / best['before'][0]:.3f}x")


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
  for name, table in (("store", tables.open_table(source, path)),
                      ("in-memory", memory_table.MemoryTable(keys, values))):
    st = train_lib.Run(stages.get(down.stage), down, workdir, f"downstream-{name}", ds,
                       table)
    it = input_pipeline.iterate(st.train_data)
    state = st.state
    state, out, _ = st.train_step(state, steps.to_device(next(it), st.mesh))
    jax.block_until_ready(out)
    t = time.perf_counter()
    for _ in range(_STEPS.value):
      state, out, _ = st.train_step(state, steps.to_device(next(it), st.mesh))
    jax.block_until_ready(out)
    sec = (time.perf_counter() - t) / _STEPS.value
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
