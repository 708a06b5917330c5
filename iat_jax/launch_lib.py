"""Command lines of `python -m iat_jax.main`, shared by the launchers.

launch/local.py (N CPU processes on this host), launch/multihost.py (one
process per host, explicit coordinator) and iat_jax/sweep.py (one pipeline per
sweep point and seed) all build the same command; only the trailing
`--config.*` flags differ.
"""

from __future__ import annotations

import shlex
import sys
from typing import Sequence


def main_command(main_args: Sequence[str], python: str | None = None) -> list[str]:
  """`python -m iat_jax.main <main_args>` as an argv list."""
  return [python or sys.executable, "-m", "iat_jax.main", *main_args]


def distributed_flags(coordinator_address: str = "",
                      num_processes: int = 0,
                      process_id: int = -1) -> list[str]:
  """Flags that make iat_jax.main call jax.distributed.initialize.

  Without a coordinator address JAX detects the cluster itself (TPU VM
  slices, SLURM); with one, the three values are passed on explicitly.
  """
  out = ["--config.distributed=True"]
  if coordinator_address:
    if not 0 <= process_id < num_processes:
      raise ValueError(f"process_id={process_id} is not in [0, {num_processes})")
    out += [
        f"--config.coordinator_address={coordinator_address}",
        f"--config.num_processes={num_processes}", f"--config.process_id={process_id}"
    ]
  return out


def local_commands(num_processes: int, port: int,
                   main_args: Sequence[str]) -> list[list[str]]:
  """One command per process of an N-process run on localhost."""
  return [
      main_command(
          [*main_args, *distributed_flags(f"localhost:{port}", num_processes, i)])
      for i in range(num_processes)
  ]


def shell_join(cmd: Sequence[str]) -> str:
  """The argv list as one line a POSIX shell reads back identically."""
  return shlex.join(cmd)
