"""Demo: the whole pipeline on the embedded synthetic data, sized for a laptop.

  python -m iat_jax.main --config=experiments/configs/demo.py --workdir=/tmp/iat
"""

from iat_jax import configs


def get_config(arg=None):
  """Variants: 'runlocal' shrinks data and steps for a smoke run."""
  a = configs.parse_arg(arg, runlocal=False)
  c = configs.base_config()
  c.data.source = "synthetic"
  # 2,000 users, 100k instances, 32 categorical + 8 dense fields, 2 tasks.
  c.data.synthetic.num_users = 2000
  c.data.synthetic.num_instances = 100_000
  c.batch_size = 256
  c.users_per_batch = 16
  c.data.user_chunk_len = 32
  c.model.hist_len = 16
  c.eval_every = 0
  c.checkpoint_every = 100
  if a.runlocal:
    c.data.synthetic.num_users = 200
    c.data.synthetic.num_instances = 8000
    c.batch_size = 64
  return c


# Named sweeps for `python -m iat_jax.sweep --sweep=<name>`: config key -> values.
SWEEPS = {
    "sit_depth": ("model.sit_layers", (0, 1, 2, 4, 8)),
    "history_len": ("model.hist_len", (1, 16, 64, 256, 1024)),
    "insemb_dim": ("model.insemb_dim", (16, 32, 64, 128)),
    "iat_layers": ("model.iat.layers", (1, 2, 4)),
    "chunk_len": ("data.user_chunk_len", (8, 16, 32, 64)),
}


def get_sweep(name):
  """The points of sweep `name`: a list of override dicts."""
  return configs.sweep_points(SWEEPS, name)
