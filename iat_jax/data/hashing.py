"""Stable, vectorized 64-bit hashing: InsIDs and hashed feature ids.

Everything here is numpy-vectorized (no per-row Python) and independent of the
platform, the process and PYTHONHASHSEED, so ids are identical on every host.

InsID recipe (documented contract; stores are keyed by it):

    ins_id = mix(mix(mix(mix(SALT ^ uid) ^ ts) ^ item) ^ request_id)

with `mix` the SplitMix64 finalizer over uint64 (wrapping arithmetic), `uid`,
`ts` (int64 seconds), `item` (raw item id) and `request_id` (a per-row id that
makes two instances with the same user, time and item distinct: the row number
in the raw source for MovieLens, the generator's instance counter for synthetic
data) all reinterpreted as uint64. Zero is never returned (it is remapped to 1),
so 0 can mean "no instance" in padded history slots.
"""

from __future__ import annotations

import hashlib

import numpy as np

_SALT = np.uint64(0x1A7_1A7_1A7)
_C1 = np.uint64(0xBF58476D1CE4E5B9)
_C2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finalizer: uint64 [...] -> uint64 [...] (a bijection)."""
  x = np.asarray(x).astype(np.uint64, copy=True)
  with np.errstate(over="ignore"):
    x += _GOLDEN
    x ^= x >> np.uint64(30)
    x *= _C1
    x ^= x >> np.uint64(27)
    x *= _C2
    x ^= x >> np.uint64(31)
  return x


def _u64(x) -> np.ndarray:
  return np.asarray(x).astype(np.int64).view(np.uint64)


def ins_ids(uid, ts, item, request_id) -> np.ndarray:
  """InsIDs (uint64 [n], never 0) of n instances; see the module docstring."""
  h = mix(_SALT ^ _u64(uid))
  for part in (ts, item, request_id):
    h = mix(h ^ _u64(part))
  h[h == 0] = 1
  return h


def hash_to_vocab(values, vocab_size: int, salt: int) -> np.ndarray:
  """Hashes integer ids into `[1, vocab_size)` (0 stays free for "missing").

  Args:
    values: integer array [...] of raw ids.
    vocab_size: size of the field's vocabulary, >= 2.
    salt: per-field salt so two fields hash the same raw id differently.

  Returns:
    int32 array [...] in [1, vocab_size).
  """
  h = mix(_u64(values) ^ mix(np.uint64(salt)))
  return (h % np.uint64(vocab_size - 1)).astype(np.int32) + 1


def string_ids(values) -> np.ndarray:
  """Stable uint64 ids of strings (blake2b-64); hashes each distinct value once.

  Args:
    values: sequence of str [n].

  Returns:
    uint64 array [n].
  """
  uniq, inverse = np.unique(np.asarray(values, dtype=object).astype(str),
                            return_inverse=True)
  digests = np.array([
      int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little")
      for u in uniq
  ],
                     dtype=np.uint64)
  return digests[inverse]
