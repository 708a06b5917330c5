"""A sweep's report: results.csv, metric plots and scaling fits (PNG, JSON)."""

from __future__ import annotations

import collections
import csv
import itertools
import json
import math
import os
import re
from typing import Sequence

from absl import logging

from iat_jax.sweeps import stats

# Lines of the metric plots.
PLOT_MODELS = ("base", "temporal_iat", "user_iat")
# The user-order IAT system whose cost the scaling fit uses.
SCALING_MODELS = ("source_user", "user_iat")


def point_name(point: dict) -> str:
  """Filesystem-safe name of a point, e.g. 'model.sit_layers=2'."""
  render = lambda v: "-".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
  text = ",".join(f"{k}={render(v)}" for k, v in point.items()) or "default"
  return re.sub(r"[^A-Za-z0-9._=,+-]", "_", text)


def swept_keys(points: Sequence[dict]) -> list[str]:
  return list(dict.fromkeys(k for p in points for k in p))


def run_dir(workdir: str, point: dict, seed: int) -> str:
  return os.path.join(workdir, point_name(point), f"seed{seed}")


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
            rows.append({
                "point": point_name(point),
                **{
                    k: point.get(k, "") for k in keys
                }, "seed": seed,
                "model": model,
                "split": split,
                "task": task,
                "metric": metric,
                "value": value,
                "params": r["params"],
                "flops_per_batch": r["flops_per_batch"]
            })
  return rows


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def pyplot():
  """matplotlib.pyplot on the Agg backend (PNG files, no display)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot  # pylint: disable=g-import-not-at-top
  return pyplot


def save_figure(plt, fig, ax, path: str, xlabel: str, ylabel: str) -> str:
  """Labels the axes, adds the legend, writes `fig` to `path` (PNG) and
  closes it; returns path."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


def plot_metrics(rows: Sequence[dict], points: Sequence[dict], seeds: int,
                 out_dir: str) -> list[str]:
  """test_<metric>_<task>.png: mean and 95% t-interval over seeds per model."""
  plt, values = pyplot(), collections.defaultdict(list)
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
        line = [(x, *stats.mean_ci(values[name, model, task, metric]))
                for x, name in zip(xs, names)
                if values[name, model, task, metric]]
        if not line:
          continue
        px, mean, hw = zip(*line)
        hw = [0.0 if math.isnan(h) else h for h in hw]
        ax.plot(px, mean, marker="o", label=model)
        ax.fill_between(px, [m - h for m, h in zip(mean, hw)],
                        [m + h for m, h in zip(mean, hw)],
                        alpha=0.2)
      if numeric and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
      if numeric:
        ax.set_xticks(xs, [f"{x:g}" for x in xs], fontsize=8)
      else:
        ax.set_xticks(xs, names, rotation=15, ha="right", fontsize=7)
      ax.set_title(f"{task}: mean and 95% t-interval over {seeds} seed(s)", fontsize=9)
      paths.append(
          save_figure(plt, fig, ax, os.path.join(out_dir, f"test_{metric}_{task}.png"),
                      keys[0] if numeric else "point", f"test {metric}"))
  return paths


def scaling_fits(rows: Sequence[dict], points: Sequence[dict],
                 seeds: int) -> list[dict]:
  """Least-squares fits of user_iat's test AUC and logloss changes against the
  same run's base (paired per seed, so the seeds' data differences cancel) vs
  log10(source_user + user_iat FLOPs per batch) and vs log10(their params), per
  task over every point x seed; [] unless the sweep is numeric."""
  if not all(_is_number(v) for p in points for v in p.values()):
    return []
  test = {
      (r["point"], r["seed"], r["model"], r["task"], r["metric"]): r
      for r in rows
      if r["split"] == "test"
  }
  tasks, fits = list(dict.fromkeys(r["task"] for r in rows)), []
  for xname, field in (("flops", "flops_per_batch"), ("params", "params")):
    for task in tasks:
      obs = {"dauc": [], "dlogloss": []}
      for name, s in itertools.product(map(point_name, points), range(seeds)):
        auc, loss = ({
            m: test.get((name, s, m, task, metric)) for m in ("base", *SCALING_MODELS)
        } for metric in ("auc", "logloss"))
        if None in auc.values() or None in loss.values():
          continue
        x = math.log10(sum(auc[m][field] for m in SCALING_MODELS))
        for y, r in (("dauc", auc), ("dlogloss", loss)):
          obs[y].append((x, r["user_iat"]["value"] - r["base"]["value"]))
      for yname, pts in obs.items():
        if len(pts) < 3 or len({x for x, _ in pts}) < 2:
          logging.info("sweep: no fit of %s %s vs %s (too few distinct points)", yname,
                       task, xname)
          continue
        fits.append({
            "x": xname,
            "task": task,
            "y": yname,
            **stats.linear_fit(*zip(*pts)), "points": pts
        })
  return fits


_Y_LABELS = {
    "dauc": "test AUC gain, user_iat - base",
    "dlogloss": "test logloss change, user_iat - base"
}
_X_LABELS = {
    "flops": "log10 FLOPs/batch (source_user + user_iat)",
    "params": "log10 params (source_user + user_iat)"
}


def plot_scaling(fits: Sequence[dict], out_dir: str) -> list[str]:
  """scaling_<x>.png: the observations and the fitted line, task x metric."""
  plt, paths = pyplot(), []
  for xname in dict.fromkeys(f["x"] for f in fits):
    sub = [f for f in fits if f["x"] == xname]
    tasks = list(dict.fromkeys(f["task"] for f in sub))
    fig, axes = plt.subplots(len(tasks),
                             2,
                             figsize=(9, 3.2 * len(tasks)),
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
      json.dump([{
          k: v for k, v in fit.items() if k != "points"
      } for fit in fits],
                f,
                indent=1)
    for fit in fits:
      print(f"scaling: {fit['y']} {fit['task']} vs log10({fit['x']}): slope "
            f"{fit['slope']:+.4g} ± {fit['slope_ci']:.2g} (95%, n={fit['n']}, "
            f"R^2={fit['r2']:.2f})")
  logging.info("sweep: wrote %d rows to %s/results.csv and %d plots", len(rows),
               workdir, len(paths))
  return rows
