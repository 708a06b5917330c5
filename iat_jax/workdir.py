"""The layout of a run's working directory, and its JSON files.

  <workdir>/
    data/<source>/        the preprocessed dataset (`iat_jax.data.sources`),
                          unless --config.data.cache_dir puts it elsewhere
    <stage or model>/     one directory per trained model:
      ckpt/, best/        Orbax checkpoints (`iat_jax.checkpointing`)
      metrics.jsonl, tb/  metrics (`iat_jax.metrics`)
      results.json        written last: final valid/test metrics, params,
                          FLOPs; its presence marks the model complete
    stores/<source>/      exported InsEmb tables (`iat_jax.store.tables`)
    results.json          the pipeline's results of every model
    buckets/              --mode=buckets' table and plots (`iat_jax.buckets`)
    writer.lock           flock'ed by the run writing here (`WriterLock`)
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from typing import Any

from absl import logging
import jax

from iat_jax import errors


def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def results_path(directory: str) -> str:
  """The results.json of a stage directory (or of a pipeline workdir)."""
  return os.path.join(directory, "results.json")


def is_complete(directory: str) -> bool:
  return os.path.exists(results_path(directory))


def load_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def load_results(directory: str) -> dict:
  return load_json(results_path(directory))


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` to `path` atomically, from process 0 only.

  A file that already holds exactly this content is left alone, so re-running
  a finished run on a read-only workdir only reads it."""
  if jax.process_index() != 0:
    return
  text = json.dumps(obj, indent=1, sort_keys=True)
  try:
    with open(path) as f:
      if f.read() == text:
        return
  except (OSError, UnicodeDecodeError):
    pass
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def write_results(directory: str, results: dict) -> None:
  write_json(results_path(directory), results)


# One writer per workdir ------------------------------------------------------

LOCK_NAME = "writer.lock"


class WriterLock:
  """An exclusive `fcntl.flock` on <workdir>/writer.lock, held while a run writes.

  The kernel drops a flock when its holder exits, however it exits (SIGKILL
  included), so a dead run never leaves a workdir locked; the lock file
  itself stays, holding the last holder's pid, host and start time for the
  refusal message. Only runs that write take it (train, export, pipeline);
  readers (evaluate, sweep reports) do not. On a filesystem without flock
  (some NFS / FUSE mounts) or a read-only workdir the run goes on unlocked,
  saying so once in the log.
  """

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd: int | None = None

  def acquire(self) -> "WriterLock":
    try:
      os.makedirs(self.workdir, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        logging.warning(
            "workdir %s is not writable (%s): running without its "
            "writer lock; anything this run writes there will fail", self.workdir,
            e.strerror)
        return self
      raise
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        holder = _read_holder(fd)
        os.close(fd)
        raise errors.LockError(
            f"workdir {self.workdir} is in use by another run ({holder}; lock "
            f"{self.path}); wait for it to finish or stop it, or pass another "
            f"--workdir") from None
      os.close(fd)
      if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        logging.warning(
            "workdir %s: its filesystem does not support flock (%s): "
            "running WITHOUT the one-writer guarantee; do not start "
            "a second run on it", self.workdir, e.strerror)
        return self
      raise
    info = (f"pid {os.getpid()} on host {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    os.ftruncate(fd, 0)
    os.pwrite(fd, (info + "\n").encode(), 0)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is not None:
      os.close(self._fd)  # closing drops the flock
      self._fd = None

  def __enter__(self) -> "WriterLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()


def _read_holder(fd: int) -> str:
  try:
    text = os.pread(fd, 4096, 0).decode(errors="replace").strip()
  except OSError:
    text = ""
  return text or "holder unknown"
