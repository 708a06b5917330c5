"""Command line: train / evaluate / export one stage, or run the whole pipeline.

  python -m iat_jax.main --config=experiments/configs/demo.py --workdir=DIR \
      --mode=pipeline [--config.key=value ...]
"""

from __future__ import annotations

import json
import logging as std_logging
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from iat_jax import configs
from iat_jax import distributed
from iat_jax import pipeline
from iat_jax.data import sources
from iat_jax.train import export_lib
from iat_jax.train import train_lib
from iat_jax.train import trainers

MODES = ("train", "evaluate", "export", "pipeline")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for all outputs.")
_MODE = flags.DEFINE_enum("mode", "pipeline", MODES, "What to run.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_orbax(record) -> bool:
  """Keeps Orbax's per-save INFO chatter out of the progress log."""
  return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_logger().addFilter(_quiet_orbax)
  config = _CONFIG.value
  configs.validate(config)
  distributed.maybe_initialize(config)
  logging.info("process %d/%d, devices %s", jax.process_index(), jax.process_count(),
               jax.devices())
  workdir, mode = os.path.abspath(_WORKDIR.value), _MODE.value  # Orbax wants absolute
  if mode == "pipeline":
    pipeline.run(config, workdir)
    return
  ds = sources.prepare(config, workdir)
  table = pipeline.open_store(config, workdir, ds)
  if mode == "train":
    trainers.train(config, workdir, config.stage, ds, table)
  elif mode == "evaluate":
    print(json.dumps(train_lib.evaluate_stage(config, workdir, config.stage, ds, table),
                     indent=1, sort_keys=True))
  else:
    print(export_lib.export(config, workdir, config.stage, ds))


def run() -> None:
  """Console-script entry point."""
  app.run(main)


if __name__ == "__main__":
  run()
