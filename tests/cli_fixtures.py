"""Runs `python -m iat_jax.main` in subprocesses on the tiny config.

All runs of a test process share one dataset cache, and all runs of a test
session (every pytest-xdist worker) share JAX's persistent compilation cache,
so repeated runs of a stage compile once, and compile with XLA's
optimizations mostly off (about half the compile time of these tiny models);
runs that a test compares share this environment. `shared_pipeline()` is one
finished tiny pipeline per session for the tests that only read (or copy) it.
"""

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from iat_jax import metrics
from iat_jax import workdir as workdir_lib
from iat_jax.sweeps import report

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "configs", "tiny.py")
# One directory per test session, shared by its xdist workers (conftest.py
# sets it before they start); outside pytest, one per process.
SESSION = os.environ.get("IAT_TEST_SESSION") or tempfile.mkdtemp(prefix="iat-tests-")
os.makedirs(SESSION, exist_ok=True)
DATA = tempfile.mkdtemp(prefix="iat-tiny-data-")
JAX_CACHE = os.path.join(SESSION, "jax-cache")
ENV = {
    **os.environ, "XLA_FLAGS": "",
    "JAX_PLATFORMS": "cpu",
    "JAX_COMPILATION_CACHE_DIR": JAX_CACHE,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"
}


def main_args(workdir, mode, *overrides, config=TINY):
  return [
      f"--config={config}", f"--workdir={workdir}", f"--mode={mode}",
      f"--config.data.cache_dir={DATA}", *overrides
  ]


def run(cmd, check=True):
  proc = subprocess.run(cmd,
                        cwd=REPO,
                        env=ENV,
                        capture_output=True,
                        text=True,
                        timeout=900)
  if check and proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
  return proc


def run_main(workdir, mode, *overrides, check=True):
  return run(
      [sys.executable, "-m", "iat_jax.main", *main_args(workdir, mode, *overrides)],
      check)


def start_main(workdir, *overrides, mode="train"):
  """`iat_jax.main` started in the background (stderr piped)."""
  return subprocess.Popen(
      [sys.executable, "-m", "iat_jax.main", *main_args(workdir, mode, *overrides)],
      cwd=REPO,
      env=ENV,
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True)


def metric_lines(workdir, stage="base"):
  return metrics.read_jsonl(os.path.join(workdir, stage, "metrics.jsonl"))


def wait_for_step(workdir, step, proc, stage="base", checkpoint=None):
  """Waits for a train line at >= step (and a committed checkpoint)."""
  deadline = time.time() + 300
  ckpt = os.path.join(workdir, stage, "ckpt")
  while time.time() < deadline:
    if any(r["split"] == "train" and r["step"] >= step
           for r in metric_lines(workdir, stage)) and (
               checkpoint is None or str(checkpoint) in os.listdir(ckpt)):
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stderr.read()[-3000:]}")
    time.sleep(0.05)
  raise AssertionError("timed out")


@contextlib.contextmanager
def _session_lock(name):
  with open(os.path.join(SESSION, name + ".lock"), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def shared_pipeline():
  """A finished `--mode=pipeline` workdir of the tiny config (every model,
  every store), built once per test session; read it or copy it, never
  write into it."""
  workdir = os.path.join(SESSION, "pipeline")
  with _session_lock("pipeline"):
    if not workdir_lib.is_complete(workdir):
      shutil.rmtree(workdir, ignore_errors=True)  # an interrupted build
      run_main(workdir, "pipeline")
  return workdir


def copy_of(workdir):
  """A private copy of a workdir (tests that train on from a shared one)."""
  copy = os.path.join(tempfile.mkdtemp(), "w")
  shutil.copytree(workdir, copy)
  return copy


def fresh_stream(workdir):
  """A private copy of a finished pipeline without its streaming source and
  the models after it: a stream trained there starts afresh."""
  copy = copy_of(workdir)
  for sub in ("source_stream", "stream_iat", os.path.join("stores", "source_stream")):
    shutil.rmtree(os.path.join(copy, sub))
  os.remove(os.path.join(copy, "results.json"))
  return copy


def write_run(workdir, point, seed, models):
  """A finished sweep run: <workdir>/<point>/seed<k>/results.json of models."""
  run = report.run_dir(workdir, point, seed)
  os.makedirs(run)
  with open(os.path.join(run, "results.json"), "w") as f:
    json.dump({"dataset": "synthetic", "models": models}, f)
