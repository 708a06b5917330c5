"""metrics.auc (behind every reported AUC) against brute-force pair counting."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

from iat_jax import metrics


def _pairs_auc(labels, scores, weights):
  """The definition: every (positive, negative) pair, ties count half."""
  num = den = 0.0
  for i in np.flatnonzero(labels == 1):
    for j in np.flatnonzero(labels == 0):
      w = weights[i] * weights[j]
      num += w * (1.0
                  if scores[i] > scores[j] else 0.5 if scores[i] == scores[j] else 0)
      den += w
  return num / den


class AucTest(parameterized.TestCase):

  @parameterized.parameters(
      dict(n=50, levels=0, weighted=False),  # continuous scores: no ties
      dict(n=200, levels=4, weighted=False),  # few score values: many ties
      dict(n=200, levels=0, weighted=True),
      dict(n=300, levels=6, weighted=True),
      dict(n=7, levels=1, weighted=True),  # every score tied
  )
  def test_equals_pair_counting(self, n, levels, weighted):
    rng = np.random.default_rng(n + levels)
    labels = rng.integers(0, 2, n)
    scores = rng.integers(0, levels, n) / 3.0 if levels else rng.normal(size=n)
    weights = np.ones(n)
    if weighted:  # including a zero weight
      weights = rng.uniform(0, 3, n)
      weights[rng.integers(0, n)] = 0.0
    want = _pairs_auc(labels, scores, weights)
    got = metrics.auc(labels, scores, weights if weighted else None)
    self.assertAlmostEqual(got, want, places=12)

  def test_known_values(self):
    self.assertEqual(metrics.auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]), 1.0)
    self.assertEqual(metrics.auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]), 0.0)
    self.assertEqual(metrics.auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]), 0.5)
    # By hand: positive .3 (weight 1) beats .1 not .4: 1; positive .9
    # (weight 2) beats both: 2 + 2; over 3 x 2 -> 5 / 6.
    self.assertAlmostEqual(
        metrics.auc([0, 1, 0, 1], [0.1, 0.3, 0.4, 0.9], [1, 1, 1, 2]), 5 / 6)

  def test_one_class_is_nan(self):
    self.assertTrue(np.isnan(metrics.auc([1, 1, 1], [0.1, 0.2, 0.3])))
    self.assertTrue(np.isnan(metrics.auc([0, 1], [0.1, 0.2], [1.0, 0.0])))


if __name__ == "__main__":
  absltest.main()
