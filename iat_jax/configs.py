"""Shared config defaults and validation; experiment files in experiments/configs/.

An experiment file defines `get_config(arg=None)` that starts from
`base_config()` and overrides fields (big_vision style `file.py:variant`).
`validate` is the one check of a config: the entry points (`main`, `sweep`)
call it before any work, and it names the offending flag. Two checks need
more than the config and run as soon as that is known: `validate_devices`
(the mesh against the device count, before the dataset is built) and
`orders.validate_data` (batch sizes against the split sizes, right after
`sources.prepare`); the memory a compiled train step needs is checked when
the stage is built (`iat_jax.train.train_lib.check_memory`).
"""

from __future__ import annotations

import ml_collections
import numpy as np

from iat_jax import models
from iat_jax import stages
from iat_jax.data import schema as schema_lib
from iat_jax.data import sources
from iat_jax.models import source as source_models
from iat_jax.store import tables

STREAM_MODES = source_models.STREAM_MODES

# Upper bound of the lengths that size a model's position tables and its
# [batch, length, width] activations (data.seq_len, model.hist_len,
# data.user_chunk_len): far above any useful history (the paper's longest is
# 256), low enough that a typo (100000) fails here instead of as an
# out-of-memory error minutes into training.
MAX_LEN = 8192


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'k1=v1,k2' (big_vision style) against typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    out[key] = (value in ("", "1", "true", "True")) if kind is bool else kind(value)
  return out


def sweep_points(sweeps: dict, name: str) -> list[dict]:
  """get_sweep(name) of a config file whose SWEEPS maps name -> (key, values)."""
  if name not in sweeps:
    raise ValueError(f"unknown sweep {name!r}; known: {sorted(sweeps)}")
  key, values = sweeps[name]
  return [{key: v} for v in values]


def base_config() -> ml_collections.ConfigDict:
  """Every knob of a run, with its default."""
  c = ml_collections.ConfigDict()
  # Which stage `train` trains: a key of iat_jax.stages.STAGES.
  c.stage = "base"
  # Seed of parameters, dropout and data order.
  c.seed = 0

  c.data = ml_collections.ConfigDict()
  # Data source: a key of iat_jax.data.sources.SOURCES ("synthetic" is the
  # embedded generator; "movielens" reads data.dir).
  c.data.source = "synthetic"
  # MovieLens folder in the GroupLens format (ML-100K or ML-1M files).
  c.data.dir = ""
  # Where the preprocessed dataset is cached; "" = <workdir>/data.
  c.data.cache_dir = ""
  # Hand-crafted behaviour sequence length S.
  c.data.seq_len = 32
  # Synthetic generator knobs (see iat_jax.data.synthetic.build).
  c.data.synthetic = ml_collections.ConfigDict(
      dict(num_users=2000,
           num_instances=200_000,
           num_categorical=32,
           num_dense=8,
           num_tasks=2,
           conversion_delay=86400))
  # User-order chunk length T (the SIT has no T-sized params).
  c.data.user_chunk_len = 16
  # User-order evaluation and export: each chunk starts with up to this many
  # of the user's rows right before its evaluated rows, any split (the SIT
  # sees them, metrics do not count them; see input_pipeline.UserChunks);
  # -1 = user_chunk_len // 2. Must be < user_chunk_len.
  c.data.eval_context = -1

  c.model = models.default_config()

  # Global batch of instances (temporal / downstream stages).
  c.batch_size = 256
  # Global batch of user chunks (user-order source; T is data.user_chunk_len).
  c.users_per_batch = 16
  # Train instances are shuffled inside windows of this many (0 = time order).
  c.shuffle_window = 4096
  # Passes over the train split.
  c.num_epochs = 1
  # Grain worker processes (0 = read in the training process).
  c.worker_count = 0

  # source_user: two-pass training (Appendix A.3), InsEmbs stored while training.
  c.two_pass = False

  c.stream = ml_collections.ConfigDict()
  # Streaming source (stage source_stream): the batch-trained stage it starts
  # from (its best checkpoint and exported store; in the pipeline, the
  # source of PIPELINE["source_stream"]) and the splits it streams.
  c.stream.init_from = "source_user"
  c.stream.splits = ("valid", "test")
  # Past InsEmbs fetched per instance K.
  c.stream.k = 16
  # 'fetch' stored InsEmbs (Method 1) | 'recompute' them (Method 2).
  c.stream.mode = "fetch"

  c.optimizer = ml_collections.ConfigDict()
  # Adam(W) with linear warm-up then cosine decay to 0.
  c.optimizer.learning_rate = 2e-3
  c.optimizer.warmup_steps = 50
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 1.0

  # Evaluate on valid (and keep the best) every N steps; 0 = only at the end.
  c.eval_every = 200
  # Periodic checkpoint every N steps; keep the last k.
  c.checkpoint_every = 100
  c.keep_checkpoints = 2
  # Progress log and train-metric line every N steps.
  c.log_every = 20
  c.eval_batch_size = 1024

  # Device mesh: its axes, their sizes (-1 = all remaining devices) and the
  # logical axis rules (logical name -> mesh axis or None = replicated; names
  # not listed are replicated): the batch over 'data', embedding-table rows
  # over 'model', everything else replicated.
  c.mesh_axes = ("data", "model")
  c.mesh_shape = (-1, 1)
  c.logical_axis_rules = (("batch", "data"), ("vocab", "model"), ("embed", None),
                          ("mlp", None), ("heads", None), ("tokens", None))
  # Run jax.distributed.initialize() (TPU pods, SLURM, or the flags below).
  c.distributed = False
  c.coordinator_address = ""
  c.num_processes = 0
  c.process_id = -1

  c.store = ml_collections.ConfigDict()
  # Storage engine of the InsEmb tables: a key of iat_jax.store.tables.BACKENDS
  # ("ocdbt": TensorStore OCDBT, the one for real runs; "memory": in-process,
  # for tests and baselines).
  c.store.backend = "ocdbt"
  # Value dtype of exported InsEmb tables: float32, bfloat16 or int8.
  c.store.dtype = "float32"
  # Downstream: which source model's store it reads ("" = from pipeline).
  c.store.source = "source_user"
  # Downstream: path of the InsEmb store ("" = <workdir>/stores/<source>).
  c.store.path = ""
  # Export: rows a process buffers before writing them as one durable chunk
  # (a killed export resumes from its last chunk).
  c.store.export_chunk_rows = 1 << 18
  # Layout of the tables this run exports: 2**shard_bits shards by the InsID's
  # high bits (8 at ~1e11 rows), and rows per stored block. A lookup costs
  # about one read per distinct block it needs: fewer rows per block read
  # fewer bytes per key, but a batch then needs more blocks (slower for
  # random keys; README, Benchmarks); more rows shrink the segment indexes a
  # reader holds (16 B per block).
  c.store.shard_bits = tables.DEFAULT_SHARD_BITS
  c.store.block_rows = tables.DEFAULT_BLOCK_ROWS
  # Memory budget of each reader of a table (its block cache and the segment
  # indexes it loaded): per process, and per input worker process.
  c.store.cache_bytes = tables.DEFAULT_CACHE_BYTES

  c.pipeline = ml_collections.ConfigDict()
  # Models `--mode=pipeline` produces (a subset of iat_jax.stages.PIPELINE,
  # by default all); each model brings in its source model and that model's
  # export (stream_iat: source_stream, which starts from source_user).
  c.pipeline.models = tuple(stages.PIPELINE)
  # Another pipeline workdir (same data) whose finished source models and
  # exported stores this run reads instead of training its own: ablations and
  # sweeps of downstream-only knobs share one source model per seed.
  c.pipeline.sources_from = ""
  return c


def _get(config: ml_collections.ConfigDict, flag: str):
  value = config
  for part in flag.split("."):
    value = value[part]
  return value


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the flag for a config that cannot run."""

  def need(ok: bool, flag: str, msg: str) -> None:
    if not ok:
      raise ValueError(f"--config.{flag}: {msg}")

  def one_of(flag: str, allowed) -> None:
    value = _get(config, flag)
    need(value in allowed, flag, f"{value!r} is not one of {tuple(allowed)}")

  one_of("stage", stages.STAGES)
  one_of("data.source", sources.SOURCES)
  sources.get(config.data.source).validate(config.data)
  for flag in ("batch_size", "users_per_batch", "data.user_chunk_len",
               "eval_batch_size", "model.hist_len", "stream.k", "num_epochs",
               "data.seq_len", "log_every", "checkpoint_every", "keep_checkpoints",
               "store.cache_bytes"):
    need(_get(config, flag) > 0, flag, f"must be > 0, got {_get(config, flag)}")
  for flag in ("data.seq_len", "model.hist_len", "data.user_chunk_len", "stream.k"):
    need(
        _get(config, flag) <= MAX_LEN, flag,
        f"{_get(config, flag)} is above the limit of {MAX_LEN} (it sizes position "
        f"tables and [batch, length, width] activations)")
  need(config.eval_every >= 0, "eval_every", "must be >= 0")
  need(
      config.data.synthetic.conversion_delay >= 0, "data.synthetic.conversion_delay",
      f"seconds until a conversion label is known; must be >= 0, got "
      f"{config.data.synthetic.conversion_delay}")
  need(
      -1 <= config.data.eval_context < config.data.user_chunk_len, "data.eval_context",
      f"{config.data.eval_context} must be -1 (= user_chunk_len // 2) or in [0, "
      f"--config.data.user_chunk_len={config.data.user_chunk_len})")
  one_of("store.dtype", tables.DTYPES)
  need(1 <= config.store.shard_bits <= 16, "store.shard_bits",
       f"{config.store.shard_bits} must be in 1..16")
  b = config.store.block_rows
  need(b >= 2 and not b & (b - 1), "store.block_rows",
       f"{b} must be a power of two >= 2")
  one_of("store.source", stages.SOURCES)
  one_of("stream.mode", STREAM_MODES)
  one_of("stream.init_from",
         [s for s in stages.SOURCES if stages.get(s).order != "stream"])
  need(
      set(config.stream.splits) <= {"valid", "test"} and config.stream.splits,
      "stream.splits", f"{config.stream.splits} must be a non-empty subset of "
      "('valid', 'test'): streaming continues after batch training")
  unknown = set(config.pipeline.models) - set(stages.PIPELINE)
  need(
      bool(config.pipeline.models) and not unknown, "pipeline.models",
      f"{sorted(unknown) or 'none'}: must be a non-empty subset of "
      f"{tuple(stages.PIPELINE)}")
  need(
      len(config.mesh_shape) == len(config.mesh_axes), "mesh_shape",
      f"{tuple(config.mesh_shape)} must have one size per axis of "
      f"--config.mesh_axes={tuple(config.mesh_axes)}")
  need(
      list(config.mesh_shape).count(-1) <= 1, "mesh_shape",
      f"at most one -1 in {tuple(config.mesh_shape)}")
  axes = set(config.mesh_axes)
  for name, axis in config.logical_axis_rules:
    need(axis is None or axis in axes, "logical_axis_rules",
         f"{name!r} -> {axis!r}: not an axis of --config.mesh_axes={tuple(axes)}")
  if "model" in config.mesh_axes:
    model_axis = config.mesh_shape[list(config.mesh_axes).index("model")]
    need(
        model_axis == -1 or config.model.vocab_pad_multiple % model_axis == 0,
        "model.vocab_pad_multiple",
        f"must be divisible by the model mesh axis ({model_axis}) so embedding "
        f"rows split evenly")
  for key, allowed in models.CHOICES.items():
    one_of(f"model.{key}", allowed)
  need(
      config.model.interaction != "rankmixer" or
      config.model.mixer_token_dim % config.model.mixer_tokens == 0,
      "model.mixer_token_dim", f"{config.model.mixer_token_dim} must be divisible "
      f"by --config.model.mixer_tokens={config.model.mixer_tokens}")
  # Each feature group, the seq token and the IAT token get their own tokens
  # (iat_jax.models.interaction), checked here so that a pipeline does not
  # fail at its downstream model after training the others.
  groups = len(schema_lib.GROUPS) + 2
  need(
      config.model.interaction != "rankmixer" or config.model.mixer_tokens >= groups,
      "model.mixer_tokens", f"{config.model.mixer_tokens} is less than the {groups} "
      f"token groups {schema_lib.GROUPS + ('seq', 'iat')}: each needs its own token")


def validate_devices(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ValueError naming --config.mesh_shape unless the mesh fits
  `num_devices` (jax.device_count()); call before building the dataset."""
  shape = tuple(config.mesh_shape)
  known = int(np.prod([s for s in shape if s != -1]))
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"--config.mesh_shape: {shape}: sizes must be > 0 (or -1)")
  if -1 in shape:
    ok, need = num_devices % known == 0, f"a multiple of {known}"
  else:
    ok, need = known == num_devices, str(known)
  if not ok:
    raise ValueError(f"--config.mesh_shape: {shape} over --config.mesh_axes="
                     f"{tuple(config.mesh_axes)} needs {need} devices, this run has "
                     f"{num_devices}; use -1 for one axis to take all devices")
