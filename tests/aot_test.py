"""Ahead-of-time compilation for a TPU slice (`iat_jax.aot`), with libtpu's
compile-only devices: no TPU is needed, the `tpu` extra is (skipped without it).
"""

import importlib.util
import json
import os
import sys
import tempfile

from absl.testing import absltest
import pytest
import jax
import jax.numpy as jnp
import numpy as np

from iat_jax import errors
from iat_jax import stages
from iat_jax.aot import compile as aot
from iat_jax.aot import hlo
from iat_jax.aot import targets
from iat_jax.data import sources
from iat_jax.train import steps
from iat_jax.train import train_lib
from tests import cli_fixtures
from tests import model_fixtures as mf

_HAVE_TPU = importlib.util.find_spec("libtpu") is not None
_TARGET = "tpu:v5e:2x2"


def _config():
  config = mf.tiny_config(vocab_pad_multiple=256)  # halves of whole 128-row tiles
  config.mesh_shape = (2, 2)
  config.compile.target = _TARGET
  config.data.cache_dir = cli_fixtures.DATA
  return config


class TargetsTest(absltest.TestCase):

  def test_parse(self):
    t = targets.parse("tpu:v5e:16x16")
    self.assertEqual((t.chip.name, t.shape, t.num_devices), ("v5e", (16, 16), 256))
    self.assertEqual(targets.parse("gpu:h100:2x8").num_devices, 16)
    for bad in ("v5e:16x16", "tpu:v9:2x2", "gpu:v5e:8", "tpu:v5e:0x2",
                "gpu:h100:1x2x8"):
      with self.assertRaisesRegex(errors.ConfigError, "--config.compile.target"):
        targets.parse(bad)

  def test_gpu_spec_carries_the_chip(self):
    spec = targets.gpu_spec(targets.CHIPS["h100"])
    self.assertIn("core_count: 132", spec)
    self.assertIn(f"device_memory_size: {targets.CHIPS['h100'].memory_bytes}", spec)


class HloTest(absltest.TestCase):

  def test_collectives_and_dot_dtypes(self):
    # Two CPU devices: a contraction over a sharded dim all-reduces.
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("x",))
    sh = jax.sharding.NamedSharding
    p = jax.sharding.PartitionSpec
    f = jax.jit(lambda a, b: a @ b,
                in_shardings=(sh(mesh, p(None, "x")), sh(mesh, p("x", None))),
                out_shardings=sh(mesh, p()))
    args = (jax.ShapeDtypeStruct(
        (16, 32), jnp.bfloat16), jax.ShapeDtypeStruct((32, 8), jnp.bfloat16))
    lowered = f.lower(*args)
    coll = hlo.collectives(lowered.compile().as_text())
    self.assertGreaterEqual(coll["all-reduce"]["count"], 1)
    self.assertGreater(coll["all-reduce"]["bytes"], 0)
    self.assertEqual(coll["all-to-all"]["count"], 0)
    self.assertEqual(hlo.dots(lowered.as_text()), {"bf16": 2.0 * 16 * 8 * 32})


@absltest.skipUnless(_HAVE_TPU, "needs the `tpu` extra (libtpu)")
class CompileTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.workdir = tempfile.mkdtemp()
    cls.config = _config()
    cls.result = aot.run(cls.config, cls.workdir)
    cls.devices = targets.parse(_TARGET).devices()
    cls.schema = sources.schema(cls.config, cls.workdir)

  def test_every_stage_compiles_and_the_report_is_written(self):
    got = {(r["stage"], r["step"]) for r in self.result["steps"]}
    want = {(s, step) for s in aot.stage_configs(self.config) for step in aot.STEPS}
    self.assertEqual(got, want)
    self.assertEqual(len(want),
                     2 * len({m.stage.name for m in stages.PIPELINE.values()}))
    with open(aot.report_path(self.workdir, _TARGET)) as f:
      self.assertEqual(
          json.load(f)["steps"], json.loads(json.dumps(self.result["steps"])))
    self.assertEqual(self.result["mesh"], {"data": 2, "model": 2})
    for r in self.result["steps"]:
      self.assertTrue(r["fits"])
      self.assertGreater(r["flops_per_chip"], 0)
      self.assertGreater(r["roofline_step_s"], 0)
      self.assertLessEqual(r["mfu_bound"], 1.0)
      # Gradients and the loss are summed over the data axis.
      if r["step"] == "train":
        self.assertGreater(r["collectives"]["all-reduce"]["count"], 0)

  def test_a_table_over_a_model_axis_of_two_holds_half_its_rows_per_chip(self):
    mesh = jax.sharding.Mesh(np.array(self.devices).reshape(2, 2), ("data", "model"))
    replicated = _config()
    replicated.logical_axis_rules = tuple(
        (k, None if k == "vocab" else v) for k, v in replicated.logical_axis_rules)
    out = {}
    for name, config in (("sharded", self.config), ("replicated", replicated)):
      lowered, _ = aot.lower(config, self.schema, stages.get("base"), "eval", mesh)
      compiled = lowered.compile()
      tables = [
          a for a in aot.arguments(compiled) if a["path"].endswith("['embedding']")
      ]
      self.assertLen(tables, 1)
      out[name] = (compiled.memory_analysis().argument_size_in_bytes, tables[0])
    (sharded_args, sharded), (replicated_args,
                              whole) = out["sharded"], out["replicated"]
    self.assertEqual(sharded["spec"], "P('model', None)")
    self.assertEqual(whole["spec"], "P(None, None)")
    self.assertEqual(2 * sharded["chip_bytes"], whole["chip_bytes"])
    # XLA's own per-chip argument bytes differ by exactly the table's half.
    self.assertEqual(replicated_args - sharded_args,
                     whole["chip_bytes"] - sharded["chip_bytes"])

  def test_the_compiled_step_is_the_training_step(self):
    # The train step training builds (train_lib.Run, on data) and the one
    # compile mode lowers (abstract state and batch) are the same program.
    config = mf.tiny_config()
    config.data.cache_dir = cli_fixtures.DATA
    ds = sources.prepare(config, self.workdir)
    st = train_lib.Run(stages.get("base"), config, self.workdir, "base", ds)
    batch = st.train_data[0]
    trained = st.train_step.trace(st.state, steps.to_device(batch, st.mesh)).lower()
    lowered, _ = aot.lower(config, ds.schema, stages.get("base"), "train", st.mesh,
                           st.num_steps)
    self.assertEqual(lowered.as_text(), trained.as_text())
    st.close()
    # For the TPU target: the same outputs, shapes and dtypes.
    mesh = jax.sharding.Mesh(np.array(self.devices).reshape(2, 2), ("data", "model"))
    target, _ = aot.lower(config, ds.schema, stages.get("base"), "train", mesh)
    shapes = lambda tree: [(a.shape, a.dtype) for a in jax.tree.leaves(tree)]
    self.assertEqual(shapes(target.out_info), shapes(trained.out_info))

  def test_schema_without_data_is_the_built_datasets(self):
    config = mf.tiny_config()
    config.data.cache_dir = cli_fixtures.DATA
    built = sources.prepare(config, self.workdir).schema
    guessed = sources.schema(config, self.workdir)
    keep = lambda s: {
        k: v
        for k, v in s.to_json().items()
        if k not in ("num_rows", "num_users", "split_sizes", "split_boundaries")
    }
    self.assertEqual(keep(guessed), keep(built))


@absltest.skipUnless(_HAVE_TPU, "needs the `tpu` extra (libtpu)")
class FitTest(absltest.TestCase):

  @pytest.mark.slow  # runs iat_jax.main
  def test_a_config_past_a_chips_memory_fails_naming_the_stage_and_writes_nothing(self):
    workdir = os.path.join(tempfile.mkdtemp(), "w")
    proc = cli_fixtures.run([
        sys.executable, "-m", "iat_jax.main", *cli_fixtures.main_args(
            workdir, "compile", f"--config.compile.target={_TARGET}",
            "--config.model.embed_dim=131072", "--config.pipeline.models=('base',)")
    ],
                            check=False)
    self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
    last = proc.stderr.strip().splitlines()[-1]
    self.assertRegex(
        last, r"^error: --config.compile.target: tpu:v5e:2x2: the train step "
        r"of stage base does not fit: .*HBM.*--config.batch_size")
    self.assertFalse(os.path.exists(workdir))


if __name__ == "__main__":
  absltest.main()
