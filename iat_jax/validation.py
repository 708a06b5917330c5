"""The one check of a run config before any work: `validate(config)`.

The entry point (`iat_jax.main`, hence every launcher and every sweep run)
calls `validate` first; a config that cannot run raises `errors.ConfigError`
whose message starts with the flag (`--config.<key>: ...`). Each check lives
with what it checks:

  config.data      the data source's own check (`sources.validate`: the
                   source module's `validate_config`, e.g. the synthetic
                   generator's knobs)
  the run's knobs  sizes and length limits, evaluation context, mesh (here)
  stages           stage, store.source, stream.*, pipeline.models against
                   `iat_jax.stages` (here)
  config.model     name-valued knobs against the modules that define their
                   choices (`MODEL_CHOICES`), RankMixer's token shape (here)
  config.store     backend, dtype, layout and cache
                   (`iat_jax.store.tables.validate_config`)

Two checks need more than the config and run as soon as that is known:
`validate_devices` (the mesh against the device count, before the dataset is
built) and `orders.check_sizes` (batch sizes against the split sizes, right
after `sources.prepare`); the memory a compiled train step needs is checked
when the stage is built (`iat_jax.train.memory.check`).

Unlike the defaults (`iat_jax.configs`), this module imports the registries,
hence JAX and Flax.
"""

from __future__ import annotations

from typing import Collection

import ml_collections
import numpy as np

from iat_jax import configs
from iat_jax import errors
from iat_jax import stages
from iat_jax.data import periods
from iat_jax.data import schema as schema_lib
from iat_jax.data import sources
from iat_jax.models import iat
from iat_jax.models import interaction
from iat_jax.models import sequence
from iat_jax.models import source as source_models
from iat_jax.store import tables

Config = ml_collections.ConfigDict

# Allowed values of the model's name-valued knobs, by their key under
# config.model.
MODEL_CHOICES = {
    "seq.encoder": sequence.ENCODERS + ("none",),
    "iat.encoder": sequence.ENCODERS,
    "interaction": interaction.INTERACTIONS,
    "iat_query": iat.QUERY_MODES,
    "dtype": ("float32", "bfloat16"),
}
# Knobs that must be > 0.
_POSITIVE = ("batch_size", "users_per_batch", "data.user_chunk_len", "eval_batch_size",
             "model.hist_len", "stream.k", "num_epochs", "data.seq_len", "log_every",
             "checkpoint_every", "keep_checkpoints")
# Lengths that size position tables and activations: at most configs.MAX_LEN.
_LENGTHS = ("data.seq_len", "model.hist_len", "data.user_chunk_len", "stream.k")


def validate(config: Config) -> None:
  """Raises errors.ConfigError naming the flag for a config that cannot run."""
  _one_of(config, "stage", stages.STAGES)
  sources.validate(config)
  _check_run(config)
  tables.validate_config(config)
  _check_stages(config)
  _check_mesh(config)
  _check_model(config)
  _check_continuous(config)
  _check_buckets(config)


def validate_devices(config: Config, num_devices: int) -> None:
  """Raises errors.ConfigError naming --config.mesh_shape unless the mesh fits
  `num_devices` (jax.device_count()); call before building the dataset."""
  shape = tuple(config.mesh_shape)
  known = int(np.prod([s for s in shape if s != -1]))
  if any(s == 0 or s < -1 for s in shape):
    raise errors.ConfigError("mesh_shape", f"{shape}: sizes must be > 0 (or -1)")
  if -1 in shape:
    ok, need = num_devices % known == 0, f"a multiple of {known}"
  else:
    ok, need = known == num_devices, str(known)
  if not ok:
    raise errors.ConfigError(
        "mesh_shape", f"{shape} over --config.mesh_axes={tuple(config.mesh_axes)} "
        f"needs {need} devices, this run has {num_devices}; use -1 for one axis "
        f"to take all devices")


def flag_value(config: Config, flag: str):
  """The value of --config.<flag> (a dotted path) in `config`."""
  value = config
  for part in flag.split("."):
    value = value[part]
  return value


def _need(ok: bool, flag: str, message: str) -> None:
  if not ok:
    raise errors.ConfigError(flag, message)


def _one_of(config: Config, flag: str, allowed: Collection[str]) -> None:
  value = flag_value(config, flag)
  _need(value in allowed, flag, f"{value!r} is not one of {tuple(allowed)}")


def _check_run(config: Config) -> None:
  """The run's own knobs: seed, sizes, length limits, evaluation."""
  _need(config.seed >= 0, "seed", f"must be >= 0, got {config.seed}")
  for flag in _POSITIVE:
    _need(
        flag_value(config, flag) > 0, flag,
        f"must be > 0, got {flag_value(config, flag)}")
  for flag in _LENGTHS:
    _need(
        flag_value(config, flag) <= configs.MAX_LEN, flag,
        f"{flag_value(config, flag)} is above the limit of {configs.MAX_LEN} (it sizes "
        f"position tables and [batch, length, width] activations)")
  _need(config.eval_every >= 0, "eval_every", "must be >= 0")
  data = config.data
  _need(
      -1 <= data.eval_context < data.user_chunk_len, "data.eval_context",
      f"{data.eval_context} must be -1 (= user_chunk_len // 2) or in [0, "
      f"--config.data.user_chunk_len={data.user_chunk_len})")


def _check_stages(config: Config) -> None:
  """Stage names: the store a downstream reads, streaming, the pipeline."""
  _one_of(config, "store.source", stages.SOURCES)
  _one_of(config, "stream.mode", source_models.STREAM_MODES)
  # A stream starts from a source that starts from nothing itself.
  _one_of(config, "stream.init_from",
          [s for s in stages.SOURCES if stages.get(s).reads is None])
  splits = config.stream.splits
  _need(
      set(splits) <= {"valid", "test"} and splits, "stream.splits",
      f"{splits} must be a non-empty subset of ('valid', 'test'): streaming "
      f"continues after batch training")
  unknown = set(config.pipeline.models) - set(stages.PIPELINE)
  _need(
      bool(config.pipeline.models) and not unknown, "pipeline.models",
      f"{sorted(unknown) or 'none'}: must be a non-empty subset of "
      f"{tuple(stages.PIPELINE)}")


def _check_mesh(config: Config) -> None:
  """The mesh axes, their sizes and the logical axis rules."""
  shape, axes = tuple(config.mesh_shape), tuple(config.mesh_axes)
  _need(
      len(shape) == len(axes), "mesh_shape",
      f"{shape} must have one size per axis of --config.mesh_axes={axes}")
  _need(shape.count(-1) <= 1, "mesh_shape", f"at most one -1 in {shape}")
  for name, axis in config.logical_axis_rules:
    _need(axis is None or axis in axes, "logical_axis_rules",
          f"{name!r} -> {axis!r}: not an axis of --config.mesh_axes={axes}")
  if "model" in axes:
    model_axis = shape[axes.index("model")]
    _need(
        model_axis == -1 or config.model.vocab_pad_multiple % model_axis == 0,
        "model.vocab_pad_multiple",
        f"must be divisible by the model mesh axis ({model_axis}) so embedding "
        f"rows split evenly")


def _check_continuous(config: Config) -> None:
  """Continuous training's knobs: models, warm-up, sync lag, periods, store."""
  models = tuple(config.continuous.models)
  unknown = set(models) - set(configs.CONTINUOUS_MODELS)
  _need(
      bool(models) and not unknown, "continuous.models",
      f"{sorted(unknown) or 'none'}: must be a non-empty subset of "
      f"{configs.CONTINUOUS_MODELS}")
  for model, source in (("temporal_iat", "source_temporal"), ("user_iat",
                                                              "source_user")):
    _need(model not in models or source in models, "continuous.models",
          f"{model} reads the InsEmbs of {source}: add {source}")
  c = config.continuous
  _need(c.warmup_periods >= 0, "continuous.warmup_periods", "must be >= 0")
  _need(c.warmup_epochs >= 1, "continuous.warmup_epochs", "must be >= 1")
  _need(c.through >= -1, "continuous.through", "must be -1 (all) or a period")
  periods.duration(c.sync_lag, "continuous.sync_lag")
  periods.check_spec(config.data.period)
  _need(config.store.retention_periods >= 0, "store.retention_periods",
        "must be >= 0 (0 keeps every period)")
  _need(config.store.flush_every > 0, "store.flush_every", "must be > 0")


def _check_model(config: Config) -> None:
  """The model's name-valued knobs and RankMixer's tokens."""
  for key, allowed in MODEL_CHOICES.items():
    _one_of(config, f"model.{key}", allowed)
  m = config.model
  if m.interaction != "rankmixer":
    return
  _need(
      m.mixer_token_dim % m.mixer_tokens == 0, "model.mixer_token_dim",
      f"{m.mixer_token_dim} must be divisible by --config.model.mixer_tokens="
      f"{m.mixer_tokens}")
  # Each feature group, the seq token and the IAT token get their own tokens
  # (iat_jax.models.interaction), checked here so that a pipeline does not
  # fail at its downstream model after training the others.
  groups = len(schema_lib.GROUPS) + 2
  _need(
      m.mixer_tokens >= groups, "model.mixer_tokens",
      f"{m.mixer_tokens} is less than the {groups} token groups "
      f"{schema_lib.GROUPS + ('seq', 'iat')}: each needs its own token")


def _check_buckets(config: Config) -> None:
  """--mode=buckets' knobs: ascending edges from 0, resamples >= 1."""
  edges = list(config.buckets.edges)
  _need(
      bool(edges) and edges[0] == 0 and all(a < b for a, b in zip(edges, edges[1:])),
      "buckets.edges", f"{tuple(edges)}: must ascend strictly from 0")
  _need(config.buckets.resamples >= 1, "buckets.resamples", "must be >= 1")
