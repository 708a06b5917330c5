"""Registry of data sources: each builds its instance dataset from a config.

A source is one entry of `SOURCES`, keyed by `config.data.source`:

  name       the value of --config.data.source
  subdir     data config -> the dataset's directory name under the cache dir
  build      (data config, out path, seed) -> builds (or reuses) the dataset
  validate   data config -> raises errors.ConfigError naming the
             --config.data.* flag of a value `build` cannot use
  schema     (data config, seed) -> the dataset's schema without building
             it, for sources whose vocabularies follow from their knobs
             (synthetic); None: the schema is the built dataset's

Adding a dataset = one module under `iat_jax/data/` with a `build` and a
`validate_config`, and one `register(Source(...))` entry below; knobs of its
own go into a block config.data.<name> that the module declares
(`default_config`, added by `iat_jax.configs.base_config`, as
`synthetic.default_config`). Nothing outside `iat_jax/data/` branches on the
source name: the rest of the package calls `validate(config)` (through
`iat_jax.validation.validate`) and `prepare(config, workdir)`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import jax
from jax.experimental import multihost_utils
import ml_collections

from iat_jax import errors
from iat_jax.data import dataset as dataset_lib
from iat_jax.data import kuairand
from iat_jax.data import movielens
from iat_jax.data import schema as schema_lib
from iat_jax.data import synthetic

DataConfig = ml_collections.ConfigDict


@dataclasses.dataclass(frozen=True)
class Source:
  """How one data source turns its config block into a dataset directory."""
  name: str
  subdir: Callable[[DataConfig], str]
  build: Callable[[DataConfig, str, int], str]
  validate: Callable[[DataConfig], None]
  schema: Callable[[DataConfig, int], schema_lib.Schema] | None = None


SOURCES: dict[str, Source] = {}


def register(source: Source) -> Source:
  if source.name in SOURCES:
    raise ValueError(f"data source {source.name!r} registered twice")
  SOURCES[source.name] = source
  return source


def get(name: str) -> Source:
  """The source called `name`; errors.ConfigError naming --config.data.source
  otherwise."""
  if name not in SOURCES:
    raise errors.ConfigError("data.source", f"{name!r} is not one of {tuple(SOURCES)}")
  return SOURCES[name]


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises errors.ConfigError naming the flag unless the run's data source can
  build its dataset from config.data (no file is parsed)."""
  get(config.data.source).validate(config.data)


def _dir_name(data: DataConfig) -> str:
  return os.path.basename(os.path.normpath(data.dir))


register(
    Source(name="synthetic",
           subdir=lambda data: "synthetic",
           build=lambda data, out, seed: synthetic.build(
               out, seed=seed, seq_len=data.seq_len, **data.synthetic),
           validate=synthetic.validate_config,
           schema=lambda data, seed: synthetic.make_schema(
               synthetic.Config(seed=seed, seq_len=data.seq_len, **data.synthetic))))

register(
    Source(name="movielens",
           subdir=_dir_name,
           build=lambda data, out, seed: movielens.build(
               data.dir, out, seq_len=data.seq_len),
           validate=movielens.validate_config))

register(
    Source(name="kuairand",
           subdir=_dir_name,
           build=lambda data, out, seed: kuairand.build(
               data.dir, out, seq_len=data.seq_len),
           validate=kuairand.validate_config))


def dataset_path(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Where the preprocessed dataset of the run `config` lives."""
  root = config.data.cache_dir or os.path.join(workdir, "data")
  return os.path.join(root, get(config.data.source).subdir(config.data))


def prepare(config: ml_collections.ConfigDict, workdir: str) -> dataset_lib.Dataset:
  """Builds (or reuses) the dataset of the run `config` and opens it.

  Process 0 builds; the others wait for it, then open the same directory.
  """
  path = dataset_path(config, workdir)
  if jax.process_index() == 0:
    get(config.data.source).build(config.data, path, config.seed)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("prepare_dataset")
  return dataset_lib.Dataset(path)


def schema(config: ml_collections.ConfigDict, workdir: str) -> schema_lib.Schema:
  """The schema of the run's dataset: from the source's knobs where they
  determine it (nothing built or read), else the prepared dataset's (built
  first if it is not there: its vocabularies come from the data)."""
  source = get(config.data.source)
  if source.schema is not None:
    return source.schema(config.data, config.seed)
  return prepare(config, workdir).schema
