"""Config defaults of a run; experiment files in experiments/configs/.

An experiment file defines `get_config(arg=None)` that starts from
`base_config()` and overrides fields (big_vision style `file.py:variant`).

This module and the experiment files are light: they import no JAX, Flax,
Grain or TensorStore (tests/configs_test.py checks), so that evaluating a
config file, as the sweep controller does, costs nothing. A block that belongs
to one part of the package is declared there: `config.model` by
`iat_jax.models.default_config`, `config.data.synthetic` by
`iat_jax.data.synthetic.default_config`, the store's layout and cache
defaults by `iat_jax.store.backend`. Checking a config needs the
registries (stages, data sources, model choices, store) and is
`iat_jax.validation.validate`, the one check a run makes before any work.
"""

from __future__ import annotations

import ml_collections

from iat_jax import errors
from iat_jax import models
from iat_jax.data import synthetic
from iat_jax.store import backend as store_backend

# Upper bound of the lengths that size a model's position tables and its
# [batch, length, width] activations (data.seq_len, model.hist_len,
# data.user_chunk_len, stream.k): far above any useful history (the paper's
# longest is 256), low enough that a typo (100000) fails validation instead of
# as an out-of-memory error minutes into training.
MAX_LEN = 8192

# The models of `iat_jax.stages.PIPELINE`, in its order: the default of
# pipeline.models (all of them). Spelled out because the stage table imports
# the Flax models; tests/configs_test.py checks that the two agree.
PIPELINE_MODELS = ("base", "source_temporal", "temporal_iat", "source_user", "user_iat",
                   "source_stream", "stream_iat")
# The models of `iat_jax.continuous.loop.MODELS`, likewise (continuous.models).
CONTINUOUS_MODELS = ("base", "source_temporal", "temporal_iat", "source_user",
                     "user_iat")


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'k1=v1,k2' (big_vision style) against typed defaults."""
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      # A ValueError: ml_collections' config flag re-raises what get_config
      # raises as type(e)(message), which a ConfigError cannot take.
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    kind = type(defaults[key])
    out[key] = (value in ("", "1", "true", "True")) if kind is bool else kind(value)
  return out


def sweep_points(sweeps: dict, name: str) -> list[dict]:
  """get_sweep(name) of a config file whose SWEEPS maps name -> (key, values)."""
  if name not in sweeps:
    raise errors.ConfigError("--sweep",
                             f"unknown sweep {name!r}; known: {sorted(sweeps)}")
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
  # Continuous training's periods (iat_jax.data.periods): "<n><unit>" by time
  # (unit s, m, h, d, w; "1d": calendar days, UTC) or "rows:<n>" by count.
  c.data.period = "1d"
  # Hand-crafted behaviour sequence length S.
  c.data.seq_len = 32
  # Synthetic generator knobs (see iat_jax.data.synthetic.build).
  c.data.synthetic = synthetic.default_config()
  # User-order chunk length T (the SIT has no T-sized params).
  c.data.user_chunk_len = 16
  # User-order evaluation and export: each chunk starts with up to this many
  # of the user's rows right before its evaluated rows, any split (the SIT
  # sees them, metrics do not count them; see batching.UserChunks);
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

  c.continuous = ml_collections.ConfigDict()
  # --mode=continuous (iat_jax.continuous.loop): the models it trains
  # period after period (a downstream needs its source).
  c.continuous.models = CONTINUOUS_MODELS
  # The first periods are warm-up: trained warmup_epochs passes each, their
  # metrics reported apart.
  c.continuous.warmup_periods = 1
  c.continuous.warmup_epochs = 1
  # Or start from a finished batch pipeline's workdir (same data): its best
  # models, and its exported InsEmbs for the periods inside its train split,
  # which are then not trained again (they count as warm-up).
  c.continuous.init_from = ""
  # How long after an instance its InsEmb is visible to the downstream models
  # ("0": as soon as the source processed it; "6h", "1d", ...).
  c.continuous.sync_lag = "0"
  # The last period this invocation runs (-1: the log's last): a daily job
  # runs the periods the log has so far; the next one continues.
  c.continuous.through = -1

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
  # Evaluation, prediction and export batch: rows per data shard of the mesh
  # (user order: rows of chunks), so a row is computed in the same batch shape
  # however many processes and devices run (iat_jax.data.orders).
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
  # random keys; docs/benchmarks.md); more rows shrink the segment indexes a
  # reader holds (16 B per block).
  c.store.shard_bits = store_backend.DEFAULT_SHARD_BITS
  c.store.block_rows = store_backend.DEFAULT_BLOCK_ROWS
  # How rows are keyed (iat_jax.store.placement): "user" places one user's
  # instances side by side (the downstream reads a user's history as a few
  # blocks), "insid" by the InsID hash alone (they scatter over the table).
  c.store.placement = "user"
  # Memory budget of each reader of a table (its block cache and the segment
  # indexes it loaded): per process, and per input worker process.
  c.store.cache_bytes = store_backend.DEFAULT_CACHE_BYTES
  # Continuous training: keep the InsEmbs and index entries of this many
  # periods before the current one (0 = all), by event time (Eq. 12's
  # retention days); flush a source's new InsEmbs every this many steps.
  c.store.retention_periods = 0
  c.store.flush_every = 50

  # Ahead-of-time compilation (--mode=compile, iat_jax.aot): the slice to
  # compile every stage for, e.g. "tpu:v5e:16x16", "tpu:v5p:2x2x1", "gpu:h100:8".
  c.compile = ml_collections.ConfigDict()
  c.compile.target = ""
  # --mode=buckets (iat_jax.buckets): dAUC vs base by the IAT length
  # available to a request. Bucket lower edges (from 0, ascending).
  c.buckets = ml_collections.ConfigDict()
  c.buckets.edges = (0, 1, 16, 64, 256)
  # Poisson-bootstrap resamples (over users) of each bucket's interval.
  c.buckets.resamples = 200
  c.pipeline = ml_collections.ConfigDict()
  # Models `--mode=pipeline` produces (a subset of iat_jax.stages.PIPELINE,
  # by default all); each model brings in its source model and that model's
  # export (stream_iat: source_stream, which starts from source_user).
  c.pipeline.models = PIPELINE_MODELS
  # Another pipeline workdir (same data) whose finished source models and
  # exported stores this run reads instead of training its own: ablations and
  # sweeps of downstream-only knobs share one source model per seed.
  c.pipeline.sources_from = ""
  return c
