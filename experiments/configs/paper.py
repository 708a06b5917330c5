"""Presets for the paper tables (experiments/paper/tables.py).

  python experiments/paper/tables.py --table=table1 \
      --config=experiments/configs/paper.py:small --workdir=workdir/paper/table1

Variants:
  'small' (default): the embedded synthetic data and CPU-sized widths, sized so
    that table1 (3 encoders x 3 seeds = 9 pipelines) takes about 2 hours on a
    2-core CPU. The estimate: a demo-sized pipeline (these sizes) took 19 min
    wall on a shared 2-core machine at load ~3.5, so ~10-13 min alone.
  'full': for accelerators (bfloat16): 10M synthetic instances of 100 fields
    (10M items, 1M ids per hashed field) and the paper's widths where they are given (InsEmb d = 64, SIT 2 x 64 with FFN
    128, IAT length L = 256, streaming K = 256, RankMixer D = 16 x 384 = 6144).
    Not run from this repository's CI.
"""

from iat_jax import configs

VARIANTS = ("small", "full")


def get_config(arg=None):
  variant = arg or "small"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r}; known: {VARIANTS}")
  c = configs.base_config()
  c.data.source = "synthetic"
  if variant == "small":
    # 2,000 users, 120k instances, 32 categorical + 8 dense fields, 2 tasks.
    c.data.synthetic.num_users = 2000
    c.data.synthetic.num_instances = 120_000
    c.batch_size = 256
    c.users_per_batch = 16
    c.data.user_chunk_len = 32
    c.model.hist_len = 32
    c.eval_every = 0
    c.checkpoint_every = 100
    return c
  # 'full': 50k users, 10M instances, 100 categorical + 16 dense fields.
  c.data.seq_len = 64
  c.data.synthetic.num_users = 50_000
  c.data.synthetic.num_instances = 10_000_000
  c.data.synthetic.num_categorical = 100
  c.data.synthetic.num_dense = 16
  # Industrial vocabularies: 10M items, 1M ids per hashed field -- 108M
  # embedding rows, 14 GB of float32 table (42 GB with Adam's moments): they
  # fit a chip only sharded over a model axis (docs/running.md).
  c.data.synthetic.num_items = 10_000_000
  c.data.synthetic.vocab_size = 1_000_000
  c.batch_size = 4096
  # Rows per device (data shard): 8,192 per evaluation batch on an 8-device
  # host, as a global train batch of 4,096 is.
  c.eval_batch_size = 1024
  # 64 users x 64 instances = 4,096 instances per user-order batch.
  c.users_per_batch = 64
  c.shuffle_window = 65_536
  c.worker_count = 4
  c.eval_every = 500
  c.checkpoint_every = 500
  c.log_every = 100
  c.optimizer.warmup_steps = 200
  m = c.model
  # Embedding rows split evenly over a model axis of up to 16 chips (e.g.
  # --config.mesh_shape="(16, 16)" on a v5e-256 slice; docs/running.md).
  m.vocab_pad_multiple = 16
  m.dtype = "bfloat16"
  m.embed_dim = 32
  m.seq.width = 128
  m.seq.heads = 4
  m.seq.layers = 2
  m.mixer_tokens = 16
  m.mixer_token_dim = 384
  m.mixer_layers = 2
  m.insemb_dim = 64
  m.decompress_hidden = 512
  m.sit_layers = 2
  m.sit_width = 64
  m.sit_ffn = 128
  m.sit_heads = 2
  c.data.user_chunk_len = 64
  c.stream.k = 256
  m.hist_len = 256
  m.adapt_dim = 256
  m.side_dim = 16
  m.iat_query_dim = 128
  m.iat.width = 128
  m.iat.heads = 4
  m.iat.layers = 2
  return c


# Named sweeps (`python -m iat_jax.sweep --sweep=<name>`), sized for 'small':
# its users have ~48 train instances each, so L beyond 64 would add only padding.
SWEEPS = {
    "sit_depth": ("model.sit_layers", (0, 1, 2, 4)),
    "history_len": ("model.hist_len", (4, 8, 16, 32, 64)),
    "insemb_dim": ("model.insemb_dim", (16, 32, 64, 128)),
    "iat_layers": ("model.iat.layers", (1, 2, 4)),
    "chunk_len": ("data.user_chunk_len", (8, 16, 32, 64)),
}


def get_sweep(name):
  """The points of sweep `name`: a list of override dicts."""
  return configs.sweep_points(SWEEPS, name)
