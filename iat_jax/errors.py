"""The errors a user can act on: one base, one subclass per kind of problem.

Each is raised where the problem is found, with a message that says what is
wrong, where (the flag, the file and line, the path) and what to do. `main`
ends a run that raised a `UserError` with one line `error: <message>` and no
traceback; any other exception is a bug and keeps its traceback.

Every subclass also derives from the builtin exception it refines, so callers
that catch `ValueError` or `RuntimeError` keep working.
"""


class UserError(Exception):
  """A failure the user can act on; the message says what to do."""


class ConfigError(UserError, ValueError):
  """A bad config value; the message starts with the flag, `--config.<key>`."""

  def __init__(self, flag: str, message: str):
    self.flag = flag if flag.startswith("--") else f"--config.{flag}"
    super().__init__(f"{self.flag}: {message}")


class DataError(UserError, ValueError):
  """Bad input data; the message names the file and line (or the rows)."""


class StoreError(UserError, ValueError):
  """A store that is missing, corrupt or does not match what the reader expects."""


class CheckpointError(UserError, RuntimeError):
  """No usable checkpoint where one is needed."""


class LockError(UserError, RuntimeError):
  """Another process holds a workdir's writer lock."""


class DownloadError(UserError, RuntimeError):
  """An archive could not be fetched or unpacked."""


class DivergedError(UserError, FloatingPointError):
  """Training produced a non-finite loss; the message names the step and flags."""
