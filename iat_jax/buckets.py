"""dAUC against base by the IAT length available to a request (the paper's
Fig. 5): `--mode=buckets` on a finished pipeline workdir.

For each test instance, its available length is the number of its user's
strictly earlier instances (`Dataset.earlier_count`: an instance with the
request's own timestamp does not count), before the downstream's cap at
model.hist_len. Instances are bucketed by config.buckets.edges (e.g. 0, 1,
16, 64, 256 -> "0", "1-15", "16-63", "64-255", ">=256"; and "all"). Per
bucket, task and downstream model of config.pipeline.models: the rows and
users, the AUC
of base and of the model on the same rows, and their difference with a
paired 95% interval from a Poisson bootstrap over users (every resample
weights all of a user's instances by one Poisson(1) draw, the same draw
for base and the model; config.buckets.resamples resamples). Test
predictions come from each model's best checkpoint (`train_lib.load_best`,
the same evaluation as the pipeline's). Writes <workdir>/buckets/
buckets.json and one PNG per task, and prints a Markdown table.

Memory: the test split's predictions of two models at a time and their
per-row columns, as the pipeline's own evaluation gathers them; at 1e11
rows the bootstrap would run per process on its users' rows (users never
span processes) and sum the per-run weights of `metrics.auc` across
processes; not built.
"""

from __future__ import annotations

import os
from typing import Sequence

import jax
import ml_collections
import numpy as np

from iat_jax import metrics as metrics_lib
from iat_jax import pipeline
from iat_jax import stages
from iat_jax import workdir as workdir_lib
from iat_jax.data import orders
from iat_jax.data import sources
from iat_jax.sweeps import report
from iat_jax.train import predict
from iat_jax.train import train_lib


def bucket_names(edges: Sequence[int]) -> list[str]:
  """Edges (ascending, from 0) -> one name per bucket [edges[i], edges[i+1])
  and a last ">=edges[-1]"."""
  names = []
  for lo, hi in zip(edges, list(edges[1:]) + [None]):
    if hi is None:
      names.append(f">={lo}")
    elif hi - lo == 1:
      names.append(str(lo))
    else:
      names.append(f"{lo}-{hi - 1}")
  return names


def paired_dauc(labels: np.ndarray, base: np.ndarray, model: np.ndarray,
                users: np.ndarray, resamples: int, seed: int) -> dict:
  """AUC of base and model on the same rows, their difference and its
  paired 95% Poisson-bootstrap interval over users (2.5 and 97.5
  percentiles of the resampled differences; NaN when a class is empty)."""
  a_base, a_model = metrics_lib.auc(labels, base), metrics_lib.auc(labels, model)
  _, user = np.unique(users, return_inverse=True)
  rng = np.random.default_rng(seed)
  diffs = []
  for _ in range(resamples):
    w = rng.poisson(1.0, user.max() + 1 if len(user) else 0)[user]
    diffs.append(metrics_lib.auc(labels, model, w) - metrics_lib.auc(labels, base, w))
  diffs = np.asarray(diffs, np.float64)
  diffs = diffs[np.isfinite(diffs)]
  lo, hi = (np.percentile(diffs, [2.5, 97.5]) if len(diffs) else (np.nan, np.nan))
  return {
      "auc_base": a_base,
      "auc_model": a_model,
      "dauc": a_model - a_base,
      "ci": [float(lo), float(hi)]
  }


def table(labels: np.ndarray, base: np.ndarray, model: np.ndarray, lengths: np.ndarray,
          users: np.ndarray, edges: Sequence[int], resamples: int,
          seed: int) -> list[dict]:
  """A row for all instances, then one per bucket of `lengths` (labels and
  scores [n] of one task)."""
  which = np.searchsorted(np.asarray(edges), lengths, side="right") - 1
  rows = []
  for b, name in enumerate(["all"] + bucket_names(edges), start=-1):
    sel = which >= 0 if b < 0 else which == b
    row = {"bucket": name, "rows": int(sel.sum()), "users": len(np.unique(users[sel]))}
    row.update(
        paired_dauc(labels[sel], base[sel], model[sel], users[sel], resamples,
                    seed + b + 1))
    rows.append(row)
  return rows


def _test_predictions(config, workdir: str, ds, model: stages.PipelineModel) -> dict:
  """{'ins_id', 'row', 'labels', 'probs'} of `model`'s best params on the
  test split, sorted by dataset row."""
  cfg = pipeline.stage_config(config, model)
  table_ = pipeline.open_store(model.stage, cfg, workdir, ds)
  st, _, params = train_lib.load_best(model.stage, cfg, workdir, model.name, ds, table_)
  data = orders.batches(cfg, ds, model.stage.order, "test", train=False, table=table_)
  res = predict.predict(st.eval_step, params, data, st.mesh)
  order = np.argsort(res["row"])
  return {k: v[order] for k, v in res.items()}


def _markdown(result: dict) -> str:
  lines = [
      "| model | task | bucket | rows | users | AUC base | AUC model | dAUC [95% CI] |",
      "|---|---|---|---|---|---|---|---|"
  ]
  for name, tasks in result["models"].items():
    for task, rows in tasks.items():
      for r in rows:
        lines.append(f"| {name} | {task} | {r['bucket']} | {r['rows']:,} | "
                     f"{r['users']:,} | {r['auc_base']:.4f} | {r['auc_model']:.4f} | "
                     f"{r['dauc']:+.4f} [{r['ci'][0]:+.4f}, {r['ci'][1]:+.4f}] |")
  return "\n".join(lines)


def _plot(result: dict, out_dir: str) -> list[str]:
  plt = report.pyplot()
  paths = []
  for task in result["tasks"]:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    names = bucket_names(result["edges"])
    x = np.arange(len(names))
    for k, (model, tasks) in enumerate(result["models"].items()):
      rows = tasks[task][1:]  # the buckets, not "all"
      y = np.array([r["dauc"] for r in rows])
      err = np.abs(np.array([r["ci"] for r in rows]).T - y)
      ax.errorbar(x + 0.1 * k, y, yerr=err, fmt="o", capsize=3, label=model)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xticks(x, names)
    ax.set_title(f"{result['dataset']}: dAUC vs base by IAT length ({task})")
    paths.append(
        report.save_figure(plt, fig, ax, os.path.join(out_dir, f"dauc_{task}.png"),
                           "strictly earlier instances of the user", "dAUC"))
  return paths


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """`--mode=buckets`: the table, JSON and plots of a finished pipeline."""
  ds = sources.prepare(config, workdir)
  edges = [int(e) for e in config.buckets.edges]
  models = [m for m in pipeline.steps(config) if orders.get(m.stage.order).reads_store]
  base = _test_predictions(config, workdir, ds, stages.PIPELINE["base"])
  lengths = ds.earlier_count(base["row"])
  users = np.asarray(ds["user_index"])[base["row"]]
  result = {
      "dataset": ds.schema.dataset,
      "edges": edges,
      "tasks": list(ds.schema.tasks),
      "resamples": int(config.buckets.resamples),
      "models": {}
  }
  for model in models:
    pred = _test_predictions(config, workdir, ds, model)
    if not np.array_equal(pred["row"], base["row"]):
      raise ValueError(f"{model.name} and base were evaluated on different test rows")
    result["models"][model.name] = {
        task:
            table(base["labels"][:, t], base["probs"][:, t], pred["probs"][:, t],
                  lengths, users, edges, int(config.buckets.resamples), config.seed)
        for t, task in enumerate(ds.schema.tasks)
    }
  if jax.process_index() == 0:
    out_dir = os.path.join(workdir, "buckets")
    os.makedirs(out_dir, exist_ok=True)
    workdir_lib.write_json(os.path.join(out_dir, "buckets.json"), result)
    result["plots"] = _plot(result, out_dir)
    print(_markdown(result))
  return result
