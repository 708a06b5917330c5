"""Cost report: parameter counts (dense vs embedding) and XLA FLOPs."""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import numpy as np
from flax import traverse_util


def is_embedding_param(path: tuple[str, ...]) -> bool:
  """Embedding (lookup-table) parameters are the leaves named 'embedding'."""
  return bool(path) and path[-1] == "embedding"


def param_counts(params: Any) -> dict[str, int]:
  """Counts parameters of a params pytree (boxed or unboxed, abstract or not).

  Args:
    params: the 'params' collection, or a variables dict holding it.

  Returns:
    {'dense': n, 'embedding': n, 'total': n}; embedding = lookup tables
    (leaves named 'embedding'), dense = everything else.
  """
  params = nn.meta.unbox(params)
  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  flat = traverse_util.flatten_dict(params)
  counts = {"dense": 0, "embedding": 0}
  for path, leaf in flat.items():
    n = int(np.prod(leaf.shape))
    counts["embedding" if is_embedding_param(path) else "dense"] += n
  counts["total"] = counts["dense"] + counts["embedding"]
  return counts


def flops(fn: Callable[..., Any], *args: Any) -> float:
  """FLOPs of `fn(*args)` from XLA's cost analysis of the compiled program."""
  return compiled_flops(jax.jit(fn).lower(*args).compile())


def compiled_flops(compiled: Any) -> float:
  """FLOPs of a compiled executable (`jax.stages.Compiled`).

  `cost_analysis()` returns a dict in recent JAX and a list of dicts (one per
  program) in older versions; both are summed.
  """
  analysis = compiled.cost_analysis()
  if analysis is None:
    return 0.0
  if isinstance(analysis, dict):
    analysis = [analysis]
  return float(sum(a.get("flops", 0.0) for a in analysis if a))
