"""Dry runs of the launchers print the commands they would run."""

import importlib.util
import os
import shlex
import subprocess
import sys
import tempfile

from absl.testing import absltest
import pytest

from iat_jax import allocator
from iat_jax import launch_lib
from tests import cli_fixtures as cli

pytestmark = pytest.mark.slow  # subprocess / end-to-end runs

LAUNCH = os.path.join(cli.REPO, "launch")
MAIN_ARGS = [
    "--config=experiments/configs/tiny.py", "--workdir=/shared/iat", "--mode=train"
]


def run(cmd, env=None, check=True):
  proc = subprocess.run(cmd,
                        cwd=cli.REPO,
                        env={
                            **cli.ENV,
                            **(env or {})
                        },
                        capture_output=True,
                        text=True,
                        timeout=120)
  if check and proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\n{proc.stderr[-3000:]}")
  return proc


def lines(proc):
  return [shlex.split(line) for line in proc.stdout.strip().splitlines()]


class TpuPodTest(absltest.TestCase):

  ENV = {
      "DRY_RUN": "1",
      "PROJECT": "my-proj",
      "ZONE": "us-central2-b",
      "TPU_NAME": "iat-v4",
      "BUCKET": "gs://my-bucket/runs",
      "RUN_NAME": "demo",
      "COMPILE_TARGET": "tpu:v4:2x2x2",
      "CHECK_DIR": "/tmp/check"
  }

  def ssh_prefix(self):
    return [
        "gcloud", "compute", "tpus", "tpu-vm", "ssh", "iat-v4", "--zone=us-central2-b",
        "--project=my-proj", "--worker=all"
    ]

  def test_runs_main_on_every_worker(self):
    proc = run([
        "bash", "launch/tpu_pod.sh", "--", "--config.num_epochs=2",
        "--config.model.mlp_dims=(16, 8)"
    ], self.ENV)
    check, cmd = lines(proc)
    # Compiled for the slice here first, with the run's own flags.
    self.assertEqual(check, [
        "python3", "-m", "iat_jax.main", "--config=experiments/configs/demo.py",
        "--workdir=/tmp/check", "--mode=compile",
        "--config.compile.target=tpu:v4:2x2x2", "--config.num_epochs=2",
        "--config.model.mlp_dims=(16, 8)"
    ])
    self.assertEqual(cmd[:-1], self.ssh_prefix())
    self.assertTrue(cmd[-1].startswith("--command="))
    remote = cmd[-1][len("--command="):]
    self.assertIn("gcsfuse --implicit-dirs my-bucket /tmp/iat-bucket", remote)
    (exports,) = [c for c in remote.split(";") if c.strip().startswith("export ")]
    for k, v in allocator.SETTINGS.items():  # before main, on every worker
      self.assertIn(f"{k}={v}", shlex.split(exports))
    main = shlex.split(remote.split(";")[-1])
    self.assertEqual(main, [
        "python3", "-m", "iat_jax.main", "--config=experiments/configs/demo.py",
        "--workdir=/tmp/iat-bucket/runs/demo", "--mode=pipeline",
        "--config.distributed=True", "--config.num_epochs=2",
        "--config.model.mlp_dims=(16, 8)"
    ])

  def test_create_and_setup_then_run(self):
    env = {
        **self.ENV, "DRY_RUN": "0",
        "ACCELERATOR": "v5litepod-16",
        "RUNTIME_VERSION": "v2-alpha-tpuv5-lite",
        "REPO_URL": "https://x/iat.git"
    }
    proc = run(["bash", "launch/tpu_pod.sh", "--dry_run", "--create", "--setup"], env)
    check, create, setup, main = lines(proc)
    self.assertIn("--mode=compile", check)
    self.assertEqual(create, [
        "gcloud", "compute", "tpus", "tpu-vm", "create", "iat-v4",
        "--zone=us-central2-b", "--project=my-proj", "--accelerator-type=v5litepod-16",
        "--version=v2-alpha-tpuv5-lite"
    ])
    self.assertEqual(setup[:-1], self.ssh_prefix())
    self.assertIn("git clone https://x/iat.git iat-jax", setup[-1])
    self.assertIn("--config.distributed=True", main[-1])

  def test_the_check_needs_its_target_or_is_skipped(self):
    env = {k: v for k, v in self.ENV.items() if k != "COMPILE_TARGET"}
    proc = run(["bash", "launch/tpu_pod.sh"], env, check=False)
    self.assertEqual(proc.returncode, 2)
    self.assertIn("set COMPILE_TARGET", proc.stderr)
    proc = run(["bash", "launch/tpu_pod.sh", "--skip_compile_check"], env)
    (cmd,) = lines(proc)
    self.assertEqual(cmd[:-1], self.ssh_prefix())

  @absltest.skipUnless(importlib.util.find_spec("libtpu"), "needs the `tpu` extra")
  def test_a_config_that_does_not_fit_stops_the_launch(self):
    # For real (no dry run): the check fails, so gcloud is never called.
    env = {
        **self.ENV, "DRY_RUN": "0",
        "COMPILE_TARGET": "tpu:v5e:2x2",
        "CONFIG": cli.TINY,
        "LOCAL_PYTHON": sys.executable,
        "CHECK_DIR": os.path.join(tempfile.mkdtemp(), "check"),
        "PATH": "/nonexistent-gcloud:" + os.environ["PATH"]
    }
    proc = run([
        "bash", "launch/tpu_pod.sh", "--", "--config.model.embed_dim=131072",
        "--config.pipeline.models=('base',)", f"--config.data.cache_dir={cli.DATA}"
    ],
               env,
               check=False)
    self.assertEqual(proc.returncode, 1, proc.stderr[-2000:])
    self.assertIn("does not fit", proc.stderr)
    self.assertNotIn("gcloud", proc.stderr + proc.stdout)
    self.assertFalse(os.path.exists(env["CHECK_DIR"]))

  def test_missing_variable_is_named(self):
    env = {k: v for k, v in self.ENV.items() if k != "ZONE"}
    proc = run(["bash", "launch/tpu_pod.sh"], env, check=False)
    self.assertEqual(proc.returncode, 2)
    self.assertIn("set ZONE", proc.stderr)
    self.assertEqual(proc.stdout, "")


class SlurmTest(absltest.TestCase):

  def test_srun_command(self):
    env = {
        "DRY_RUN": "1",
        "CONFIG": "experiments/configs/tiny.py",
        "WORKDIR": "/shared/iat",
        "GPUS_PER_NODE": "4",
        "COMPILE_TARGET": "gpu:h100:2x4"
    }
    proc = run(["bash", "launch/slurm.sbatch", "--config.num_epochs=2"], env)
    check, cmd = lines(proc)
    self.assertEqual(check, [
        "python", "-m", "iat_jax.main", "--config=experiments/configs/tiny.py",
        "--workdir=/shared/iat", "--mode=compile",
        "--config.compile.target=gpu:h100:2x4", "--config.num_epochs=2"
    ])
    self.assertEqual(cmd, [
        "srun", "--kill-on-bad-exit=1", "--ntasks-per-node=4", "python", "-m",
        "iat_jax.main", "--config=experiments/configs/tiny.py", "--workdir=/shared/iat",
        "--mode=pipeline", "--config.distributed=True", "--config.num_epochs=2"
    ])

  def test_the_check_needs_its_target_or_is_skipped(self):
    env = {"DRY_RUN": "1", "WORKDIR": "/shared/iat"}
    proc = run(["bash", "launch/slurm.sbatch"], env, check=False)
    self.assertEqual(proc.returncode, 2)
    self.assertIn("set COMPILE_TARGET", proc.stderr)
    (cmd,) = lines(
        run(["bash", "launch/slurm.sbatch"], {
            **env, "SKIP_COMPILE_CHECK": "1"
        }))
    self.assertEqual(cmd[0], "srun")

  def test_exports_the_allocator_settings(self):
    # As .ci/run does; iat_jax.main would otherwise re-exec every task.
    for script in ("launch/slurm.sbatch", ".ci/run"):
      with open(os.path.join(cli.REPO, script)) as f:
        text = f.read()
      for k, v in allocator.SETTINGS.items():
        self.assertIn(f'{k}="${{{k}:-{v}}}"', text, script)

  def test_sbatch_header(self):
    with open(os.path.join(LAUNCH, "slurm.sbatch")) as f:
      header = [l for l in f if l.startswith("#SBATCH")]
    for option in ("--partition=", "--nodes=", "--gpus-per-node=",
                   "--ntasks-per-node="):
      self.assertTrue(any(option in l for l in header), option)


class MultihostTest(absltest.TestCase):

  def test_dry_run_passes_the_distributed_flags(self):
    proc = run([
        sys.executable, "launch/multihost.py", "--coordinator_address=10.0.0.1:1234",
        "--num_processes=4", "--process_id=2", "--dry_run", "--", *MAIN_ARGS
    ])
    (cmd,) = lines(proc)
    self.assertEqual(cmd, [
        sys.executable, "-m", "iat_jax.main", *MAIN_ARGS, "--config.distributed=True",
        "--config.coordinator_address=10.0.0.1:1234", "--config.num_processes=4",
        "--config.process_id=2"
    ])

  def test_bad_process_id(self):
    proc = run([
        sys.executable, "launch/multihost.py", "--coordinator_address=h:1",
        "--num_processes=2", "--process_id=2", "--dry_run"
    ],
               check=False)
    self.assertNotEqual(proc.returncode, 0)
    self.assertIn("process_id=2 is not in [0, 2)", proc.stderr)

  def test_launch_lib_builds_local_py_commands(self):
    proc = run([
        sys.executable, "launch/local.py", "--num_processes=2", "--port=4321",
        "--dry_run", "--", *MAIN_ARGS
    ])
    self.assertEqual(lines(proc), launch_lib.local_commands(2, 4321, MAIN_ARGS))


if __name__ == "__main__":
  absltest.main()
