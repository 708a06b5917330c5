"""Cost report: parameter counts (dense vs embedding), XLA FLOPs, and the
matrix products (dot_general) a traced program does."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

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


class Dot(NamedTuple):
  """One `lax.dot_general` of a program, as traced."""
  lhs: jax.ShapeDtypeStruct
  rhs: jax.ShapeDtypeStruct
  # ((lhs contracting, rhs contracting), (lhs batch, rhs batch)) dims.
  dimension_numbers: Any
  preferred_element_type: Any

  @property
  def flops(self) -> float:
    """2 x batch x M x N x K: a multiply and an add per term."""
    (lc, rc), (lb, rb) = self.dimension_numbers
    lhs, rhs = self.lhs.shape, self.rhs.shape
    free_l = [n for i, n in enumerate(lhs) if i not in (*lc, *lb)]
    free_r = [n for i, n in enumerate(rhs) if i not in (*rc, *rb)]
    return 2.0 * float(
        np.prod([lhs[i] for i in (*lc, *lb)]) * np.prod(free_l) * np.prod(free_r))


def dot_generals(jaxpr: Any) -> list[Dot]:
  """Every dot_general a (closed) jaxpr executes, nested jaxprs included.

  A `scan` body's dots appear `length` times; any other nested jaxpr (jit,
  custom_vjp, remat, cond branches, while bodies) counts once. So for a
  program without while loops or conds (the train steps) this is each matrix
  product the program runs, forward and backward, in order.
  """
  out = []
  for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
    if eqn.primitive.name == "dot_general":
      lhs, rhs = (jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
      out.append(
          Dot(lhs, rhs, eqn.params["dimension_numbers"],
              eqn.params.get("preferred_element_type")))
    repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
          out += dot_generals(sub) * repeat
  return out
