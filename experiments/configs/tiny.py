"""Tiny: a few hundred instances and widths of a few units; for tests."""

from iat_jax import configs


def get_config(arg=None):
  del arg
  c = configs.base_config()
  c.data.source = "synthetic"
  c.data.seq_len = 4
  c.data.synthetic.num_users = 24
  c.data.synthetic.num_instances = 960
  c.data.synthetic.num_categorical = 4
  c.data.synthetic.num_dense = 2
  c.batch_size = 32
  c.eval_batch_size = 64
  c.users_per_batch = 4
  c.shuffle_window = 128
  c.eval_every = 8
  c.checkpoint_every = 4
  c.log_every = 1
  c.optimizer.warmup_steps = 2
  m = c.model
  m.embed_dim = 4
  m.seq.width = 8
  m.seq.heads = 1
  m.seq.din_mlp = (8,)
  m.iat.din_mlp = (8,)
  m.mixer_tokens = 6  # >= its 5 feature groups (user, item, context, seq, IAT)
  m.mixer_token_dim = 6
  m.mlp_dims = (16,)
  m.insemb_dim = 4
  m.decompress_hidden = 8
  m.sit_layers = 1
  m.sit_width = 8
  m.sit_ffn = 8
  m.sit_heads = 1
  c.data.user_chunk_len = 8
  m.hist_len = 4
  m.adapt_dim = 8
  m.side_dim = 4
  m.iat_query_dim = 8
  m.iat.width = 8
  m.iat.heads = 1
  return c


# Two-point versions of demo.py's sweeps, for tests.
SWEEPS = {
    "sit_depth": ("model.sit_layers", (0, 1)),
    "history_len": ("model.hist_len", (1, 4)),
    "insemb_dim": ("model.insemb_dim", (4, 8)),
    "iat_layers": ("model.iat.layers", (1, 2)),
    "chunk_len": ("data.user_chunk_len", (4, 8)),
}


def get_sweep(name):
  """The points of sweep `name`: a list of override dicts."""
  return configs.sweep_points(SWEEPS, name)
