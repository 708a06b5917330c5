"""Results of a continuous run: per-period metrics, summary, table and plots.

Metrics of record are progressive: each prediction was made before its
model learned from its row. Per period and model, `metrics.task_metrics` of
the period's predictions (exact). Over all periods after warm-up, the
overall AUC per task comes from score histograms carried in the period
checkpoints (`HIST_BINS` bins of [0, 1]: memory bounded whatever the log's
length; ties within a bin count half, so it can differ from the exact AUC in
the 4th decimal). The comparison with base is paired by period: the mean of
a model's per-period AUC minus base's, with its 95% t-interval over the
periods after warm-up (`sweeps.stats.mean_ci`).
"""

from __future__ import annotations

import math
import os

import numpy as np

from iat_jax.sweeps import stats

HIST_BINS = 1 << 14


def empty_hist(num_tasks: int) -> np.ndarray:
  """int64 [T, 2, HIST_BINS]: per task, negatives and positives by score bin."""
  return np.zeros((num_tasks, 2, HIST_BINS), np.int64)


def add_hist(hist: np.ndarray, labels: np.ndarray, probs: np.ndarray) -> None:
  """Adds predictions probs [n, T] of labels [n, T] (0/1) to `hist` in place."""
  bins = np.clip((probs * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)
  for t in range(hist.shape[0]):
    pos = labels[:, t] > 0.5
    hist[t, 1] += np.bincount(bins[pos, t], minlength=HIST_BINS)
    hist[t, 0] += np.bincount(bins[~pos, t], minlength=HIST_BINS)


def hist_auc(hist_t: np.ndarray) -> float:
  """AUC of one task's [2, HIST_BINS] histogram (nan without both classes)."""
  neg, pos = hist_t[0].astype(np.float64), hist_t[1].astype(np.float64)
  if not neg.sum() or not pos.sum():
    return math.nan
  below = np.cumsum(neg) - neg
  return float((pos * (below + 0.5 * neg)).sum() / (pos.sum() * neg.sum()))


def period_row(p: int, start: int, rows: int, warmup: bool, metrics: dict) -> dict:
  return {
      "period": p,
      "start": start,
      "rows": rows,
      "warmup": warmup,
      "models": metrics
  }


def brief(row: dict, task: str) -> str:
  return ", ".join(
      f"{n} {m.get(f'auc/{task}', math.nan):.4f}" for n, m in row["models"].items())


def summarize(rows: list[dict], hists: dict, tasks, names, num_periods: int) -> dict:
  """results.json: per-period rows, overall AUC, paired dAUC vs base."""
  record = [r for r in rows if not r["warmup"]]
  overall = {
      n: {
          f"auc/{t}": hist_auc(hists[n][i]) for i, t in enumerate(tasks)
      } for n in names
  }
  vs_base = {}
  if "base" in names and record:
    for n in names:
      if n == "base":
        continue
      vs_base[n] = {}
      for t in tasks:
        key = f"auc/{t}"
        d = [r["models"][n][key] - r["models"]["base"][key] for r in record]
        d = [x for x in d if not math.isnan(x)]
        if d:
          mean, half = stats.mean_ci(d)
          vs_base[n][key] = {
              "mean": mean,
              "ci95": half,
              "periods": len(d),
              "better": sum(x > 0 for x in d)
          }
  return {
      "periods": rows,
      "num_periods": num_periods,
      "record_periods": len(record),
      "overall": overall,
      "vs_base": vs_base
  }


def table(results: dict) -> str:
  """The printed summary: overall AUC and paired dAUC vs base per model."""
  overall = results["overall"]
  keys = sorted({k for m in overall.values() for k in m})
  lines = [
      f"continuous: {len(results['periods'])} of {results['num_periods']} periods "
      f"done, {results['record_periods']} after warm-up", f"{'model':<16}" +
      "".join(f"{k:>16}{'dAUC vs base, 95% CI (wins)':>34}" for k in keys)
  ]
  for n, m in overall.items():
    line = f"{n:<16}"
    for k in keys:
      d = results["vs_base"].get(n, {}).get(k)
      ci = ("" if d is None else f"{d['mean']:+.4f} ± {d['ci95']:.4f} "
            f"({d['better']}/{d['periods']})")
      line += f"{m[k]:>16.4f}{ci:>34}"
    lines.append(line)
  return "\n".join(lines)


def plot(results: dict, out_dir: str) -> list[str]:
  """auc_<task>.png (per-period AUC by model) and dauc_<task>.png (per-period
  dAUC vs base with the mean's 95% band)."""
  from iat_jax.sweeps import report as sweep_report  # pylint: disable=g-import-not-at-top
  plt = sweep_report.pyplot()
  rows = results["periods"]
  if not rows:
    return []
  names = list(rows[0]["models"])
  tasks = [
      k.split("/", 1)[1] for k in rows[0]["models"][names[0]] if k.startswith("auc/")
  ]
  x = [r["period"] for r in rows]
  paths = []
  for task in tasks:
    key = f"auc/{task}"
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n in names:
      ax.plot(x, [r["models"][n][key] for r in rows], marker=".", label=n)
    warm = [r["period"] for r in rows if r["warmup"]]
    if warm:
      ax.axvspan(min(warm) - 0.5,
                 max(warm) + 0.5,
                 color="grey",
                 alpha=0.15,
                 label="warm-up")
    paths.append(
        sweep_report.save_figure(plt, fig, ax, os.path.join(out_dir, f"auc_{task}.png"),
                                 "period", f"progressive AUC ({task})"))
    if "base" not in names:
      continue
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    record = [r for r in rows if not r["warmup"]]
    for n in names:
      d = results["vs_base"].get(n, {}).get(key)
      if d is None:
        continue
      xs = [r["period"] for r in record]
      line = ax.plot(xs,
                     [r["models"][n][key] - r["models"]["base"][key] for r in record],
                     marker=".",
                     label=n)[0]
      if not math.isnan(d["ci95"]):
        ax.axhspan(d["mean"] - d["ci95"],
                   d["mean"] + d["ci95"],
                   color=line.get_color(),
                   alpha=0.15)
    ax.axhline(0.0, color="black", lw=0.8)
    paths.append(
        sweep_report.save_figure(plt, fig, ax,
                                 os.path.join(out_dir, f"dauc_{task}.png"), "period",
                                 f"AUC - base AUC ({task}); band: mean's 95% CI"))
  return paths


def across_seeds(results: list[dict]) -> list[dict]:
  """Rows of a seeds table from several runs' results.json (one per seed):
  per model and task, the overall progressive AUC's mean and 95% t-interval
  over the seeds, and the dAUC vs base paired within each seed (its mean
  over the periods after warm-up), mean and interval over the seeds."""
  names = list(results[0]["overall"])
  tasks = sorted(results[0]["overall"][names[0]])
  rows = []
  for n in names:
    for key in tasks:
      auc = stats.mean_ci([r["overall"][n][key] for r in results])
      d = [r["vs_base"][n][key]["mean"] for r in results if n in r["vs_base"]]
      rows.append({
          "model": n,
          "task": key,
          "auc": auc,
          "dauc": stats.mean_ci(d) if d else None,
          "seeds": len(results)
      })
  return rows


def seeds_markdown(rows: list[dict]) -> str:
  """`across_seeds` rows as a Markdown table (dAUC: AUC minus base's)."""
  lines = [
      "| model | task | progressive AUC | dAUC vs base | ≠ 0 | seeds |",
      "|---|---|---|---|---|---|"
  ]
  for r in rows:
    auc = f"{r['auc'][0]:.5f} ± {r['auc'][1]:.5f}"
    if r["dauc"] is None:
      d = ne = "—"
    else:
      mean, half = r["dauc"]
      d = f"{mean:+.5f} ± {half:.5f}"
      ne = {True: "yes", False: "no", None: "—"}[stats.excludes_zero(mean, half)]
    lines.append(f"| {r['model']} | {r['task']} | {auc} | {d} | {ne} | {r['seeds']} |")
  return "\n".join(lines)
