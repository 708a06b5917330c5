"""Tests of iat_jax.sweep and iat_jax.sweeps: statistics, points, commands and
a tiny sweep."""

import collections
import csv
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile

from absl.testing import absltest
from matplotlib import image
import pytest

from iat_jax.sweeps import report
from iat_jax.sweeps import runner
from iat_jax.sweeps import stats
from tests import cli_fixtures as cli

DEMO = os.path.join(cli.REPO, "experiments", "configs", "demo.py")
PAPER = os.path.join(cli.REPO, "experiments", "configs", "paper.py")
SWEEPS = ("sit_depth", "history_len", "insemb_dim", "iat_layers", "chunk_len")
# Fewer checkpoints and evaluations: the tiny pipeline is compile-bound.
FAST = ("--config.checkpoint_every=1000", "--config.eval_every=0",
        "--config.log_every=100")
# The sweep runs pipelines of these models only (base, for the deltas, and
# user_iat, whose cost the scaling fit uses, with its source): the plumbing
# is the same for all seven, at under half the time.
MODELS = {"base", "source_user", "user_iat"}
PIPELINE_MODELS = "--config.pipeline.models=('base','user_iat')"
# Halves the compile-bound run time; these tests check plumbing, not numbers.
ENV = cli.ENV


def run_sweep(workdir, *args, extra=FAST):
  proc = subprocess.run([
      sys.executable, "-m", "iat_jax.sweep", f"--config={cli.TINY}",
      f"--workdir={workdir}", *args, "--", *extra
  ],
                        cwd=cli.REPO,
                        env=ENV,
                        capture_output=True,
                        text=True,
                        timeout=900)
  if proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
  return proc


class StatsTest(absltest.TestCase):

  def test_t_quantile(self):
    for df, want in ((1, 12.7062), (2, 4.3027), (10, 2.2281), (30, 2.0423),
                     (31, 2.0395), (60, 2.0003), (120, 1.9799), (10**7, 1.9600)):
      self.assertAlmostEqual(stats.t_quantile(df), want, places=3, msg=df)
    self.assertEqual(stats.t_quantile(0), math.inf)
    values = [stats.t_quantile(df) for df in range(1, 200)]
    self.assertEqual(values, sorted(values, reverse=True))

  def test_mean_ci(self):
    mean, half = stats.mean_ci([1.0, 2.0, 3.0])  # sd 1, t(2) = 4.30265
    self.assertAlmostEqual(mean, 2.0)
    self.assertAlmostEqual(half, 4.30265 / math.sqrt(3), places=5)
    mean, half = stats.mean_ci([0.7])
    self.assertEqual(mean, 0.7)
    self.assertTrue(math.isnan(half))

  def test_linear_fit(self):
    exact = stats.linear_fit([0, 1, 2, 3], [1, 3, 5, 7])
    self.assertAlmostEqual(exact["slope"], 2.0)
    self.assertAlmostEqual(exact["intercept"], 1.0)
    self.assertAlmostEqual(exact["slope_ci"], 0.0)
    self.assertAlmostEqual(exact["r2"], 1.0)
    # slope 0.6, intercept 2.2, SSE 2.4, Sxx 10: se = sqrt(2.4 / 3 / 10).
    fit = stats.linear_fit([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    self.assertAlmostEqual(fit["slope"], 0.6)
    self.assertAlmostEqual(fit["intercept"], 2.2)
    self.assertAlmostEqual(fit["slope_ci"], 3.18245 * math.sqrt(0.08), places=5)
    self.assertAlmostEqual(fit["r2"], 0.6)
    self.assertEqual(fit["n"], 5)
    self.assertTrue(math.isnan(stats.linear_fit([1, 2], [3, 5])["slope_ci"]))
    with self.assertRaisesRegex(ValueError, "distinct"):
      stats.linear_fit([1, 1, 1], [1, 2, 3])


class PointsTest(absltest.TestCase):

  def test_point_names_and_flag_values(self):
    self.assertEqual(report.point_name({"model.sit_layers": 2}), "model.sit_layers=2")
    self.assertEqual(
        report.point_name({
            "model.mlp_dims": (16, 8),
            "data.dir": "a/b c"
        }), "model.mlp_dims=16-8,data.dir=a_b_c")
    self.assertEqual(report.point_name({}), "default")
    self.assertEqual(runner.flag_value((8,)), "(8,)")
    self.assertEqual(runner.flag_value((16, 8)), "(16,8)")
    self.assertEqual(runner.flag_value(("user_iat",)), "('user_iat',)")
    self.assertEqual(runner.flag_value(True), "True")

  def test_named_sweeps(self):
    for name in SWEEPS:
      tiny = runner.get_points(cli.TINY, name)
      demo = runner.get_points(DEMO + ":runlocal", name)
      self.assertLen(tiny, 2, name)
      self.assertGreaterEqual(len(demo), 3, name)
      self.assertLen({k for p in tiny + demo for k in p}, 1, name)
    self.assertEqual(runner.get_points(PAPER, "history_len"), [{
        "model.hist_len": v
    } for v in (4, 8, 16, 32, 64)])
    self.assertEqual(runner.get_points(DEMO, "sit_depth"), [{
        "model.sit_layers": v
    } for v in (0, 1, 2, 4, 8)])
    self.assertEqual(runner.get_points(DEMO, "history_len"), [{
        "model.hist_len": v
    } for v in (1, 16, 64, 256, 1024)])

  def test_unknown_sweep_lists_the_known(self):
    with self.assertRaisesRegex(ValueError, r"'nope'.*chunk_len.*sit_depth"):
      runner.get_points(cli.TINY, "nope")

  def test_unknown_config_key(self):
    path = os.path.join(tempfile.mkdtemp(), "bad.py")
    with open(path, "w") as f:
      f.write("from iat_jax import configs\n"
              "def get_config(arg=None):\n  return configs.base_config()\n"
              "def get_sweep(name):\n  return [{'model.nope': 1}]\n")
    with self.assertRaisesRegex(ValueError, "'model.nope' is not a config field"):
      runner.get_points(path, "x")

  @pytest.mark.slow
  def test_emit_commands(self):
    workdir = os.path.join(tempfile.mkdtemp(), "sweep")
    out = run_sweep(workdir,
                    "--sweep=sit_depth",
                    "--seeds=2",
                    "--emit=commands",
                    extra=["--config.num_epochs=1"]).stdout
    lines = out.strip().splitlines()
    self.assertLen(lines, 4)
    for line, (layers, seed) in zip(lines, [(0, 0), (0, 1), (1, 0), (1, 1)]):
      argv = shlex.split(line)
      self.assertEqual(argv[:3], [sys.executable, "-m", "iat_jax.main"])
      run = os.path.join(workdir, f"model.sit_layers={layers}", f"seed{seed}")
      data = os.path.join(workdir, "data", f"seed{seed}")
      self.assertEqual(argv[3:], [
          f"--config={cli.TINY}", f"--workdir={run}", "--mode=pipeline",
          f"--config.data.cache_dir={data}", "--config.num_epochs=1",
          f"--config.model.sit_layers={layers}", f"--config.seed={seed}"
      ])
    self.assertFalse(os.path.exists(workdir))


def fake_results(workdir, point, seed, flops, gain, noise):
  """A pipeline results.json whose user_iat AUC is base + gain + noise."""

  def model(auc, loss):
    return {
        split: {
            "auc/click": auc,
            "logloss/click": loss
        } for split in ("valid", "test")
    } | {
        "params": int(flops),
        "flops_per_batch": flops
    }

  models = {m: model(0.6, 0.5) for m in MODELS}
  models["user_iat"] = model(0.6 + gain + noise, 0.5 - gain)
  cli.write_run(workdir, point, seed, models)


class ReportTest(absltest.TestCase):

  def test_numeric_sweep_fits_the_known_slope(self):
    workdir = tempfile.mkdtemp()
    points = [{"model.hist_len": v} for v in (1, 16, 256)]
    for p, flops in zip(points, (1e3, 1e4, 1e5)):
      for seed, noise in enumerate((0.002, -0.002)):
        # x = log10(source_user + user_iat FLOPs) = log10(2 * flops)
        fake_results(workdir, p, seed, flops, 0.01 * math.log10(2 * flops), noise)
    rows = report.report(workdir, points, seeds=2)
    self.assertLen(rows, 3 * 2 * len(MODELS) * 1 * 2 * 2)
    with open(os.path.join(workdir, "scaling.json")) as f:
      fits = {(fit["x"], fit["y"]): fit for fit in json.load(f)}
    self.assertAlmostEqual(fits["flops", "dauc"]["slope"], 0.01)
    self.assertAlmostEqual(fits["flops", "dlogloss"]["slope"], -0.01)
    self.assertAlmostEqual(fits["flops", "dlogloss"]["slope_ci"], 0.0)
    self.assertGreater(fits["flops", "dauc"]["slope_ci"], 0.0)
    self.assertEqual(fits["flops", "dauc"]["n"], 6)
    for name in ("test_auc_click.png", "scaling_flops.png", "scaling_params.png"):
      self.assertGreater(image.imread(os.path.join(workdir, "plots", name)).std(), 0)

  def test_categorical_sweep_with_a_missing_run(self):
    workdir = tempfile.mkdtemp()
    points = [{
        "model.seq.encoder": "din",
        "model.hist_len": 4
    }, {
        "model.seq.encoder": "transformer",
        "model.hist_len": 8
    }]
    for p in points:
      for seed in (0, 1):
        if (p["model.hist_len"], seed) != (8, 1):
          fake_results(workdir, p, seed, 1e4, 0.01, 0.0)
    rows = report.report(workdir, points, seeds=2)
    self.assertLen(rows, 3 * len(MODELS) * 1 * 2 * 2)
    self.assertEqual(rows[0]["point"], "model.seq.encoder=din,model.hist_len=4")
    self.assertFalse(os.path.exists(os.path.join(workdir, "scaling.json")))
    self.assertGreater(
        image.imread(os.path.join(workdir, "plots", "test_logloss_click.png")).std(), 0)


class SweepRunTest(absltest.TestCase):
  """One test: xdist could split a class's tests and run the sweep twice."""

  @pytest.mark.slow
  def test_sweep_table_plots_fit_and_resume(self):
    workdir = tempfile.mkdtemp()
    args = ("--sweep=iat_layers", "--seeds=2")
    first = run_sweep(workdir, *args, extra=FAST + (PIPELINE_MODELS,))
    self.assertIn("sweep: 4/4 runs done", first.stderr)
    self.assertIn("ETA", first.stderr)
    self._check_table(workdir)
    self._check_plots_and_fits(workdir, first.stdout)
    self._check_resume(workdir, args)

  def _check_table(self, workdir):
    with open(os.path.join(workdir, "results.csv")) as f:
      rows = list(csv.DictReader(f))
    # points x seeds x models x tasks x metrics x splits
    self.assertLen(rows, 2 * 2 * len(MODELS) * 2 * 2 * 2)
    self.assertEqual(list(rows[0]), [
        "point", "model.iat.layers", "seed", "model", "split", "task", "metric",
        "value", "params", "flops_per_batch"
    ])
    per_run = collections.Counter(
        (r["point"], r["model.iat.layers"], r["seed"]) for r in rows)
    self.assertEqual(
        per_run, {
            (f"model.iat.layers={v}", str(v), str(s)): 8 * len(MODELS) for v in (1, 2)
            for s in (0, 1)
        })
    self.assertEqual({r["model"] for r in rows}, MODELS)
    self.assertEqual({(r["split"], r["task"], r["metric"]) for r in rows},
                     {(s, t, m)
                      for s in ("valid", "test")
                      for t in ("click", "conversion")
                      for m in ("auc", "logloss")})
    for r in rows:
      self.assertTrue(math.isfinite(float(r["value"])))
      self.assertGreater(float(r["flops_per_batch"]), 0)

  def _check_plots_and_fits(self, workdir, stdout):
    plots = os.path.join(workdir, "plots")
    names = [
        f"test_{m}_{t}.png" for m in ("auc", "logloss") for t in ("click", "conversion")
    ] + ["scaling_flops.png", "scaling_params.png"]
    for name in names:
      img = image.imread(os.path.join(plots, name))
      self.assertGreater(img.shape[0], 200, name)
      self.assertGreater(img.shape[1], 300, name)
      self.assertGreater(img.std(), 0.0, name)
    with open(os.path.join(workdir, "scaling.json")) as f:
      fits = json.load(f)
    self.assertLen(fits, 2 * 2 * 2)  # x (flops, params) x tasks x (dAUC, dlogloss)
    for fit in fits:
      self.assertEqual(fit["n"], 4)
      self.assertTrue(math.isfinite(fit["slope"]))
    self.assertIn("scaling: dauc click vs log10(flops): slope", stdout)

  def _check_resume(self, workdir, args):
    """A sweep killed during one run's last stage: only that run runs again,
    and its pipeline resumes (skips its four finished steps)."""
    victim = os.path.join(workdir, "model.iat.layers=2", "seed1")
    os.remove(os.path.join(victim, "results.json"))
    shutil.rmtree(os.path.join(victim, "user_iat"))
    others = [
        os.path.join(workdir, f"model.iat.layers={v}", f"seed{s}", "results.json")
        for v, s in ((1, 0), (1, 1), (2, 0))
    ]
    mtimes = [os.stat(p).st_mtime_ns for p in others]
    second = run_sweep(workdir, *args, extra=FAST + (PIPELINE_MODELS,))
    self.assertIn("4 runs, 3 complete, 1 to run", second.stderr)
    self.assertEqual(second.stderr.count("sweep: run "), 1, second.stderr)
    self.assertIn(f"sweep: run {victim}", second.stderr)
    self.assertEqual(second.stderr.count("sweep: skip "), 3)
    self.assertEqual([os.stat(p).st_mtime_ns for p in others], mtimes)
    self.assertTrue(os.path.exists(os.path.join(victim, "results.json")))
    with open(os.path.join(victim, "pipeline.log")) as f:
      self.assertEqual(f.read().count("already complete"), len(MODELS) - 1)
    with open(os.path.join(workdir, "results.csv")) as f:
      self.assertLen(list(csv.DictReader(f)), 2 * 2 * len(MODELS) * 8)


if __name__ == "__main__":
  absltest.main()
