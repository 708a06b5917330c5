r"""JAX train steps vs their PyTorch-eager twin, side by side in one process,
on equal cores.

  python experiments/bench_twin.py --config=experiments/configs/demo.py \
      --cores=1 [--algorithms=same,full] [--batches=20] [--rounds=3] \
      [--steps=1] [--workdir=/tmp/benchwd]
  python experiments/bench_twin.py --config=experiments/configs/movielens.py \
      --config.data.dir=/work/shared/data/ml-100k --cores=2

--cores N (default: every core of the affinity mask): before JAX or torch is
imported, the process pins itself to the first N cores of its affinity mask
(os.sched_setaffinity; the re-execution of `allocator.ensure()` inherits the
mask and the environment, so JAX and torch run under the same allocator
settings and cores), XLA:CPU sizes its thread pool from that mask, and torch
gets torch.set_num_threads(N). At N = 1, XLA_FLAGS also gets
--xla_cpu_multi_thread_eigen=false (`XLA_ONE_CORE`). Measured with jaxlib
0.10.2 on this 2-core machine: the affinity mask is what limits XLA:CPU (a
2048^3 jnp.dot keeps one thread busy at N = 1 and four at N = 2, with or
without that flag, which does not stop the dot's threads); the TF option
intra_op_parallelism_threads is no XLA flag (`--intra_op_parallelism_threads=1`
aborts: "Unknown flag in XLA_FLAGS"), so it is not set. The header prints
the cores, XLA_FLAGS, torch's threads, the allocator settings the process
started with, and for jnp.dot and torch.mm their fp32 GFLOP/s and how many
threads were busy (> 10% of the wall time) while they ran.

Then for each stage (--stages: base, source_temporal, downstream): the JAX
`after` train step of experiments/bench_train.py (`_StepBench`: today's
code, compiled per batch shape) and the eager twin of
experiments/torch_twin.py with the same parameters, algorithm `same` (what
the JAX step computes; `full`, every token in every block, the adapt MLP on
every history slot and no folds, with --algorithms=same,full), on the same
--batches batches evenly spaced across the train split; each step timed
alone, --steps times per batch in each of --rounds rounds, batches and
JAX / torch interleaved, the best kept per batch. Printed: the JAX step's
median FLOPs and compiled shapes, the loss of JAX and of each twin on the
first batch at the same parameters, the median and p90 over the batches of
the step time of each, instances/s at the median, and the speed ratio JAX /
torch (torch time / JAX time) from the medians and from the p90s, with the
machine load (os.getloadavg). Flags --steps, --rounds, --batches, --stages,
--workdir (dataset cache, default a temp dir) are bench_train's (its
--variants and --dense_above are not used). Parameters are freshly
initialized: throughput does not depend on training. The downstream stage
reads random InsEmbs from a `MemoryTable`, as in bench_train's section 2.
"""

from __future__ import annotations

import os
import sys
import time

# Added to XLA_FLAGS at one core: XLA:CPU's Eigen ops single-threaded. The
# affinity mask is what sizes XLA:CPU's thread pool (see the docstring).
XLA_ONE_CORE = "--xla_cpu_multi_thread_eigen=false"


def _cores_flag(argv: list[str]) -> int | None:
  """--cores from the command line, read before absl parses it."""
  for i, a in enumerate(argv):
    if a.startswith("--cores="):
      return int(a.split("=", 1)[1])
    if a == "--cores" and i + 1 < len(argv):
      return int(argv[i + 1])
  return None


def pin(cores: int | None) -> int:
  """Pins this process to the first `cores` cores of its affinity mask (all
  by default) and, at one core, adds XLA_ONE_CORE to XLA_FLAGS. Idempotent
  (the re-executed process pins to the same cores). Returns the count."""
  mask = sorted(os.sched_getaffinity(0))
  cores = len(mask) if cores is None else cores
  if not 1 <= cores <= len(mask):
    raise SystemExit(f"--cores={cores}: the affinity mask has {len(mask)} cores")
  os.sched_setaffinity(0, mask[:cores])
  flags = os.environ.get("XLA_FLAGS", "")
  if cores == 1 and XLA_ONE_CORE not in flags.split():
    os.environ["XLA_FLAGS"] = f"{flags} {XLA_ONE_CORE}".strip()
  return cores


if __name__ == "__main__":
  pin(_cores_flag(sys.argv[1:]))  # before any thread starts: all inherit it
  from iat_jax import allocator
  allocator.ensure()  # as bench_train and iat_jax.main do; keeps mask and env

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import torch

import bench_train  # experiments/, next to this file; defines the shared flags
import torch_twin
from iat_jax import allocator

FLAGS = flags.FLAGS
_CORES = flags.DEFINE_integer(
    "cores", None, "Cores to pin to (default: all of the affinity mask); torch "
    "threads = cores. Read before absl parses it (see the module docstring).")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["same"],
                                "Twin algorithms (torch_twin.ALGORITHMS).")


def _thread_ticks() -> dict[str, int]:
  """CPU ticks (user + sys) of each thread of this process."""
  out = {}
  for t in os.listdir("/proc/self/task"):
    try:
      with open(f"/proc/self/task/{t}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
      continue
    out[t] = int(fields[11]) + int(fields[12])
  return out


def busy_threads(fn) -> tuple[float, int]:
  """(fn(), the threads busy > 10% of its wall time while it ran)."""
  t0, start = _thread_ticks(), time.perf_counter()
  result = fn()
  wall, t1 = time.perf_counter() - start, _thread_ticks()
  hz = os.sysconf("SC_CLK_TCK")
  return result, sum((t1[t] - t0.get(t, 0)) / hz > 0.1 * wall for t in t1)


def matmul_peaks(n: int = 2048, reps: int = 5) -> dict[str, tuple[float, int]]:
  """{'jnp.dot' | 'torch.mm': (best fp32 FLOP/s of an n x n x n product,
  threads busy while it ran)}, each warmed (compiled) first."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  dot(a, a).block_until_ready()
  t = torch.randn(n, n)
  torch.mm(t, t)
  return {
      "jnp.dot":
          busy_threads(lambda: bench_train.best_flops(
              lambda: dot(a, a).block_until_ready(), n, reps)),
      "torch.mm":
          busy_threads(lambda: bench_train.best_flops(lambda: torch.mm(t, t), n, reps)),
  }


class _TwinBench:
  """One stage x algorithm: the eager twin's train step on the JAX bench's
  batches, each timed alone (the best kept per batch)."""

  def __init__(self, bench: bench_train._StepBench, algorithm: str):
    run = bench.run
    self.model = torch_twin.build(run.config.stage, run.config, run.ds.schema,
                                  algorithm)
    torch_twin.load_flax_params(self.model, bench.state.params)
    self.params = sum(p.numel() for p in self.model.parameters())
    self.step = torch_twin.TrainStep(self.model, run.config, run.num_steps)
    self.batches = [torch_twin.torch_batch(b, algorithm) for b in bench.host]
    b = self.batches[0]
    with torch.no_grad():  # at the JAX bench's current parameters
      self.loss = torch_twin.task_loss(self.model(b), b["labels"], b["mask"]).item()
    for b in self.batches:  # warm: each batch's step run once
      self.step(b)
    self.best = np.full(len(self.batches), np.inf)

  def time(self, i: int, n: int) -> None:
    """Times n steps on batch i, each alone; keeps the best."""
    for _ in range(n):
      t = time.perf_counter()
      self.step(self.batches[i])
      self.best[i] = min(self.best[i], time.perf_counter() - t)


def _line(name: str, best: np.ndarray, instances: int) -> str:
  med, p90 = bench_train.median_p90(best)
  return (f"{name}: step median {med * 1e3:7.2f} ms, p90 {p90 * 1e3:7.2f} ms; "
          f"{instances / med:9,.0f} instances/s")


def bench_stage(config, workdir, stage, ds, table) -> None:
  """Times one stage's JAX step and its twins interleaved; prints them."""
  jx = bench_train._StepBench(config, workdir, stage, ds, table, "after", FLAGS.batches)
  twins = {a: _TwinBench(jx, a) for a in _ALGORITHMS.value}
  out = jx.step(0)  # at the twins' parameters: the loss to compare
  losses = ", ".join(f"torch {a} {tw.loss:.6f}" for a, tw in twins.items())
  for _ in range(FLAGS.rounds):
    for i in range(len(jx.batches)):
      jx.time(i, FLAGS.steps)
      for tw in twins.values():
        tw.time(i, FLAGS.steps)
  counts = {tw.params for tw in twins.values()}
  print(f"  {stage}: batches {jx.indices[0]}..{jx.indices[-1]} of "
        f"{len(jx.run.train_data)}; JAX {jx.median_flops():.3g} FLOPs/step (median; "
        f"{bench_train._shapes(jx.shape_count)}, compiled in {jx.compile_sec:.1f} s"
        f"{jx.layouts()}); params JAX {jx.run.cost()['params']:,} torch "
        f"{', '.join(f'{c:,}' for c in counts)}; loss on batch {jx.indices[0]}: "
        f"JAX {float(out['loss']):.6f}, {losses}")
  print(f"  {_line(f'{stage:16s} jax after ', jx.best, jx.instances)}"
        f"  [{bench_train._load()}]")
  jm, j9 = bench_train.median_p90(jx.best)
  for a, tw in twins.items():
    tm, t9 = bench_train.median_p90(tw.best)
    print(f"  {_line(f'{stage:16s} torch {a:4s}', tw.best, jx.instances)}; "
          f"jax/torch speed {tm / jm:.2f}x (medians), {t9 / j9:.2f}x (p90s)"
          f"  [{bench_train._load()}]")


def main(argv) -> None:
  del argv
  config = FLAGS.config
  cores = pin(_CORES.value)  # as at start (a no-op but for the count)
  torch.set_num_threads(cores)
  workdir, ds = bench_train.prepare(config)
  print(f"dataset {ds.schema.dataset}: {ds.num_rows:,} rows; pinned to {cores} "
        f"core(s) {sorted(os.sched_getaffinity(0))}; JAX devices {jax.devices()}, "
        f"XLA_FLAGS {os.environ.get('XLA_FLAGS', '')!r}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); allocator at start (JAX and torch) "
        f"{allocator.at_start() or 'none'}  [{bench_train._load()}]")
  peaks = matmul_peaks()
  print("fp32 matmul 2048^3: " +
        ", ".join(f"{k} {f / 1e9:.1f} GFLOP/s ({b} thread(s) busy)"
                  for k, (f, b) in peaks.items()) + f"  [{bench_train._load()}]")
  table = bench_train.random_table(config, ds)
  print(f"train steps (fp32), batch {config.batch_size}: {FLAGS.batches} batches "
        f"evenly spaced over the train split, each step timed alone, best of "
        f"{FLAGS.rounds} rounds x {FLAGS.steps} steps per batch, batches and JAX / "
        f"torch interleaved; median and p90 over the batches  "
        f"[{bench_train._load()}]")
  for stage in FLAGS.stages:
    bench_stage(config, workdir, stage, ds, table)


if __name__ == "__main__":
  app.run(main)
