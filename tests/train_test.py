"""End-to-end tests of the CLI and train loop on the tiny config."""

import json
import os
import signal
import tempfile

from absl.testing import absltest

import cli_fixtures as cli
from iat_jax.store import tables


class TrainCliTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.reference = tempfile.mkdtemp()
    cli.run_main(cls.reference, "train")

  def test_train_writes_metrics_and_results(self):
    rows = cli.metric_lines(self.reference)
    splits = {r["split"] for r in rows}
    self.assertEqual(splits, {"train", "valid", "final_valid", "test"})
    with open(os.path.join(self.reference, "base", "results.json")) as f:
      res = json.load(f)
    for split in ("valid", "test"):
      self.assertBetween(res[split]["auc/click"], 0.0, 1.0)
      self.assertGreater(res[split]["logloss/click"], 0.0)
    self.assertGreater(res["params"], 0)
    self.assertGreater(res["flops_per_batch"], 0)
    self.assertNotEmpty(os.listdir(os.path.join(self.reference, "base", "tb")))

  def test_evaluate_mode_matches_training_results(self):
    out = cli.run_main(self.reference, "evaluate").stdout
    got = json.loads(out[out.index("{"):])
    with open(os.path.join(self.reference, "base", "results.json")) as f:
      want = json.load(f)
    self.assertEqual(got["test"], want["test"])

  def test_resume_after_sigkill_is_identical(self):
    workdir = tempfile.mkdtemp()
    proc = cli.start_main(workdir)
    cli.wait_for_step(workdir, 6, proc, checkpoint=4)  # past the step-4 checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    self.assertFalse(os.path.exists(os.path.join(workdir, "base", "results.json")))
    cli.run_main(workdir, "train")
    self.assertEqual(cli.metric_lines(workdir), cli.metric_lines(self.reference))

  def test_sigterm_checkpoints_then_resumes_identically(self):
    workdir = tempfile.mkdtemp()
    proc = cli.start_main(workdir)
    cli.wait_for_step(workdir, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("preempted at step", err)
    last = max(r["step"] for r in cli.metric_lines(workdir) if r["split"] == "train")
    steps = os.listdir(os.path.join(workdir, "base", "ckpt"))
    self.assertIn(str(last), steps)
    cli.run_main(workdir, "train")
    self.assertEqual(cli.metric_lines(workdir), cli.metric_lines(self.reference))

  def test_non_finite_loss_stops_with_step(self):
    workdir = tempfile.mkdtemp()
    proc = cli.run_main(workdir, "train", "--config.optimizer.learning_rate=1e38",
                    "--config.optimizer.grad_clip_norm=0", "--config.optimizer.warmup_steps=0",
                    check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertRegex(proc.stderr, r"non-finite loss \S+ at step \d+")
    self.assertFalse(os.path.exists(os.path.join(workdir, "base", "results.json")))

  def test_bad_flags_name_the_flag(self):
    for flag, needle in (("--config.stage=nope", "--config.stage"),
                         ("--config.model.seq.encoder=rnn", "--config.model.seq.encoder"),
                         ("--config.batch_size=0", "--config.batch_size"),
                         ("--config.data.source=movielens", "--config.data.dir"),
                         ("--config.pipeline.models=(nope,)",
                          "--config.pipeline.models")):
      proc = cli.run_main(tempfile.mkdtemp(), "train", flag, check=False)
      self.assertNotEqual(proc.returncode, 0, flag)
      self.assertIn(needle, proc.stderr, flag)


class PipelineTest(absltest.TestCase):

  def test_pipeline_results_schema_and_skip(self):
    workdir = tempfile.mkdtemp()
    cli.run_main(workdir, "pipeline")
    with open(os.path.join(workdir, "results.json")) as f:
      res = json.load(f)
    self.assertEqual(res["dataset"], "synthetic")
    self.assertEqual(set(res["models"]), {"base", "source_temporal", "source_user",
                                          "temporal_iat", "user_iat"})
    for r in res["models"].values():
      for split in ("valid", "test"):
        self.assertEqual(set(r[split]), {"auc/click", "auc/conversion",
                                         "logloss/click", "logloss/conversion"})
      self.assertGreater(r["flops_per_batch"], 0)
    for stage in ("temporal_iat", "user_iat"):  # every history InsID was exported
      train = [r for r in cli.metric_lines(workdir, stage) if r["split"] == "train"]
      self.assertNotEmpty(train)
      self.assertTrue(all(r["hist_missing"] == 0 for r in train))
    for store in ("source_temporal", "source_user"):  # published OCDBT tables
      self.assertTrue(tables.is_published(os.path.join(workdir, "stores", store),
                                          store, res["models"][store]["best_step"]))
    # A second run finds every step complete and trains nothing.
    out = cli.run_main(workdir, "pipeline")
    self.assertEqual(out.stderr.count("already complete"), 5, out.stderr[-3000:])

    # user_iat alone, reading source_user and its store from that workdir:
    # nothing else is trained or exported, and it matches the full pipeline's.
    reuse = tempfile.mkdtemp()
    cli.run_main(reuse, "pipeline", "--config.pipeline.models=('user_iat',)",
                 f"--config.pipeline.sources_from={workdir}")
    with open(os.path.join(reuse, "results.json")) as f:
      again = json.load(f)
    self.assertEqual(again["sources_from"], workdir)
    self.assertEqual(set(again["models"]), {"source_user", "user_iat"})
    self.assertEqual(again["models"]["source_user"], res["models"]["source_user"])
    for name, value in res["models"]["user_iat"]["test"].items():
      self.assertAlmostEqual(again["models"]["user_iat"]["test"][name], value,
                             places=5, msg=name)
    self.assertEqual(set(os.listdir(reuse)) & {"stores", "source_user", "base"},
                     set())
    proc = cli.run_main(tempfile.mkdtemp(), "pipeline",
                        "--config.pipeline.models=('temporal_iat',)",
                        f"--config.pipeline.sources_from={reuse}", check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("--config.pipeline.sources_from", proc.stderr)

  def test_downstream_refuses_a_mismatched_store(self):
    workdir = tempfile.mkdtemp()
    cli.run_main(workdir, "train", "--config.stage=source_temporal")
    cli.run_main(workdir, "export", "--config.stage=source_temporal")
    proc = cli.run_main(workdir, "train", "--config.stage=downstream",
                    "--config.store.source=source_temporal",
                    "--config.model.insemb_dim=6", check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("--config.model.insemb_dim", proc.stderr)


if __name__ == "__main__":
  absltest.main()
