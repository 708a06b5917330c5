r"""Benchmark: continuous training's cost per period, and its throughput vs batch.

Runs, as subprocesses of `python -m iat_jax.main` on the demo config, over
one synthetic log of --periods daily periods of about --rows_per_period
instances each:

1. `--mode=continuous` over the whole log: per period, from its
   timing.jsonl, wall seconds, rows/s, bytes the period added on disk (its
   InsEmb tables, the index's new generation, its checkpoint, less what
   checkpoint rotation removed) and resident / peak memory. Targets: period
   10's time and bytes within 1.3x of period 2's (cost follows the new rows,
   not the log), resident memory flat after period 2. The InsEmb tables'
   readers fill their caches up to store.cache_bytes (MAX_OPEN + 1 shares of
   it, one per open period table), so resident memory grows while that budget
   fills; resident memory less what the readers hold (their own accounting,
   `Partitions.memory_bytes`) is what must stay flat. The synthetic log's
   periods differ in size, so the ratios per row of each period are printed
   too.
2. `--mode=pipeline` with one epoch (num_epochs=1, no mid-run evaluation)
   of the same models over the same log: the batch stage's train rows per
   second (train split rows x models / its wall time, evaluation and
   export included), against the continuous run's (every row x models / its
   wall time, progressive predictions and store writes included). Target:
   continuous >= 0.7x batch.

Both commands run in this one invocation, one after the other (each owns the
machine's cores while it runs); the load average before each is printed.
Writes <out>/bench.json.

  python experiments/bench_continuous.py --out=/tmp/bench_continuous \
      [--periods=11 --rows_per_period=100000 --models=base,source_user,user_iat]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from absl import app
from absl import flags
import numpy as np

from iat_jax import metrics

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OUT = flags.DEFINE_string("out", None, "Output directory (workdirs, bench.json).")
_PERIODS = flags.DEFINE_integer("periods", 11, "Daily periods of the synthetic log.")
_ROWS = flags.DEFINE_integer("rows_per_period", 100_000, "Instances per period.")
_MODELS = flags.DEFINE_list("models", ["base", "source_user", "user_iat"],
                            "Models of both runs (a downstream brings its source).")
_BATCH = flags.DEFINE_boolean("batch", True, "Also time the batch pipeline.")
_REPORT_ONLY = flags.DEFINE_boolean(
    "report_only", False, "Print the figures of a finished run in --out "
    "(its timing.jsonl and bench.json), running nothing.")
flags.mark_flag_as_required("out")


def _load() -> str:
  return "load " + " ".join(f"{x:.1f}" for x in os.getloadavg())


def _main(workdir: str, mode: str, *overrides: str) -> float:
  """Runs iat_jax.main; returns its wall seconds."""
  n = _PERIODS.value * _ROWS.value
  args = [
      sys.executable, "-m", "iat_jax.main",
      f"--config={_ROOT}/experiments/configs/demo.py", f"--workdir={workdir}",
      f"--mode={mode}", f"--config.data.cache_dir={_OUT.value}/data",
      f"--config.data.synthetic.num_instances={n}",
      f"--config.data.synthetic.num_users={max(n // 50, 2000)}",
      f"--config.data.synthetic.days={_PERIODS.value}", "--config.data.period=1d",
      *overrides
  ]
  print(f"{mode}: {_load()}", flush=True)
  t0 = time.time()
  with open(os.path.join(_OUT.value, f"{mode}.log"), "w") as log:
    subprocess.run(args, cwd=_ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
  return time.time() - t0


def _ratio(rows: list[dict], key: str, a: int, b: int, per_row: bool = False) -> float:
  """rows[b][key] / rows[a][key] (per row of each period if per_row)."""
  if per_row:
    return (rows[b][key] / rows[b]["rows"]) / (rows[a][key] / rows[a]["rows"])
  return rows[b][key] / rows[a][key]


def _rest(r: dict) -> int:
  """Resident bytes of a period's line less its InsEmb readers' caches."""
  return r["rss_bytes"] - r["store_cache_bytes"]


def main(argv) -> None:
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  models = "(" + ",".join(f"'{m}'" for m in _MODELS.value) + ",)"
  cont_dir = os.path.join(_OUT.value, "continuous")
  before = {}
  if _REPORT_ONLY.value:
    with open(os.path.join(_OUT.value, "bench.json")) as f:
      before = json.load(f)
    wall = before["continuous_wall_s"]
  else:
    wall = _main(cont_dir, "continuous", f"--config.continuous.models={models}")
  rows = metrics.read_jsonl(os.path.join(cont_dir, "continuous", "timing.jsonl"))
  print(f"{'period':>6} {'rows':>8} {'seconds':>8} {'rows/s':>8} {'MB grown':>9} "
        f"{'RSS GB':>7} {'peak GB':>8} {'cache GB':>9} {'RSS-cache':>10}")
  for r in rows:
    print(
        f"{r['period']:>6} {r['rows']:>8} {r['seconds']:>8.1f} {r['rows_per_s']:>8.0f} "
        f"{r['bytes_grown'] / 1e6:>9.1f} {r['rss_bytes'] / 2**30:>7.2f} "
        f"{r['peak_rss_bytes'] / 2**30:>8.2f} {r['store_cache_bytes'] / 2**30:>9.2f} "
        f"{_rest(r) / 2**30:>10.2f}")
  last = min(10, len(rows) - 1)
  total_rows = sum(r["rows"] for r in rows)
  out = {
      "periods":
          rows,
      "continuous_wall_s":
          wall,
      "time_ratio":
          _ratio(rows, "seconds", 2, last),
      "bytes_ratio":
          _ratio(rows, "bytes_grown", 2, last),
      "time_per_row_ratio":
          _ratio(rows, "seconds", 2, last, per_row=True),
      "bytes_per_row_ratio":
          _ratio(rows, "bytes_grown", 2, last, per_row=True),
      "rss_after_2_max_over_min":
          (max(r["rss_bytes"] for r in rows[2:]) / min(r["rss_bytes"] for r in rows[2:])
          ),
      "rest_after_2_max_over_min":
          max(_rest(r) for r in rows[2:]) / min(_rest(r) for r in rows[2:]),
      "continuous_rows_per_s":
          total_rows * len(_MODELS.value) / wall,
      "models":
          _MODELS.value,
  }
  print(f"period {last} / period 2: time {out['time_ratio']:.2f}x, bytes "
        f"{out['bytes_ratio']:.2f}x (target <= 1.3x); per row of each period: time "
        f"{out['time_per_row_ratio']:.2f}x, bytes {out['bytes_per_row_ratio']:.2f}x; "
        f"RSS after period 2 varies {out['rss_after_2_max_over_min']:.2f}x, RSS less "
        f"the store caches (which fill up to store.cache_bytes) "
        f"{out['rest_after_2_max_over_min']:.2f}x")
  if _REPORT_ONLY.value and "batch_wall_s" in before:
    batch_wall = before["batch_wall_s"]
  elif _BATCH.value:
    pipe_models = [
        m for m in _MODELS.value if m in ("base", "temporal_iat", "user_iat")
    ]
    listed = "(" + ",".join(f"'{m}'" for m in pipe_models) + ",)"
    batch_wall = _main(os.path.join(_OUT.value, "batch"), "pipeline",
                       f"--config.pipeline.models={listed}", "--config.num_epochs=1",
                       "--config.eval_every=0")
  else:
    batch_wall = None
  if batch_wall is not None:
    train_rows = int(np.round(total_rows * 0.8))
    out["batch_wall_s"] = batch_wall
    out["batch_rows_per_s"] = train_rows * len(_MODELS.value) / batch_wall
    out["throughput_ratio"] = out["continuous_rows_per_s"] / out["batch_rows_per_s"]
    print(f"continuous {out['continuous_rows_per_s']:.0f} rows x models/s over "
          f"{total_rows} rows ({wall:.0f} s); batch one epoch "
          f"{out['batch_rows_per_s']:.0f} over {train_rows} train rows "
          f"({batch_wall:.0f} s): ratio {out['throughput_ratio']:.2f} (target >= 0.7)")
  with open(os.path.join(_OUT.value, "bench.json"), "w") as f:
    json.dump(out, f, indent=1)


if __name__ == "__main__":
  app.run(main)
