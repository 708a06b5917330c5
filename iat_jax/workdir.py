"""The layout of a run's working directory, and its JSON files.

  <workdir>/
    data/<source>/        the preprocessed dataset (`iat_jax.data.sources`),
                          unless --config.data.cache_dir puts it elsewhere
    <stage or model>/     one directory per trained model:
      ckpt/, best/        Orbax checkpoints (`iat_jax.checkpointing`)
      metrics.jsonl, tb/  metrics (`iat_jax.metrics`)
      results.json        written last: final valid/test metrics, params,
                          FLOPs; its presence marks the model complete
    stores/<source>/      exported InsEmb tables (`iat_jax.store.tables`)
    results.json          the pipeline's results of every model
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax


def stage_dir(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def results_path(directory: str) -> str:
  """The results.json of a stage directory (or of a pipeline workdir)."""
  return os.path.join(directory, "results.json")


def is_complete(directory: str) -> bool:
  return os.path.exists(results_path(directory))


def load_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def load_results(directory: str) -> dict:
  return load_json(results_path(directory))


def write_json(path: str, obj: Any) -> None:
  """Writes `obj` to `path` atomically, from process 0 only."""
  if jax.process_index() != 0:
    return
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def write_results(directory: str, results: dict) -> None:
  write_json(results_path(directory), results)
