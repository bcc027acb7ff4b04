"""dpmega.accounting.pld: the array-built PLDs equal dp-accounting's own, and compose as PLDAccountant does."""

import math

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.pld import privacy_loss_mechanism as mech
import numpy as np
import pytest

from dpmega.accounting import pld

CASES = [(0.8167, 256 / 16278), (1.1, 256 / 60000), (0.5, 0.3), (5.0, 0.9), (0.3, 1e-6), (2.0, 0.999)]


def _grid(q):
  # The PLD builder's grid, widened, plus the branch points: +-log(1-q) (the add/remove edges, either spelling)
  # and their float neighbours, 0 and -0.
  edges = [math.log1p(-q), -math.log1p(-q), math.log(1 - q), -math.log(1 - q)]
  near = [np.nextafter(e, s) for e in edges for s in (-math.inf, math.inf)]
  return np.concatenate([np.arange(-200_000, 200_000) * 1e-4, edges, near, [0.0, -0.0]])


@pytest.mark.parametrize("sigma,q", CASES)
@pytest.mark.parametrize("adjacency", [mech.AdjacencyType.ADD, mech.AdjacencyType.REMOVE])
def test_hockey_stick_divergence_is_bit_equal_to_dp_accountings(sigma, q, adjacency):
  theirs = mech.GaussianPrivacyLoss(sigma, sampling_prob=q, adjacency_type=adjacency)
  ours = pld._ArrayGaussianLoss(sigma, sampling_prob=q, adjacency_type=adjacency)
  eps = _grid(q)
  np.testing.assert_array_equal(ours.get_delta_for_epsilon(eps), theirs.get_delta_for_epsilon(eps))
  assert ours.get_delta_for_epsilon(0.5) == theirs.get_delta_for_epsilon(0.5)  # scalars: dp-accounting's path


@pytest.mark.parametrize("sigma,q", CASES[:4])
def test_subsampled_gaussian_pld_is_dp_accountings(sigma, q):
  theirs = pld_lib.from_gaussian_mechanism(sigma, value_discretization_interval=1e-4, sampling_prob=q)
  ours = pld.subsampled_gaussian(sigma, q, 1e-4)
  eps = np.linspace(0, 10, 101)
  np.testing.assert_array_equal(ours.get_delta_for_epsilon(eps), theirs.get_delta_for_epsilon(eps))
  for delta in (1e-5, 1e-9):
    assert ours.get_epsilon_for_delta(delta) == theirs.get_epsilon_for_delta(delta)


def _accountant(events):
  acc = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
  for event, count in events:
    acc.compose(event, count)
  return acc


def _poisson(q, sigma):
  return dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))


def test_repeated_steps_compose_bit_for_bit_as_the_accountant():
  events = [(_poisson(0.01, 1.1), 500), (_poisson(0.04, 1.1), 100), (dp_accounting.GaussianDpEvent(40.0), 3),
            (_poisson(0.0, 1.1), 7)]
  ours, theirs = pld.compose(events, 1e-4), _accountant(events)
  for delta in (1e-5, 1e-8):
    assert ours.get_epsilon(delta) == theirs.get_epsilon(delta)
  assert ours.get_delta(1.0) == theirs.get_delta(1.0)


def test_a_ramp_of_distinct_steps_agrees_with_the_accountant():
  # Each step occurs once: composed without the accountant's self_compose(1), which only adds 1e-15 of mass at
  # +inf (and an FFT round trip): so ours is at most the accountant's, and within 1e-6 relative (measured 5e-8).
  events = [(_poisson(q, 2.0), 1) for q in np.geomspace(0.01, 0.08, 6)]
  ours, theirs = pld.compose(events, 1e-4), _accountant(events)
  for delta in (1e-5, 1e-8):
    assert ours.get_epsilon(delta) == pytest.approx(theirs.get_epsilon(delta), rel=1e-6)
    assert 0 < ours.get_epsilon(delta) <= theirs.get_epsilon(delta) + 1e-12
  assert ours.get_delta(0.5) == pytest.approx(theirs.get_delta(0.5), rel=1e-6, abs=1e-14)


def test_a_noiseless_step_makes_epsilon_infinite_and_other_events_are_refused():
  for noiseless in (_poisson(0.01, 0.0), dp_accounting.GaussianDpEvent(0.0)):
    composed = pld.compose([(_poisson(0.01, 1.0), 10), (noiseless, 1)], 1e-4)
    assert composed.get_epsilon(1e-5) == math.inf and composed.get_delta(3.0) == 1.0
  wor = dp_accounting.SampledWithoutReplacementDpEvent(100, 10, dp_accounting.GaussianDpEvent(1.0))
  with pytest.raises(dp_accounting.UnsupportedEventError):
    pld.compose([(wor, 1)], 1e-4)
