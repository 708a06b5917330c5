"""Command line: train / evaluate / export one stage, run the whole pipeline,
train continuously period after period (--mode=continuous), or compile every
stage for a TPU slice or GPU hosts from any machine (--mode=compile, with
--config.compile.target; see iat_jax.aot), or tabulate a finished pipeline's
dAUC by the IAT length available to each request (--mode=buckets, see
iat_jax.buckets).

  python -m iat_jax.main --config=experiments/configs/demo.py --workdir=DIR \
      --mode=pipeline [--config.key=value ...]

The writing modes (train, export, pipeline) hold the workdir's writer lock
(`iat_jax.workdir.WriterLock`) from before the dataset is prepared until they
exit; evaluate only reads. A failure the user can act on (a bad flag, a
damaged checkpoint or store, a full or read-only disk, a diverged loss, a busy
workdir) ends the output with one line `error: <what, where, what to do>` and
exit status 1, without a traceback (the reports that library threads print of
the same failure, such as Orbax's failed async writes on a full disk, come
before it; nothing comes after it).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the heavy imports: re-exec costs ~0.1 s
  from iat_jax import allocator
  allocator.ensure()

import errno
import gc
import json
import logging as std_logging
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from iat_jax import allocator
from iat_jax import buckets
from iat_jax import distributed
from iat_jax import errors
from iat_jax import pipeline
from iat_jax import stages
from iat_jax import validation
from iat_jax import workdir as workdir_lib
from iat_jax.aot import compile as aot
from iat_jax.continuous import loop
from iat_jax.data import orders
from iat_jax.data import sources
from iat_jax.train import trainers

MODES = ("train", "evaluate", "export", "pipeline", "continuous", "compile", "buckets")
WRITING_MODES = ("train", "export", "pipeline", "continuous")

_CONFIG = config_flags.DEFINE_config_file("config",
                                          None,
                                          "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs.")
_MODE = flags.DEFINE_enum("mode", "pipeline", MODES, "What to run.")
flags.mark_flags_as_required(["config", "workdir"])

# What to do about an OSError, by errno.
_OS_ADVICE = {
    errno.ENOSPC: "free space there (or pass another --workdir) and re-run: the "
                  "run resumes from its last checkpoint",
    errno.EDQUOT: "free space within your quota and re-run: the run resumes from "
                  "its last checkpoint",
    errno.EROFS: "the filesystem is read-only: a finished run can still be "
                 "evaluated (--mode=evaluate); to train, pass a writable --workdir",
    errno.EACCES: "make it writable or pass another --workdir",
    errno.EPERM: "make it writable or pass another --workdir",
}


def _quiet_orbax(record) -> bool:
  """Keeps Orbax's per-save INFO chatter out of the progress log, and the
  tracebacks out of its reports of a failure the user can act on (its async
  writes failing on a full disk): the one-line report stays, and the run ends
  with the `error:` line saying what to do."""
  if record.exc_info and user_error(record.exc_info[1]) is not None:
    record.exc_info = record.exc_text = None
  return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def user_error(e: BaseException) -> str | None:
  """The one-line `error:` message of a failure the user can act on, or None
  for anything else (a bug: it keeps its traceback).

  A failure the user can act on is an `errors.UserError`, or an OSError the
  user can fix (a full or read-only disk, a permission). Follows the
  exception's causes, so an error that Orbax or TensorStore wrapped still
  reads as one."""
  seen = 0
  while e is not None and seen < 8:
    if isinstance(e, errors.UserError):
      return str(e)
    if isinstance(e, OSError) and e.errno in _OS_ADVICE:
      where = f" ({e.filename})" if e.filename else f" writing under --workdir={_WORKDIR.value}"
      what = (e.strerror or str(e)).lower()  # e.g. "no space left on device"
      return f"{what}{where}; {_OS_ADVICE[e.errno]}"
    if "No space left on device" in str(e):  # ENOSPC as TensorStore reports it
      return (f"no space left on device writing under --workdir={_WORKDIR.value}; "
              f"{_OS_ADVICE[errno.ENOSPC]}")
    e, seen = e.__cause__ or e.__context__, seen + 1
  return None


def fail(message: str) -> None:
  """Ends the run: the last line of the output is `error: message`.

  Background tasks that failed with the error (Orbax's async writes) are
  collected first, so asyncio's "exception was never retrieved" reports come
  before it. After it, stdout and stderr are /dev/null at the descriptor
  level: the threads still failing with the same error (Orbax's, TensorStore's
  C++ callbacks into a closed event loop) and the warnings of coroutines
  finalized at exit report an error already reported, and the process exits
  normally (`finally` blocks, atexit) behind them."""
  gc.collect()
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  stderr, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  for fd in (1, 2):  # first, so no other thread's write can follow the line
    os.dup2(devnull, fd)
  # On a line of its own even when a thread's report ended mid-line.
  os.write(stderr, f"\nerror: {' '.join(message.split())}\n".encode())
  os.close(stderr)
  os.close(devnull)
  sys.exit(1)


def _run(config, workdir: str, mode: str) -> None:
  if mode == "continuous":
    loop.check_workdir(workdir)
    loop.run(config, workdir, sources.prepare(config, workdir))
    return
  if os.path.isdir(os.path.join(workdir, "continuous")):
    raise errors.ConfigError(
        "--workdir", f"{workdir} holds a continuous run (continuous/); "
        f"--mode={mode} needs a workdir of its own")
  if mode == "pipeline":
    pipeline.run(config, workdir)
    return
  if mode == "buckets":
    buckets.run(config, workdir)
    return
  stage = stages.get(config.stage)  # a single stage runs as the model of its name
  ds = sources.prepare(config, workdir)
  if mode == "train":
    orders.check_sizes(config, ds, [stage.order])
  table = pipeline.open_store(stage, config, workdir, ds)
  if mode == "train":
    trainers.train(stage, config, workdir, stage.name, ds, table)
  elif mode == "evaluate":
    print(
        json.dumps(trainers.evaluate(stage, config, workdir, stage.name, ds, table),
                   indent=1,
                   sort_keys=True))
  else:
    print(trainers.export(stage, config, workdir, stage.name, ds))


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_logger().addFilter(_quiet_orbax)
  logging.info("allocator settings at start: %s", allocator.at_start() or "none")
  config = _CONFIG.value
  workdir, mode = os.path.abspath(_WORKDIR.value), _MODE.value  # Orbax wants absolute
  lock = None
  try:
    validation.validate(config)
    if mode == "compile":  # for the target's devices, not this host's
      aot.run(config, workdir)
      return
    distributed.maybe_initialize(config)
    logging.info("process %d/%d, devices %s", jax.process_index(), jax.process_count(),
                 jax.devices())
    validation.validate_devices(config, jax.device_count())
    # One writer per workdir: process 0 holds the lock for the whole job (the
    # other processes of a jax.distributed job write only under its control).
    if mode in WRITING_MODES and jax.process_index() == 0:
      lock = workdir_lib.WriterLock(workdir).acquire()
    _run(config, workdir, mode)
  except Exception as e:  # pylint: disable=broad-except
    message = user_error(e)
    if message is None:
      raise
    fail(message)
  finally:
    if lock is not None:
      lock.release()


def _parse_flags(argv):
  """absl flag parsing whose failures (an unknown --config key, a bad value)
  end in one `error:` line naming the flag."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(f"{e}; see --helpfull")
  except (AttributeError, KeyError) as e:  # ml_collections: no such config field
    key = str(e).strip("\"' ")
    bad = [
        a.split("=")[0]
        for a in argv[1:]
        if a.startswith("--config.") and re.search(rf"\b{re.escape(key)}\b", a)
    ]
    flag = bad[0] if bad else f"--config.{key}"
    fail(f"{flag}: {key!r} is not a field of the config; check the spelling "
         f"against the config file and iat_jax/configs.py:base_config")


def run() -> None:
  """Console-script entry point (re-executes once with `allocator.SETTINGS`)."""
  allocator.ensure()
  app.run(main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
