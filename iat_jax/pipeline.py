"""The two-stage flow the paper evaluates, restartable step by step.

  base                                   (no IAT)
  source_temporal -> export -> temporal_iat (downstream on temporal InsEmbs)
  source_user     -> export -> user_iat     (downstream on user-order InsEmbs)
  source_user -> source_stream -> stream_iat (streaming source started from
                 source_user, valid+test streamed; downstream on its store)

The models and their order are `iat_jax.stages.PIPELINE`.
config.pipeline.models picks the models (a model brings in its source, and
that one its own: stream_iat needs source_stream and source_user);
config.pipeline.sources_from reads the source models and their stores from
another workdir instead. Each step is skipped when complete in the workdir
(its results.json, or a store exported from the same checkpoint) and resumed
from its checkpoints when interrupted. Ends with <workdir>/results.json and a
printed table.
"""

from __future__ import annotations

from absl import logging
import jax
import ml_collections

from iat_jax import errors
from iat_jax import stages
from iat_jax import workdir as workdir_lib
from iat_jax.data import orders
from iat_jax.data import sources
from iat_jax.store import tables
from iat_jax.train import trainers


def stage_config(config: ml_collections.ConfigDict,
                 model: stages.PipelineModel) -> ml_collections.ConfigDict:
  """The run config of one pipeline model: its stage and the source it reads
  (the stage's `reads` key: store.source, or stream.init_from)."""
  cfg = ml_collections.ConfigDict(config.to_dict())
  cfg.stage = model.stage.name
  if model.source:
    block, key = model.stage.reads.split(".")
    cfg[block][key] = model.source
  return cfg


def open_store(stage: stages.Stage, config: ml_collections.ConfigDict, workdir: str,
               ds):
  """The store `stage`'s batches look InsEmbs up in (checked), or None.

  Only an order that reads a store gets one through the input pipeline; the
  streaming stage opens the one it starts from itself."""
  if not orders.get(stage.order).reads_store:
    return None
  return tables.open_checked(config, workdir, stages.read_source(config, stage),
                             ds.schema.fingerprint)


def steps(config: ml_collections.ConfigDict) -> list[stages.PipelineModel]:
  """The PIPELINE models of config.pipeline.models and of their sources (and
  of those sources' sources), in pipeline order."""
  wanted = set()
  todo = list(config.pipeline.models)
  while todo:
    name = todo.pop()
    if name not in wanted:
      wanted.add(name)
      todo += [stages.PIPELINE[name].source] if stages.PIPELINE[name].source else []
  return [m for name, m in stages.PIPELINE.items() if name in wanted]


def reused_source(sources_from: str, name: str) -> dict:
  """The results of source model `name` finished in workdir `sources_from`."""
  directory = workdir_lib.stage_dir(sources_from, name)
  if not workdir_lib.is_complete(directory):
    raise errors.ConfigError(
        "pipeline.sources_from",
        f"{workdir_lib.results_path(directory)} does not exist; "
        f"finish that pipeline's {name} first")
  return workdir_lib.load_results(directory)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs the steps of config.pipeline.models; returns (and writes) the results
  dict. With pipeline.sources_from, source models and their stores are read
  from that workdir instead of being trained and exported here."""
  ds = sources.prepare(config, workdir)
  orders.check_sizes(config, ds, [m.stage.order for m in steps(config)])
  sources_from = config.pipeline.sources_from
  models = {}
  for model in steps(config):
    cfg = stage_config(config, model)
    exports = model.stage.exports
    if sources_from and exports:
      models[model.name] = reused_source(sources_from, model.name)
      continue
    directory = workdir_lib.stage_dir(workdir, model.name)
    if workdir_lib.is_complete(directory):
      logging.info("pipeline: %s already complete", model.name)
      models[model.name] = workdir_lib.load_results(directory)
    else:
      table = open_store(model.stage, cfg, sources_from or workdir, ds)
      models[model.name] = trainers.train(model.stage, cfg, workdir, model.name, ds,
                                          table)
    if exports:
      trainers.export(model.stage, cfg, workdir, model.name, ds)
  results = {"dataset": ds.schema.dataset, "models": models}
  if sources_from:
    results["sources_from"] = sources_from
  if jax.process_index() == 0:
    workdir_lib.write_results(workdir, results)
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
    cells += [
        f"{100 * (test[f'auc/{t}'] / base[f'auc/{t}'] - 1):+.2f}%" if base else "-"
        for t in tasks
    ]
    cells += [f"{r['params']:,}", f"{r['flops_per_batch']:.3g}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)
