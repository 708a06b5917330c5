"""`--mode=continuous` end to end: killed anywhere and resumed, it ends
exactly where an uninterrupted run ends; bad input is refused before work."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from absl.testing import absltest
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from iat_jax import configs
from iat_jax.data import dataset
from iat_jax.data import periods
from iat_jax.data import sources
from iat_jax.store import tables
from iat_jax.store import user_index
from tests import cli_fixtures
from tests import model_fixtures
from tests import store_fixtures as sf

# 11 periods of 3 days; retention keeps 2 before the current one; the three
# kinds of continuous model.
_RUN = ("--config.data.period=3d", "--config.store.retention_periods=2",
        "--config.store.flush_every=2",
        "--config.continuous.models=('base','source_user','user_iat')")


def _start(workdir, *overrides):
  return cli_fixtures.start_main(workdir, *_RUN, *overrides, mode="continuous")


def _kill_when(proc, ready, delay=0.0):
  deadline = time.time() + 600
  while not ready():
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stderr.read()[-3000:]}")
    if time.time() > deadline:
      raise AssertionError("timed out")
    time.sleep(0.02)
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  proc.wait()


def _ckpt(workdir):
  path = os.path.join(workdir, "continuous", "ckpt")
  return os.listdir(path) if os.path.isdir(path) else []


def _state(workdir):
  """Everything a continuous run leaves that must not depend on kills:
  results, metric lines, the index's entries, the surviving InsEmb tables."""
  d = os.path.join(workdir, "continuous")
  out = {}
  for name in ("results.json", "metrics.jsonl"):
    with open(os.path.join(d, name)) as f:
      out[name] = f.read()
  config = configs.base_config()
  stores = os.path.join(d, "stores")
  for model in sorted(os.listdir(stores)):
    for period in sorted(os.listdir(os.path.join(stores, model))):
      t = tables.open_table(config, os.path.join(stores, model, period, "part-000"))
      out[f"{model}/{period}"] = (len(t), t.metadata["checksum"])
  index = user_index.UserIndex(os.path.join(d, "index"), 2, 16)
  users = np.arange(-5, 200)  # the tiny config's uids are small
  out["index"] = [v.tobytes() for v in index.read(users)]
  return out


@pytest.mark.slow
class ContinuousTest(absltest.TestCase):

  def test_killed_anywhere_resumed_equals_uninterrupted(self):
    """A daily job (through period 2), then a run killed mid-period and
    again mid-checkpoint, re-run each time: results, metric lines, index and
    InsEmb tables (retention dropping the same periods) equal those of one
    uninterrupted run."""
    base = tempfile.mkdtemp()
    a, b = os.path.join(base, "a"), os.path.join(base, "b")
    cli_fixtures.run([
        sys.executable, "-m", "iat_jax.main",
        *cli_fixtures.main_args(a, "continuous", *_RUN)
    ])
    cli_fixtures.run([
        sys.executable, "-m", "iat_jax.main",
        *cli_fixtures.main_args(b, "continuous", *_RUN, "--config.continuous.through=2")
    ])
    self.assertEqual(sorted(_ckpt(b)), ["2", "3"])
    _kill_when(_start(b), lambda: "5" in _ckpt(b), delay=0.5)  # mid-period 5
    _kill_when(_start(b), lambda: any(c.split(".")[0] == "8" for c in _ckpt(b)))
    cli_fixtures.run([
        sys.executable, "-m", "iat_jax.main",
        *cli_fixtures.main_args(b, "continuous", *_RUN)
    ])
    want, got = _state(a), _state(b)
    self.assertEqual(sorted(want), sorted(got))
    for key in want:
      self.assertEqual(want[key], got[key], key)
    results = json.loads(want["results.json"])
    self.assertLen(results["periods"], 11)
    # After period 10, retention keeps the InsEmb tables of periods 9 and 10.
    self.assertEqual([k for k in want if k.startswith("source_user/")],
                     ["source_user/period-00009", "source_user/period-00010"])
    self.assertIn("user_iat", results["vs_base"])
    for png in ("auc_click.png", "dauc_click.png"):
      self.assertTrue(os.path.exists(os.path.join(a, "continuous", png)))

  def test_two_processes_equal_one_with_two_devices(self):
    """Two CPU processes (jax.distributed, one device each) end with the
    results and metric lines, exactly, of one process driving two devices
    (the same per-device batches); each process wrote its own part of every
    period's InsEmbs and of the index."""
    base = tempfile.mkdtemp()
    one, two = os.path.join(base, "one"), os.path.join(base, "two")
    env = {**cli_fixtures.ENV, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    proc = subprocess.run([
        sys.executable, "-m", "iat_jax.main",
        *cli_fixtures.main_args(one, "continuous", *_RUN)
    ],
                          cwd=cli_fixtures.REPO,
                          env=env,
                          capture_output=True,
                          text=True,
                          timeout=900)
    self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
    cli_fixtures.run([
        sys.executable,
        os.path.join(cli_fixtures.REPO, "launch", "local.py"), "--num_processes=2",
        "--", *cli_fixtures.main_args(two, "continuous", *_RUN)
    ])
    for name in ("results.json", "metrics.jsonl"):
      with open(os.path.join(one, "continuous",
                             name)) as a, open(os.path.join(two, "continuous",
                                                            name)) as b:
        self.assertEqual(a.read(), b.read(), name)
    config = configs.base_config()
    period = os.path.join("continuous", "stores", "source_user", "period-00010")
    whole = tables.open_table(config, os.path.join(one, period, "part-000"))
    parts = [
        tables.open_table(config, os.path.join(two, period, f"part-{k:03d}"))
        for k in range(2)
    ]
    self.assertTrue(all(len(t) for t in parts))
    self.assertEqual(sum(len(t) for t in parts), len(whole))
    self.assertCountEqual(os.listdir(os.path.join(two, "continuous", "index")),
                          ["part-000", "part-001"])

  def test_init_from_a_batch_pipeline(self):
    """The periods inside a finished batch pipeline's train split come from
    it (its best parameters, its exported InsEmbs) and are not trained; the
    run then trains the rest."""
    pipeline = cli_fixtures.shared_pipeline()
    work = os.path.join(tempfile.mkdtemp(), "w")
    flags = (*_RUN, f"--config.continuous.init_from={pipeline}",
             "--config.continuous.warmup_periods=0")
    cli_fixtures.run_main(work, "continuous", *flags, "--config.continuous.through=8")
    ckpt = ocp.CheckpointManager(
        os.path.join(work, "continuous", "ckpt"),
        item_handlers={"state": ocp.StandardCheckpointHandler()})
    self.assertEqual(ckpt.latest_step(), 9)  # periods 0-8: the train split
    state = ckpt.restore(9, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    best = ocp.CheckpointManager(
        os.path.join(pipeline, "base", "best"),
        item_handlers={"params": ocp.StandardCheckpointHandler()})
    params = best.restore(best.latest_step(),
                          args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    jax.tree.map(np.testing.assert_array_equal,
                 state["state"]["models"]["base"]["params"], params["params"])
    # Period 8's InsEmbs are the batch source's exported ones (retention
    # kept periods 7 and 8).
    config = model_fixtures.tiny_config()
    config.data.cache_dir = cli_fixtures.DATA
    ds = dataset.Dataset(sources.dataset_path(config, work))
    keys = sf.ds_keys(ds, periods.of_dataset(ds, "3d").rows(8))
    want = tables.open_table(config, os.path.join(pipeline, "stores", "source_user"))
    got = tables.open_table(
        config,
        os.path.join(work, "continuous", "stores", "source_user", "period-00008",
                     "part-000"))
    np.testing.assert_array_equal(got.lookup(keys)[0], want.lookup(keys)[0])
    self.assertTrue(got.lookup(keys)[1].all())
    cli_fixtures.run_main(work, "continuous", *flags)
    with open(os.path.join(work, "continuous", "results.json")) as f:
      results = json.load(f)
    self.assertEqual([r["warmup"] for r in results["periods"]],
                     [True] * 9 + [False] * 2)
    self.assertEqual(results["record_periods"], 2)
    line = cli_fixtures.run_main(os.path.join(tempfile.mkdtemp(), "w"),
                                 "continuous",
                                 *flags,
                                 "--config.data.synthetic.num_instances=1000",
                                 check=False).stderr.strip().splitlines()[-1]
    self.assertIn("--config.continuous.init_from", line)

  def test_bad_input_is_refused_before_any_work(self):
    work = os.path.join(tempfile.mkdtemp(), "w")

    def fails(workdir, mode, *flags):
      proc = cli_fixtures.run_main(workdir, mode, *flags, check=False)
      self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
      return proc.stderr.strip().splitlines()[-1]

    self.assertIn("--config.data.period: '0'",
                  fails(work, "continuous", "--config.data.period=0"))
    self.assertIn("--config.continuous.sync_lag",
                  fails(work, "continuous", "--config.continuous.sync_lag=soon"))
    self.assertIn("--config.continuous.through",
                  fails(work, "continuous", *_RUN, "--config.continuous.through=11"))
    self.assertFalse(os.path.exists(os.path.join(work, "continuous")))
    cli_fixtures.run_main(work, "continuous", *_RUN, "--config.continuous.through=0")
    steps = _ckpt(work)
    line = fails(work, "continuous", *_RUN, "--config.continuous.sync_lag=6h")
    self.assertIn("--config.continuous.sync_lag: is '6h'", line)
    line = fails(work, "continuous", *_RUN,
                 "--config.data.synthetic.num_instances=1000")
    self.assertIn("period 0's instances differ", line)
    self.assertIn("--workdir", fails(work, "pipeline"))
    self.assertEqual(_ckpt(work), steps)
    pipeline = cli_fixtures.shared_pipeline()
    self.assertIn("holds a batch pipeline", fails(pipeline, "continuous", *_RUN))
    self.assertFalse(os.path.exists(os.path.join(pipeline, "continuous")))


if __name__ == "__main__":
  absltest.main()
