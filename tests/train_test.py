"""End-to-end tests of the CLI (`python -m iat_jax.main`) on the tiny config.

The reference run is the base model of the session's shared tiny pipeline
(`cli.shared_pipeline`): `--mode=train` of the base stage must reproduce its
metric lines exactly, after a SIGKILL or a SIGTERM (preemption) mid-run.
"""

import json
import os
import signal
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import pytest

from iat_jax import stages
from iat_jax import validation
from iat_jax import workdir as workdir_lib
from iat_jax.store import tables
from tests import cli_fixtures as cli
from tests import model_fixtures as mf

MODELS = set(stages.PIPELINE)


@pytest.mark.slow
class TrainCliTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.reference = cli.shared_pipeline()

  def test_train_writes_metrics_and_results(self):
    rows = cli.metric_lines(self.reference)
    splits = {r["split"] for r in rows}
    self.assertEqual(splits, {"train", "valid", "final_valid", "test"})
    res = workdir_lib.load_results(os.path.join(self.reference, "base"))
    for split in ("valid", "test"):
      self.assertBetween(res[split]["auc/click"], 0.0, 1.0)
      self.assertGreater(res[split]["logloss/click"], 0.0)
    self.assertGreater(res["params"], 0)
    self.assertGreater(res["flops_per_batch"], 0)
    self.assertNotEmpty(os.listdir(os.path.join(self.reference, "base", "tb")))

  def test_evaluate_mode_matches_training_results(self):
    workdir = cli.copy_of(self.reference)
    out = cli.run_main(workdir, "evaluate").stdout
    got = json.loads(out[out.index("{"):])
    want = workdir_lib.load_results(os.path.join(workdir, "base"))
    self.assertEqual(got["test"], want["test"])

  def test_resume_after_sigkill_is_identical(self):
    workdir = tempfile.mkdtemp()
    proc = cli.start_main(workdir)
    cli.wait_for_step(workdir, 6, proc, checkpoint=4)  # past the step-4 checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    self.assertFalse(workdir_lib.is_complete(os.path.join(workdir, "base")))
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
    proc = cli.run_main(workdir,
                        "train",
                        "--config.optimizer.learning_rate=1e38",
                        "--config.optimizer.grad_clip_norm=0",
                        "--config.optimizer.warmup_steps=0",
                        check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertRegex(proc.stderr, r"non-finite loss \S+ at step \d+")
    self.assertFalse(workdir_lib.is_complete(os.path.join(workdir, "base")))

  def test_bad_flag_is_named_before_any_work(self):
    workdir = tempfile.mkdtemp()
    proc = cli.run_main(workdir, "train", "--config.model.seq.encoder=rnn", check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("--config.model.seq.encoder", proc.stderr)
    self.assertEqual(os.listdir(workdir), [])  # validated before the dataset


class ValidateTest(parameterized.TestCase):
  """validation.validate (what main runs first) names the offending flag."""

  def test_tiny_config_is_valid(self):
    validation.validate(mf.tiny_config())

  @parameterized.parameters(
      ("stage", "nope", "--config.stage"),
      ("model.seq.encoder", "rnn", "--config.model.seq.encoder"),
      ("model.iat.encoder", "none", "--config.model.iat.encoder"),
      ("batch_size", 0, "--config.batch_size"),
      ("data.user_chunk_len", 0, "--config.data.user_chunk_len"),
      ("stream.k", 0, "--config.stream.k"),
      ("stream.mode", "guess", "--config.stream.mode"),
      ("data.source", "movielens", "--config.data.dir"),
      ("pipeline.models", ("nope",), "--config.pipeline.models"),
      ("mesh_shape", (-1, -1), "--config.mesh_shape"),
      ("mesh_shape", (-1,), "--config.mesh_shape"),
      ("logical_axis_rules", (("batch", "pod"),), "--config.logical_axis_rules"),
      ("model.mixer_token_dim", 7, "--config.model.mixer_token_dim"),
      ("store.block_rows", 48, "--config.store.block_rows"),
      ("store.block_rows", 1, "--config.store.block_rows"),
      ("store.shard_bits", 0, "--config.store.shard_bits"),
      ("store.shard_bits", 17, "--config.store.shard_bits"),
      ("store.cache_bytes", 0, "--config.store.cache_bytes"),
  )
  def test_bad_value_names_the_flag(self, flag, value, needle):
    config = mf.tiny_config()
    *blocks, key = flag.split(".")
    parent = config
    for block in blocks:
      parent = parent[block]
    parent[key] = value
    with self.assertRaisesRegex(ValueError, needle):
      validation.validate(config)


@pytest.mark.slow
class PipelineTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = cli.shared_pipeline()
    cls.results = workdir_lib.load_results(cls.workdir)

  def test_results_schema_and_stores(self):
    res = self.results
    self.assertEqual(res["dataset"], "synthetic")
    self.assertEqual(set(res["models"]), MODELS)
    for r in res["models"].values():
      for split in ("valid", "test"):
        self.assertEqual(
            set(r[split]),
            {"auc/click", "auc/conversion", "logloss/click", "logloss/conversion"})
      self.assertGreater(r["flops_per_batch"], 0)
    for stage in ("temporal_iat", "user_iat"):  # every history InsID was exported
      train = [
          r for r in cli.metric_lines(self.workdir, stage) if r["split"] == "train"
      ]
      self.assertNotEmpty(train)
      self.assertTrue(all(r["hist_missing"] == 0 for r in train))
    for store in ("source_temporal", "source_user"):  # published OCDBT tables
      self.assertTrue(
          tables.is_published(mf.tiny_config(),
                              os.path.join(self.workdir, "stores", store), store,
                              res["models"][store]["best_step"]))

  def test_second_run_trains_nothing(self):
    workdir = cli.copy_of(self.workdir)
    out = cli.run_main(workdir, "pipeline")
    self.assertEqual(out.stderr.count("already complete"), len(MODELS),
                     out.stderr[-3000:])
    self.assertEqual(workdir_lib.load_results(workdir), self.results)

  def test_sources_from_another_workdir(self):
    # user_iat alone, reading source_user and its store from that workdir:
    # nothing else is trained or exported, and it matches the full pipeline's.
    reuse = tempfile.mkdtemp()
    cli.run_main(reuse, "pipeline", "--config.pipeline.models=('user_iat',)",
                 f"--config.pipeline.sources_from={self.workdir}")
    again = workdir_lib.load_results(reuse)
    self.assertEqual(again["sources_from"], self.workdir)
    self.assertEqual(set(again["models"]), {"source_user", "user_iat"})
    self.assertEqual(again["models"]["source_user"],
                     self.results["models"]["source_user"])
    for name, value in self.results["models"]["user_iat"]["test"].items():
      self.assertAlmostEqual(again["models"]["user_iat"]["test"][name],
                             value,
                             places=5,
                             msg=name)
    self.assertEqual(set(os.listdir(reuse)) & {"stores", "source_user", "base"}, set())
    # A workdir without the source model is refused, naming the flag.
    proc = cli.run_main(tempfile.mkdtemp(),
                        "pipeline",
                        "--config.pipeline.models=('temporal_iat',)",
                        f"--config.pipeline.sources_from={reuse}",
                        check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("--config.pipeline.sources_from", proc.stderr)


if __name__ == "__main__":
  absltest.main()
