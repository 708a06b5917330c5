"""Tests of experiments/paper/tables.py: plan, statistics, report, tiny runs."""

import importlib.util
import json
import math
import os
import shlex
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest
from matplotlib import image

from iat_jax import stages
from iat_jax import validation
from iat_jax.sweeps import report
from iat_jax.sweeps import runner
from iat_jax.sweeps import stats
from tests import cli_fixtures as cli

SCRIPT = os.path.join(cli.REPO, "experiments", "paper", "tables.py")
PAPER = os.path.join(cli.REPO, "experiments", "configs", "paper.py")
_spec = importlib.util.spec_from_file_location("paper_tables", SCRIPT)
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)

FAST = ("--config.checkpoint_every=1000", "--config.eval_every=0",
        "--config.log_every=100")
# Halves the compile-bound run time; these runs check plumbing, not numbers.
ENV = {**cli.ENV, "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
TASKS = ("click", "conversion")


def run_tables(workdir, *args, extra=FAST):
  proc = subprocess.run([
      sys.executable, SCRIPT, f"--config={cli.TINY}", f"--workdir={workdir}", *args,
      "--", *extra
  ],
                        cwd=cli.REPO,
                        env=ENV,
                        capture_output=True,
                        text=True,
                        timeout=900)
  if proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-4000:]}")
  return proc


def table_lines(workdir):
  """The Markdown table of DIR/report.md as lists of cells."""
  with open(os.path.join(workdir, "report.md")) as f:
    text = f.read()
  rows = [[c.strip()
           for c in line.strip().strip("|").split("|")]
          for line in text.splitlines()
          if line.startswith("|")]
  return text, rows[0], rows[2:]


def fake_run(workdir, point, seed, aucs):
  """A results.json: model -> test AUC (logloss 1 - AUC, 1000 params, 2e6 FLOPs)."""
  models = {
      m: {
          split: {
              f"{k}/{t}": (a if k == "auc" else 1 - a)
              for t in TASKS
              for k in ("auc", "logloss")
          }
          for split in ("valid", "test")
      } | {
          "params": 1000,
          "flops_per_batch": 2e6
      } for m, a in aucs.items()
  }
  cli.write_run(workdir, point, seed, models)


class PlanTest(absltest.TestCase):

  def test_table1(self):
    points, rows = tables.plan("table1", ["din", "transformer"])
    self.assertEqual(points, [{
        "model.seq.encoder": "din"
    }, {
        "model.seq.encoder": "transformer"
    }])
    self.assertLen(rows, 2 * len(stages.PIPELINE))
    self.assertEqual(
        rows[2], {
            "label": "din / temporal_iat",
            "point": points[0],
            "model": "temporal_iat",
            "ref": (points[0], "base"),
            "group": "din",
            "series": "temporal_iat"
        })
    self.assertIsNone(rows[len(stages.PIPELINE)]["ref"])  # transformer / base
    with self.assertRaisesRegex(ValueError, "--encoders.*rnn"):
      tables.plan("table1", ["din", "rnn"])

  def test_table4(self):
    points, rows = tables.plan("table4", ablations=["iat_query", "label_side"])
    self.assertEqual(points, [{
        "model.seq.encoder": "transformer"
    }, {
        "model.seq.encoder": "transformer",
        "model.iat_query": "id"
    }, {
        "model.seq.encoder": "transformer",
        "model.use_label_side": False
    }])
    # The full point is table1's transformer point: one DIR serves both.
    self.assertEqual(report.point_name(points[0]),
                     report.point_name(tables.plan("table1")[0][2]))
    self.assertEqual([r["label"] for r in rows], [
        "base (no IAT)", "full user-order IAT", "ID-based query",
        "without label side info"
    ])
    self.assertEqual(rows[3]["ref"], (points[0], "user_iat"))
    all_points, _ = tables.plan("table4")
    self.assertLen(all_points, 6)
    with self.assertRaisesRegex(ValueError, "--ablations"):
      tables.plan("table4", ablations=["nope"])

  def test_point_runs(self):
    points, _ = tables.plan("table4", ablations=["insemb_after_sit", "iat_query"])
    runs = tables.point_runs("table4", points, "W")
    full_dir = os.path.join("W", report.point_name(tables.FULL))
    self.assertEqual(runs, [((), ""), (tables.ABLATION_FLAGS, ""),
                            (tables.ABLATION_FLAGS, full_dir)])
    cmd = runner.command("c.py",
                         "W",
                         points[2],
                         1,
                         "D",
                         runs[2][0],
                         sources_from=runs[2][1])
    self.assertIn(f"--config.pipeline.sources_from={full_dir}/seed1", cmd)
    self.assertEqual(tables.point_runs("table1", points[:2], "W"), [((), "")] * 2)

  def test_keys_exist_in_every_config(self):
    every = tables.plan("table1")[0] + tables.plan("table4")[0]
    for config in (cli.TINY, PAPER, PAPER + ":small", PAPER + ":full"):
      runner.check_points(config, every, "paper tables")
    with self.assertRaisesRegex(ValueError,
                                "paper tables: 'model.nope' is not a config field"):
      runner.check_points(cli.TINY, [{"model.nope": 1}], "paper tables")

  def test_paper_presets_validate(self):
    module = runner.load_config_module(PAPER)
    for variant in ("small", "full"):
      validation.validate(module.get_config(variant))
    self.assertEqual(module.get_config("full").model.dtype, "bfloat16")
    with self.assertRaisesRegex(ValueError, "unknown variant"):
      module.get_config("huge")


class StatsTest(absltest.TestCase):

  def test_relative_change_and_interval_verdict(self):
    self.assertAlmostEqual(stats.relative_change(0.8024, 0.8), 0.3)
    self.assertTrue(stats.excludes_zero(0.3, 0.2))
    self.assertTrue(stats.excludes_zero(-0.3, 0.2))
    self.assertFalse(stats.excludes_zero(0.1, 0.2))
    self.assertIsNone(stats.excludes_zero(0.1, math.nan))
    self.assertEqual(tables.fmt(0.123456, 0.01, 3, sign=True), "+0.123 ± 0.010")
    self.assertEqual(tables.fmt(0.5, math.nan, 2), "0.50 ± n/a")

  def test_paired_changes_skip_unpaired_seeds(self):
    full, abl = {"model.seq.encoder": "transformer"}, {"model.iat_query": "id"}
    name, ref = report.point_name(abl), report.point_name(full)
    test = {
        (ref, 0, "user_iat", "click", "auc"): 0.5,
        (ref, 1, "user_iat", "click", "auc"): 0.8,
        (name, 0, "user_iat", "click", "auc"): 0.51,
        (name, 1, "user_iat", "click", "auc"): 0.78,
        (name, 2, "user_iat", "click", "auc"): 0.9
    }  # no seed-2 reference
    row = {"point": abl, "model": "user_iat", "ref": (full, "user_iat")}
    got = tables.paired_changes(test, row, "click")
    self.assertLen(got, 2)
    self.assertAlmostEqual(got[0], 2.0)
    self.assertAlmostEqual(got[1], -2.5)


class ReportTest(absltest.TestCase):

  def test_table1_report_on_known_numbers(self):
    workdir = tempfile.mkdtemp()
    points, table_rows = tables.plan("table1", ["din", "transformer"])
    # din: user_iat gains +2%, +3%, +4% on seeds 0-2 (mean 3, sd 1, so the
    # interval 3 ± 2.48 excludes 0); temporal_iat gains +1%, -1%, 0% (mean 0).
    # transformer: seed 2 never ran.
    for seed, (gain, tgain) in enumerate(((2, 1), (3, -1), (4, 0))):
      aucs = {
          "base": 0.6,
          "source_temporal": 0.6,
          "source_user": 0.6,
          "temporal_iat": 0.6 * (1 + tgain / 100),
          "user_iat": 0.6 * (1 + gain / 100),
          "source_stream": 0.6,
          "stream_iat": 0.6 * (1 + gain / 100)
      }
      fake_run(workdir, points[0], seed, aucs)
      if seed < 2:
        fake_run(workdir, points[1], seed, aucs)
    rows = report.report(workdir, points, seeds=3)
    text = tables.write_report(workdir, "table1", "tiny.py", 3, rows, table_rows)
    _, head, body = table_lines(workdir)
    self.assertEqual(head[:5], [
        "model", "AUC click", "logloss click", "ΔAUC click vs base (%)", "Δ click ≠ 0"
    ])
    self.assertEqual(head[-3:], ["params", "FLOPs/batch", "seeds"])
    self.assertLen(head, 1 + 4 * len(TASKS) + 3)
    cells = {r[0]: dict(zip(head, r)) for r in body}
    self.assertLen(cells, 2 * len(stages.PIPELINE))
    half = 4.30265 / math.sqrt(3)  # sd 1 over 3 seeds
    self.assertEqual(cells["din / user_iat"]["ΔAUC click vs base (%)"],
                     f"+3.000 ± {half:.3f}")
    self.assertEqual(cells["din / user_iat"]["Δ click ≠ 0"], "yes")
    self.assertEqual(cells["din / temporal_iat"]["Δ conversion ≠ 0"], "no")
    self.assertEqual(cells["din / base"]["ΔAUC click vs base (%)"], "—")
    self.assertEqual(cells["din / base"]["AUC click"], "0.60000 ± 0.00000")
    self.assertEqual(cells["din / base"]["params"], "1,000")
    self.assertEqual(cells["din / base"]["seeds"], "3")
    self.assertEqual(cells["transformer / base"]["seeds"], "2")
    self.assertIn("Missing runs (left out): transformer / ", text)
    self.assertIn("![", text)
    img = image.imread(os.path.join(workdir, "table1_auc_change.png"))
    self.assertGreater(img.std(), 0)

  def test_table4_with_one_seed_has_no_verdict(self):
    workdir = tempfile.mkdtemp()
    points, table_rows = tables.plan("table4", ablations=["insemb_after_sit"])
    fake_run(workdir, points[0], 0, {"base": 0.6, "user_iat": 0.62})
    fake_run(workdir, points[1], 0, {"base": 0.6, "user_iat": 0.6138})
    rows = report.report(workdir, points, seeds=1)
    tables.write_report(workdir, "table4", "tiny.py", 1, rows, table_rows)
    _, head, body = table_lines(workdir)
    cells = {r[0]: dict(zip(head, r)) for r in body}
    self.assertEqual(cells["InsEmb stored after SIT"]["ΔAUC click vs full (%)"],
                     "-1.000 ± n/a")
    self.assertEqual(cells["InsEmb stored after SIT"]["Δ click ≠ 0"], "n/a")
    self.assertEqual(cells["full user-order IAT"]["ΔAUC click vs full (%)"], "—")
    self.assertTrue(
        cells["base (no IAT)"]["ΔAUC click vs full (%)"].startswith("-3.226"))


@pytest.mark.slow
class TablesRunTest(absltest.TestCase):
  """One test: xdist could split a class's tests and run the pipelines twice."""

  def test_table1_then_table4_in_one_workdir(self):
    workdir = tempfile.mkdtemp()
    # One encoder (the one Table 4 reuses): each run is a whole pipeline.
    t1 = ("--table=table1", "--encoders=transformer", "--seeds=2")
    lines = run_tables(workdir, *t1, "--emit=commands").stdout.strip().splitlines()
    self.assertLen(lines, 2)
    argv = shlex.split(lines[1])
    self.assertEqual(argv[1:3], ["-m", "iat_jax.main"])
    self.assertIn("--config.model.seq.encoder=transformer", argv)
    self.assertEqual(argv[-1], "--config.seed=1")
    self.assertFalse(os.path.exists(os.path.join(workdir, "report.md")))

    first = run_tables(workdir, *t1)
    self.assertIn("2 runs, 0 complete, 2 to run", first.stderr)
    text, head, body = table_lines(workdir)
    self.assertIn("| transformer / user_iat |", first.stdout)
    self.assertEqual([r[0] for r in body],
                     [f"transformer / {m}" for m in tables.MODELS])
    self.assertLen(head, 1 + 4 * len(TASKS) + 3)
    for r in body:
      self.assertLen(r, len(head))
      self.assertEqual(r[-1], "2")
      self.assertNotIn("nan", " ".join(r))
    self.assertIn("(table1_auc_change.png)", text)
    img = image.imread(os.path.join(workdir, "table1_auc_change.png"))
    self.assertGreater(img.shape[1], 300)
    self.assertGreater(img.std(), 0)
    self.assertTrue(os.path.exists(os.path.join(workdir, "results.csv")))

    # Table 4 reuses table1's transformer runs as its full model.
    second = run_tables(workdir, "--table=table4", "--ablations=iat_query", "--seeds=2")
    self.assertIn("4 runs, 2 complete, 2 to run", second.stderr)
    # The ablation trained only user_iat, on the full run's source_user.
    ablation = report.run_dir(workdir, {**tables.FULL, "model.iat_query": "id"}, 1)
    with open(os.path.join(ablation, "results.json")) as f:
      res = json.load(f)
    self.assertEqual(set(res["models"]), {"source_user", "user_iat"})
    self.assertEqual(res["sources_from"], report.run_dir(workdir, tables.FULL, 1))
    self.assertFalse(os.path.exists(os.path.join(ablation, "stores")))
    _, head, body = table_lines(workdir)
    self.assertEqual([r[0] for r in body],
                     ["base (no IAT)", "full user-order IAT", "ID-based query"])
    self.assertIn("ΔAUC conversion vs full (%)", head)
    self.assertRegex(body[2][head.index("Δ click ≠ 0")], "^(yes|no)$")
    self.assertGreater(
        image.imread(os.path.join(workdir, "table4_auc_change.png")).std(), 0)


if __name__ == "__main__":
  absltest.main()
