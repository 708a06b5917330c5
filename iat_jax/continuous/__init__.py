"""Continuous training: the log as a sequence of periods (`--mode=continuous`).

  periods  (`iat_jax.data.periods`) cut the log;
  history  assembles each period's batches from the user-history index
           (`iat_jax.store.user_index`) and the InsEmbs of earlier instances
           (`iat_jax.store.partitions`);
  loop     runs the models period after period, with atomic period
           checkpoints;
  report   turns per-period predictions into results, tables and plots;
  warm_start  starts a run from a finished batch pipeline;
  cost     each period's wall time, bytes and memory (timing.jsonl).
"""
