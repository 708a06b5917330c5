"""pytest set-up: 8 forced CPU devices (before jax is imported), absl flags
parsed with defaults (as absltest.main would), the tests folder on sys.path."""

import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

from absl import flags  # pylint: disable=g-import-not-at-top

flags.FLAGS.mark_as_parsed()
