"""Starts N CPU processes of `iat_jax.main` on this host (gloo collectives).

The same code path as a multi-host run: every process gets
--config.distributed with the coordinator on localhost and its process id.

  python launch/local.py --num_processes=2 -- \
      --config=experiments/configs/tiny.py --workdir=/tmp/iat --mode=train
  python launch/local.py --num_processes=2 --dry_run -- ...   # print only

--devices_per_process=N gives each process N CPU devices (a mesh whose rows
span processes, as a model axis across TPU hosts does).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from absl import app
from absl import flags

from iat_jax import allocator
from iat_jax import launch_lib

_N = flags.DEFINE_integer("num_processes", 2, "Processes to start.")
_PORT = flags.DEFINE_integer("port", 0, "Coordinator port (0 = pick a free one).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands, run nothing.")
_DEVICES = flags.DEFINE_integer("devices_per_process", 1, "CPU devices per process.")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def main(argv: list[str]) -> None:
  cmds = launch_lib.local_commands(_N.value, _PORT.value or _free_port(), argv[1:])
  if _DRY_RUN.value:
    print("\n".join(launch_lib.shell_join(c) for c in cmds))
    return
  # glibc malloc settings (iat_jax/allocator.py) set here: no re-exec per process.
  devices = _DEVICES.value
  env = {
      **allocator.environ(os.environ), "JAX_PLATFORMS":
          "cpu",
      "XLA_FLAGS":
          f"--xla_force_host_platform_device_count={devices}" if devices > 1 else ""
  }
  procs = [subprocess.Popen(c, env=env) for c in cmds]
  codes = [p.wait() for p in procs]
  if any(codes):
    sys.exit(f"process exit codes: {codes}")


if __name__ == "__main__":
  app.run(main)
