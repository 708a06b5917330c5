"""The two-stage flow the paper evaluates, restartable step by step.

  base                                   (no IAT)
  source_temporal -> export -> temporal_iat (downstream on temporal InsEmbs)
  source_user     -> export -> user_iat     (downstream on user-order InsEmbs)

config.pipeline.models picks the models (an IAT model brings in its source);
config.pipeline.sources_from reads the source models and their stores from
another workdir instead. Each step is skipped when complete in the workdir
(its results.json, or a store exported from the same checkpoint) and resumed
from its checkpoints when interrupted. Ends with <workdir>/results.json and a
printed table.
"""

from __future__ import annotations

import os

from absl import logging
import jax
import ml_collections

from iat_jax.store import insemb_table
from iat_jax.train import export_lib
from iat_jax.train import stream_lib
from iat_jax.train import train_lib
from iat_jax.train import two_pass_lib

# (result name, stage, InsEmb source it reads or exports)
PLAN = (
    ("base", "base", None),
    ("source_temporal", "source_temporal", None),
    ("temporal_iat", "downstream", "source_temporal"),
    ("source_user", "source_user", None),
    ("user_iat", "downstream", "source_user"),
)


def stage_config(config: ml_collections.ConfigDict, stage: str,
                 source: str | None) -> ml_collections.ConfigDict:
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.stage = stage
  if source:
    cfg.store.source = source
  return cfg


def open_table(config: ml_collections.ConfigDict, workdir: str,
               ds) -> insemb_table.Table:
  """The downstream stage's store, checked against its config and dataset."""
  table = insemb_table.Table(export_lib.store_path(config, workdir, config.store.source))
  table.check(d=config.model.insemb_dim, source=config.store.source,
              dataset=ds.schema.fingerprint)
  return table


def train_stage(config: ml_collections.ConfigDict, workdir: str, name: str, ds,
                table=None) -> dict:
  """Trains config.stage into <workdir>/<name> by the right method."""
  if config.stage == "source_stream":
    return stream_lib.train_stream(config, workdir, name, ds)
  if config.stage == "source_user" and config.two_pass:
    return two_pass_lib.train(config, workdir, name, ds)
  return train_lib.train(config, workdir, name, ds, table)


def steps(config: ml_collections.ConfigDict) -> list[tuple[str, str, str | None]]:
  """The PLAN steps of config.pipeline.models and of their source models."""
  wanted = set(config.pipeline.models)
  wanted |= {source for name, _, source in PLAN if name in wanted and source}
  return [step for step in PLAN if step[0] in wanted]


def reused_source(sources_from: str, name: str) -> dict:
  """The results of source model `name` finished in workdir `sources_from`."""
  path = train_lib.results_path(os.path.join(sources_from, name))
  if not os.path.exists(path):
    raise ValueError(f"--config.pipeline.sources_from: {path} does not exist; "
                     f"finish that pipeline's {name} first")
  return train_lib.load_json(path)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the steps of config.pipeline.models; returns (and writes) the results
  dict. With pipeline.sources_from, source models and their stores are read
  from that workdir instead of being trained and exported here."""
  ds = train_lib.prepare_dataset(config, workdir)
  sources_from = config.pipeline.sources_from
  models = {}
  for name, stage, source in steps(config):
    cfg = stage_config(config, stage, source)
    if sources_from and stage.startswith("source"):
      models[name] = reused_source(sources_from, name)
      continue
    done = train_lib.results_path(os.path.join(workdir, name))
    if os.path.exists(done):
      logging.info("pipeline: %s already complete", name)
      models[name] = train_lib.load_json(done)
    else:
      table = (open_table(cfg, sources_from or workdir, ds)
               if stage == "downstream" else None)
      models[name] = train_stage(cfg, workdir, name, ds, table)
    if stage.startswith("source"):
      export_lib.export(cfg, workdir, name, ds)
  results = {"dataset": ds.schema.dataset, "models": models}
  if sources_from:
    results["sources_from"] = sources_from
  if jax.process_index() == 0:
    train_lib.write_json(os.path.join(workdir, "results.json"), results)
    print(format_table(results, ds.schema.tasks))
  return results


def format_table(results: dict, tasks) -> str:
  """Markdown table: test AUC / logloss per task, AUC change vs base, cost."""
  head = ["model"] + [f"{m} {t}" for t in tasks for m in ("AUC", "logloss")]
  head += [f"dAUC {t} vs base" for t in tasks] + ["params", "FLOPs/batch"]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  base = results["models"].get("base", {}).get("test", {})
  for name, r in results["models"].items():
    test = r["test"]
    cells = [name]
    cells += [f"{test[f'{m}/{t}']:.5f}" for t in tasks for m in ("auc", "logloss")]
    cells += [f"{100 * (test[f'auc/{t}'] / base[f'auc/{t}'] - 1):+.2f}%"
              if base else "-" for t in tasks]
    cells += [f"{r['params']:,}", f"{r['flops_per_batch']:.3g}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
