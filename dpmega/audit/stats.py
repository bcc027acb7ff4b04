"""Statistics of an audit: Clopper–Pearson bounds and the ε lower bound of a threshold test.

:func:`holdout_epsilon_lower_bound` turns scores of runs with and without a
canary into a lower bound on ε that holds with a stated confidence (numpy and
scipy only).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import scipy.stats

from dpmega import validation


def check_scores(name: str, scores: Any) -> np.ndarray:
  """``scores`` as a finite, non-empty 1-D float64 array, else ``ValueError`` naming ``name``."""
  a = np.asarray(scores, dtype=np.float64)
  if a.ndim != 1 or a.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape {a.shape}.")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} must be finite, got {int(np.sum(~np.isfinite(a)))} non-finite score(s).")
  return a


def clopper_pearson_lower(successes: Any, trials: int, significance: float) -> np.ndarray:
  """One-sided Clopper–Pearson lower bound: ``P[p < lower] <= significance``.

  Args:
    successes: number(s) of successes k (array-like of ints in ``[0, trials]``).
    trials: number of Bernoulli trials n > 0.
    significance: allowed failure probability, in (0, 1).

  Returns:
    ``Beta.ppf(significance, k, n - k + 1)`` (0 where k == 0), float64.

  Example:
    >>> round(float(clopper_pearson_lower(100, 100, 0.05)), 4)  # 0.05 ** (1/100)
    0.9705
  """
  k = np.asarray(successes, dtype=np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    lo = scipy.stats.beta.ppf(significance, k, trials - k + 1)
  return np.where(k > 0, lo, 0.0)


def clopper_pearson_upper(successes: Any, trials: int, significance: float) -> np.ndarray:
  """One-sided Clopper–Pearson upper bound: ``P[p > upper] <= significance``.

  Example:
    >>> round(float(clopper_pearson_upper(0, 100, 0.05)), 4)  # 1 - 0.05 ** (1/100)
    0.0295
  """
  k = np.asarray(successes, dtype=np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    hi = scipy.stats.beta.ppf(1.0 - significance, k + 1, trials - k)
  return np.where(k < trials, hi, 1.0)


def epsilon_lower_bound_from_counts(
    true_positives: Any, num_positives: int, false_positives: Any, num_negatives: int, *,
    delta: float, significance: float) -> np.ndarray:
  """``log((TPR_lo - δ) / FPR_hi)`` with one-sided Clopper–Pearson bounds, floored at 0.

  ``TPR_lo`` and ``FPR_hi`` are each taken at ``significance / 2`` so that both
  hold together with probability ``>= 1 - significance`` (union bound). Valid
  for ONE threshold fixed before the counts were drawn; choosing the best of
  many on the same data needs a correction (see
  :func:`holdout_epsilon_lower_bound`).

  Returns:
    float64 array (or scalar) of lower bounds on ε for (ε, δ)-DP, >= 0.
  """
  tpr_lo = clopper_pearson_lower(true_positives, num_positives, significance / 2)
  fpr_hi = clopper_pearson_upper(false_positives, num_negatives, significance / 2)
  with np.errstate(invalid="ignore", divide="ignore"):
    eps = np.log(np.maximum(tpr_lo - delta, 0.0)) - np.log(fpr_hi)
  return np.where(tpr_lo > delta, np.maximum(eps, 0.0), 0.0)


def _threshold_bounds(pos: np.ndarray, neg: np.ndarray, delta: float, significance: float):
  """Bounds of the rule "score >= t means positive" at every positive score t."""
  thresholds = np.unique(pos)
  tp = pos.size - np.searchsorted(np.sort(pos), thresholds, side="left")
  fp = neg.size - np.searchsorted(np.sort(neg), thresholds, side="left")
  eps = epsilon_lower_bound_from_counts(tp, pos.size, fp, neg.size, delta=delta,
                                        significance=significance)
  return thresholds, eps


def holdout_epsilon_lower_bound(
    in_scores: Any, out_scores: Any, *, delta: float, confidence: float = 0.95, seed: int = 0,
) -> tuple[float, dict[str, Any]]:
  """ε lower bound from scores of runs with (in) and without (out) the canary.

  Threshold selection by **holdout**: each score array is split at random into
  two halves. On the first half every threshold ``t``, both sets ``{score >=
  t}`` and ``{score <= t}`` and both directions of the DP inequality are tried
  -- ``log((P_in(S) - δ) / P_out(S))``, i.e. ``log((TPR - δ) / FPR)``, and the
  symmetric ``log((P_out(S) - δ) / P_in(S))``, i.e. ``log((TNR - δ) / FNR)`` --
  and the one with the largest Clopper–Pearson bound on that half is chosen
  (so the canary may move the score either way). Only that one test is
  then evaluated on the second half, with one-sided Clopper–Pearson bounds at
  ``(1 - confidence) / 2`` each. The second half is independent of the choice,
  so no multiple-comparison correction is needed and the bound holds with
  probability ``>= confidence``.

  Args:
    in_scores: 1-D scores of runs on the input with the canary (>= 2 of them).
    out_scores: 1-D scores of runs on the input without it (>= 2 of them).
    delta: δ of the (ε, δ) claim being tested, in (0, 1).
    confidence: in [0.5, 1).
    seed: seed of the random split.

  Returns:
    ``(epsilon_lower_bound, details)``; ``details`` has the chosen ``test``,
    ``threshold`` and the holdout counts.
  """
  in_s = check_scores("in_scores", in_scores)
  out_s = check_scores("out_scores", out_scores)
  if in_s.size < 2 or out_s.size < 2:
    raise ValueError("in_scores and out_scores must each hold at least 2 scores (one per half).")
  delta = validation.check_real("delta", delta, 0.0, 1.0, lo_open=True, hi_open=True)
  significance = 1.0 - validation.check_real("confidence", confidence, 0.5, 1.0, hi_open=True)
  rng = np.random.default_rng(seed)
  in_perm, out_perm = rng.permutation(in_s), rng.permutation(out_s)
  in_sel, in_eval = in_perm[: in_s.size // 2], in_perm[in_s.size // 2:]
  out_sel, out_eval = out_perm[: out_s.size // 2], out_perm[out_s.size // 2:]

  # The DP inequality P[M(D) in S] <= e^eps P[M(D') in S] + delta holds both ways
  # (D, D' = in, out and out, in) and for any S: try S = {score >= t} and
  # S = {score <= t} (as {-score >= -t}) each way. A test is (sign, numerator world).
  tests = (("in", 1.0), ("out", 1.0), ("in", -1.0), ("out", -1.0))
  sel = {"in": in_sel, "out": out_sel}
  ev = {"in": in_eval, "out": out_eval}
  other = {"in": "out", "out": "in"}
  best = (-1.0, tests[0], math.inf)
  for world, sign in tests:
    thresholds, eps = _threshold_bounds(sign * sel[world], sign * sel[other[world]], delta, significance)
    i = int(np.argmax(eps))
    if eps[i] > best[0]:
      best = (float(eps[i]), (world, sign), float(thresholds[i]))
  _, (world, sign), t = best
  pos, neg = sign * ev[world], sign * ev[other[world]]
  tp, fp = int(np.sum(pos >= t)), int(np.sum(neg >= t))
  eps = float(epsilon_lower_bound_from_counts(tp, pos.size, fp, neg.size, delta=delta,
                                              significance=significance))
  details = {"test": f"P_{world}(score {'>=' if sign > 0 else '<='} t) vs P_{other[world]}",
             "threshold": sign * t,
             "holdout_true_positives": tp, "holdout_positives": int(pos.size),
             "holdout_false_positives": fp, "holdout_negatives": int(neg.size),
             "selection": "holdout (half the trials choose the test, half bound it)"}
  return eps, details
