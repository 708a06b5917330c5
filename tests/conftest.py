"""pytest set-up: 8 forced CPU devices (before jax is imported), absl flags
parsed with defaults (as absltest.main would), one scratch directory per test
session, and a persistent JAX compilation cache in it.

tests/ is a package, so pytest puts the repository root on sys.path and the
fixtures are imported as `from tests import model_fixtures as mf`. Run it as
`python -m pytest -n 2 --dist loadfile tests` (pytest-xdist): the xdist
workers inherit this process's environment, hence its session directory.
With workers, the controller starts building the shared tiny pipeline
(`cli_fixtures.shared_pipeline`) in the background at once, so that the
workers run the in-process tests meanwhile instead of waiting for it.
Tests that run programs in subprocesses or whole pipelines are marked `slow`;
`-m "not slow"` is the fast tier.
"""

import os
import signal
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not os.environ.get("IAT_TEST_SESSION"):
  os.environ["IAT_TEST_SESSION"] = tempfile.mkdtemp(prefix="iat-tests-")
# Tests compile the same tiny steps many times (a stage's Run is rebuilt to
# evaluate and to export); XLA's optimizations buy nothing at these sizes.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(os.environ["IAT_TEST_SESSION"], "jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

from absl import flags  # pylint: disable=g-import-not-at-top

flags.FLAGS.mark_as_parsed()

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Test files that read the shared pipeline.
_PIPELINE_USERS = ("train_test.py", "stream_test.py", "distributed_test.py",
                   "pipeline_test.py")
_prebuild = None


def _wants_pipeline(args) -> bool:
  for arg in args or ["."]:
    path = arg.split("::")[0]
    if os.path.isdir(path) or os.path.basename(path) in _PIPELINE_USERS:
      return True
  return False


def pytest_configure(config):
  global _prebuild
  if hasattr(config, "workerinput") or not config.getoption("numprocesses", None):
    return  # an xdist worker, or no workers: built on first use
  if not _wants_pipeline(config.args) or "not slow" in (config.option.markexpr or ""):
    return  # the fast tier (-m "not slow") runs no pipeline
  log = open(os.path.join(os.environ["IAT_TEST_SESSION"], "prebuild.log"), "w")
  _prebuild = subprocess.Popen([
      sys.executable, "-c",
      "from tests import cli_fixtures; cli_fixtures.shared_pipeline()"
  ],
                               cwd=_REPO,
                               stdout=log,
                               stderr=subprocess.STDOUT,
                               start_new_session=True)


def pytest_unconfigure(config):
  del config
  if _prebuild is not None and _prebuild.poll() is None:  # e.g. interrupted
    os.killpg(_prebuild.pid, signal.SIGTERM)  # it and its `iat_jax.main` run
    _prebuild.wait()
