"""One place that starts multi-process JAX (TPU pods, SLURM, plain hosts, CPU)."""

from __future__ import annotations

from absl import logging
import jax
import ml_collections


def maybe_initialize(config: ml_collections.ConfigDict) -> None:
  """Calls jax.distributed.initialize when config.distributed is set.

  With coordinator_address / num_processes / process_id set they are passed
  on (plain multi-host, the local CPU launcher); otherwise JAX detects the
  cluster itself (TPU VM slices, SLURM). CPU processes use gloo collectives.
  """
  if not config.distributed:
    return
  kwargs = {}
  if config.coordinator_address:
    kwargs = dict(coordinator_address=config.coordinator_address,
                  num_processes=config.num_processes,
                  process_id=config.process_id)
  # CPU processes talk through gloo (no-op for GPU / TPU backends).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  logging.info("jax.distributed: process %d of %d", jax.process_index(),
               jax.process_count())
