"""RDP upper bounds of one step summed from positive terms: what stands in when dp-accounting's ε rounds to 0.

dp-accounting computes the RDP of a Poisson-sampled Gaussian at an integer
order α as ``log(A_α) / (α - 1)`` with (Mironov, Talwar, Zhang 2019, Sec. 3.3)

    A_α = Σ_{k=0..α} C(α, k) (1 - q)^(α-k) q^k exp(k (k - 1) / (2 s²))

(``s``: noise std over sensitivity). At a huge ``s`` (≳ 1e5), ``A_α - 1`` is
near or below float64's resolution of 1, so ``log(A_α)`` comes out wrong by up
to 100% and at some orders exactly 0. ``compute_epsilon`` then reads an RDP of
0 as "KL divergence below δ²" and returns ε = 0 whatever the number of steps:
a guarantee the mechanism does not have. Here the binomial weights sum to 1,
so

    A_α - 1 = Σ_{k=2..α} C(α, k) (1 - q)^(α-k) q^k expm1(k (k - 1) / (2 s²)),

a sum of non-negative terms: summed in log space, no cancellation, relative
error far below the margin ``_MARGIN`` every value is raised by.

======================================  ==========================================================  ========
step                                    RDP at integer order α (upper bound)                        how
======================================  ==========================================================  ========
Poisson, ``q < 1``                      ``log1p(A_α - 1) / (α - 1)``                                exact
every batch the whole dataset (q = 1)   ``α / (2 s²)``                                              exact
without replacement, ``q = B/N < 1``    ``log1p(q expm1(α (α - 1) / (2 s²))) / (α - 1)``            bound
======================================  ==========================================================  ========

The last row: conditioned on the batch, the step is the Gaussian when the
changed example is in it (probability ``q``) and output-identical otherwise, so
``P = Σ w_i P_i``, ``Q = Σ w_i Q_i`` with common weights, and
``E_Q[(dP/dQ)^α]`` is jointly convex (a perspective): ``A_α <= 1 - q + q
exp(α (α - 1) / (2 s²))``.

ε = 0 from these curves is a proof: RDP at any order >= 1 bounds the KL
divergence, and ``TV <= sqrt(1 - exp(-KL))`` (Bretagnolle-Huber), which is the
test ``compute_epsilon`` applies (``δ² > 1 - exp(-r)``).

Example:
  >>> r = step_rdp("poisson", q=1e-4, noise_multiplier=1e6)
  >>> bool(abs(r[0] / 1e-20 - 1) < 1e-4)   # α = 2: log1p(q² expm1(1/s²)), about q²/s²
  True
  >>> epsilon([("poisson", 1e-4, 1e6, 1000)], delta=1e-12) > 0   # dp-accounting's RDP gives 0 here
  True
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings
from typing import Iterable

from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np
from scipy import special

__all__ = ["ORDERS", "EpsilonRoundingWarning", "step_rdp", "total_rdp", "total_variation", "epsilon", "delta",
           "negative_rdp_unlogged"]

# The integer orders of dp-accounting's DEFAULT_RDP_ORDERS (the formulas above are for integer α).
ORDERS = tuple(range(2, 64)) + (128, 256, 512, 1024)

# Relative: the log-space sums below are exact to ~1e-11 relative (|log terms| <= ~3e4 at 1e-16 each).
_MARGIN = 1e-6


class EpsilonRoundingWarning(UserWarning):
  """dp-accounting's ε rounded to 0 (a huge σ); the ε given instead is a sound bound summed without rounding."""


class _NegativeRdp(logging.Filter):
  def filter(self, record: logging.LogRecord) -> bool:
    return "Negative Renyi divergence" not in record.getMessage()


@contextlib.contextmanager
def negative_rdp_unlogged():
  """Drops, in scope, dp-accounting's "Negative Renyi divergence ... Returning an epsilon of zero" log lines
  (callers replace that 0 with :func:`epsilon`)."""
  absl_logger, drop = logging.getLogger("absl"), _NegativeRdp()
  absl_logger.addFilter(drop)
  try:
    yield
  finally:
    absl_logger.removeFilter(drop)


def _log_expm1(x: np.ndarray) -> np.ndarray:
  """``log(exp(x) - 1)`` for ``x > 0``, without overflow or cancellation."""
  return x + np.log(-np.expm1(-x))


def _log_a_minus_1_poisson(q: float, s: float, alpha: int) -> float:
  k = np.arange(2, alpha + 1, dtype=np.float64)
  log_terms = (special.gammaln(alpha + 1.0) - special.gammaln(k + 1) - special.gammaln(alpha - k + 1)
               + k * math.log(q) + (alpha - k) * math.log1p(-q) + _log_expm1(k * (k - 1) / (2 * s * s)))
  return float(special.logsumexp(log_terms))


@functools.lru_cache(maxsize=1 << 12)
def step_rdp(scheme: str, q: float, noise_multiplier: float) -> np.ndarray:
  """Upper bound on one step's RDP at :data:`ORDERS` (module table), raised by a relative margin.

  Args:
    scheme: ``"poisson"`` or ``"without_replacement"``.
    q: the probability that one example is in the batch, in (0, 1].
    noise_multiplier: the noise std over the step's L2 sensitivity (dp-accounting's noise multiplier), > 0.

  Returns:
    A read-only float64 array, one value per order, each >= 0 (inf where it overflows).
  """
  if scheme not in ("poisson", "without_replacement"):
    raise ValueError(f"scheme must be 'poisson' or 'without_replacement', got scheme={scheme!r}.")
  if not 0 < q <= 1:
    raise ValueError(f"q must be in (0, 1], got q={q!r}.")
  if not 0 < noise_multiplier < math.inf:
    raise ValueError(f"noise_multiplier must be positive and finite, got noise_multiplier={noise_multiplier!r}.")
  s = float(noise_multiplier)
  alphas = np.asarray(ORDERS, np.float64)
  if q == 1:
    rdp = alphas / (2 * s * s)
  elif scheme == "poisson":
    log_am1 = np.array([_log_a_minus_1_poisson(q, s, a) for a in ORDERS])
    rdp = np.logaddexp(0.0, log_am1) / (alphas - 1)
  else:
    log_am1 = math.log(q) + _log_expm1(alphas * (alphas - 1) / (2 * s * s))
    rdp = np.logaddexp(0.0, log_am1) / (alphas - 1)
  rdp = rdp * (1 + _MARGIN)
  rdp.setflags(write=False)
  return rdp


def total_rdp(steps: Iterable[tuple[str, float, float, int]]) -> np.ndarray:
  """Σ count · :func:`step_rdp` over ``steps`` = ``(scheme, q, noise_multiplier, count)`` (RDP composes by sum)."""
  total = np.zeros(len(ORDERS))
  for scheme, q, noise_multiplier, count in steps:
    total = total + int(count) * step_rdp(scheme, q, noise_multiplier)
  return total


def total_variation(steps: Iterable[tuple[str, float, float, int]]) -> float:
  """Upper bound on the total variation distance of ``steps`` run on neighbouring datasets.

  One step is the Gaussian of shift 1 and std ``s`` (the noise multiplier) with probability ``q`` and identical
  outputs otherwise, so its distance is at most ``q erf(1 / (2 sqrt(2) s))`` (convexity); distances of an
  (adaptive) composition add up. At most ``delta`` means (0, ``delta``)-DP.
  """
  return (1 + _MARGIN) * sum(int(c) * q * math.erf(1 / (2 * math.sqrt(2) * s)) for _, q, s, c in steps)


def epsilon(steps: Iterable[tuple[str, float, float, int]], delta: float, *, replaces: float | None = None) -> float:
  """ε(``delta``) of ``steps`` from :func:`total_rdp`, by dp-accounting's conversion (Canonne, Kamath, Steinke 2020,
  Prop. 12; and 0 where ``δ² > 1 - exp(-r)``: Bretagnolle-Huber, a proof since ``r`` bounds the KL divergence),
  or 0 where :func:`total_variation` is at most ``delta``.

  Args:
    steps: ``(scheme, q, noise_multiplier, count)`` groups.
    delta: in (0, 1).
    replaces: the accountant's ε this value stands in for (an :class:`EpsilonRoundingWarning` when this one is > 0).

  Raises:
    ArithmeticError: the result is not a number >= 0 (so that nothing unsound is ever printed instead).
  """
  steps = list(steps)
  if total_variation(steps) <= delta:
    return 0.0
  value = float(rdp_privacy_accountant.compute_epsilon(ORDERS, total_rdp(steps), delta)[0])
  if not value >= 0:
    raise ArithmeticError(f"no sound epsilon at delta={delta:g}: the accountant gave {replaces!r} and the "
                          f"positive-term RDP bound gave {value!r}.")
  if replaces is not None and value > 0:
    warnings.warn("dp-accounting's epsilon rounded to 0 at a very large noise multiplier; the epsilon given is a "
                  "sound RDP bound summed without rounding (dpmega.accounting.tiny_rdp).", EpsilonRoundingWarning, 4)
  return value


def delta(steps: Iterable[tuple[str, float, float, int]], epsilon_: float) -> float:
  """δ(``epsilon_``) of ``steps`` from :func:`total_rdp` (> 0; ArithmeticError otherwise)."""
  value = float(rdp_privacy_accountant.compute_delta(ORDERS, total_rdp(steps), epsilon_)[0])
  if not value > 0:
    raise ArithmeticError(f"no sound delta at epsilon={epsilon_:g}: the positive-term RDP bound gave {value!r}.")
  return value
