r"""JAX train steps vs their PyTorch-eager twin, side by side in one process.

For a config (default: the demo config) and each stage (base,
source_temporal, downstream): the JAX `after` train step of
experiments/bench_train.py (`_StepBench`: compiled, on a fixed device batch)
and the eager twin of experiments/torch_twin.py with the same parameters on
the same batch, algorithm `same` (what the JAX step computes) and `full`
(every token in every block, the adapt MLP on every history slot: for
reference), torch at each --threads (torch.set_num_threads). They are timed
interleaved, --rounds rounds of --steps steps each, best kept; printed:
steps/s, instances/s, the speed ratio JAX / torch, the machine load
(os.getloadavg) and the thread counts. Header: the fp32 matmul peak of
jnp.dot and of torch.mm at each thread count.

  python experiments/bench_twin.py --config=experiments/configs/demo.py
  python experiments/bench_twin.py --config=experiments/configs/movielens.py \
      --config.data.dir=/work/shared/data/ml-100k
Flags --steps, --rounds, --stages, --workdir (dataset cache, default a temp
dir) are bench_train's. Parameters are freshly initialized: throughput does
not depend on training. The downstream stage reads random InsEmbs from a
`MemoryTable`, as in bench_train's section 2.
"""

from __future__ import annotations

import os
import time

if __name__ == "__main__":
  from iat_jax import allocator
  allocator.ensure()  # as bench_train and iat_jax.main do

from absl import app
from absl import flags
import jax
import torch

import bench_train  # experiments/, next to this file; defines the shared flags
import torch_twin

FLAGS = flags.FLAGS
_THREADS = flags.DEFINE_list("threads", ["1", "2"], "torch.set_num_threads values.")
_ALGORITHMS = flags.DEFINE_list("algorithms", ["same", "full"],
                                "Twin algorithms (torch_twin.ALGORITHMS).")


def torch_matmul_peak(n: int = 2048, reps: int = 5) -> float:
  """Best fp32 FLOP/s of an n x n x n torch.mm at the current thread count."""
  a = torch.randn(n, n)
  torch.mm(a, a)
  best = float("inf")
  for _ in range(reps):
    t = time.perf_counter()
    torch.mm(a, a)
    best = min(best, time.perf_counter() - t)
  return 2 * n**3 / best


class _TwinBench:
  """One stage x algorithm: the eager twin's train step on a fixed batch."""

  def __init__(self, bench: bench_train._StepBench, algorithm: str):
    run = bench.run
    self.model = torch_twin.build(run.config.stage, run.config, run.ds.schema,
                                  algorithm)
    torch_twin.load_flax_params(self.model, bench.state.params)
    self.params = sum(p.numel() for p in self.model.parameters())
    self.step = torch_twin.TrainStep(self.model, run.config, run.num_steps)
    self.batch = torch_twin.torch_batch(run.train_data[0], algorithm)
    with torch.no_grad():
      self.loss = torch_twin.task_loss(self.model(self.batch), self.batch["labels"],
                                       self.batch["mask"]).item()

  def time(self, n: int) -> float:
    """Seconds per step over n steps, after one untimed step."""
    self.step(self.batch)
    t = time.perf_counter()
    for _ in range(n):
      self.step(self.batch)
    return (time.perf_counter() - t) / n


def _line(name: str, sec: float, instances: int, flops: float) -> str:
  return (f"{name}: {1 / sec:7.2f} steps/s, {instances / sec:9,.0f} instances/s, "
          f"{flops / sec / 1e9:6.2f} GFLOP/s of the JAX step's FLOPs")


def bench_stage(config, workdir, stage, ds, table) -> None:
  """Times one stage's JAX step and its twins interleaved; prints them."""
  jx = bench_train._StepBench(config, workdir, stage, ds, table, "after")
  twins = {a: _TwinBench(jx, a) for a in _ALGORITHMS.value}
  jx.state, out, _ = jx.run.train_step(jx.state, jx.batch)  # at the twins' params
  losses = ", ".join(f"torch {a} {tw.loss:.6f}" for a, tw in twins.items())
  threads = [int(t) for t in _THREADS.value]
  best = {"jax": float("inf")}
  best.update({(a, t): float("inf") for a in twins for t in threads})
  for _ in range(FLAGS.rounds):
    best["jax"] = min(best["jax"], jx.time(FLAGS.steps)[0])
    for t in threads:
      torch.set_num_threads(t)
      for a, tw in twins.items():
        best[a, t] = min(best[a, t], tw.time(FLAGS.steps))
  counts = {tw.params for tw in twins.values()}
  print(f"  {stage}: {jx.flops:.3g} FLOPs/step (JAX), params JAX "
        f"{jx.run.cost()['params']:,} torch {', '.join(f'{c:,}' for c in counts)}; "
        f"loss on the batch: JAX {float(out['loss']):.6f}, {losses}")
  print("  " +
        _line(f"{stage:16s} jax after         ", best["jax"], jx.instances, jx.flops) +
        f"  [{bench_train._load()}]")
  for a in twins:
    for t in threads:
      sec = best[a, t]
      print("  " +
            _line(f"{stage:16s} torch {a:4s} {t} thread", sec, jx.instances, jx.flops) +
            f"; jax/torch speed {sec / best['jax']:.2f}x"
            f"  [{bench_train._load()}]")


def main(argv) -> None:
  del argv
  config = FLAGS.config
  workdir, ds = bench_train.prepare(config)
  cores = len(os.sched_getaffinity(0))
  print(f"dataset {ds.schema.dataset}: {ds.num_rows:,} rows; JAX devices "
        f"{jax.devices()} (XLA:CPU threads: all {cores} cores); torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads by default  "
        f"[{bench_train._load()}]")
  peaks = [f"jnp.dot {bench_train.matmul_peak() / 1e9:.1f}"]
  for t in _THREADS.value:
    torch.set_num_threads(int(t))
    peaks.append(f"torch.mm {t} thread {torch_matmul_peak() / 1e9:.1f}")
  print(f"fp32 matmul 2048^3 GFLOP/s: {', '.join(peaks)}  [{bench_train._load()}]")
  table = bench_train.random_table(config, ds)
  print(f"train steps (fp32), batch {config.batch_size}, {FLAGS.steps} steps x "
        f"{FLAGS.rounds} interleaved rounds, best kept  [{bench_train._load()}]")
  for stage in FLAGS.stages:
    bench_stage(config, workdir, stage, ds, table)


if __name__ == "__main__":
  app.run(main)
