"""The statistics of sweeps and tables: 95% t-intervals, paired relative
changes and least-squares fits (pure Python; a handful of seeds each)."""

from __future__ import annotations

import math
from typing import Sequence

# t_{0.975, df} for df = 1..30.
_T975 = (12.7062, 4.30265, 3.18245, 2.77645, 2.57058, 2.44691, 2.36462, 2.30600,
         2.26216, 2.22814, 2.20099, 2.17881, 2.16037, 2.14479, 2.13145, 2.11991,
         2.10982, 2.10092, 2.09302, 2.08596, 2.07961, 2.07387, 2.06866, 2.06390,
         2.05954, 2.05553, 2.05183, 2.04841, 2.04523, 2.04227)


def t_quantile(df: int) -> float:
  """Two-sided 95% Student-t quantile t_{0.975, df}; inf for df < 1.

  A table for df <= 30, then the Cornish-Fisher expansion around the normal
  quantile (error < 1e-5 there).
  """
  if df < 1:
    return math.inf
  if df <= len(_T975):
    return _T975[df - 1]
  z, v = 1.959963985, float(df)
  return (z + (z**3 + z) / (4 * v) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * v**2) +
          (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * v**3))


def mean_ci(values: Sequence[float]) -> tuple[float, float]:
  """Mean and the half-width of its 95% t-interval (nan for one value)."""
  n = len(values)
  mean = sum(values) / n
  if n < 2:
    return mean, math.nan
  var = sum((v - mean)**2 for v in values) / (n - 1)
  return mean, t_quantile(n - 1) * math.sqrt(var / n)


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict:
  """Least squares y = intercept + slope * x.

  Returns:
    dict with slope, slope_ci (half-width of its 95% t-interval, n - 2 df;
    nan for n = 2), intercept, r2 and n.
  """
  n = len(x)
  mx, my = sum(x) / max(n, 1), sum(y) / max(n, 1)
  sxx = sum((a - mx)**2 for a in x)
  if sxx == 0:
    raise ValueError(f"need two distinct x values, got {list(x)}")
  slope = sum((a - mx) * (b - my) for a, b in zip(x, y)) / sxx
  intercept = my - slope * mx
  sse = sum((b - intercept - slope * a)**2 for a, b in zip(x, y))
  syy = sum((b - my)**2 for b in y)
  ci = t_quantile(n - 2) * math.sqrt(sse / (n - 2) / sxx) if n > 2 else math.nan
  return {
      "slope": slope,
      "slope_ci": ci,
      "intercept": intercept,
      "r2": 1 - sse / syy if syy > 0 else 1.0,
      "n": n
  }


def relative_change(value: float, ref: float) -> float:
  """100 * (value / ref - 1), in percent."""
  return 100.0 * (value / ref - 1.0)


def excludes_zero(mean: float, half: float) -> bool | None:
  """Whether mean ± half excludes 0; None when the interval is unknown."""
  return None if math.isnan(half) else abs(mean) > half
