"""The tiny schema, config, models and random batches shared by the model tests.

The schema is the one of the tiny dataset (`data_fixtures.tiny_schema`); the
config is experiments/configs/tiny.py's run config, so its widths are written
down once.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from iat_jax import stages
from iat_jax.data import orders
from iat_jax.data import schema as schema_lib
from tests import data_fixtures

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "experiments", "configs", "tiny.py")
SCHEMA = data_fixtures.tiny_schema()
NUM_TASKS = SCHEMA.num_tasks


@functools.cache
def _tiny_module():
  spec = importlib.util.spec_from_file_location("tiny_config", TINY)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(**model_overrides) -> ml_collections.ConfigDict:
  """tiny.get_config() (a full run config) with config.model overrides.

  A dict value updates a model sub-block: `tiny_config(seq=dict(encoder="din"))`.
  """
  c = _tiny_module().get_config()
  for key, value in model_overrides.items():
    if key not in c.model:
      raise KeyError(f"config.model has no {key!r}")
    if isinstance(value, dict):
      c.model[key].update(value)
    else:
      c.model[key] = value
  return c


def make_model(stage: str,
               config: ml_collections.ConfigDict | None = None,
               schema: schema_lib.Schema = SCHEMA,
               **model_overrides) -> nn.Module:
  """`stages.make_model` of `stage` on the tiny schema and config (+ overrides)."""
  if config is None:
    config = tiny_config(**model_overrides)
  elif model_overrides:
    raise ValueError("pass either a config or model overrides")
  return stages.make_model(config, schema, stage)


def stage_batch(stage: str,
                config: ml_collections.ConfigDict | None = None,
                schema: schema_lib.Schema = SCHEMA,
                seed: int = 0) -> dict:
  """A random batch in `stage`'s order (its `orders.Order.example`) with the
  tiny config's shapes."""
  return orders.get(stages.get(stage).order).example(config or tiny_config(), schema,
                                                     seed)


def jit(fn, **kwargs):
  """`jax.jit` at XLA backend optimization level 0 (halves CPU compile time)."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kwargs)


def abstract_params(model, batch: dict):
  """Unboxed parameter shapes of `model` for `batch` (no compilation)."""
  return jax.eval_shape(
      lambda: nn.meta.unbox(model.init(jax.random.key(0), batch))["params"])


def random_params(model, batch: dict, seed: int = 0):
  """Random numpy params of the right shapes, without compiling an init.

  Weights ~ N(0, 1/fan_in), LayerNorm scales ~ 1 + N(0, 0.1^2), biases and
  embeddings ~ N(0, 0.1^2): like a trained model, nothing is exactly 0.
  """
  rng = np.random.default_rng(seed)

  def fill(path, x):
    name = str(getattr(path[-1], "key", path[-1]))
    z = rng.normal(size=x.shape).astype(np.float32)
    if name == "scale":
      return 1.0 + 0.1 * z
    if name in ("bias", "embedding") or x.ndim < 2:
      return 0.1 * z
    return z / np.sqrt(x.shape[-2])

  return jax.tree_util.tree_map_with_path(fill, abstract_params(model, batch))
