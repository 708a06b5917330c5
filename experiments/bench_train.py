r"""Train-step, export and store-in-the-loop throughput (prints figures).

For a config (default: the demo config), in one run:
  1. export throughput: a source model's forward pass over every instance,
     each batch's InsEmbs written as they come through the store's export
     (`tables.export_writer` ... `tables.finish_export`, as --mode=export
     does), published as one table version (instances/s);
  2. downstream training with the InsEmb store (TensorStore) in the input
     pipeline vs the same InsEmbs preloaded in memory (`MemoryTable`):
     steps/s, instances/s and their ratio (target >= 0.8: the store must not
     be the bottleneck);
  3. the compiled train step alone: XLA FLOPs per step, steps/s and, when
     --peak_tflops is given (the device's peak), model FLOPs utilisation.

  python experiments/bench_train.py --config=experiments/configs/demo.py \
      [--config.model.dtype=bfloat16] [--peak_tflops=989]
Parameters are freshly initialized: throughput does not depend on training.
"""

from __future__ import annotations

import tempfile
import time

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from iat_jax.data import input_pipeline
from iat_jax.data import sources
from iat_jax.store import memory_table
from iat_jax.store import tables
from iat_jax.train import cost
from iat_jax.train import predict
from iat_jax.train import steps
from iat_jax.train import train_lib

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/demo.py",
                                          "Experiment config.")
_STEPS = flags.DEFINE_integer("steps", 50, "Timed steps per measurement.")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU.")


def _time_steps(st: train_lib.Run, data, n: int):
  """(seconds per step incl. host input, state) over n steps after a warm-up.

  The step donates its input state, so the returned state replaces st.state.
  """
  it = input_pipeline.iterate(data)
  state = st.state
  state, out, _ = st.train_step(state, steps.to_device(next(it), st.mesh))
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(n):
    state, out, _ = st.train_step(state, steps.to_device(next(it), st.mesh))
  jax.block_until_ready(out)
  return (time.perf_counter() - t) / n, state


def main(argv) -> None:
  del argv
  config = _CONFIG.value
  workdir = tempfile.mkdtemp(prefix="iat-bench-")
  ds = sources.prepare(config, workdir)
  print(f"dataset {ds.schema.dataset}: {ds.num_rows:,} rows; devices {jax.devices()}")

  source = config.copy_and_resolve_references()
  source.stage = "source_temporal"
  st = train_lib.Run(source, workdir, "source_temporal", ds)
  path = f"{workdir}/store"
  t = time.perf_counter()
  out = tables.export_writer(source, path, source="source_temporal", step=0,
                             fingerprint=ds.schema.fingerprint)
  n = 0
  for split in ("train", "valid", "test"):
    for batch in input_pipeline.iterate(train_lib.batches(
        source, ds, "source_temporal", split, train=False)):
      mask = np.asarray(batch["mask"]).reshape(-1)
      res = st.eval_step(st.state.params, steps.to_device(batch, st.mesh))
      values = predict.local_rows(res["insemb"])
      out.add(np.asarray(batch["ins_id"]).reshape(-1)[mask],
              values.reshape(-1, values.shape[-1])[mask])
      n += int(mask.sum())
  tables.finish_export(out)
  dt = time.perf_counter() - t
  print(f"export: {n:,} instances in {dt:.1f} s = {n / dt:,.0f} instances/s")
  store = tables.Table(path)
  keys = np.asarray(ds["ins_id"])
  values, _ = store.lookup(keys)  # the same (quantized) values, in memory

  down = config.copy_and_resolve_references()
  down.stage = "downstream"
  results = {}
  for name, table in (("store", tables.Table(path)),
                      ("in-memory", memory_table.MemoryTable(keys, values))):
    st = train_lib.Run(down, workdir, f"downstream-{name}", ds, table)
    sec, state = _time_steps(st, st.train_data, _STEPS.value)
    results[name] = sec
    print(f"downstream, InsEmbs from {name:9s}: {1 / sec:6.2f} steps/s "
          f"{config.batch_size / sec:9,.0f} instances/s")
  print(f"store / in-memory throughput ratio: "
        f"{results['in-memory'] / results['store']:.2f} (target >= 0.8)")

  flops = cost.compiled_flops(st.train_step)
  batch = steps.to_device(st.train_data[0], st.mesh)
  state, out, _ = st.train_step(state, batch)
  jax.block_until_ready(out)
  t = time.perf_counter()
  for _ in range(_STEPS.value):
    state, out, _ = st.train_step(state, batch)
  jax.block_until_ready(out)
  sec = (time.perf_counter() - t) / _STEPS.value
  line = (f"train step alone ({config.model.dtype}): {flops:.3g} FLOPs, {1 / sec:.2f} "
          f"steps/s, {config.batch_size / sec:,.0f} instances/s, "
          f"{flops / sec / 1e12:.3f} TFLOP/s")
  if _PEAK.value:
    line += f", MFU {flops / sec / (_PEAK.value * 1e12):.2%}"
  print(line)


if __name__ == "__main__":
  app.run(main)
