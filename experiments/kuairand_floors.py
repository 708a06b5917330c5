r"""Simple floors on the KuaiRand test split: what a ranking model must beat.

Builds (or reuses) the KuaiRand dataset with `kuairand.build` and prints, per
task (is_click, long_view, is_like), the test AUC of
  popularity   the video's rate of the task over every strictly earlier row
               (all users, any split), smoothed towards the train rate with
               --smoothing pseudo-rows; no training
  onehot_lr    logistic regression on one-hot user, video, tab and hour
  rates_lr     logistic regression on the logits of the user's and the video's
               strictly-earlier smoothed rates of the task, log1p of both
               earlier counts, and one-hot tab and hour
The regressions are fit on the train split (L-BFGS, L2 chosen from --l2 by
valid AUC); nothing looks at the test split but the printed figures. On the
04-25..05-08 extract it takes about 5 minutes on 2 shared cores (the 24 fits).

  python experiments/kuairand_floors.py \
      --data_dir=../shared/data/kuairand-pure-0425-0508 [--dataset_dir=DIR]
"""

from __future__ import annotations

import tempfile

from absl import app
from absl import flags
import numpy as np
import scipy.optimize

from iat_jax import metrics
from iat_jax.data import dataset as dataset_lib
from iat_jax.data import adapter
from iat_jax.data import kuairand

_DATA_DIR = flags.DEFINE_string("data_dir", None, "KuaiRand-Pure files.")
_DATASET_DIR = flags.DEFINE_string(
    "dataset_dir", "", "Built dataset directory (reused when up to date); "
    "empty: a temporary one.")
_SMOOTHING = flags.DEFINE_float("smoothing", 5.0,
                                "Pseudo-rows at the train rate in past rates.")
_L2 = flags.DEFINE_list("l2", ["1e-6", "1e-5", "1e-4", "1e-3"],
                        "L2 strengths tried for the regressions.")


def past_counts(group: np.ndarray, ts: np.ndarray,
                y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Strictly-earlier rows of the same group, per row.

  Args:
    group: int [n] group of each row (a video, a user).
    ts: int64 [n] timestamps.
    y: float [n, T] labels.

  Returns:
    count: float64 [n] earlier rows of the row's group (ts strictly smaller).
    positives: float64 [n, T] their label sums.
  """
  o = np.lexsort((ts, group))
  start, end, _ = adapter.earlier_rows(group[o], ts[o])
  csum = np.concatenate([np.zeros((1, y.shape[1])), np.cumsum(y[o], axis=0)])
  count, positives = np.empty(len(o)), np.empty(y.shape)
  count[o] = end - start
  positives[o] = csum[end] - csum[start]
  return count, positives


def fit_lr(ids: np.ndarray, dense: np.ndarray, y: np.ndarray, num_ids: int,
           l2: float) -> np.ndarray:
  """Logistic regression on one-hot ids and dense features.

  Args:
    ids: int [n, F] active one-hot indices in [0, num_ids).
    dense: float [n, D].
    y: float [n] labels.
    num_ids: size of the one-hot weight vector.
    l2: penalty l2 / 2 * |w|^2 on every weight but the bias.

  Returns:
    float64 [num_ids + D + 1] weights (one-hot, dense, bias).
  """
  n, d = len(y), dense.shape[1]
  flat = ids.reshape(-1)

  def loss_and_grad(w):
    z = w[flat].reshape(ids.shape).sum(1) + dense @ w[num_ids:-1] + w[-1]
    p = 1.0 / (1.0 + np.exp(-z))
    loss = np.mean(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w[:-1] @ w[:-1]
    r = (p - y) / n
    grad = np.concatenate([
        np.bincount(flat, weights=np.repeat(r, ids.shape[1]), minlength=num_ids),
        dense.T @ r, [r.sum()]
    ])
    grad[:-1] += l2 * w[:-1]
    return loss, grad

  w0 = np.zeros(num_ids + d + 1)
  return scipy.optimize.minimize(loss_and_grad,
                                 w0,
                                 jac=True,
                                 method="L-BFGS-B",
                                 options={
                                     "maxiter": 500
                                 }).x


def predict(w: np.ndarray, ids: np.ndarray, dense: np.ndarray,
            num_ids: int) -> np.ndarray:
  """Logits [n] of `fit_lr` weights."""
  return w[ids].sum(1) + dense @ w[num_ids:-1] + w[-1]


def lr_floor(ids, dense, y, split, num_ids) -> tuple[float, float]:
  """(test AUC, chosen l2) of an LR fit on train with l2 picked on valid."""
  train, valid, test = (split == k for k in range(3))
  best = None
  for l2 in map(float, _L2.value):
    w = fit_lr(ids[train], dense[train], y[train], num_ids, l2)
    auc = metrics.auc(y[valid], predict(w, ids[valid], dense[valid], num_ids))
    if best is None or auc > best[0]:
      best = (auc, l2, w)
  _, l2, w = best
  return metrics.auc(y[test], predict(w, ids[test], dense[test], num_ids)), l2


def one_hot(*columns: np.ndarray) -> tuple[np.ndarray, int]:
  """Int columns [n] each -> (ids [n, F] with per-column offsets, total size)."""
  offsets = np.cumsum([0] + [int(c.max()) + 1 for c in columns])
  return np.stack([c + o for c, o in zip(columns, offsets)], 1), int(offsets[-1])


def main(argv):
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    out = kuairand.build(_DATA_DIR.value, _DATASET_DIR.value or tmp + "/ds")
    ds = dataset_lib.Dataset(out)
    s = ds.schema
    y = np.asarray(ds["labels"], dtype=np.float64)
    split, ts = np.asarray(ds["split"]), np.asarray(ds["ts"])
    cat = lambda name: np.asarray(ds["cat"][:, s.categorical_index(name)])
    user, video, tab, hour = (cat(k) for k in ("user_id", "video_id", "tab", "hour"))
    prior = y[split == 0].mean(0)
    a = _SMOOTHING.value
    n_video, pos_video = past_counts(video, ts, y)
    n_user, pos_user = past_counts(user, ts, y)
    rate = lambda n, pos: (pos + a * prior) / (n[:, None] + a)
    video_rate, user_rate = rate(n_video, pos_video), rate(n_user, pos_user)
    logit = lambda p: np.log(p / (1 - p))
    ids_onehot, size_onehot = one_hot(user, video, tab, hour)
    ids_ctx, size_ctx = one_hot(tab, hour)
    no_dense = np.zeros((len(y), 0))
    test = split == 2
    print(f"KuaiRand floors, test split ({int(test.sum()):,} of {len(y):,} rows; "
          f"train rates {np.round(prior, 4).tolist()})")
    print(f"{'task':<10} {'popularity':>10} {'onehot_lr':>10} {'rates_lr':>10}"
          f"   (l2 onehot / rates)")
    for t, task in enumerate(s.tasks):
      pop = metrics.auc(y[test, t], video_rate[test, t])
      onehot, l2_a = lr_floor(ids_onehot, no_dense, y[:, t], split, size_onehot)
      dense = np.stack([
          logit(user_rate[:, t]),
          logit(video_rate[:, t]),
          np.log1p(n_user),
          np.log1p(n_video)
      ], 1)
      rates, l2_b = lr_floor(ids_ctx, dense, y[:, t], split, size_ctx)
      print(f"{task:<10} {pop:>10.4f} {onehot:>10.4f} {rates:>10.4f}"
            f"   ({l2_a:g} / {l2_b:g})")


if __name__ == "__main__":
  flags.mark_flag_as_required("data_dir")
  app.run(main)
