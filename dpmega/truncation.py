"""The privacy cost of a noise sampler's bounded support: the truncation term ``δ_tail``.

A floating-point Gaussian sampler cannot return every real number: its output
lies in ``[lo, hi]`` standard deviations (``jax.random.normal`` in float32:
``[-5.420, 5.220]``). An output beyond ``hi - Δ`` on the coordinate that one
example moves by ``Δ`` is then possible with that example and impossible
without it, which no accountant for the ideal Gaussian sees. This module bounds
what that costs, so that the δ a run reports covers the sampler that ran.

Model: each noise coordinate is ``N(0, 1)`` conditioned on the sampler's
support (the body's discretization is not modelled: ``docs/privacy.md``, known
limits). A step whose clipped sum has L2 sensitivity ``s·C`` (``s = 1``
add/remove-one, ``s = 2`` replace-one) and noise std ``σC`` moves the noise
vector by ``v`` with ``‖v‖₂ <= Δ = s/σ`` standard deviations.

Analysis (any support ``[-a, b]``, ``m = min(a, b)``): let ``G_t`` be the
outputs of step ``t`` that both neighbouring datasets can produce, given the
history. On ``G_t`` each step's density is the ideal Gaussian mechanism's
divided by the same constant ``Z₁^d`` (``Z₁ = Φ(b) - Φ(-a)``), whatever the
history, so on ``G = ∩ G_t`` the truncated pair's densities are the ideal
pair's times ``Z^-1``, ``Z = Z₁^(d·T)``. For any set ``S`` of outputs, with
``(ε, δ_ideal)`` the accountant's guarantee for the ideal (adaptively
composed, subsampled) Gaussian mechanism::

    P'(S) <= Z^-1·P(S ∩ G) + P'(G^c)
          <= Z^-1·(e^ε Q(S ∩ G) + δ_ideal) + P'(G^c)
           = e^ε Q'(S ∩ G) + Z^-1·δ_ideal + P'(G^c).

``P'(G^c)`` is at most ``Σ_t q_t · η_t`` (the target must be sampled for the
supports to differ), where ``η`` bounds the mass of the bad set::

    η(Δ, d, m) = min(1, min_t [ min(d, ⌊Δ²/t²⌋)·g(Δ) + √d·Δ·φ(m - t) ] / Z₁)

with ``g(x) = Φ(m) - Φ(m - x)`` and ``d`` noised coordinates (coordinates
moved by more than ``t`` are at most ``Δ²/t²``; the others add at most
``|v_i|·φ(m - t)`` each, and ``Σ|v_i| <= √d·Δ``). So

    δ_total <= δ_ideal(ε)/Z + Σ_t q_t · η(s/σ_t, d, m).

For the default wide-tail sampler (``m = 9.155``) ``1/Z - 1 ≈ 1.1e-19·d·T``
and ``η`` is below 1e-11 for ``σ >= 0.5`` and ``d <= 10^9``: negligible. For
``jax.random.normal`` (``[-5.420, 5.220]``) both terms are large beyond small
models: that sampler is kept only behind an explicit option.

References:
  Šidák 1967, "Rectangular confidence regions for the means of multivariate
  normal distributions", JASA 62(318).
  Mironov 2012, "On significance of the least significant bits for
  differential privacy", CCS (why floating-point noise needs care).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable

import numpy as np

__all__ = ["Support", "TailModel", "bad_mass", "tail_delta", "accountant_delta"]


def _norm():
  """``scipy.stats.norm``, imported on first use: importing the noise module must not load scipy."""
  from scipy import stats  # pylint: disable=import-outside-toplevel
  return stats.norm


@dataclasses.dataclass(frozen=True)
class Support:
  """The closed range ``[lo, hi]`` (standard deviations) of a noise sampler's output."""

  lo: float
  hi: float

  def __post_init__(self):
    if not (math.isfinite(self.lo) and math.isfinite(self.hi) and self.lo < 0 < self.hi):
      raise ValueError(f"a support needs finite lo < 0 < hi, got {self.lo=}, {self.hi=}.")

  @property
  def symmetric(self) -> bool:
    return -self.lo == self.hi

  @property
  def half_width(self) -> float:
    """``m = min(-lo, hi)``: the nearer edge."""
    return min(-self.lo, self.hi)

  @property
  def log_inv_mass(self) -> float:
    """``-log Z₁``: the log of the truncated density's factor over the ideal one, per coordinate."""
    return -math.log1p(-(float(_norm().sf(-self.lo)) + float(_norm().sf(self.hi))))


@dataclasses.dataclass(frozen=True)
class TailModel:
  """What ``δ_tail`` depends on besides the schedule: the sampler's support and how many coordinates get noise."""

  support: Support
  num_coordinates: int

  def __post_init__(self):
    if not (isinstance(self.num_coordinates, (int, np.integer)) and self.num_coordinates >= 1):
      raise ValueError(f"num_coordinates must be an integer >= 1, got {self.num_coordinates=!r}.")


def bad_mass(*, shift: float, num_coordinates: int, support: Support) -> float:
  """``η``: the largest probability that a shift of L2 norm ``shift`` (std units) leaves the support.

  Args:
    shift: ``Δ = sensitivity / (σ C)``, in standard deviations (``s / σ``).
    num_coordinates: ``d``, how many coordinates are noised.
    support: the sampler's support.

  Returns:
    An upper bound in ``[0, 1]`` (see the module docstring).

  Example:
    >>> bad_mass(shift=1.0, num_coordinates=10**9, support=Support(-9.1, 9.1)) < 1e-12
    True
  """
  if not shift >= 0:
    raise ValueError(f"shift must be >= 0, got {shift=}.")
  if shift == 0:
    return 0.0
  if math.isinf(shift):
    return 1.0
  m, d = support.half_width, int(num_coordinates)
  if shift >= m:
    return 1.0
  norm = _norm()
  z1 = 1.0 - float(norm.sf(-support.lo)) - float(norm.sf(support.hi))
  g = float(norm.sf(m - shift) - norm.sf(m))  # mass of (m - Δ, m]
  ts = shift * np.exp2(-np.arange(0, 64, 0.25))
  counts = np.minimum(float(d), np.floor(shift**2 / ts**2))
  bounds = counts * g + math.sqrt(d) * shift * norm.pdf(m - ts)
  return float(min(1.0, bounds.min() / z1))


def tail_delta(steps: Iterable[tuple[int, float, float]], *, sensitivity: float, tail: TailModel,
               accountant_delta: float = 0.0) -> float:
  """``δ_tail``: what the support adds to ``accountant_delta`` over ``steps``.

  Args:
    steps: ``(count, q, σ)`` for each group of identical steps.
    sensitivity: ``s``: 1 (add/remove-one) or 2 (replace-one), in units of C.
    tail: the sampler's support and the number of noised coordinates.
    accountant_delta: the δ the ideal-Gaussian accountant reports (scaled by
      ``1/Z``, the truncated density's factor).

  Returns:
    ``δ_total - accountant_delta`` (``inf`` when no bound holds).
  """
  total, log_inv_z = 0.0, 0.0
  for count, q, sigma in steps:
    if count == 0 or q == 0:
      continue
    shift = math.inf if sigma == 0 else sensitivity / sigma
    total += count * q * bad_mass(shift=shift, num_coordinates=tail.num_coordinates, support=tail.support)
    log_inv_z += count * tail.num_coordinates * tail.support.log_inv_mass
  if accountant_delta > 0:
    total += accountant_delta * math.expm1(log_inv_z) if log_inv_z < 700 else math.inf
  return total


def accountant_delta(delta: float, steps: Iterable[tuple[int, float, float]], *, sensitivity: float,
                     tail: TailModel) -> float:
  """The δ to give the ideal-Gaussian accountant so that the sampler that runs is ``(ε, delta)``-DP.

  Raises:
    ValueError: the truncation term alone is ``>= delta``.
  """
  steps = list(steps)
  eta = tail_delta(steps, sensitivity=sensitivity, tail=tail)
  if not eta < delta:
    raise ValueError(f"the noise sampler's bounded support alone costs delta_tail = {eta:.3g} >= delta = "
                     f"{delta:g}: use the default wide-tail sampler or a larger delta.")
  rest = delta - eta
  log_inv_z = sum(c * tail.num_coordinates * tail.support.log_inv_mass for c, q, _ in steps if c and q)
  out = rest * math.exp(-log_inv_z)
  if not out > 0:
    raise ValueError(f"the noise sampler's bounded support {tail.support} leaves no delta for the accountant "
                     f"over {sum(c for c, _, _ in steps)} steps of {tail.num_coordinates} coordinates: use the "
                     "default wide-tail sampler.")
  return out
