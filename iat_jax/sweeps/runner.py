"""Sweep points, their `iat_jax.main` commands, and running them.

A point is an override dict such as {"model.sit_layers": 2}; each point x
seed is one `python -m iat_jax.main --mode=pipeline` run in
DIR/<point>/seed<k>/. `execute` is the one run-and-report tail that
`iat_jax.sweep` and `experiments/paper/tables.py` share.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import time
from typing import Callable, Sequence

from absl import logging
import ml_collections

from iat_jax import errors
from iat_jax import launch_lib
from iat_jax.sweeps import report


def load_config_module(config_arg: str):
  """Imports the config file of `file.py[:arg]`."""
  path = config_arg.partition(":")[0]
  spec = importlib.util.spec_from_file_location("iat_sweep_config", path)
  if spec is None:
    raise errors.ConfigError("--config", f"cannot load {path!r}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_points(config_arg: str, name: str) -> list[dict]:
  """The file's get_sweep(name), each key checked against its get_config."""
  module = load_config_module(config_arg)
  if not hasattr(module, "get_sweep"):
    raise ValueError(f"{config_arg} defines no get_sweep(name)")
  points = [dict(p) for p in module.get_sweep(name)]
  check_points(config_arg, points, f"sweep {name!r}")
  names = [report.point_name(p) for p in points]
  if len(set(names)) != len(names):
    raise ValueError(f"sweep {name!r} has repeated points: {names}")
  return points


def check_points(config_arg: str, points, what: str) -> None:
  """Raises ValueError (naming `what`) unless every key is a config field."""
  module = load_config_module(config_arg)
  arg = config_arg.partition(":")[2]
  config = module.get_config(arg) if arg else module.get_config()
  for key in {k for p in points for k in p}:
    node = config
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ValueError(f"{what}: {key!r} is not a config field of {config_arg}")
      node = node[part]


def _element(value) -> str:
  return repr(value) if isinstance(value, str) else str(value)


def flag_value(value) -> str:
  """A value as ml_collections' config flags parse it back."""
  if isinstance(value, (tuple, list)):
    return "(" + ",".join(map(_element, value)) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def command(config_arg: str,
            workdir: str,
            point: dict,
            seed: int,
            data_cache: str,
            extra_args: Sequence[str] = (),
            mode: str = "pipeline",
            sources_from: str = "") -> list[str]:
  """The `python -m iat_jax.main --mode=pipeline` command of one run.

  sources_from: a point directory of another sweep or table; the run then
  reads its source models from <sources_from>/seed<seed>.
  """
  data = os.path.join(data_cache, f"seed{seed}")
  reuse = ([
      f"--config.pipeline.sources_from={os.path.join(sources_from, f'seed{seed}')}"
  ] if sources_from else [])
  return launch_lib.main_command([
      f"--config={config_arg}", f"--workdir={report.run_dir(workdir, point, seed)}",
      f"--mode={mode}", f"--config.data.cache_dir={data}", *reuse, *extra_args,
      *(f"--config.{k}={flag_value(v)}" for k, v in point.items()),
      f"--config.seed={seed}"
  ])


def _run_logged(cmd: list[str], log_path: str, env: dict) -> int:
  """Runs cmd with its output appended to log_path; SIGTERMs it if we stop."""
  with open(log_path, "a") as log:
    log.write(f"$ {launch_lib.shell_join(cmd)}\n")
    log.flush()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
      return proc.wait()
    finally:
      if proc.poll() is None:  # the sweep itself was stopped: let the run checkpoint
        proc.terminate()
        proc.wait()


def _duration(seconds: float) -> str:
  return time.strftime("%H:%M:%S", time.gmtime(seconds))


def run_all(jobs: Sequence[tuple[str, list[str]]], cache_dir: str) -> list[str]:
  """Runs each (run dir, command) without a results.json; returns the failed.

  Runs share JAX's persistent compilation cache (cache_dir unless the
  environment names one), so the seeds of a point compile once.
  """
  env = {"JAX_COMPILATION_CACHE_DIR": cache_dir, **os.environ}
  todo = []
  for d, cmd in jobs:
    if os.path.exists(os.path.join(d, "results.json")):
      logging.info("sweep: skip %s (complete)", d)
    else:
      todo.append((d, cmd))
  total, failed, t0 = len(jobs), [], time.time()
  logging.info("sweep: %d runs, %d complete, %d to run", total, total - len(todo),
               len(todo))
  for i, (d, cmd) in enumerate(todo):
    os.makedirs(d, exist_ok=True)
    logging.info("sweep: run %s", d)
    start = time.time()
    code = _run_logged(cmd, os.path.join(d, "pipeline.log"), env)
    if code:
      failed.append(d)
      logging.error("sweep: %s failed (exit %d); see %s/pipeline.log", d, code, d)
    eta = (time.time() - t0) / (i + 1) * (len(todo) - i - 1)
    logging.info("sweep: %d/%d runs done, %s took %s, ETA %s",
                 total - len(todo) + i + 1, total, d, _duration(time.time() - start),
                 _duration(eta))
  return failed


def execute(jobs: Sequence[tuple[str, list[str]]],
            workdir: str,
            points: Sequence[dict],
            seeds: int,
            *,
            emit: str = "none",
            what: str = "sweep",
            on_rows: Callable[[list[dict]], None] | None = None) -> None:
  """Prints the commands (emit='commands') or runs the missing jobs, then writes
  the sweep report and calls `on_rows` with its rows; exits non-zero naming
  the failed runs."""
  if emit == "commands":
    print("\n".join(launch_lib.shell_join(c) for _, c in jobs))
    return
  # SIGTERM ends this through SystemExit, which SIGTERMs the current run.
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
  failed = run_all(jobs, os.path.join(workdir, "jax_cache"))
  rows = report.report(workdir, points, seeds)
  if rows and on_rows is not None:
    on_rows(rows)
  if failed:
    sys.exit(f"{what}: {len(failed)} run(s) failed: {failed}")
