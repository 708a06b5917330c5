"""MovieLens (ML-100K or ML-1M in the GroupLens format) via --config.data.dir.

  python -m iat_jax.main --config=experiments/configs/movielens.py \
      --config.data.dir=../shared/data/ml-100k --workdir=/tmp/iat-ml

Args (movielens.py:<k=v,...>): runlocal (one epoch), long (the paper's
sequence lengths: IAT 256, behaviour 256, user chunks 256).
"""

from iat_jax import configs

VARIANTS = ("runlocal", "long")


def get_config(arg=None):
  a = configs.parse_arg(arg, runlocal=False, long=False)
  c = configs.base_config()
  c.data.source = "movielens"
  # Folder with u.data/u.user/u.item (ML-100K) or ratings/users/movies.dat (ML-1M).
  c.data.dir = ""
  # The paper's hand-crafted sequence: last 50 earlier ratings.
  c.data.seq_len = 50
  c.batch_size = 256
  c.users_per_batch = 8
  c.data.user_chunk_len = 64
  c.model.hist_len = 64
  c.num_epochs = 2
  c.eval_every = 0
  c.checkpoint_every = 200
  # Continuous training: periods of ~25,000 ratings (87% of ML-1M's
  # timestamps fall in 2000, so calendar periods would be a few huge ones
  # and many near-empty ones); ML-1M users 1-2999 gives 20 periods.
  c.data.period = "rows:25000"
  if a.runlocal:
    c.num_epochs = 1
  if a.long:
    # The paper's lengths (Sec. 4.1): IAT sequence 256, behaviour sequence
    # 256, user chunks of 256 so the SIT sees long pasts (ML-1M users
    # 1-2999: median 89 ratings a user, 47% of users >= 100).
    c.data.seq_len = 256
    c.model.hist_len = 256
    c.data.user_chunk_len = 256
    c.users_per_batch = 2
  return c
