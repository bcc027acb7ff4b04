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
  assert set(out) == {"auc", "log_loss", "normalized_entropy", "positive_rate"}
