"""Exact AUC and log loss (dpmega/metrics.py), row by row of its edge-case table."""

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpmega import metrics


def brute_force_auc(labels, scores):
  pos = [s for y, s in zip(labels, scores) if y == 1]
  neg = [s for y, s in zip(labels, scores) if y == 0]
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
  return wins / (len(pos) * len(neg))


@given(st.lists(st.tuples(st.integers(0, 1), st.integers(-3, 3)), min_size=2, max_size=40))
def test_auc_equals_pairwise_definition_with_ties(rows):
  labels = [y for y, _ in rows]
  scores = [float(s) for _, s in rows]  # few distinct values: many ties
  if len(set(labels)) < 2:
    with pytest.raises(ValueError, match="both classes"):
      metrics.auc(labels, scores)
    return
  assert metrics.auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_auc_known_values():
  assert metrics.auc([0, 1], [0.0, 1.0]) == 1.0
  assert metrics.auc([0, 1], [1.0, 0.0]) == 0.0
  assert metrics.auc([0, 1, 0, 1], [0.5] * 4) == 0.5  # constant predictor
  assert metrics.auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_auc_invariant_to_monotone_transform():
  rng = np.random.default_rng(0)
  y = (rng.random(500) < 0.3).astype(int)
  z = rng.normal(size=500) + y
  assert metrics.auc(y, z) == pytest.approx(metrics.auc(y, 1 / (1 + np.exp(-z))), abs=1e-12)


def test_auc_rejects_bad_input():
  with pytest.raises(ValueError, match="labels must be a non-empty"):
    metrics.auc([], [])
  with pytest.raises(ValueError, match="labels must all be 0 or 1"):
    metrics.auc([0, 2], [0.1, 0.2])
  with pytest.raises(ValueError, match="scores must have shape"):
    metrics.auc([0, 1], [0.1])
  with pytest.raises(ValueError, match="scores must all be finite"):
    metrics.auc([0, 1], [0.1, math.nan])
  with pytest.raises(ValueError, match="both classes"):
    metrics.auc([1, 1], [0.1, 0.2])


def test_log_loss_from_logits_matches_definition_and_is_stable():
  y = np.array([1, 0, 1, 0])
  z = np.array([2.0, -1.0, -0.5, 3.0])
  p = 1 / (1 + np.exp(-z))
  expected = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
  assert metrics.log_loss_from_logits(y, z) == pytest.approx(expected, rel=1e-12)
  assert metrics.log_loss(y, p) == pytest.approx(expected, rel=1e-9)
  # Extreme logits: exact, no overflow, no clipping.
  assert metrics.log_loss_from_logits([1, 0], [-1000.0, 1000.0]) == pytest.approx(1000.0)
  with pytest.raises(ValueError, match="logits must all be finite"):
    metrics.log_loss_from_logits([1], [math.inf])


def test_log_loss_clips_certain_mistakes():
  assert metrics.log_loss([1], [0.0], eps=1e-7) == pytest.approx(-math.log(1e-7))
  with pytest.raises(ValueError, match="eps must be in"):
    metrics.log_loss([1], [0.5], eps=0.0)
  with pytest.raises(ValueError, match="probabilities must lie in"):
    metrics.log_loss([1], [1.5])


def test_constant_predictor_has_normalized_entropy_one():
  y = np.array([1, 0, 0, 0, 1, 0, 0, 0])
  rate = y.mean()
  logit = math.log(rate / (1 - rate))
  assert metrics.normalized_entropy(y, np.full(8, logit)) == pytest.approx(1.0)
  assert metrics.constant_log_loss(np.ones(3)) == 0.0
  out = metrics.binary_metrics(y, np.full(8, logit))
  assert out["auc"] == 0.5 and out["positive_rate"] == 0.25
  assert set(out) == {"auc", "log_loss", "normalized_entropy", "ece", "mean_predicted", "positive_rate"}
  assert out["ece"] == pytest.approx(0.0, abs=1e-12)  # one bucket, predicted = observed = 0.25
  assert out["mean_predicted"] == pytest.approx(0.25)


def _logit(p):
  return math.log(p / (1 - p))


def test_calibration_table_by_hand_uniform_buckets():
  # Predictions 0.1, 0.1, 0.3 | 0.7, 0.9 in two buckets [0, .5), [.5, 1].
  y = [0, 1, 0, 1, 1]
  z = [_logit(0.1), _logit(0.1), _logit(0.3), _logit(0.7), _logit(0.9)]
  t = metrics.calibration_table(y, z, num_buckets=2)
  assert t.edges.tolist() == [0.0, 0.5, 1.0]
  assert t.count.tolist() == [3, 2]
  np.testing.assert_allclose(t.mean_predicted, [0.5 / 3, 0.8], rtol=1e-12)
  np.testing.assert_allclose(t.observed_rate, [1 / 3, 1.0], rtol=1e-12)
  # ECE = 3/5 |1/6 - 1/3| + 2/5 |0.8 - 1| = 0.1 + 0.08.
  assert metrics.expected_calibration_error(y, z, num_buckets=2) == pytest.approx(0.18, rel=1e-12)
  assert [r["count"] for r in t.rows()] == [3, 2]


def test_calibration_empty_bucket_has_no_weight():
  y = [0, 1]
  z = [_logit(0.05), _logit(0.95)]
  t = metrics.calibration_table(y, z, num_buckets=4)
  assert t.count.tolist() == [1, 0, 0, 1]
  assert math.isnan(t.mean_predicted[1]) and math.isnan(t.observed_rate[2])
  assert len(t.rows()) == 2
  assert metrics.expected_calibration_error(y, z, num_buckets=4) == pytest.approx(0.05, rel=1e-12)


def test_calibration_quantile_buckets_hold_equal_counts():
  rng = np.random.default_rng(0)
  z = rng.normal(-2.0, 1.0, size=1000)
  y = (rng.random(1000) < 1 / (1 + np.exp(-z))).astype(int)
  t = metrics.calibration_table(y, z, num_buckets=10, binning="quantile")
  assert t.count.tolist() == [100] * 10
  assert t.edges[0] == 0.0 and t.edges[-1] == 1.0
  # Labels drawn from the predictions: calibrated up to sampling error (a few / sqrt(100) per bucket).
  assert metrics.expected_calibration_error(y, z, binning="quantile") < 0.05
  # Logits doubled (over-confident): the same ranking, a clearly larger ECE and NE.
  assert metrics.expected_calibration_error(y, 2 * z, binning="quantile") > 0.1
  assert metrics.normalized_entropy(y, 2 * z) > metrics.normalized_entropy(y, z)


def test_calibration_rejects_bad_input():
  with pytest.raises(ValueError, match="num_buckets"):
    metrics.calibration_table([0, 1], [0.0, 0.0], num_buckets=0)
  with pytest.raises(ValueError, match="binning"):
    metrics.calibration_table([0, 1], [0.0, 0.0], binning="log")
  with pytest.raises(ValueError, match="logits must all be finite"):
    metrics.expected_calibration_error([0, 1], [0.0, math.nan])
