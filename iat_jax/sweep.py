"""Sweeps: one pipeline per point and seed, then a table, plots and a scaling fit.

  python -m iat_jax.sweep --config=experiments/configs/demo.py --sweep=sit_depth \
      --workdir=DIR [--seeds=3] [--emit=commands] [-- --config.key=value ...]

The config file defines `get_sweep(name)`: a list of override dicts such as
[{"model.sit_layers": 0}, {"model.sit_layers": 1}]. Each point x seed runs
`python -m iat_jax.main --mode=pipeline` into DIR/<point>/seed<k>/ with the
overrides as `--config.<key>=<value>` flags plus `--config.seed=<k>` (arguments
after `--` go to every run, e.g. `--config.pipeline.models="('base','user_iat')"`;
--sources_from=POINT_DIR reuses another run's source models, seed by seed),
one run at a time; seed k's runs share the
dataset cache DIR/data/seed<k> and all share JAX's compilation cache
(DIR/jax_cache unless JAX_COMPILATION_CACHE_DIR is set). A run whose
results.json exists is skipped; an interrupted one is re-run and its pipeline
resumes itself. Then:

  DIR/results.csv     one row per point x seed x model x split x task x metric
  DIR/plots/test_<metric>_<task>.png   metric vs swept value, mean and 95%
                      t-interval over seeds, one line per model
  DIR/plots/scaling_<flops|params>.png, DIR/scaling.json   for numeric sweeps:
                      least-squares fits of user_iat's AUC and logloss changes
                      against the same run's base vs log10 of the user-order
                      IAT system's cost (source_user + user_iat FLOPs per
                      batch, or params)
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import app
from absl import flags

from iat_jax.sweeps import report
from iat_jax.sweeps import runner


def define_flags() -> None:
  """The command-line flags (defined only when run, so importing this module
  next to iat_jax.main in one process does not clash with its flags)."""
  flags.DEFINE_string(
      "config", None, "Config file[:arg], as for iat_jax.main, "
      "that defines get_sweep(name).")
  flags.DEFINE_string("sweep", None, "Name passed to the file's get_sweep.")
  flags.DEFINE_string("workdir", None, "Sweep directory.")
  flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1 of every point.", lower_bound=1)
  flags.DEFINE_enum("emit", "none", ["none", "commands"],
                    "'commands': print one command per run, run nothing.")
  flags.DEFINE_enum("mode", "pipeline", ["pipeline"],
                    "Mode of every run (a sweep collects pipeline results).")
  flags.DEFINE_string(
      "data_cache", "", "Dataset cache root ('' = DIR/data); seed "
      "k uses <root>/seed<k>: synthetic data depend on the seed.")
  flags.DEFINE_string(
      "sources_from", "", "A point directory of another sweep or "
      "table run on the same data: seed k's runs read their source "
      "models and stores from <dir>/seed<k> instead of training "
      "them (for sweeps of downstream-only knobs).")
  flags.mark_flags_as_required(["config", "sweep", "workdir"])


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  points = runner.get_points(f.config, f.sweep)
  data_cache = f.data_cache or os.path.join(f.workdir, "data")
  jobs = [(report.run_dir(f.workdir, p, s),
           runner.command(f.config, f.workdir, p, s, data_cache, argv[1:], f.mode,
                          f.sources_from)) for p in points for s in range(f.seeds)]
  runner.execute(jobs, f.workdir, points, f.seeds, emit=f.emit)


if __name__ == "__main__":
  define_flags()
  app.run(main)
