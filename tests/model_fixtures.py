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
  """A random batch in `stage`'s order with the tiny config's shapes."""
  config = config or tiny_config()
  m = config.model
  order = stages.get(stage).order
  if order == "temporal":
    return base_batch(schema, seed=seed)
  if order == "user_chunks":
    return user_batch(schema, bu=2, t=config.data.user_chunk_len, seed=seed)
  if order == "stream":
    return stream_batch(schema, d=m.insemb_dim, k=config.stream.k, seed=seed)
  return downstream_batch(schema,
                          d=m.insemb_dim,
                          l=m.hist_len,
                          num_gap_buckets=m.num_gap_buckets,
                          seed=seed)


def instance_features(rng: np.random.Generator,
                      schema: schema_lib.Schema,
                      lead: tuple[int, ...],
                      prefix: str = "") -> dict:
  """Random per-instance features with leading dims `lead`."""
  b = {}
  b[prefix +
    "cat"] = np.stack([rng.integers(0, f.vocab_size, lead) for f in schema.categorical],
                      -1).astype(np.int32)
  for f in schema.multi_hot:
    b[prefix + f"mh_{f.name}"] = rng.integers(0, f.vocab_size,
                                              lead + (f.max_len,)).astype(np.int32)
  b[prefix + "dense"] = rng.normal(size=lead + (len(schema.dense),)).astype(np.float32)
  s = schema.seq_len
  n_valid = rng.integers(0, s + 1, lead)
  valid = np.arange(s) < n_valid[..., None]
  b[prefix + "seq_item"] = np.where(
      valid, rng.integers(1, schema.vocab_size(schema.seq_item_field), lead + (s,)),
      0).astype(np.int32)
  b[prefix + "seq_category"] = np.where(
      valid, rng.integers(1, schema.vocab_size(schema.seq_category_field), lead + (s,)),
      0).astype(np.int32)
  b[prefix + "seq_action"] = np.where(valid,
                                      rng.integers(1, schema.num_actions, lead + (s,)),
                                      0).astype(np.int32)
  return b


def base_batch(schema: schema_lib.Schema, b: int = 4, seed: int = 0) -> dict:
  """Batch for 'base' / 'source_temporal': leading dims [B]."""
  rng = np.random.default_rng(seed)
  batch = instance_features(rng, schema, (b,))
  batch["labels"] = rng.integers(0, 2, (b, schema.num_tasks)).astype(np.float32)
  batch["mask"] = np.ones((b,), bool)
  return batch


def user_batch(schema: schema_lib.Schema,
               bu: int = 2,
               t: int = 4,
               seed: int = 0) -> dict:
  """Batch for 'source_user': leading dims [B_users, T]; last user padded; no
  timestamp ties (tie_group = position)."""
  rng = np.random.default_rng(seed)
  batch = instance_features(rng, schema, (bu, t))
  batch["labels"] = rng.integers(0, 2, (bu, t, schema.num_tasks)).astype(np.float32)
  mask = np.ones((bu, t), bool)
  mask[-1, t - 1:] = False  # a dummy instance at the end of the last chunk
  batch["mask"] = mask
  batch["tie_group"] = np.broadcast_to(np.arange(t, dtype=np.int32), (bu, t)).copy()
  return batch


def stream_batch(schema: schema_lib.Schema,
                 d: int,
                 b: int = 4,
                 k: int = 3,
                 seed: int = 0) -> dict:
  """Batch for 'source_stream': [B] + past_insemb [B, K, d] + past_* raw; no
  timestamp ties (past_tie_group K-1..0 newest first, tie_group K)."""
  rng = np.random.default_rng(seed)
  batch = base_batch(schema, b, seed)
  batch["past_insemb"] = rng.normal(size=(b, k, d)).astype(np.float32)
  n_valid = np.arange(b) % (k + 1)  # 0..K valid past entries
  batch["past_mask"] = np.arange(k)[None] < n_valid[:, None]
  batch["tie_group"] = np.full(b, k, np.int32)
  batch["past_tie_group"] = np.broadcast_to(np.arange(k - 1, -1, -1, dtype=np.int32),
                                            (b, k)).copy()
  batch.update(instance_features(rng, schema, (b, k), prefix="past_"))
  return batch


def downstream_batch(schema: schema_lib.Schema,
                     d: int,
                     l: int = 6,
                     b: int = 4,
                     num_gap_buckets: int = 8,
                     seed: int = 0) -> dict:
  """Batch for 'downstream': [B] + hist_* [B, L, ...]; row 0 has no history."""
  rng = np.random.default_rng(seed)
  batch = base_batch(schema, b, seed)
  n_valid = np.arange(b) * l // max(b - 1, 1)  # 0 .. L
  mask = np.arange(l)[None] < n_valid[:, None]
  batch["hist_insemb"] = rng.normal(size=(b, l, d)).astype(np.float32)
  batch["hist_mask"] = mask
  # Some labels not yet known (delayed): they read 0, flagged unknown.
  known = mask[..., None] & (rng.random((b, l, schema.num_tasks)) < 0.8)
  batch["hist_label_known"] = known
  batch["hist_labels"] = (rng.integers(0, 2, known.shape) * known).astype(np.float32)
  batch["hist_gap"] = np.where(mask, rng.integers(1, num_gap_buckets, (b, l)),
                               0).astype(np.int32)
  return batch


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
