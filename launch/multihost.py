"""Starts this host's process of a plain multi-host run of `iat_jax.main`.

Run it once on every host with the same coordinator (host:port of process 0)
and process count, and each host's own process id:

  python launch/multihost.py --coordinator_address=10.0.0.1:1234 \
      --num_processes=2 --process_id=0 -- \
      --config=experiments/configs/demo.py --workdir=/shared/iat --mode=pipeline
  python launch/multihost.py ... --dry_run -- ...   # print the command only

The workdir must be on a filesystem every host shares. TPU slices and SLURM
clusters need none of this: see launch/tpu_pod.sh and launch/slurm.sbatch.
"""

from __future__ import annotations

import subprocess
import sys

from absl import app
from absl import flags

from iat_jax import allocator
from iat_jax import launch_lib

_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in all.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This host's process id.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the command, run nothing.")
flags.mark_flags_as_required(["coordinator_address", "num_processes", "process_id"])


def command(coordinator_address: str, num_processes: int, process_id: int,
            main_args: list[str]) -> list[str]:
  """This host's `python -m iat_jax.main` command line."""
  return launch_lib.main_command([
      *main_args,
      *launch_lib.distributed_flags(coordinator_address, num_processes, process_id)
  ])


def main(argv: list[str]) -> None:
  try:
    cmd = command(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, argv[1:])
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if _DRY_RUN.value:
    print(launch_lib.shell_join(cmd))
    return
  # glibc malloc settings (iat_jax/allocator.py) set here: no re-exec needed.
  sys.exit(subprocess.call(cmd, env=allocator.environ()))


if __name__ == "__main__":
  app.run(main)
