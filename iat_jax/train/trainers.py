"""The trainers a stage can name (`iat_jax.stages.Stage.trainer`), and the
evaluation and export that go with each.

Each trainer is `train(config, workdir, name, ds, table) -> results dict`:
trains config.stage into <workdir>/<name>, resuming from its checkpoints, and
writes its results.json; `table` is the InsEmb store a downstream stage reads.
`evaluate` re-evaluates a trained stage (the streaming source: its progressive
metrics, from the predictions it stored) and `export` writes (or, for the
streaming source, checks) a source stage's store.
"""

from __future__ import annotations

import ml_collections

from iat_jax import stages
from iat_jax.data import dataset as dataset_lib
from iat_jax.train import export_lib
from iat_jax.train import stream_lib
from iat_jax.train import train_lib
from iat_jax.train import two_pass_lib

TRAINERS = {
    "loop": train_lib.train,
    "user_order": two_pass_lib.train_user_order,
    "stream": stream_lib.train_stream,
}
# Trainers whose stages evaluate / export differently from the default.
EVALUATORS = {"stream": stream_lib.evaluate_stream}
EXPORTERS = {"stream": stream_lib.export_stream}


def train(config: ml_collections.ConfigDict,
          workdir: str,
          name: str,
          ds: dataset_lib.Dataset,
          table=None) -> dict:
  """Trains config.stage with the trainer its `stages` entry names."""
  return TRAINERS[stages.get(config.stage).trainer](config, workdir, name, ds, table)


def evaluate(config: ml_collections.ConfigDict,
             workdir: str,
             name: str,
             ds: dataset_lib.Dataset,
             table=None) -> dict:
  """Valid / test metrics of trained stage config.stage in <workdir>/<name>."""
  trainer = stages.get(config.stage).trainer
  return EVALUATORS.get(trainer, train_lib.evaluate_stage)(config, workdir, name, ds,
                                                           table)


def export(config: ml_collections.ConfigDict, workdir: str, name: str,
           ds: dataset_lib.Dataset) -> str:
  """The store of trained source stage config.stage (<workdir>/<name>); its path."""
  trainer = stages.get(config.stage).trainer
  return EXPORTERS.get(trainer, export_lib.export)(config, workdir, name, ds)
