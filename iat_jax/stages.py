"""The stages a run can train, and the models a pipeline produces: one table each.

A stage (`--config.stage`) is one trainable model with everything the rest of
the package needs to know about it:

  name     the value of --config.stage (and the default stage directory);
  model    (run config, schema) -> the Flax module (`iat_jax.models`);
  order    the batches it trains and evaluates on: a key of
           `iat_jax.data.orders.ORDERS`;
  exports  whether its InsEmbs go to a store (`--mode=export`);
  reads    the config key naming the source whose store it reads, or None;
  trainer  the trainer that runs it (a key of `iat_jax.train.trainers.TRAINERS`).

`PIPELINE` lists the models `--mode=pipeline` produces, each a stage plus the
source model whose store it reads (set as the stage's `reads` key: the
streaming source starts from that model's best checkpoint and store). Adding a stage = one `STAGES` entry (and a
`PIPELINE` entry to run it in the pipeline) + its model and trainer code.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import flax.linen as nn
import ml_collections

from iat_jax import errors
from iat_jax.data import schema as schema_lib
from iat_jax.models import iat
from iat_jax.models import ranker
from iat_jax.models import source

ModelFn = Callable[[ml_collections.ConfigDict, schema_lib.Schema], nn.Module]


@dataclasses.dataclass(frozen=True)
class Stage:
  """One trainable stage (see the module docstring)."""
  name: str
  model: ModelFn
  order: str
  exports: bool
  reads: str | None
  trainer: str


def _frozen(cls) -> ModelFn:
  return lambda config, schema: cls(ml_collections.FrozenConfigDict(config.model),
                                    schema)


def _stream_model(config, schema) -> nn.Module:
  return source.StreamSource(ml_collections.FrozenConfigDict(config.model),
                             schema,
                             mode=config.stream.mode)


STAGES: dict[str, Stage] = {
    s.name: s for s in (
        Stage("base",
              _frozen(ranker.Ranker),
              "temporal",
              exports=False,
              reads=None,
              trainer="loop"),
        Stage("source_temporal",
              _frozen(source.TemporalSource),
              "temporal",
              exports=True,
              reads=None,
              trainer="loop"),
        Stage("source_user",
              _frozen(source.UserSource),
              "user_chunks",
              exports=True,
              reads=None,
              trainer="user_order"),
        Stage("source_stream",
              _stream_model,
              "stream",
              exports=True,
              reads="stream.init_from",
              trainer="stream"),
        Stage("downstream",
              _frozen(iat.Downstream),
              "history",
              exports=False,
              reads="store.source",
              trainer="loop"),
    )
}

# Stages whose InsEmbs a downstream model can read.
SOURCES = tuple(name for name, s in STAGES.items() if s.exports)


@dataclasses.dataclass(frozen=True)
class PipelineModel:
  """A model of the pipeline: `stage` trained into <workdir>/<name>, reading
  the store of model `source` (the config key `Stage.reads` of `stage` is set
  to `source`). A source model's store is its own: <workdir>/stores/<name>
  (`tables.path`), so two models over one stage never share one."""
  name: str
  stage: Stage
  source: str | None = None


# In the order the pipeline runs them.
PIPELINE: dict[str, PipelineModel] = {
    m.name: m for m in (
        PipelineModel("base", STAGES["base"]),
        PipelineModel("source_temporal", STAGES["source_temporal"]),
        PipelineModel("temporal_iat", STAGES["downstream"], "source_temporal"),
        PipelineModel("source_user", STAGES["source_user"]),
        PipelineModel("user_iat", STAGES["downstream"], "source_user"),
        PipelineModel("source_stream", STAGES["source_stream"], "source_user"),
        PipelineModel("stream_iat", STAGES["downstream"], "source_stream"),
    )
}


def get(name: str) -> Stage:
  """The stage called `name`; ConfigError naming --config.stage otherwise."""
  if name not in STAGES:
    raise errors.ConfigError("stage", f"{name!r} is not one of {tuple(STAGES)}")
  return STAGES[name]


def make_model(config: ml_collections.ConfigDict, schema: schema_lib.Schema,
               stage: str) -> nn.Module:
  """The Flax module of `stage` for `schema` under the run `config`."""
  return get(stage).model(config, schema)


def read_source(config: ml_collections.ConfigDict, stage: Stage) -> str | None:
  """The model whose store `stage` reads under `config` (or None)."""
  if stage.reads is None:
    return None
  block, key = stage.reads.split(".")
  return config[block][key]
