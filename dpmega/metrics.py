"""Exact evaluation metrics for binary prediction (CTR): AUC, log loss, normalized entropy, calibration.

Everything here runs on the host in float64 NumPy over the WHOLE evaluation
split at once: no streaming approximation (no histogram AUC, no mini-batch
averages of AUC), so the numbers are reproducible and comparable across runs.

Edge cases (mirrored by ``tests/test_metrics.py``):

==========================  ===============================================
input                       behaviour
==========================  ===============================================
ties in scores              counted as half a correct pair (average ranks)
all labels equal            ``auc`` raises ``ValueError`` (AUC undefined)
empty input                 ``ValueError`` naming ``labels``
labels not in {0, 1}        ``ValueError`` naming ``labels``
NaN / inf score or logit    ``ValueError`` naming the argument
probability 0 or 1          clipped to ``[eps, 1 - eps]`` in ``log_loss``
empty calibration bucket    count 0, NaN rates, no weight in the ECE
num_buckets < 1             ``ValueError`` naming ``num_buckets``
==========================  ===============================================

Metrics on an evaluation split are computed without noise: they are private
with respect to the TRAINING data only through the model (post-processing),
and say everything about the evaluation examples themselves. Keep the
evaluation split disjoint from training, and treat it as non-private.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dpmega import validation

BINNINGS = ("uniform", "quantile")


def _labels(labels) -> np.ndarray:
  y = np.asarray(labels)
  if y.ndim != 1 or y.size == 0:
    raise ValueError(f"labels must be a non-empty 1-D array, got shape {y.shape}.")
  if not np.all((y == 0) | (y == 1)):
    bad = y[(y != 0) & (y != 1)][:3]
    raise ValueError(f"labels must all be 0 or 1, got values such as {bad.tolist()}.")
  return y.astype(np.float64)


def _finite(name: str, x, n: int) -> np.ndarray:
  x = np.asarray(x, dtype=np.float64)
  if x.shape != (n,):
    raise ValueError(f"{name} must have shape ({n},) like labels, got {x.shape}.")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} must all be finite, got {int(np.sum(~np.isfinite(x)))} NaN/inf value(s).")
  return x


def auc(labels, scores) -> float:
  """Area under the ROC curve, exactly (Mann-Whitney U with average ranks).

  Equals the probability that a random positive scores higher than a random
  negative, ties counting one half. Invariant to any strictly increasing
  transform of ``scores`` (logits and probabilities give the same AUC).

  Args:
    labels: ``[n]`` 0/1 labels.
    scores: ``[n]`` finite real scores (logits or probabilities).

  Returns:
    AUC in ``[0, 1]``; 0.5 for a constant predictor.

  Raises:
    ValueError: bad shapes or values, or only one class present.

  Example:
    >>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    0.75
  """
  y = _labels(labels)
  s = _finite("scores", scores, y.size)
  n_pos = float(np.sum(y))
  n_neg = y.size - n_pos
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"labels must contain both classes for AUC, got {int(n_pos)} positive(s) "
                     f"and {int(n_neg)} negative(s).")
  order = np.argsort(s, kind="mergesort")
  sorted_s = s[order]
  # Average 1-based rank of each group of tied scores.
  starts = np.flatnonzero(np.r_[True, sorted_s[1:] != sorted_s[:-1]])
  ends = np.r_[starts[1:], s.size]
  group_rank = (starts + ends + 1) / 2.0
  ranks = np.empty(s.size, np.float64)
  ranks[order] = np.repeat(group_rank, ends - starts)
  u = np.sum(ranks[y == 1]) - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def log_loss_from_logits(labels, logits) -> float:
  """Mean binary cross-entropy (natural log) of ``sigmoid(logits)``, computed stably.

  ``mean(softplus(z) - y * z)``: no clipping needed, exact for any finite logit.

  Example:
    >>> round(log_loss_from_logits([1, 0], [0.0, 0.0]), 6)  # log 2
    0.693147
  """
  y = _labels(labels)
  z = _finite("logits", logits, y.size)
  return float(np.mean(np.logaddexp(0.0, z) - y * z))


def log_loss(labels, probabilities, *, eps: float = 1e-7) -> float:
  """Mean binary cross-entropy (natural log) of predicted probabilities.

  Probabilities are clipped to ``[eps, 1 - eps]`` so that a confident mistake
  costs ``-log(eps)`` rather than infinity. Prefer
  :func:`log_loss_from_logits` when logits are available.
  """
  if not 0 < eps < 0.5:
    raise ValueError(f"eps must be in (0, 0.5), got {eps=}.")
  y = _labels(labels)
  p = _finite("probabilities", probabilities, y.size)
  if np.any((p < 0) | (p > 1)):
    raise ValueError("probabilities must lie in [0, 1].")
  p = np.clip(p, eps, 1 - eps)
  return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))


def constant_log_loss(labels) -> float:
  """Log loss of the best constant predictor (the base rate): the entropy of the labels.

  Returns 0.0 when all labels are equal.
  """
  y = _labels(labels)
  p = float(np.mean(y))
  if p in (0.0, 1.0):
    return 0.0
  return float(-(p * np.log(p) + (1 - p) * np.log1p(-p)))


def normalized_entropy(labels, logits) -> float:
  """Log loss divided by the base-rate entropy (He et al. 2014): < 1 beats a constant.

  References:
    He et al., "Practical Lessons from Predicting Clicks on Ads at Facebook",
    ADKDD 2014. https://doi.org/10.1145/2648584.2648589
  """
  base = constant_log_loss(labels)
  if base == 0.0:
    raise ValueError("labels must contain both classes for normalized entropy.")
  return log_loss_from_logits(labels, logits) / base


class CalibrationTable(NamedTuple):
  """Predicted vs observed positive rate per bucket of predicted probability.

  Attributes:
    edges: ``[k + 1]`` bucket edges in probability (bucket ``i`` is
      ``[edges[i], edges[i + 1])``, the last one closed).
    count: ``[k]`` examples per bucket.
    mean_predicted: ``[k]`` mean predicted probability (NaN when empty).
    observed_rate: ``[k]`` fraction of positives (NaN when empty).
  """

  edges: np.ndarray
  count: np.ndarray
  mean_predicted: np.ndarray
  observed_rate: np.ndarray

  def rows(self) -> list[dict[str, float]]:
    """One dict per non-empty bucket (``lo``, ``hi``, ``count``, ``predicted``, ``observed``), for reports."""
    return [{"lo": float(self.edges[i]), "hi": float(self.edges[i + 1]), "count": int(self.count[i]),
             "predicted": float(self.mean_predicted[i]), "observed": float(self.observed_rate[i])}
            for i in range(self.count.size) if self.count[i]]


def _sigmoid(z: np.ndarray) -> np.ndarray:
  return np.exp(-np.logaddexp(0.0, -z))


def calibration_table(labels, logits, *, num_buckets: int = 10, binning: str = "uniform") -> CalibrationTable:
  """Buckets examples by predicted probability ``sigmoid(logit)`` and compares predicted with observed rates.

  Args:
    labels: ``[n]`` 0/1 labels.
    logits: ``[n]`` finite logits.
    num_buckets: number of buckets ``k >= 1``.
    binning: ``"uniform"``: ``k`` equal-width buckets of ``[0, 1]`` (the usual
      reliability diagram); ``"quantile"``: edges at the ``i / k`` quantiles of
      the predictions (equal counts up to ties; informative when most
      predictions are small, as in CTR).

  Returns:
    A :class:`CalibrationTable`.

  Example:
    >>> t = calibration_table([0, 1, 1, 1], [-10.0, -10.0, 10.0, 10.0], num_buckets=2)
    >>> t.count.tolist(), t.observed_rate.tolist()
    ([2, 2], [0.5, 1.0])
  """
  num_buckets = validation.check_int("num_buckets", num_buckets, 1)
  binning = validation.check_choice("binning", binning, BINNINGS)
  y = _labels(labels)
  p = _sigmoid(_finite("logits", logits, y.size))
  if binning == "uniform":
    edges = np.linspace(0.0, 1.0, num_buckets + 1)
  else:
    edges = np.quantile(p, np.linspace(0.0, 1.0, num_buckets + 1))
    edges[0], edges[-1] = 0.0, 1.0
  which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, num_buckets - 1)
  count = np.bincount(which, minlength=num_buckets)
  with np.errstate(invalid="ignore", divide="ignore"):
    mean_predicted = np.bincount(which, weights=p, minlength=num_buckets) / count
    observed = np.bincount(which, weights=y, minlength=num_buckets) / count
  return CalibrationTable(edges, count, mean_predicted, observed)


def expected_calibration_error(labels, logits, *, num_buckets: int = 10, binning: str = "uniform") -> float:
  """ECE: the count-weighted mean of ``|mean predicted - observed rate|`` over the buckets of
  :func:`calibration_table` (Naeini et al. 2015; Guo et al. 2017, eq. 3). 0 for a calibrated model.

  References:
    Guo et al., "On Calibration of Modern Neural Networks", ICML 2017. https://arxiv.org/abs/1706.04599

  Example:
    >>> round(expected_calibration_error([0, 1, 1, 1], [-10.0, -10.0, 10.0, 10.0], num_buckets=2), 12)
    0.25
  """
  t = calibration_table(labels, logits, num_buckets=num_buckets, binning=binning)
  full = t.count > 0
  gap = np.abs(t.mean_predicted[full] - t.observed_rate[full])
  return float(np.sum(t.count[full] * gap) / np.sum(t.count))


def recalibrated_logits(logits, calibration: dict[str, float] | None):
  """``a z + b`` for ``calibration = {"temperature": a, "bias": b}`` (a private Platt fit,
  :mod:`dpmega.train.recalibration`); ``logits`` unchanged when ``calibration`` is None.

  >>> recalibrated_logits(np.array([1.0, -2.0]), {"temperature": 0.5, "bias": 0.1}).tolist()
  [0.6, -0.9]
  """
  if calibration is None:
    return logits
  return calibration["temperature"] * logits + calibration["bias"]


def binary_metrics(labels, logits) -> dict[str, float]:
  """``auc``, ``log_loss``, ``normalized_entropy``, ``ece`` (10 uniform buckets), ``mean_predicted`` and
  ``positive_rate`` of logits on labels (scalars: what a progress line and ``summary.json`` carry)."""
  z = _finite("logits", logits, _labels(labels).size)
  return {
      "auc": auc(labels, z),
      "log_loss": log_loss_from_logits(labels, z),
      "normalized_entropy": normalized_entropy(labels, z),
      "ece": expected_calibration_error(labels, z),
      "mean_predicted": float(np.mean(_sigmoid(z))),
      "positive_rate": float(np.mean(_labels(labels))),
  }
