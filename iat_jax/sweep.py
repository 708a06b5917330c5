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

import collections
import csv
import importlib.util
import itertools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from typing import Sequence

from absl import app
from absl import flags
from absl import logging
import ml_collections

from iat_jax import launch_lib


# Lines of the metric plots.
PLOT_MODELS = ("base", "temporal_iat", "user_iat")
# The user-order IAT system whose cost the scaling fit uses.
SCALING_MODELS = ("source_user", "user_iat")

# ---------------------------------------------------------------- statistics

# t_{0.975, df} for df = 1..30.
_T975 = (12.7062, 4.30265, 3.18245, 2.77645, 2.57058, 2.44691, 2.36462, 2.30600,
         2.26216, 2.22814, 2.20099, 2.17881, 2.16037, 2.14479, 2.13145, 2.11991,
         2.10982, 2.10092, 2.09302, 2.08596, 2.07961, 2.07387, 2.06866, 2.06390,
         2.05954, 2.05553, 2.05183, 2.04841, 2.04523, 2.04227)


def t_quantile(df: int) -> float:
  """Two-sided 95% Student-t quantile t_{0.975, df}; inf for df < 1.

  A table for df <= 30, then the Cornish-Fisher expansion around the normal
  quantile (error < 1e-5 there).
  """
  if df < 1:
    return math.inf
  if df <= len(_T975):
    return _T975[df - 1]
  z, v = 1.959963985, float(df)
  return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2)
          + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
  """Mean and the half-width of its 95% t-interval (nan for one value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, math.nan
  var = sum((v - mean) ** 2 for v in values) / (n - 1)
  return mean, t_quantile(n - 1) * math.sqrt(var / n)


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict:
  """Least squares y = intercept + slope * x.

  Returns:
    dict with slope, slope_ci (half-width of its 95% t-interval, n - 2 df;
    nan for n = 2), intercept, r2 and n.
  """
  n = len(x)
  mx, my = sum(x) / max(n, 1), sum(y) / max(n, 1)
  sxx = sum((a - mx) ** 2 for a in x)
  if sxx == 0:
    raise ValueError(f"need two distinct x values, got {list(x)}")
  slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
  intercept = my - slope * mx
  sse = sum((b - intercept - slope * a) ** 2 for a, b in zip(x, y))
  syy = sum((b - my) ** 2 for b in y)
  ci = t_quantile(n - 2) * math.sqrt(sse / (n - 2) / sxx) if n > 2 else math.nan
  return {"slope": slope, "slope_ci": ci, "intercept": intercept,
          "r2": 1 - sse / syy if syy > 0 else 1.0, "n": n}


# ------------------------------------------------------------- sweep points


def load_config_module(config_arg: str):
  """Imports the config file of `file.py[:arg]`."""
  path = config_arg.partition(":")[0]
  spec = importlib.util.spec_from_file_location("iat_sweep_config", path)
  if spec is None:
    raise ValueError(f"--config: cannot load {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_points(config_arg: str, name: str) -> list[dict]:
  """The file's get_sweep(name), each key checked against its get_config."""
  module = load_config_module(config_arg)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{config_arg} defines no get_sweep(name)")
  points = [dict(p) for p in module.get_sweep(name)]
  check_points(config_arg, points, f"sweep {name!r}")
  names = [point_name(p) for p in points]
  if len(set(names)) != len(names):
    raise ValueError(f"sweep {name!r} has repeated points: {names}")
  return points


def check_points(config_arg: str, points, what: str) -> None:
  """Raises ValueError (naming `what`) unless every key is a config field."""
  module = load_config_module(config_arg)
  arg = config_arg.partition(":")[2]
  config = module.get_config(arg) if arg else module.get_config()
  for key in {k for p in points for k in p}:
    node = config
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ValueError(f"{what}: {key!r} is not a config field of {config_arg}")
      node = node[part]


def point_name(point: dict) -> str:
  """Filesystem-safe name of a point, e.g. 'model.sit_layers=2'."""
  render = lambda v: "-".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
  text = ",".join(f"{k}={render(v)}" for k, v in point.items()) or "default"
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def _element(value) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def flag_value(value) -> str:
  """A value as ml_collections' config flags parse it back."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(map(_element, value)) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def swept_keys(points: Sequence[dict]) -> list[str]:
  return list(dict.fromkeys(k for p in points for k in p))


def run_dir(workdir: str, point: dict, seed: int) -> str:
  return os.path.join(workdir, point_name(point), f"seed{seed}")


def command(config_arg: str, workdir: str, point: dict, seed: int, data_cache: str,
            extra_args: Sequence[str] = (), mode: str = "pipeline",
            sources_from: str = "") -> list[str]:
  """The `python -m iat_jax.main --mode=pipeline` command of one run.

  sources_from: a point directory of another sweep or table; the run then
  reads its source models from <sources_from>/seed<seed>.
  """
  data = os.path.join(data_cache, f"seed{seed}")
  reuse = ([f"--config.pipeline.sources_from={os.path.join(sources_from, f'seed{seed}')}"]
           if sources_from else [])
  return launch_lib.main_command([
      f"--config={config_arg}", f"--workdir={run_dir(workdir, point, seed)}",
      f"--mode={mode}", f"--config.data.cache_dir={data}", *reuse, *extra_args,
      *(f"--config.{k}={flag_value(v)}" for k, v in point.items()),
      f"--config.seed={seed}"])


# ------------------------------------------------------------------ running


def _run_logged(cmd: list[str], log_path: str, env: dict) -> int:
  """Runs cmd with its output appended to log_path; SIGTERMs it if we stop."""
  with open(log_path, "a") as log:
    log.write(f"$ {launch_lib.shell_join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
      return proc.wait()
    finally:
      if proc.poll() is None:  # the sweep itself was stopped: let the run checkpoint
        proc.terminate()
        proc.wait()


def _duration(seconds: float) -> str:
  return time.strftime("%H:%M:%S", time.gmtime(seconds))


def run_all(jobs: Sequence[tuple[str, list[str]]], cache_dir: str) -> list[str]:
  """Runs each (run dir, command) without a results.json; returns the failed.

  Runs share JAX's persistent compilation cache (cache_dir unless the
  environment names one), so the seeds of a point compile once.
  """
  env = {"JAX_COMPILATION_CACHE_DIR": cache_dir, **os.environ}
  todo = []
  for d, cmd in jobs:
    if os.path.exists(os.path.join(d, "results.json")):
      logging.info("sweep: skip %s (complete)", d)
    else:
      todo.append((d, cmd))
  total, failed, t0 = len(jobs), [], time.time()
  logging.info("sweep: %d runs, %d complete, %d to run", total, total - len(todo),
               len(todo))
  for i, (d, cmd) in enumerate(todo):
    os.makedirs(d, exist_ok=True)
    logging.info("sweep: run %s", d)
    start = time.time()
    code = _run_logged(cmd, os.path.join(d, "pipeline.log"), env)
    if code:
      failed.append(d)
      logging.error("sweep: %s failed (exit %d); see %s/pipeline.log", d, code, d)
    eta = (time.time() - t0) / (i + 1) * (len(todo) - i - 1)
    logging.info("sweep: %d/%d runs done, %s took %s, ETA %s",
                 total - len(todo) + i + 1, total, d, _duration(time.time() - start),
                 _duration(eta))
  return failed


# --------------------------------------------------------------- collecting


def collect(workdir: str, points: Sequence[dict], seeds: int) -> list[dict]:
  """Rows of every finished run: one per model x split x task x metric."""
  keys, rows = swept_keys(points), []
  for point in points:
    for seed in range(seeds):
      path = os.path.join(run_dir(workdir, point, seed), "results.json")
      if not os.path.exists(path):
        logging.warning("sweep: %s missing; left out", path)
        continue
      with open(path) as f:
        models = json.load(f)["models"]
      for model, r in models.items():
        for split in ("valid", "test"):
          for name, value in r[split].items():
            metric, _, task = name.partition("/")
            rows.append({"point": point_name(point),
                         **{k: point.get(k, "") for k in keys}, "seed": seed,
                         "model": model, "split": split, "task": task,
                         "metric": metric, "value": value, "params": r["params"],
                         "flops_per_batch": r["flops_per_batch"]})
  return rows


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  return pyplot


def plot_metrics(rows: Sequence[dict], points: Sequence[dict], seeds: int,
                 out_dir: str) -> list[str]:
  """test_<metric>_<task>.png: mean and 95% t-interval over seeds per model."""
  plt, values = _pyplot(), collections.defaultdict(list)
  for r in rows:
    if r["split"] == "test":
      values[r["point"], r["model"], r["task"], r["metric"]].append(r["value"])
  keys, names = swept_keys(points), [point_name(p) for p in points]
  numeric = len(keys) == 1 and all(_is_number(p.get(keys[0])) for p in points)
  xs = [float(p[keys[0]]) for p in points] if numeric else list(range(len(points)))
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for task in tasks:
    for metric in ("auc", "logloss"):
      fig, ax = plt.subplots(figsize=(6.4, 4.2))
      for model in PLOT_MODELS:
        line = [(x, *mean_ci(values[name, model, task, metric]))
                for x, name in zip(xs, names) if values[name, model, task, metric]]
        if not line:
          continue
        px, mean, hw = zip(*line)
        hw = [0.0 if math.isnan(h) else h for h in hw]
        ax.plot(px, mean, marker="o", label=model)
        ax.fill_between(px, [m - h for m, h in zip(mean, hw)],
                        [m + h for m, h in zip(mean, hw)], alpha=0.2)
      if numeric and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
      if numeric:
        ax.set_xticks(xs, [f"{x:g}" for x in xs], fontsize=8)
      else:
        ax.set_xticks(xs, names, rotation=15, ha="right", fontsize=7)
      ax.set_xlabel(keys[0] if numeric else "point")
      ax.set_ylabel(f"test {metric}")
      ax.set_title(f"{task}: mean and 95% t-interval over {seeds} seed(s)", fontsize=9)
      ax.legend(fontsize=8)
      fig.tight_layout()
      paths.append(os.path.join(out_dir, f"test_{metric}_{task}.png"))
      fig.savefig(paths[-1], dpi=100)
      plt.close(fig)
  return paths


def scaling_fits(rows: Sequence[dict], points: Sequence[dict],
                 seeds: int) -> list[dict]:
  """Least-squares fits of user_iat's test AUC and logloss changes against the
  same run's base (paired per seed, so the seeds' data differences cancel) vs
  log10(source_user + user_iat FLOPs per batch) and vs log10(their params), per
  task over every point x seed; [] unless the sweep is numeric."""
  if not all(_is_number(v) for p in points for v in p.values()):
    return []
  test = {(r["point"], r["seed"], r["model"], r["task"], r["metric"]): r
          for r in rows if r["split"] == "test"}
  tasks, fits = list(dict.fromkeys(r["task"] for r in rows)), []
  for xname, field in (("flops", "flops_per_batch"), ("params", "params")):
    for task in tasks:
      obs = {"dauc": [], "dlogloss": []}
      for name, s in itertools.product(map(point_name, points), range(seeds)):
        auc, loss = ({m: test.get((name, s, m, task, metric))
                      for m in ("base", *SCALING_MODELS)}
                     for metric in ("auc", "logloss"))
        if None in auc.values() or None in loss.values():
          continue
        x = math.log10(sum(auc[m][field] for m in SCALING_MODELS))
        for y, r in (("dauc", auc), ("dlogloss", loss)):
          obs[y].append((x, r["user_iat"]["value"] - r["base"]["value"]))
      for yname, pts in obs.items():
        if len(pts) < 3 or len({x for x, _ in pts}) < 2:
          logging.info("sweep: no fit of %s %s vs %s (too few distinct points)",
                       yname, task, xname)
          continue
        fits.append({"x": xname, "task": task, "y": yname,
                     **linear_fit(*zip(*pts)), "points": pts})
  return fits


_Y_LABELS = {"dauc": "test AUC gain, user_iat - base",
             "dlogloss": "test logloss change, user_iat - base"}
_X_LABELS = {"flops": "log10 FLOPs/batch (source_user + user_iat)",
             "params": "log10 params (source_user + user_iat)"}


def plot_scaling(fits: Sequence[dict], out_dir: str) -> list[str]:
  """scaling_<x>.png: the observations and the fitted line, task x metric."""
  plt, paths = _pyplot(), []
  for xname in dict.fromkeys(f["x"] for f in fits):
    sub = [f for f in fits if f["x"] == xname]
    tasks = list(dict.fromkeys(f["task"] for f in sub))
    fig, axes = plt.subplots(len(tasks), 2, figsize=(9, 3.2 * len(tasks)),
                             squeeze=False)
    for f in sub:
      ax = axes[tasks.index(f["task"])][0 if f["y"] == "dauc" else 1]
      x, y = zip(*f["points"])
      ax.scatter(x, y, s=14)
      ends = [min(x), max(x)]
      ax.plot(ends, [f["intercept"] + f["slope"] * e for e in ends], color="C3")
      ax.set_title(f"{f['task']}: slope {f['slope']:+.3g} ± {f['slope_ci']:.2g} (95%)",
                   fontsize=9)
      ax.set_xlabel(_X_LABELS[xname], fontsize=8)
      ax.set_ylabel(_Y_LABELS[f["y"]], fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, f"scaling_{xname}.png"))
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
  return paths


def report(workdir: str, points: Sequence[dict], seeds: int) -> list[dict]:
  """Writes results.csv, the plots and the scaling fits; returns the rows."""
  rows = collect(workdir, points, seeds)
  if not rows:
    logging.warning("sweep: no finished runs to report")
    return rows
  with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  plots = os.path.join(workdir, "plots")
  paths = plot_metrics(rows, points, seeds, plots)
  fits = scaling_fits(rows, points, seeds)
  if fits:
    paths += plot_scaling(fits, plots)
    with open(os.path.join(workdir, "scaling.json"), "w") as f:
      json.dump([{k: v for k, v in fit.items() if k != "points"} for fit in fits], f,
                indent=1)
    for fit in fits:
      print(f"scaling: {fit['y']} {fit['task']} vs log10({fit['x']}): slope "
            f"{fit['slope']:+.4g} ± {fit['slope_ci']:.2g} (95%, n={fit['n']}, "
            f"R^2={fit['r2']:.2f})")
  logging.info("sweep: wrote %d rows to %s/results.csv and %d plots", len(rows),
               workdir, len(paths))
  return rows


def define_flags() -> None:
  """The command-line flags (defined only when run, so importing this module
  next to iat_jax.main in one process does not clash with its flags)."""
  flags.DEFINE_string("config", None, "Config file[:arg], as for iat_jax.main, "
                      "that defines get_sweep(name).")
  flags.DEFINE_string("sweep", None, "Name passed to the file's get_sweep.")
  flags.DEFINE_string("workdir", None, "Sweep directory.")
  flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1 of every point.", lower_bound=1)
  flags.DEFINE_enum("emit", "none", ["none", "commands"],
                    "'commands': print one command per run, run nothing.")
  flags.DEFINE_enum("mode", "pipeline", ["pipeline"],
                    "Mode of every run (a sweep collects pipeline results).")
  flags.DEFINE_string("data_cache", "", "Dataset cache root ('' = DIR/data); seed "
                      "k uses <root>/seed<k>: synthetic data depend on the seed.")
  flags.DEFINE_string("sources_from", "", "A point directory of another sweep or "
                      "table run on the same data: seed k's runs read their source "
                      "models and stores from <dir>/seed<k> instead of training "
                      "them (for sweeps of downstream-only knobs).")
  flags.mark_flags_as_required(["config", "sweep", "workdir"])


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  workdir, seeds = f.workdir, f.seeds
  points = get_points(f.config, f.sweep)
  data_cache = f.data_cache or os.path.join(workdir, "data")
  jobs = [(run_dir(workdir, p, s),
           command(f.config, workdir, p, s, data_cache, argv[1:], f.mode,
                   f.sources_from))
          for p in points for s in range(seeds)]
  if f.emit == "commands":
    print("\n".join(launch_lib.shell_join(c) for _, c in jobs))
    return
  # SIGTERM ends the sweep through SystemExit, which SIGTERMs the current run.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  failed = run_all(jobs, os.path.join(workdir, "jax_cache"))
  report(workdir, points, seeds)
  if failed:
    sys.exit(f"sweep: {len(failed)} run(s) failed: {failed}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
