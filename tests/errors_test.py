"""The user-error hierarchy and how `main` tells a user error from a bug."""

import errno

from absl.testing import absltest

from iat_jax import errors
from iat_jax import main


class UserErrorTest(absltest.TestCase):

  def test_every_kind_is_a_user_error_and_keeps_its_builtin_base(self):
    for cls, base in ((errors.ConfigError, ValueError), (errors.DataError, ValueError),
                      (errors.StoreError,
                       ValueError), (errors.CheckpointError,
                                     RuntimeError), (errors.LockError, RuntimeError),
                      (errors.DownloadError, RuntimeError), (errors.DivergedError,
                                                             FloatingPointError)):
      self.assertTrue(issubclass(cls, errors.UserError), cls)
      self.assertTrue(issubclass(cls, base), cls)

  def test_config_error_names_the_flag(self):
    e = errors.ConfigError("data.synthetic.num_users", "must be > 0, got 0")
    self.assertEqual(str(e), "--config.data.synthetic.num_users: must be > 0, got 0")
    self.assertEqual(e.flag, "--config.data.synthetic.num_users")
    self.assertEqual(str(errors.ConfigError("--config", "cannot load 'x.py'")),
                     "--config: cannot load 'x.py'")

  def test_main_recognises_user_errors_by_type_not_by_text(self):
    wrapped = RuntimeError("async save failed")
    wrapped.__cause__ = errors.StoreError("/s: corrupt block")
    self.assertEqual(main.user_error(wrapped), "/s: corrupt block")
    self.assertEqual(main.user_error(errors.DivergedError("loss nan at step 3")),
                     "loss nan at step 3")
    # A bug whose text looks like a config error keeps its traceback.
    self.assertIsNone(main.user_error(ValueError("--config.stage: looks like one")))
    self.assertIsNone(main.user_error(KeyError("DataError")))

  def test_fixable_os_errors_say_what_to_do(self):
    message = main.user_error(OSError(errno.EROFS, "Read-only file system", "/w/ckpt"))
    self.assertIn("/w/ckpt", message)
    self.assertIn("read-only", message)


if __name__ == "__main__":
  absltest.main()
