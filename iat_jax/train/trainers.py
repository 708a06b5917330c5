"""The trainers a stage can name (`iat_jax.stages.Stage.trainer`).

Each is `train(config, workdir, name, ds, table) -> results dict`: trains
config.stage into <workdir>/<name>, resuming from its checkpoints, and writes
its results.json; `table` is the InsEmb store a downstream stage reads.
"""

from __future__ import annotations

import ml_collections

from iat_jax import stages
from iat_jax.data import dataset as dataset_lib
from iat_jax.train import stream_lib
from iat_jax.train import train_lib
from iat_jax.train import two_pass_lib

TRAINERS = {
    "loop": train_lib.train,
    "user_order": two_pass_lib.train_user_order,
    "stream": stream_lib.train_stream,
}


def train(config: ml_collections.ConfigDict,
          workdir: str,
          name: str,
          ds: dataset_lib.Dataset,
          table=None) -> dict:
  """Trains config.stage with the trainer its `stages` entry names."""
  return TRAINERS[stages.get(config.stage).trainer](config, workdir, name, ds, table)
