"""What happens when things go wrong (issue 16): one writer per workdir, resume
past a damaged checkpoint, bounds on size flags, errors that end on the cause.

Process-level behaviour runs `iat_jax.main` in subprocesses on the tiny
config (`tests.cli_fixtures`); checkpoint corruption is also tested in-process
on a small state, one test per kind of damage.
"""

import errno
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

from absl.testing import absltest
import grain
import jax
import jax.numpy as jnp
import pytest

from iat_jax import checkpointing
from iat_jax import configs
from iat_jax import errors
from iat_jax import workdir as workdir_lib
from tests import cli_fixtures as cli


def last_line(text: str) -> str:
  lines = [l for l in text.splitlines() if l.strip()]
  return lines[-1] if lines else ""


def can_mount() -> bool:
  """Whether this process may mount a tmpfs (root in most containers)."""
  if os.geteuid() != 0 or not shutil.which("mount"):
    return False
  d = tempfile.mkdtemp()
  ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d],
                      capture_output=True).returncode == 0
  if ok:
    subprocess.run(["umount", d], check=True)
  return ok


@pytest.mark.slow
class _Reference(absltest.TestCase):
  """One uninterrupted tiny `train` run the tests compare against or copy."""

  reference = None

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if _Reference.reference is None:
      _Reference.reference = tempfile.mkdtemp()
      cli.run_main(_Reference.reference, "train")

  def copy_reference(self) -> str:
    workdir = os.path.join(tempfile.mkdtemp(), "w")
    shutil.copytree(self.reference, workdir)
    return workdir

  def assert_error_line(self, proc, *needles):
    """Exit status 1, the output ends with one `error:` line naming needles,
    and the main thread's exception printed no traceback (a traceback through
    iat_jax/main.py; a library's background thread logs its own frames)."""
    self.assertEqual(proc.returncode, 1, proc.stderr[-3000:])
    line = last_line(proc.stderr)
    self.assertTrue(line.startswith("error: "), proc.stderr[-3000:])
    self.assertLen(re.findall(r"^error: ", proc.stderr, re.M), 1, proc.stderr[-3000:])
    for needle in needles:
      self.assertIn(needle, line)
    self.assertNotIn(os.path.join("iat_jax", "main.py") + '", line', proc.stderr)
    return line


# 1. One writer per workdir ---------------------------------------------------


class WriterLockTest(_Reference):

  def test_second_writer_refused_until_holder_is_killed(self):
    workdir = tempfile.mkdtemp()
    holder = cli.start_main(workdir)
    try:
      cli.wait_for_step(workdir, 2, holder)
      holder.send_signal(signal.SIGSTOP)  # holds the lock, deterministically
      proc = cli.run_main(workdir, "train", check=False)
      line = self.assert_error_line(proc, workdir, f"pid {holder.pid}",
                                    socket.gethostname(), "started")
      self.assertIn("in use by another run", line)
    finally:
      holder.send_signal(signal.SIGKILL)
      holder.wait()
    # The kernel dropped the dead holder's lock: a fresh start resumes.
    cli.run_main(workdir, "train")
    self.assertEqual(cli.metric_lines(workdir), cli.metric_lines(self.reference))

  def test_refused_writer_touches_nothing_and_readers_are_allowed(self):
    workdir = self.copy_reference()
    os.remove(os.path.join(workdir, "base", "results.json"))
    shutil.rmtree(os.path.join(workdir, "base", "ckpt", "24"))

    def files():
      return {
          os.path.relpath(os.path.join(d, f), workdir)
          for d, _, fs in os.walk(workdir)
          for f in fs
      }

    before = files() | {workdir_lib.LOCK_NAME}
    metrics = open(os.path.join(workdir, "base", "metrics.jsonl")).read()
    with workdir_lib.WriterLock(workdir):  # this test process is the writer
      for mode in ("train", "export", "pipeline"):
        proc = cli.run_main(workdir,
                            mode,
                            "--config.stage=source_temporal",
                            check=False)
        self.assert_error_line(proc, workdir, f"pid {os.getpid()}")
        self.assertEqual(files(), before, mode)
        self.assertEqual(
            open(os.path.join(workdir, "base", "metrics.jsonl")).read(), metrics)
    # A reader (evaluate) of a finished stage is not refused.
    with workdir_lib.WriterLock(self.reference):
      out = cli.run_main(self.reference, "evaluate").stdout
    with open(os.path.join(self.reference, "base", "results.json")) as f:
      self.assertEqual(json.loads(out[out.index("{"):])["test"], json.load(f)["test"])

  def test_lock_is_exclusive_in_process_and_released(self):
    workdir = tempfile.mkdtemp()
    lock = workdir_lib.WriterLock(workdir).acquire()
    with self.assertRaisesRegex(errors.LockError, f"pid {os.getpid()}"):
      workdir_lib.WriterLock(workdir).acquire()  # flock is per open file
    lock.release()
    workdir_lib.WriterLock(workdir).acquire().release()


# 2. Damaged checkpoints --------------------------------------------------------


def _damage(directory: str, kind: str) -> None:
  """Damages a committed checkpoint step directory `directory` one way."""
  if kind == "truncated_array":
    files = glob.glob(f"{directory}/*/**/d/*", recursive=True)
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
      f.truncate(os.path.getsize(biggest) // 2)
  elif kind == "empty_iterator_state":
    open(f"{directory}/data_iter/process_0-of-1.json", "w").close()
  elif kind == "empty_manifest":
    for f in glob.glob(f"{directory}/*/**/manifest.ocdbt", recursive=True):
      open(f, "w").close()
  elif kind == "garbage_metadata":
    for f in glob.glob(f"{directory}/*/_METADATA"):
      with open(f, "w") as out:
        out.write("\x00garbage{")
  else:
    raise ValueError(kind)


class CheckpointFallbackTest(absltest.TestCase):
  """In-process: three periodic steps of a small state, the newest damaged."""

  def setUp(self):
    super().setUp()
    self.dir = tempfile.mkdtemp()
    self.state = {"w": jnp.arange(1000.0), "b": jnp.ones((3, 4))}
    ckpts = checkpointing.Checkpoints(self.dir, keep=3, best_metric="auc")
    it = self.iterator()
    for step in (1, 2, 3):
      next(it)
      ckpts.save(step, jax.tree.map(lambda x, s=step: x * s, self.state), it)
    ckpts.save_best(3, self.state, {"auc": 0.5})
    ckpts.close()

  def iterator(self):
    return iter(grain.MapDataset.range(100).to_iter_dataset())

  def restore(self, steps_to_damage, kind):
    for step in steps_to_damage:
      _damage(os.path.join(self.dir, "ckpt", str(step)), kind)
    ckpts = checkpointing.Checkpoints(self.dir, keep=3, best_metric="auc")
    it = self.iterator()
    try:
      with self.assertLogs(level="WARNING") as logs:
        state, step = ckpts.restore_latest(checkpointing.abstract(self.state), it)
    finally:
      ckpts.close()
    return state, step, next(it), "\n".join(logs.output)

  def check_fallback(self, kind):
    state, step, next_item, log = self.restore([3], kind)
    self.assertEqual(step, 2)
    self.assertEqual(float(state["w"][1]), 2.0)
    self.assertEqual(next_item, 2)  # the iterator is at step 2's position
    self.assertIn(os.path.join(self.dir, "ckpt", "3"), log)
    self.assertIn("does not restore", log)
    self.assertEqual(sorted(os.listdir(os.path.join(self.dir, "ckpt"))), ["1", "2"])
    self.assertLen(os.listdir(os.path.join(self.dir, "ckpt.damaged")), 1)
    # The damaged step's number is free again: the run redoes and saves it.
    ckpts = checkpointing.Checkpoints(self.dir, keep=3, best_metric="auc")
    ckpts.save(3, self.state, self.iterator())
    ckpts.close()
    self.assertIn("3", os.listdir(os.path.join(self.dir, "ckpt")))

  def test_truncated_array_file(self):
    self.check_fallback("truncated_array")

  def test_empty_iterator_state(self):
    self.check_fallback("empty_iterator_state")

  def test_empty_ocdbt_manifest(self):
    self.check_fallback("empty_manifest")

  def test_garbage_metadata(self):
    self.check_fallback("garbage_metadata")

  def test_none_restores_names_the_directory_and_moves_nothing(self):
    with self.assertRaisesRegex(
        errors.CheckpointError, rf"no checkpoint in {self.dir}/ckpt restores.*"
        rf"delete {self.dir} to train this stage afresh"):
      self.restore([1, 2, 3], "truncated_array")
    self.assertEqual(sorted(os.listdir(os.path.join(self.dir, "ckpt"))),
                     ["1", "2", "3"])

  def test_damaged_best_names_the_path_and_what_to_do(self):
    _damage(os.path.join(self.dir, "best", "3"), "truncated_array")
    ckpts = checkpointing.Checkpoints(self.dir, keep=3, best_metric="auc")
    try:
      with self.assertRaisesRegex(
          errors.CheckpointError, rf"best checkpoint {self.dir}/best/3 does not "
          rf"restore .*delete {self.dir} to retrain"):
        ckpts.restore_best(checkpointing.abstract(self.state))
    finally:
      ckpts.close()


class ResumeFallbackCliTest(_Reference):

  def test_damaged_latest_checkpoint_redoes_steps_to_identical_metrics(self):
    workdir = self.copy_reference()  # checkpoints at steps 20 and 24
    os.remove(os.path.join(workdir, "base", "results.json"))
    _damage(os.path.join(workdir, "base", "ckpt", "24"), "truncated_array")
    proc = cli.run_main(workdir, "train")
    self.assertIn(f"checkpoint {workdir}/base/ckpt/24 does not restore", proc.stderr)
    self.assertIn("resumed from step 20", proc.stderr)
    self.assertEqual(cli.metric_lines(workdir), cli.metric_lines(self.reference))
    with open(os.path.join(workdir, "base", "results.json")) as f:
      got = json.load(f)
    with open(os.path.join(self.reference, "base", "results.json")) as f:
      self.assertEqual(got, json.load(f))

  def test_damaged_best_fails_naming_it(self):
    workdir = self.copy_reference()
    _damage(glob.glob(os.path.join(workdir, "base", "best", "*"))[0], "truncated_array")
    proc = cli.run_main(workdir, "evaluate", check=False)
    self.assert_error_line(proc, f"{workdir}/base/best/", "does not restore",
                           f"delete {workdir}/base to retrain")


# 3. Size flags -------------------------------------------------------------------


class SizeBoundsTest(_Reference):

  def test_batch_larger_than_split_names_flag_and_limit(self):
    for flags, needles in (
        (["--config.batch_size=100000"], ["--config.batch_size", "768"]),
        (["--config.stage=source_user", "--config.users_per_batch=100000"],
         ["--config.users_per_batch", "train chunks"]),
        (["--config.model.hist_len=100000"],
         ["--config.model.hist_len", str(configs.MAX_LEN)]),
        (["--config.data.seq_len=100000"], ["--config.data.seq_len"]),
        (["--config.data.user_chunk_len=100000"], ["--config.data.user_chunk_len"]),
    ):
      workdir = tempfile.mkdtemp()
      proc = cli.run_main(workdir, "train", *flags, check=False)
      self.assert_error_line(proc, *needles)
      self.assertFalse(os.path.exists(os.path.join(workdir, "base")), flags)

  def test_eval_batch_may_exceed_the_splits(self):  # 1000 > 768 train rows
    workdir = self.copy_reference()
    proc = cli.run_main(workdir, "evaluate", "--config.eval_batch_size=1000")
    self.assertIn('"test"', proc.stdout)

  def test_train_step_larger_than_memory_names_the_size_flags(self):
    workdir = tempfile.mkdtemp()
    proc = subprocess.run(
        [sys.executable, "-m", "iat_jax.main", *cli.main_args(workdir, "train")],
        cwd=cli.REPO,
        env={
            **cli.ENV, "IAT_JAX_MEMORY_BYTES": "100000"
        },
        capture_output=True,
        text=True,
        timeout=600)
    self.assert_error_line(proc, "train step of base needs", "--config.batch_size",
                           "IAT_JAX_MEMORY_BYTES")
    self.assertFalse(os.path.exists(os.path.join(workdir, "base", "metrics.jsonl")))


# 4. Errors that end on the cause ---------------------------------------------


class ErrorLineTest(_Reference):

  def test_unknown_config_key(self):
    proc = cli.run_main(tempfile.mkdtemp(),
                        "train",
                        "--config.no_such_key=1",
                        check=False)
    self.assert_error_line(proc, "--config.no_such_key", "not a field")

  def test_mesh_checked_against_devices_before_the_dataset(self):
    cache = tempfile.mkdtemp()
    proc = cli.run_main(tempfile.mkdtemp(),
                        "train",
                        "--config.mesh_shape=(3,1)",
                        f"--config.data.cache_dir={cache}",
                        check=False)
    self.assert_error_line(proc, "--config.mesh_shape", "needs 3 devices")
    self.assertEqual(os.listdir(cache), [])

  def test_non_finite_loss_without_checkpoint(self):
    workdir = tempfile.mkdtemp()
    proc = cli.run_main(workdir,
                        "train",
                        "--config.optimizer.learning_rate=1e38",
                        "--config.optimizer.grad_clip_norm=0",
                        "--config.optimizer.warmup_steps=0",
                        check=False)
    line = self.assert_error_line(proc, "non-finite loss", "learning_rate")
    self.assertNotIn("step None", line)
    self.assertRegex(line, r"no checkpoint saved yet|last good checkpoint: step \d+")

  @absltest.skipUnless(can_mount(), "needs to mount a small tmpfs (root)")
  def test_disk_full_ends_with_one_error_line_and_resumes(self):
    # Two sizes: the disk fills in a different save (and a different Orbax or
    # TensorStore write, some still running in threads when the run ends).
    for size in ("400k", "700k"):
      with self.subTest(size=size):
        mnt = tempfile.mkdtemp()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt],
                       check=True)
        workdir = os.path.join(mnt, "w")
        try:
          proc = cli.run_main(workdir, "train", check=False)
          self.assert_error_line(proc, "no space left on device", workdir, "re-run")
          self.assertNotIn("sys.meta_path is None", proc.stderr)
          # Space freed, the same command finishes the run as if never stopped.
          subprocess.run(["mount", "-o", "remount,size=64m", mnt], check=True)
          cli.run_main(workdir, "train")
          self.assertEqual(cli.metric_lines(workdir), cli.metric_lines(self.reference))
        finally:
          subprocess.run(["umount", mnt], check=True)

  def test_finished_pipeline_rerun_on_read_only_workdir(self):
    workdir = self.copy_reference()
    base_only = "--config.pipeline.models=('base',)"
    cli.run_main(workdir, "pipeline", base_only)
    with open(os.path.join(workdir, "results.json")) as f:
      results = f.read()
    with _read_only(workdir) as ro:
      proc = cli.run_main(ro, "pipeline", base_only, check=False)
      self.assertEqual(proc.returncode, 0, proc.stderr[-3000:])
      self.assertIn("already complete", proc.stderr)
      self.assertIn("| base |", proc.stdout)
      with open(os.path.join(ro, "results.json")) as f:
        self.assertEqual(f.read(), results)
      # Training there fails with one line saying the workdir is read-only.
      proc = cli.run_main(ro, "train", check=False)
      self.assert_error_line(proc, "read-only")

  def test_user_error_follows_wrapped_causes(self):
    from iat_jax import main  # pylint: disable=g-import-not-at-top
    try:
      try:
        raise OSError(errno.ENOSPC, "No space left on device", "/x/ckpt")
      except OSError as e:
        raise RuntimeError("async save failed") from e
    except RuntimeError as e:
      message = main.user_error(e)
    self.assertIn("/x/ckpt", message)
    self.assertIn("re-run", message)
    self.assertIsNone(main.user_error(KeyError("a bug keeps its traceback")))


class _read_only:  # pylint: disable=invalid-name
  """A read-only view of a directory: a read-only bind mount where this process
  may mount, else the directory itself with write permission removed (which
  binds only non-root users)."""

  def __init__(self, directory: str):
    self.directory = directory
    self.mount = None

  def __enter__(self) -> str:
    if can_mount():
      self.mount = tempfile.mkdtemp()
      subprocess.run(["mount", "--bind", self.directory, self.mount], check=True)
      subprocess.run(["mount", "-o", "remount,ro,bind", self.mount], check=True)
      return self.mount
    if os.geteuid() == 0:
      raise absltest.SkipTest("root without mount: cannot make a read-only workdir")
    subprocess.run(["chmod", "-R", "a-w", self.directory], check=True)
    return self.directory

  def __exit__(self, *exc) -> None:
    if self.mount:
      subprocess.run(["umount", self.mount], check=True)
    else:
      subprocess.run(["chmod", "-R", "u+w", self.directory], check=True)


if __name__ == "__main__":
  absltest.main()
