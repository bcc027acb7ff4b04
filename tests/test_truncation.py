"""dpmega.truncation: the bad mass and δ_tail of a bounded noise sampler, against direct computations."""

import itertools
import math

import numpy as np
import pytest
from scipy import stats

from dpmega import noise
from dpmega import truncation
from dpmega.truncation import Support, TailModel, accountant_delta, bad_mass, tail_delta

WIDE = noise.sampler_support("wide_tail")
BOUNDED = noise.sampler_support("jax_bounded")
MNIST = [(14_063, 256 / 60_000, 1.1)]  # the README's example: T steps of (q, sigma)


def _g(x, m):
  """Phi(m) - Phi(m - x): the mass of the last x standard deviations below the edge m."""
  return stats.norm.sf(m - np.asarray(x, np.float64)) - stats.norm.sf(m)


def _z1(support):
  return 1.0 - stats.norm.sf(-support.lo) - stats.norm.sf(support.hi)


def _exact_worst_small_d(shift, d, support, n=400):
  """max over ||v|| = shift of P(some coordinate leaves the support) (union), by a grid on the sphere's octant."""
  m = support.half_width
  if d == 1:
    return float(_g(shift, m) / _z1(support))
  angles = np.linspace(0, np.pi / 2, n)
  if d == 2:
    v = np.stack([np.cos(angles), np.sin(angles)], -1)
  else:
    a, b = np.meshgrid(angles, angles)
    v = np.stack([np.cos(a) * np.cos(b), np.cos(a) * np.sin(b), np.sin(a)], -1).reshape(-1, 3)
  return float(_g(shift * v, m).sum(-1).max() / _z1(support))


def _exact_worst_two_levels(shift, d, support):
  """The same max for large d: at the optimum the non-zero |v_i| take at most two values (the Lagrange condition
  phi(m - x) = 2 lambda x has at most two roots), so search k coordinates at a and l at b, k a^2 + l b^2 = shift^2."""
  m = support.half_width
  ks = np.unique(np.concatenate([np.arange(1, 9), np.geomspace(1, d, 60).astype(np.int64)]))
  ks = ks[ks <= d]
  best = 0.0
  for k in ks:
    a = shift / math.sqrt(k) * np.linspace(0, 1, 201)[1:]  # k coordinates at a
    rest = shift**2 - k * a**2
    ls = ks[ks <= d - k][:, None] if k < d else np.array([[0]])
    b = np.sqrt(np.maximum(rest[None, :], 0) / np.maximum(ls, 1))
    total = k * _g(a, m)[None, :] + ls * _g(b, m)
    best = max(best, float(total.max()))
  return best / _z1(support)


# ----------------------------------------------------------------------------- bad_mass against direct maxima


@pytest.mark.parametrize("d", [1, 2, 3])
@pytest.mark.parametrize("shift", [0.1, 0.5, 1 / 1.1, 2.0, 3.5])
@pytest.mark.parametrize("m", [float(WIDE.hi), 5.22, 4.0])
def test_bad_mass_bounds_the_brute_force_worst_shift_and_is_tight_for_small_d(d, shift, m):
  support = Support(-m, m)
  exact = _exact_worst_small_d(shift, d, support)
  bound = bad_mass(shift=shift, num_coordinates=d, support=support)
  assert bound >= exact * (1 - 1e-9), (bound, exact)
  # A useful bound, not just a true one: within d + 1 (it charges g(shift) to every coordinate when d is small).
  assert bound <= (d + 1) * exact, (bound, exact)


@pytest.mark.parametrize("d", [10, 10**3, 10**6, 10**9])
@pytest.mark.parametrize("shift", [0.05, 1 / 1.1, 2.0])
@pytest.mark.parametrize("support", [WIDE, Support(-6.0, 6.0)], ids=["wide", "m6"])
def test_bad_mass_bounds_the_worst_shift_for_large_d(d, shift, support):
  exact = _exact_worst_two_levels(shift, d, support)
  bound = bad_mass(shift=shift, num_coordinates=d, support=support)
  assert bound >= exact * (1 - 1e-9), (bound, exact)
  assert bound <= 30 * exact, (bound, exact)


def test_bad_mass_is_monotone():
  shifts = np.linspace(0.01, 5, 60)
  by_shift = [bad_mass(shift=s, num_coordinates=1000, support=WIDE) for s in shifts]
  assert np.all(np.diff(by_shift) >= 0)
  by_d = [bad_mass(shift=0.9, num_coordinates=d, support=WIDE) for d in (1, 10, 10**3, 10**6, 10**9, 10**12)]
  assert np.all(np.diff(by_d) >= 0)
  by_m = [bad_mass(shift=0.9, num_coordinates=10**6, support=Support(-m, m)) for m in np.linspace(4, 9.5, 30)]
  assert np.all(np.diff(by_m) <= 0)


@pytest.mark.parametrize("shift, want", [(0.0, 0.0), (math.inf, 1.0), (float(WIDE.hi), 1.0), (20.0, 1.0)])
def test_bad_mass_edge_cases(shift, want):
  assert bad_mass(shift=shift, num_coordinates=5, support=WIDE) == want


@pytest.mark.parametrize("bad", [-1.0, math.nan])
def test_bad_mass_rejects_a_negative_or_nan_shift(bad):
  with pytest.raises(ValueError, match="shift"):
    bad_mass(shift=bad, num_coordinates=5, support=WIDE)


# ----------------------------------------------------------------------------- tail_delta and accountant_delta


def test_tail_delta_is_the_sum_of_q_times_bad_mass_when_the_accountant_delta_is_zero():
  steps = [(100, 0.01, 1.0), (50, 0.02, 0.8), (0, 0.5, 0.1), (10, 0.0, 0.1)]
  tail = TailModel(Support(-6.0, 6.0), 10**4)
  want = sum(c * q * _exact_worst_two_levels(1 / s, 10**4, tail.support) for c, q, s in steps if c and q)
  got = tail_delta(steps, sensitivity=1, tail=tail)
  assert want <= got <= 30 * want
  direct = sum(c * q * bad_mass(shift=1 / s, num_coordinates=10**4, support=tail.support) for c, q, s in steps[:2])
  assert got == pytest.approx(direct, rel=1e-12)
  assert tail_delta(steps, sensitivity=2, tail=tail) > got  # replace-one moves twice as far


@pytest.mark.parametrize("support", [Support(-5.0, 4.5), Support(-5.0, 5.0)])
def test_tail_delta_scales_the_accountant_delta_by_the_lost_mass(support):
  d, steps = 3, [(20, 0.1, 2.0)]
  eta = 20 * 0.1 * bad_mass(shift=0.5, num_coordinates=d, support=support)
  z = (stats.norm.cdf(support.hi) - stats.norm.cdf(support.lo)) ** (20 * d)  # the truncated density's constant over the run
  got = tail_delta(steps, sensitivity=1, tail=TailModel(support, d), accountant_delta=1e-6)
  assert got == pytest.approx(eta + 1e-6 * (1 / z - 1), rel=1e-9)


@pytest.mark.parametrize("support, d, steps", [(WIDE, 10**9, MNIST), (Support(-6.0, 6.0), 10**5, [(100, 0.01, 2.0)]),
                                               (BOUNDED, 10, [(10, 0.01, 3.0)])])
def test_accountant_delta_leaves_exactly_the_target_delta(support, d, steps):
  tail, delta = TailModel(support, d), 1e-5
  inner = accountant_delta(delta, steps, sensitivity=1, tail=tail)
  assert 0 < inner < delta
  assert inner + tail_delta(steps, sensitivity=1, tail=tail, accountant_delta=inner) == pytest.approx(delta,
                                                                                                       rel=1e-9)


def test_tail_delta_grows_with_steps_and_q_and_falls_with_sigma():
  tail = TailModel(Support(-6.0, 6.0), 10**5)
  f = lambda c, q, s: tail_delta([(c, q, s)], sensitivity=1, tail=tail)
  assert f(100, 0.01, 1.0) < f(200, 0.01, 1.0) and f(100, 0.01, 1.0) < f(100, 0.02, 1.0)
  assert f(100, 0.01, 1.0) > f(100, 0.01, 1.5) > f(100, 0.01, 3.0)
  assert f(100, 0.01, 0.0) == pytest.approx(100 * 0.01)  # no noise: every sampled step is a bad one


# ----------------------------------------------------------------------------- the issue's numbers


def test_jax_bounded_has_the_issue_delta_floor_and_wide_tail_does_not():
  # Direct lower bound on the real delta of jax.random.normal: one coordinate moved by 1/sigma lands beyond the
  # support's top with probability P(Z > 5.22 - 1/sigma) - P(Z > 5.22), at each of T steps with probability q.
  count, q, sigma = MNIST[0]
  floor = count * q * (stats.norm.sf(BOUNDED.hi - 1 / sigma) - stats.norm.sf(BOUNDED.hi))
  assert floor > 4.8e-4
  assert tail_delta(MNIST, sensitivity=1, tail=TailModel(BOUNDED, 1)) >= floor
  with pytest.raises(ValueError, match="delta_tail"):
    accountant_delta(1e-5, MNIST, sensitivity=1, tail=TailModel(BOUNDED, 669_706))
  for d in (1, 669_706, 10**9):
    wide = tail_delta(MNIST, sensitivity=1, tail=TailModel(WIDE, d))
    assert count * q * _g(1 / sigma, WIDE.hi) <= wide < 2e-12, d


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("lo, hi", [(0.0, 1.0), (-1.0, 0.0), (1.0, 2.0), (-math.inf, 3.0), (-1.0, math.nan)])
def test_support_rejects_a_range_not_around_zero(lo, hi):
  with pytest.raises(ValueError, match="lo < 0 < hi"):
    Support(lo, hi)


@pytest.mark.parametrize("bad", [0, -1, 2.0, "3"])
def test_tail_model_rejects_a_bad_coordinate_count(bad):
  with pytest.raises(ValueError, match="num_coordinates"):
    TailModel(WIDE, bad)


def test_support_properties():
  assert Support(-2.0, 3.0).half_width == 2.0 and not Support(-2.0, 3.0).symmetric
  for lo, hi in itertools.product([-3.0, -9.0], [3.0, 9.0]):
    s = Support(lo, hi)
    assert s.log_inv_mass == pytest.approx(-math.log(stats.norm.cdf(hi) - stats.norm.cdf(lo)), rel=1e-9)
  assert truncation.__all__ == ["Support", "TailModel", "bad_mass", "tail_delta", "accountant_delta"]
