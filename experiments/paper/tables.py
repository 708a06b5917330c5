"""The paper's Table 1 (base sequence encoders x IAT) and Table 4 (ablations).

  python experiments/paper/tables.py --table=table1|table4 \
      --config=experiments/configs/paper.py[:arg] --workdir=DIR [--seeds=3] \
      [--encoders=din,longer,transformer] [--ablations=iat_query,...] \
      [--emit=commands] [-- --config.key=value ...]

Drives iat_jax.sweeps.runner: every point x seed is one `python -m iat_jax.main
--mode=pipeline` run in DIR/<point>/seed<k>/ (finished runs are skipped, seed
k's runs share the dataset DIR/data/seed<k>, so comparisons are paired), then
DIR/results.csv and DIR/plots/ as a sweep writes them, and:

  DIR/report.md               test AUC and logloss per task (mean ± 95%
                              t-interval over seeds), the per-seed paired
                              relative AUC change vs the reference row, whether
                              its t-interval excludes 0, params, FLOPs/batch
  DIR/<table>_auc_change.png  those AUC changes with their intervals

table1: model.seq.encoder in --encoders; each pipeline gives every model of
  `stages.PIPELINE` (base, the three source models, temporal_iat, user_iat and
  stream_iat); changes are vs that encoder's base.
table4: the transformer encoder's full user-order IAT and one run per
  --ablations switch; changes of user_iat are vs the full model's user_iat.
  An ablation run trains only user_iat, reading the full run's source model
  of the same seed unless the switch changes the source (insemb_after_sit).
  Its full point is table1's transformer point, so one DIR serves both tables
  (each run rewrites report.md for its table).
Checkpoints are picked on valid inside each pipeline; test is only reported.
"""

from __future__ import annotations

import math
import os
from typing import Sequence

from absl import app
from absl import flags

from iat_jax import stages
from iat_jax.sweeps import report
from iat_jax.sweeps import runner
from iat_jax.sweeps import stats

ENCODERS = ("din", "longer", "transformer")
# Models of one pipeline, in its order; table1 charts the IAT ones.
MODELS = tuple(stages.PIPELINE)
CHART_MODELS = ("temporal_iat", "user_iat", "stream_iat")
FULL = {"model.seq.encoder": "transformer"}
# name -> (the paper's label, overrides of the full model, whether the switch
# changes the source model; the others reuse the full point's source models).
ABLATIONS = {
    "insemb_after_sit": ("InsEmb stored after SIT", {
        "model.insemb_after_sit": True
    }, True),
    "label_side": ("without label side info", {
        "model.use_label_side": False
    }, False),
    "iat_query": ("ID-based query", {
        "model.iat_query": "id"
    }, False),
    "after_interaction": ("IAT token after the feature interaction", {
        "model.iat_after_interaction": True
    }, False),
    "other_side": ("without other side info", {
        "model.use_other_side": False
    }, False),
}
# An ablation point trains only its table row (and its source model if needed).
ABLATION_FLAGS = ("--config.pipeline.models=('user_iat',)",)


def plan(
    table: str,
    encoders: Sequence[str] = ENCODERS,
    ablations: Sequence[str] = tuple(ABLATIONS)
) -> tuple[list[dict], list[dict]]:
  """The sweep points of a table and its rows.

  Returns:
    (points, rows): override dicts for iat_jax.sweep, and one dict per table
    row with label, point, model, ref (point, model) or None, group, series.
  """
  if table == "table1":
    bad = [e for e in encoders if e not in ENCODERS]
    if bad or not encoders:
      raise ValueError(f"--encoders: {bad or 'none'}; allowed: {ENCODERS}")
    points = [{"model.seq.encoder": e} for e in encoders]
    rows = [{
        "label": f"{e} / {m}",
        "point": p,
        "model": m,
        "ref": None if m == "base" else (p, "base"),
        "group": e if m in CHART_MODELS else None,
        "series": m
    } for e, p in zip(encoders, points) for m in MODELS]
    return points, rows
  if table == "table4":
    bad = [a for a in ablations if a not in ABLATIONS]
    if bad or not ablations:
      raise ValueError(f"--ablations: {bad or 'none'}; allowed: {list(ABLATIONS)}")
    points = [FULL] + [{**FULL, **ABLATIONS[a][1]} for a in ablations]
    ref = (FULL, "user_iat")
    rows = [{
        "label": "base (no IAT)",
        "point": FULL,
        "model": "base",
        "ref": ref,
        "group": None,
        "series": None
    }, {
        "label": "full user-order IAT",
        "point": FULL,
        "model": "user_iat",
        "ref": None,
        "group": None,
        "series": None
    }]
    rows += [{
        "label": ABLATIONS[a][0],
        "point": p,
        "model": "user_iat",
        "ref": ref,
        "group": ABLATIONS[a][0],
        "series": "user_iat"
    } for a, p in zip(ablations, points[1:])]
    return points, rows
  raise ValueError(f"unknown table {table!r}")


def point_runs(table: str, points: Sequence[dict], workdir: str) -> list[tuple]:
  """(extra flags, sources_from) of each point's runs, for runner.command.

  table4's ablation points train only user_iat; those of downstream-only
  switches read the full point's source model and store of the same seed.
  """
  if table != "table4":
    return [((), "")] * len(points)
  full_dir = os.path.dirname(report.run_dir(workdir, FULL, 0))
  source_side = {report.point_name({**FULL, **o}): s for _, o, s in ABLATIONS.values()}
  return [((), "") if p == FULL else
          (ABLATION_FLAGS, "" if source_side[report.point_name(p)] else full_dir)
          for p in points]


# --------------------------------------------------------------- statistics


def paired_changes(test: dict, row: dict, task: str) -> list[float]:
  """Per-seed relative test-AUC changes of a row vs its reference row, over the
  seeds where both ran. test: (point name, seed, model, task, metric) -> value."""
  name, (ref_point, ref_model) = report.point_name(row["point"]), row["ref"]
  ref_name, out = report.point_name(ref_point), []
  for seed in sorted({key[1] for key in test}):
    value = test.get((name, seed, row["model"], task, "auc"))
    ref = test.get((ref_name, seed, ref_model, task, "auc"))
    if value is not None and ref is not None:
      out.append(stats.relative_change(value, ref))
  return out


def fmt(mean: float, half: float, digits: int, sign: bool = False) -> str:
  spec = f"{'+' if sign else ''}.{digits}f"
  return f"{mean:{spec}} ± " + ("n/a" if math.isnan(half) else f"{half:.{digits}f}")


# ------------------------------------------------------------------ report


def summarize(rows: Sequence[dict], table_rows: Sequence[dict]) -> list[dict]:
  """Per table row and task: metric means/intervals, changes, cost, seeds.

  rows: iat_jax.sweeps.report.collect's rows.
  """
  test = {
      (r["point"], r["seed"], r["model"], r["task"], r["metric"]): r["value"]
      for r in rows
      if r["split"] == "test"
  }
  cost = {(r["point"], r["model"]): (r["params"], r["flops_per_batch"]) for r in rows}
  tasks = list(dict.fromkeys(r["task"] for r in rows))
  out = []
  for row in table_rows:
    name, per_task = report.point_name(row["point"]), {}
    for task in tasks:
      values = {
          metric: [
              v
              for (p, _, m, t, mt), v in test.items()
              if (p, m, t, mt) == (name, row["model"], task, metric)
          ] for metric in ("auc", "logloss")
      }
      per_task[task] = {
          metric: stats.mean_ci(v) if v else (math.nan, math.nan)
          for metric, v in values.items()
      }
      per_task[task]["n"] = len(values["auc"])
      if row["ref"] is not None:
        changes = paired_changes(test, row, task)
        per_task[task]["change"] = (stats.mean_ci(changes) if changes else
                                    (math.nan, math.nan))
    out.append({
        **row, "tasks": per_task,
        "cost": cost.get((name, row["model"]), (math.nan, math.nan))
    })
  return out


def markdown(summary: Sequence[dict], ref_name: str) -> str:
  """The Markdown table of summarize's output."""
  tasks = list(summary[0]["tasks"])
  head = ["model"]
  for t in tasks:
    head += [f"AUC {t}", f"logloss {t}", f"ΔAUC {t} vs {ref_name} (%)", f"Δ {t} ≠ 0"]
  head += ["params", "FLOPs/batch", "seeds"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for s in summary:
    cells = [s["label"]]
    for t in tasks:
      st = s["tasks"][t]
      cells += [fmt(*st["auc"], 5), fmt(*st["logloss"], 5)]
      if "change" not in st:
        cells += ["—", "—"]
      else:
        verdict = stats.excludes_zero(*st["change"])
        cells += [
            fmt(*st["change"], 3, sign=True), {
                None: "n/a",
                True: "yes",
                False: "no"
            }[verdict]
        ]
    params, flops = s["cost"]
    cells += [
        "—" if math.isnan(params) else f"{params:,}", f"{flops:.3g}",
        str(max(st["n"] for st in s["tasks"].values()))
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def plot_changes(summary: Sequence[dict], path: str, title: str) -> None:
  """Bars of the charted rows' mean AUC change, 95% t-interval error bars."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  charted = [s for s in summary if s["group"] is not None]
  groups = list(dict.fromkeys(s["group"] for s in charted))
  series = list(dict.fromkeys(s["series"] for s in charted))
  tasks = list(summary[0]["tasks"])
  fig, axes = plt.subplots(1,
                           len(tasks),
                           squeeze=False,
                           figsize=(len(tasks) * max(3.5, 1.2 + 1.1 * len(groups)),
                                    4.4))
  width = 0.8 / len(series)
  for ax, task in zip(axes[0], tasks):
    for j, name in enumerate(series):
      bars = {
          s["group"]: s["tasks"][task]["change"] for s in charted if s["series"] == name
      }
      xs = [
          i + (j - (len(series) - 1) / 2) * width
          for i, g in enumerate(groups)
          if g in bars
      ]
      mean = [bars[g][0] for g in groups if g in bars]
      err = [0.0 if math.isnan(bars[g][1]) else bars[g][1] for g in groups if g in bars]
      ax.bar(xs, mean, width, yerr=err, capsize=3, label=name)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(groups)), groups, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel(f"test AUC change, % ({task})")
    ax.set_title(task, fontsize=9)
    if len(series) > 1:
      ax.legend(fontsize=8)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(workdir: str, table: str, config_arg: str, seeds: int,
                 rows: Sequence[dict], table_rows: Sequence[dict]) -> str:
  """Writes DIR/report.md and DIR/<table>_auc_change.png; returns the text."""
  summary = summarize(rows, table_rows)
  ref_name = "base" if table == "table1" else "full"
  chart = f"{table}_auc_change.png"
  title = (f"{table}: paired relative test-AUC change vs {ref_name}, mean and 95% "
           f"t-interval over seeds")
  plot_changes(summary, os.path.join(workdir, chart), title)
  missing = sorted(
      {s["label"] for s in summary for st in s["tasks"].values() if st["n"] < seeds})
  what = ("Table 1: base sequence encoder x {base, temporal IAT, user-order IAT}"
          if table == "table1" else
          "Table 4: ablations of the user-order IAT (transformer encoder)")
  text = "\n".join([
      f"# {what}", "",
      f"Config `{config_arg}`, seeds 0..{seeds - 1} (seed k: the same data for "
      "every row). Test split, used for nothing else: each model's checkpoint "
      "is its best valid AUC of the main task over its evaluations.", "",
      "AUC, logloss: mean ± half-width of the 95% Student-t interval over seeds. "
      f"ΔAUC: per-seed relative change 100·(AUC / AUC_{ref_name} − 1) against the "
      f"same seed's {ref_name} row, mean ± 95% t-interval of those paired "
      "differences; ≠ 0: 'yes' when that interval excludes 0 (n/a with one "
      "seed). Params and FLOPs per batch of the row's own model.", "",
      markdown(summary, ref_name), "",
      *([f"Missing runs (left out): {', '.join(missing)}.", ""] if missing else []),
      f"![{title}]({chart})", ""
  ])
  with open(os.path.join(workdir, "report.md"), "w") as f:
    f.write(text)
  return text


# --------------------------------------------------------------------- main


def define_flags() -> None:
  flags.DEFINE_enum("table", None, ["table1", "table4"], "Which paper table.")
  flags.DEFINE_string("config", None, "Config file[:arg], as for iat_jax.main.")
  flags.DEFINE_string("workdir", None, "Directory of the runs and the report.")
  flags.DEFINE_integer("seeds", 3, "Seeds 0..N-1 of every row.", lower_bound=1)
  flags.DEFINE_list("encoders", list(ENCODERS), "table1: base sequence encoders.")
  flags.DEFINE_list("ablations", list(ABLATIONS), "table4: ablation switches.")
  flags.DEFINE_enum("emit", "none", ["none", "commands"],
                    "'commands': print one command per run, run nothing.")
  flags.DEFINE_string("data_cache", "", "Dataset cache root ('' = DIR/data).")
  flags.mark_flags_as_required(["table", "config", "workdir"])


def main(argv: Sequence[str]) -> None:
  f = flags.FLAGS
  points, table_rows = plan(f.table, f.encoders, f.ablations)
  runner.check_points(f.config, points, f"--table={f.table}")
  data_cache = f.data_cache or os.path.join(f.workdir, "data")
  jobs = [(report.run_dir(f.workdir, p, s),
           runner.command(f.config,
                          f.workdir,
                          p,
                          s,
                          data_cache, [*extra, *argv[1:]],
                          sources_from=sources_from))
          for p, (extra,
                  sources_from) in zip(points, point_runs(f.table, points, f.workdir))
          for s in range(f.seeds)]
  runner.execute(
      jobs,
      f.workdir,
      points,
      f.seeds,
      emit=f.emit,
      what="tables",
      on_rows=lambda rows: print(
          write_report(f.workdir, f.table, f.config, f.seeds, rows, table_rows)))


if __name__ == "__main__":
  define_flags()
  app.run(main)
