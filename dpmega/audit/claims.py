"""What an audit compares with: the accountant's claimed ε and the exact ε of the Gaussian mechanism."""

from __future__ import annotations

import math
from fractions import Fraction

import scipy.optimize
import scipy.stats

from dpmega import validation


def gaussian_mechanism_epsilon(noise_multiplier: float, delta: float, sensitivity: float = 1.0) -> float:
  """Exact ε(δ) of one Gaussian mechanism: noise std ``noise_multiplier·C``, L2 sensitivity ``sensitivity·C``.

  Balle & Wang (2018), Theorem 8: with ``μ = sensitivity/σ``, the mechanism is
  (ε, δ)-DP iff ``Φ(μ/2 - ε/μ) - e^ε Φ(-μ/2 - ε/μ) <= δ``; this returns the
  smallest such ε >= 0 (solved with Brent's method).

  The sensitivity depends on the neighbouring relation: a clipped sum moves by
  at most C when one example is added or removed (``sensitivity=1``) but by up
  to 2C when one is replaced (``sensitivity=2``: ``g`` may become ``-g``), so the
  two relations do NOT give the same curve at the same σ
  (:attr:`dpmega.accounting.SamplingScheme.sensitivity`).

  Example:
    >>> round(gaussian_mechanism_epsilon(1.0, 1e-5), 3)
    4.377
    >>> round(gaussian_mechanism_epsilon(2.0, 1e-5, sensitivity=2.0), 3)  # replace-one at σ = 2
    4.377
  """
  sigma = validation.check_real("noise_multiplier", noise_multiplier, 0.0, math.inf, lo_open=True, hi_open=True)
  delta = validation.check_real("delta", delta, 0.0, 1.0, lo_open=True, hi_open=True)
  sensitivity = validation.check_real("sensitivity", sensitivity, 0.0, math.inf, lo_open=True, hi_open=True)
  mu = sensitivity / sigma
  norm = scipy.stats.norm

  def delta_of(eps: float) -> float:
    # e^ε Φ(b) computed in logs so that large ε does not overflow.
    a = norm.cdf(mu / 2 - eps / mu)
    b = math.exp(eps + norm.logcdf(-mu / 2 - eps / mu))
    return a - b

  if delta_of(0.0) <= delta:
    return 0.0
  hi = 1.0
  while delta_of(hi) > delta:
    hi *= 2.0
  return float(scipy.optimize.brentq(lambda e: delta_of(e) - delta, 0.0, hi, xtol=1e-10))


def ledger_sizes(sampling_rate: float | None) -> tuple[int, int]:
  """``(batch_size, dataset_size)`` whose ratio is the sampling rate (1 when None)."""
  if sampling_rate is None or sampling_rate == 1.0:
    return 1, 1
  frac = Fraction(sampling_rate).limit_denominator(10**9)
  if frac.numerator < 1:
    raise ValueError(f"sampling_rate must be >= 1e-9, got {sampling_rate=}.")
  return frac.numerator, frac.denominator


def claimed_epsilon(*, noise_multiplier: float, delta: float, sampling_rate: float | None = None,
                    steps: int = 1, accountant: str = "pld", sampling: str = "poisson") -> float:
  """The ε the library's accountant claims for ``steps`` sampled Gaussian steps.

  ``sampling_rate=None`` (or 1) is no subsampling: every example in every step.
  Computed by :func:`dpmega.accounting.compute_epsilon` on a
  :class:`dpmega.accounting.Ledger` with the scheme ``sampling``: ``"poisson"``
  (add/remove-one, sensitivity C) or ``"without_replacement"`` (replace-one,
  sensitivity 2C; PLD only without subsampling).
  """
  from dpmega import accounting  # pylint: disable=import-outside-toplevel

  sampling_rate = validation.check_real("sampling_rate", sampling_rate, 0.0, 1.0, lo_open=True, optional=True)
  batch_size, dataset_size = ledger_sizes(sampling_rate)
  ledger = accounting.Ledger()
  ledger.record(batch_size=batch_size, dataset_size=dataset_size, noise_multiplier=noise_multiplier,
                scheme=sampling, steps=steps)
  return float(accounting.compute_epsilon(ledger, delta, accountant=accountant))
