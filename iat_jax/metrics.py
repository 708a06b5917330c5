"""Evaluation metrics and metric writers (JSONL + TensorBoard event files).

TensorBoard events are written with tensorboardX, a small pure-Python writer,
so summaries do not pull in TensorFlow (clu's writer would).
"""

from __future__ import annotations

import json
import os
import time

from absl import logging
import numpy as np
import tensorboardX


def auc(labels: np.ndarray,
        scores: np.ndarray,
        weights: np.ndarray | None = None) -> float:
  """Exact ROC AUC over all instances (Mann-Whitney U; ties count half).

  The probability that a random positive scores above a random negative,
  each drawn with probability proportional to its weight: sum over (positive
  i, negative j) of w_i w_j ([s_i > s_j] + [s_i == s_j] / 2), over the total
  positive weight times the total negative weight. O(n log n): one sort,
  then each run of tied scores at once.

  Args:
    labels: [n] in {0, 1}.
    scores: [n] any real scores.
    weights: [n] >= 0 instance weights (None = all 1).

  Returns:
    AUC, or NaN when either class has no (weight of) instances.
  """
  labels = np.asarray(labels).reshape(-1) > 0.5
  scores = np.asarray(scores).reshape(-1)
  w = np.ones(len(scores)) if weights is None else np.asarray(weights, np.float64)
  pos, neg = np.where(labels, w, 0.0), np.where(labels, 0.0, w)
  w_pos, w_neg = pos.sum(), neg.sum()
  if w_pos <= 0 or w_neg <= 0:
    return float("nan")
  order = np.argsort(scores, kind="stable")
  sorted_scores = scores[order]
  starts = np.flatnonzero(np.r_[True, sorted_scores[1:] != sorted_scores[:-1]])
  # Per run of tied scores: its positive and negative weight.
  run_pos = np.add.reduceat(pos[order], starts)
  run_neg = np.add.reduceat(neg[order], starts)
  below = np.cumsum(run_neg) - run_neg  # negative weight strictly below the run
  return float((run_pos * (below + run_neg / 2.0)).sum() / (w_pos * w_neg))


def logloss(labels: np.ndarray, probs: np.ndarray, eps: float = 1e-7) -> float:
  """Mean binary cross-entropy of probabilities [n] against labels [n]."""
  p = np.clip(np.asarray(probs, dtype=np.float64), eps, 1 - eps)
  y = np.asarray(labels, dtype=np.float64)
  return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def task_metrics(tasks, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  """{'auc/<task>', 'logloss/<task>'} from labels and probs [n, num_tasks]."""
  out = {}
  for t, name in enumerate(tasks):
    out[f"auc/{name}"] = auc(labels[:, t], probs[:, t])
    out[f"logloss/{name}"] = logloss(labels[:, t], probs[:, t])
  return out


def read_jsonl(path: str) -> list[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Writer:
  """Appends metrics to <dir>/metrics.jsonl and TensorBoard events.

  Only the process with `active=True` (process 0) writes. On resume from a
  checkpoint at step s, `truncate(s)` drops lines past s that a killed run
  wrote, so the file reads as if the run had never been interrupted.
  """

  def __init__(self, directory: str, active: bool = True):
    self.path = os.path.join(directory, "metrics.jsonl")
    self.active = active
    self._tb = None
    if active:
      os.makedirs(directory, exist_ok=True)
      self._tb = tensorboardX.SummaryWriter(os.path.join(directory, "tb"))

  def truncate(self, step: int) -> None:
    if not self.active:
      return
    kept = [r for r in read_jsonl(self.path) if r["step"] <= step]
    tmp = self.path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    os.replace(tmp, self.path)

  def write(self, step: int, split: str, values: dict[str, float]) -> None:
    if not self.active:
      return
    row = {"step": int(step), "split": split, **{k: float(v) for k, v in values.items()}}
    with open(self.path, "a") as f:
      f.write(json.dumps(row, sort_keys=True) + "\n")
    if self._tb is None:
      return
    for k, v in values.items():
      self._tb.add_scalar(f"{split}/{k}", float(v), int(step))
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class Progress:
  """Logs loss, steps/s, instances/s and ETA every `every` steps."""

  def __init__(self,
               total_steps: int,
               instances_per_step: int,
               every: int,
               first_step: int = 0):
    self.total = total_steps
    self.per_step = instances_per_step
    self.every = every
    self._t0 = time.time()
    self._s0 = first_step

  def __call__(self, step: int, loss: float) -> None:
    if step % self.every and step != self.total:
      return
    dt = max(time.time() - self._t0, 1e-9)
    rate = (step - self._s0) / dt
    eta = (self.total - step) / rate if rate > 0 else float("inf")
    logging.info("step %d/%d loss %.5f | %.2f steps/s %.0f instances/s | ETA %.0fs",
                 step, self.total, loss, rate, rate * self.per_step, eta)
    self._t0, self._s0 = time.time(), step
