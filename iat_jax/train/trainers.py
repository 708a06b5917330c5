"""The trainers a stage can name (`iat_jax.stages.Stage.trainer`): one table,
each row with how its stages train, evaluate and export.

  train     (stage, config, workdir, name, ds, table) -> results dict: trains
            `stage` into <workdir>/<name>, resuming from its checkpoints, and
            writes its results.json; `table` is the InsEmb store a downstream
            stage reads;
  evaluate  (stage, config, workdir, name, ds, table) -> valid / test metrics
            of the trained stage (the streaming source: its progressive
            metrics, from the predictions it stored);
  export    (stage, config, workdir, name, ds) -> the path of the store of
            model `name` (`tables.path`), written from the trained source (the
            streaming source: checked, as it kept its store up to date).

Adding a trainer = one `TRAINERS` row; a stage names it by key.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections

from iat_jax import stages
from iat_jax.data import dataset as dataset_lib
from iat_jax.train import export_lib
from iat_jax.train import stream_lib
from iat_jax.train import train_lib
from iat_jax.train import two_pass_lib


@dataclasses.dataclass(frozen=True)
class Trainer:
  """How the stages naming this trainer train, evaluate and export."""
  train: Callable[..., dict]
  evaluate: Callable[..., dict]
  export: Callable[..., str]


TRAINERS: dict[str, Trainer] = {
    "loop":
        Trainer(train_lib.train, train_lib.evaluate_stage, export_lib.export),
    "user_order":
        Trainer(two_pass_lib.train_user_order, train_lib.evaluate_stage,
                two_pass_lib.export_user_order),
    "stream":
        Trainer(stream_lib.train_stream, stream_lib.evaluate_stream,
                stream_lib.export_stream),
}


def train(stage: stages.Stage,
          config: ml_collections.ConfigDict,
          workdir: str,
          name: str,
          ds: dataset_lib.Dataset,
          table=None) -> dict:
  """Trains `stage` (config.stage) into <workdir>/<name> with its trainer."""
  return TRAINERS[stage.trainer].train(stage, config, workdir, name, ds, table)


def evaluate(stage: stages.Stage,
             config: ml_collections.ConfigDict,
             workdir: str,
             name: str,
             ds: dataset_lib.Dataset,
             table=None) -> dict:
  """Valid / test metrics of trained `stage` in <workdir>/<name>."""
  return TRAINERS[stage.trainer].evaluate(stage, config, workdir, name, ds, table)


def export(stage: stages.Stage, config: ml_collections.ConfigDict, workdir: str,
           name: str, ds: dataset_lib.Dataset) -> str:
  """The store of model `name`, trained source `stage`; its path."""
  return TRAINERS[stage.trainer].export(stage, config, workdir, name, ds)
