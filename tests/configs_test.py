"""Tests of the config defaults (`iat_jax.configs`, experiments/configs/) and of
their one check (`iat_jax.validation.validate`)."""

import glob
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import pytest

from iat_jax import configs
from iat_jax import errors
from iat_jax import stages
from iat_jax import validation
from iat_jax.continuous import loop
from iat_jax.data import synthetic
from tests import cli_fixtures as cli
from tests import model_fixtures as mf

CONFIG_FILES = sorted(
    glob.glob(os.path.join(cli.REPO, "experiments", "configs", "*.py")))
HEAVY = ("jax", "flax", "optax", "orbax", "grain", "tensorstore", "matplotlib")
# Evaluates every config file (each variant and sweep) and the sweep
# controller's points, then prints the heavy modules that got imported.
_LIGHT_SCRIPT = """
import importlib.util, json, sys
from iat_jax import configs, sweep
from iat_jax.sweeps import runner
for path in sys.argv[1:]:
  spec = importlib.util.spec_from_file_location("config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  for variant in (None, *getattr(module, "VARIANTS", ())):
    module.get_config(variant)
  for name in getattr(module, "SWEEPS", ()):
    runner.get_points(path, name)
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in %r)))
""" % (HEAVY,)


def _load(path):
  spec = importlib.util.spec_from_file_location("config_file", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _set(config, flag, value):
  *blocks, key = flag.split(".")
  for block in blocks:
    config = config[block]
  config[key] = value


class LightTest(absltest.TestCase):

  @pytest.mark.slow
  def test_config_files_import_no_heavy_module(self):
    proc = subprocess.run([sys.executable, "-c", _LIGHT_SCRIPT, *CONFIG_FILES],
                          cwd=cli.REPO,
                          capture_output=True,
                          text=True,
                          timeout=300,
                          check=True)
    self.assertEqual(json.loads(proc.stdout.splitlines()[-1]), [])

  def test_pipeline_models_are_the_pipelines(self):
    self.assertEqual(configs.base_config().pipeline.models, tuple(stages.PIPELINE))

  def test_continuous_models_are_the_continuous_table(self):
    self.assertCountEqual(configs.base_config().continuous.models, loop.MODELS)

  def test_synthetic_block_is_the_generators_defaults(self):
    block = configs.base_config().data.synthetic
    self.assertCountEqual(block, synthetic.RUN_KNOBS)
    for knob, value in block.items():
      self.assertEqual(value, getattr(synthetic.Config(), knob), knob)


class ValidateTest(parameterized.TestCase):

  @parameterized.parameters(
      ("continuous.models", ("user_iat",), "add source_user"),
      ("continuous.models", ("base", "stream_iat"), "stream_iat"),
      ("continuous.warmup_epochs", 0, "must be >= 1"),
      ("continuous.sync_lag", "2 days", "not a duration"),
      ("data.period", "rows:-3", "neither <n><unit>.*nor rows:<n>"),
      ("store.retention_periods", -1, "must be >= 0"),
  )
  def test_bad_continuous_knob_names_the_flag(self, flag, value, message):
    config = configs.base_config()
    _set(config, flag, value)
    with self.assertRaisesRegex(errors.ConfigError, f"--config.{flag}.*{message}"):
      validation.validate(config)

  def test_synthetic_config_files_are_valid(self):
    for path in CONFIG_FILES:
      module = _load(path)
      for variant in (None, *getattr(module, "VARIANTS", ())):
        config = module.get_config(variant)
        if config.data.source == "synthetic":
          validation.validate(config)

  def test_file_sources_need_a_data_dir(self):
    for name in ("movielens", "kuairand"):
      config = _load(os.path.join(cli.REPO, "experiments", "configs",
                                  f"{name}.py")).get_config()
      with self.assertRaisesWithLiteralMatch(
          errors.ConfigError, f"--config.data.dir: required for data.source={name}"):
        validation.validate(config)
      config.data.dir = tempfile.mkdtemp()  # a directory without the files
      with self.assertRaisesRegex(
          errors.ConfigError,
          f"^--config.data.dir: no .* in {re.escape(config.data.dir)}"):
        validation.validate(config)

  @parameterized.parameters(
      ("data.synthetic.num_users", 0, "must be > 0, got 0"),
      ("data.synthetic.num_instances", -5, "must be > 0, got -5"),
      ("data.synthetic.num_tasks", 0, "must be > 0, got 0"),
      ("data.synthetic.num_categorical", 1,
       "must be >= 2 (item_id and category), got 1"),
      ("data.synthetic.num_dense", -1, "must be >= 0, got -1"),
      ("data.synthetic.conversion_delay", -1,
       "seconds until a conversion label is known; must be >= 0, got -1"),
      ("data.seq_len", 0, "must be > 0, got 0"),
      ("seed", -1, "must be >= 0, got -1"),
  )
  def test_bad_synthetic_knob_names_the_flag(self, flag, value, message):
    config = mf.tiny_config()
    _set(config, flag, value)
    with self.assertRaisesWithLiteralMatch(errors.ConfigError,
                                           f"--config.{flag}: {message}"):
      validation.validate(config)

  def test_unknown_source_names_the_flag(self):
    config = mf.tiny_config()
    config.data.source = "nope"
    with self.assertRaisesRegex(errors.ConfigError, "^--config.data.source: 'nope'"):
      validation.validate(config)

  def test_errors_are_value_errors(self):
    config = mf.tiny_config()
    config.data.synthetic.num_users = 0
    with self.assertRaises(ValueError):  # what callers catching ValueError see
      validation.validate(config)

  @parameterized.parameters((-1, 4, True), (3, 4, True), (4, 4, False), (-2, 4, False))
  def test_eval_context(self, eval_context, chunk_len, ok):
    config = mf.tiny_config()
    config.data.eval_context, config.data.user_chunk_len = eval_context, chunk_len
    if ok:
      validation.validate(config)
    else:
      with self.assertRaisesRegex(errors.ConfigError, "^--config.data.eval_context"):
        validation.validate(config)

  def test_length_limit(self):
    config = mf.tiny_config()
    config.model.hist_len = configs.MAX_LEN + 1
    with self.assertRaisesRegex(errors.ConfigError,
                                "^--config.model.hist_len: .* above the limit"):
      validation.validate(config)

  @parameterized.parameters(
      ((-1, 1), 8, None), ((2, 4), 8, None), ((2, 2), 8, "needs 4 devices"),
      ((-1, 3), 8, "a multiple of 3"), ((0, 1), 8, "sizes must be > 0"))
  def test_validate_devices(self, shape, devices, error):
    config = mf.tiny_config()
    config.mesh_shape = shape
    if error is None:
      validation.validate_devices(config, devices)
    else:
      with self.assertRaisesRegex(errors.ConfigError,
                                  f"^--config.mesh_shape: .*{error}"):
        validation.validate_devices(config, devices)


class MainTest(absltest.TestCase):

  @pytest.mark.slow
  def test_bad_synthetic_knob_is_one_line_before_any_data(self):
    workdir, cache = tempfile.mkdtemp(), tempfile.mkdtemp()
    proc = cli.run_main(workdir,
                        "train",
                        f"--config.data.cache_dir={cache}",
                        "--config.data.synthetic.num_users=0",
                        check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertEqual(proc.stderr.strip().splitlines()[-1],
                     "error: --config.data.synthetic.num_users: must be > 0, got 0")
    self.assertNotIn("Traceback", proc.stderr)
    self.assertEqual(os.listdir(workdir), [])  # validated before any work
    self.assertEqual(os.listdir(cache), [])  # and before any data


if __name__ == "__main__":
  absltest.main()
