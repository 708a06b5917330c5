"""KuaiRand-Pure (the original KuaiRand files) via --config.data.dir.

  python -m iat_jax.main --config=experiments/configs/kuairand.py \
      --config.data.dir=../shared/data/kuairand-pure-0425-0508 --workdir=/tmp/iat-kr

`:runlocal` is one short epoch with shorter histories, for a 2-core machine.
"""

from iat_jax import configs


def get_config(arg=None):
  a = configs.parse_arg(arg, runlocal=False)
  c = configs.base_config()
  c.data.source = "kuairand"
  # Folder with log_standard_*_pure.csv, user_features_pure.csv and
  # video_features_basic_pure.csv.
  c.data.dir = ""
  # Rows per user in the 04-25..05-08 extract: median 7, p99 42, max 141.
  c.data.seq_len = 32
  c.batch_size = 512
  c.users_per_batch = 16
  c.data.user_chunk_len = 32
  c.model.hist_len = 32
  c.num_epochs = 2
  c.eval_every = 0
  c.checkpoint_every = 200
  # Continuous training: one period a day (the extract's 14 days).
  c.data.period = "1d"
  if a.runlocal:
    c.num_epochs = 1
    c.data.seq_len = 16
    c.data.user_chunk_len = 16
    c.model.hist_len = 16
  return c
