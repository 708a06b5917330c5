"""Rows and tables for the store tests."""

import numpy as np

from iat_jax import configs
from iat_jax.store import tables
from iat_jax.store import writer

# int8 error bound slack: float32 rounding of the scale arithmetic.
INT8_SLACK = 1 + 2.0**-15


def ds_keys(ds, rows=slice(None)) -> np.ndarray:
  """The store keys (default --config.store.placement) of a dataset's rows."""
  return tables.store_keys(configs.base_config().store.placement,
                           np.asarray(ds["ins_id"])[rows],
                           np.asarray(ds["uid"])[rows])


def data(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """n unique uint64 keys spread over the whole range, in random order; [n, d].

  The keys are a bijection of 0..n-1 (odd multiply, xor-shift: both invertible
  mod 2**64), so they are unique without a sort.
  """
  rng = np.random.default_rng(seed)
  keys = np.arange(n, dtype=np.uint64) + np.uint64(seed) * np.uint64(n)
  keys *= np.uint64(0x9E3779B97F4A7C15)
  keys ^= keys >> np.uint64(29)
  keys *= np.uint64(0xBF58476D1CE4E5B9)
  values = rng.random((n, d), dtype=np.float32)
  values -= 0.5
  values *= rng.uniform(0.02, 20, (n, 1)).astype(np.float32)  # varied row norms
  return keys, values


def write(path,
          keys,
          values,
          dtype="float32",
          step=0,
          source="source_temporal",
          **kw) -> int:
  """`writer.write` of rows from `source` at `step`; -> the version."""
  return writer.write(path,
                      keys,
                      values,
                      source=source,
                      source_step=step,
                      source_config={"d": values.shape[1]},
                      dtype=dtype,
                      **kw)
