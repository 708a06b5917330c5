"""Starts N CPU processes of `iat_jax.main` on this host (gloo collectives).

The same code path as a multi-host run: every process gets
--config.distributed with the coordinator on localhost and its process id.

  python launch/local.py --num_processes=2 -- \
      --config=experiments/configs/tiny.py --workdir=/tmp/iat --mode=train
  python launch/local.py --num_processes=2 --dry_run -- ...   # print only
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
  env = {**allocator.environ(os.environ), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  procs = [subprocess.Popen(c, env=env) for c in cmds]
  codes = [p.wait() for p in procs]
  if any(codes):
    sys.exit(f"process exit codes: {codes}")


if __name__ == "__main__":
  app.run(main)
