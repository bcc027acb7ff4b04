"""PLDs of Poisson-subsampled Gaussian steps, built as dp-accounting builds them, on whole arrays.

dp-accounting's ``PLDAccountant`` builds each Poisson-subsampled Gaussian step's privacy loss distribution
(``from_gaussian_mechanism``) from the mechanism's hockey-stick divergence on a grid of privacy losses, and it
inverts the privacy loss one grid point at a time in Python: about 10^5 points for each of the add and the remove
side at a typical σ, so ~1 s per distinct step. A batch-size ramp has one distinct step per batch size (the
tiny-BERT reference run: 120, five minutes of PLD). :class:`_ArrayGaussianLoss` is dp-accounting's
``GaussianPrivacyLoss`` with that inversion done on the whole grid at once, with the same formulas, branches and
order of operations (only the elementwise ``log``/``exp`` may round differently in the last bit, as numpy's
vector loops may); everything else (the grid, truncation, pessimistic rounding, connect-the-dots, composition) is
dp-accounting's own code. :func:`compose` mirrors ``PLDAccountant`` event by event, with one exception: a step
that occurs once is composed as it is, where the accountant calls ``self_compose(1)``, which convolves nothing,
moves ``1e-15`` of mass to ``+inf`` and round-trips the distribution through an FFT (half of the remaining time
on a ramp). So on a ramp ε is at most the accountant's and within ~1e-7 relative of it; bit for bit when every step
repeats.
"""

from __future__ import annotations

import math
import numbers

import dp_accounting
import numpy as np
from dp_accounting.pld import privacy_loss_distribution as pld_lib
from dp_accounting.pld import privacy_loss_mechanism as mech

_ADD, _REMOVE = mech.AdjacencyType.ADD, mech.AdjacencyType.REMOVE


class _ArrayGaussianLoss(mech.GaussianPrivacyLoss):
  """``GaussianPrivacyLoss`` whose ``get_delta_for_epsilon`` inverts the privacy loss on the whole array."""

  def _isclose(self, a: np.ndarray, b: float) -> np.ndarray:  # math.isclose's default rule, elementwise
    return np.abs(a - b) <= 1e-9 * np.maximum(np.abs(a), abs(b))

  def _log_a_exp_b_plus_c(self, b: np.ndarray) -> np.ndarray:
    """``common.log_a_times_exp_b_plus_c(1 / q, b, 1 - 1 / q)`` elementwise (``0 < q < 1``: a > 0 > c)."""
    a, c = 1 / self.sampling_prob, 1 - 1 / self.sampling_prob
    d = b + np.log(a)
    log_c = np.log(-c)
    if np.any(log_c >= d[b != 0]):
      raise ValueError(f"a must be greater than b: log(-c) = {log_c} >= some d.")
    out = d + np.log1p(-np.exp(log_c - d))
    return np.where(b == 0, np.log(a + c), out)

  def _inverse_remove_unsampled(self, privacy_loss: np.ndarray) -> np.ndarray:
    return -0.5 * self.sensitivity - privacy_loss * (self._standard_deviation ** 2) / self.sensitivity

  def _inverse(self, privacy_loss: np.ndarray) -> np.ndarray:
    """``inverse_privacy_loss`` elementwise, for ADD or REMOVE with ``0 < q < 1``."""
    q = self.sampling_prob
    if self.adjacency_type is _ADD:
      edge = -math.log(1 - q)
      close = self._isclose(privacy_loss, edge)
      if np.any(~close & (privacy_loss > edge)):
        raise ValueError(f"privacy_loss is larger than -log(1 - sampling_prob) ({edge}).")
      unsampled = -self._log_a_exp_b_plus_c(np.where(close, 0.0, -privacy_loss))
      return np.where(close, -math.inf, self.sensitivity + self._inverse_remove_unsampled(unsampled))
    edge = math.log(1 - q)
    close = self._isclose(privacy_loss, edge)
    if np.any(~close & (privacy_loss <= edge)):
      raise ValueError(f"privacy_loss is smaller than log(1 - sampling_prob) ({edge}).")
    unsampled = self._log_a_exp_b_plus_c(np.where(close, 0.0, privacy_loss))
    return np.where(close, math.inf, self._inverse_remove_unsampled(unsampled))

  def get_delta_for_epsilon(self, epsilon):
    vectorized = self.adjacency_type in (_ADD, _REMOVE) and 0 < self.sampling_prob < 1
    if isinstance(epsilon, numbers.Number) or not vectorized:
      return super().get_delta_for_epsilon(epsilon)
    epsilons = np.asarray(epsilon)
    deltas = np.zeros_like(epsilons, dtype=float)
    if self.adjacency_type is _ADD:
      inverse_indices = epsilons < -math.log1p(-self.sampling_prob)
    else:
      inverse_indices = epsilons > math.log1p(-self.sampling_prob)
      other = np.logical_not(inverse_indices)
      deltas[other] = -np.expm1(epsilons[other])
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
      x_cutoffs = self._inverse(epsilons[inverse_indices])
    deltas[inverse_indices] = (self.mu_upper_cdf(x_cutoffs)
                               - np.exp(epsilons[inverse_indices] + self.mu_lower_log_cdf(x_cutoffs)))
    return np.clip(deltas, 0, 1)


def subsampled_gaussian(sigma: float, q: float, discretization: float) -> pld_lib.PrivacyLossDistribution:
  """``from_gaussian_mechanism(sigma, sampling_prob=q)`` with the add/remove relation, as PLDAccountant calls it."""
  def one(adjacency):
    return pld_lib._create_pld_pmf_from_monotone_privacy_loss(  # pylint: disable=protected-access
        _ArrayGaussianLoss(sigma, sensitivity=1, pessimistic_estimate=True, sampling_prob=q,
                           adjacency_type=adjacency),
        pessimistic_estimate=True, value_discretization_interval=discretization, use_connect_dots=True)
  if q == 1.0:
    return pld_lib.PrivacyLossDistribution(one(_REMOVE))
  return pld_lib.PrivacyLossDistribution(one(_REMOVE), one(_ADD))


class Composed:
  """A composed PLD with the two queries of ``PLDAccountant`` (ε at δ, δ at ε); ``inf``/1 with a σ = 0 step."""

  def __init__(self, pld: pld_lib.PrivacyLossDistribution, non_private: bool):
    self._pld, self._non_private = pld, non_private

  def get_epsilon(self, delta: float) -> float:
    return math.inf if self._non_private else self._pld.get_epsilon_for_delta(delta)

  def get_delta(self, epsilon: float) -> float:
    return 1.0 if self._non_private else self._pld.get_delta_for_epsilon(epsilon)


def compose(events: list[tuple[dp_accounting.DpEvent, int]], discretization: float) -> Composed:
  """``PLDAccountant(ADD_OR_REMOVE_ONE, discretization)`` after ``compose(event, count)`` for each pair.

  The events are what :func:`dpmega.accounting.events.key_event` makes: ``PoissonSampledDpEvent`` of a
  ``GaussianDpEvent`` (built here, on arrays) or a plain ``GaussianDpEvent`` (dp-accounting's own builder, as
  the accountant calls it). Anything else is refused as the accountant refuses it.
  """
  relation = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  pld, non_private = pld_lib.identity(value_discretization_interval=discretization), False
  for event, count in events:
    if isinstance(event, dp_accounting.PoissonSampledDpEvent) and isinstance(event.event,
                                                                             dp_accounting.GaussianDpEvent):
      if event.sampling_probability == 0:
        continue
      if event.event.noise_multiplier == 0:
        non_private = True
        continue
      step = subsampled_gaussian(event.event.noise_multiplier, event.sampling_probability, discretization)
      pld = pld.compose(step if count == 1 else step.self_compose(count))
    elif isinstance(event, dp_accounting.GaussianDpEvent):
      if event.noise_multiplier == 0:
        non_private = True
        continue
      pld = pld.compose(pld_lib.from_gaussian_mechanism(
          standard_deviation=event.noise_multiplier / math.sqrt(count),
          value_discretization_interval=discretization, neighboring_relation=relation))
    else:
      raise dp_accounting.UnsupportedEventError(f"PLD of {event} is not supported here.")
  return Composed(pld, non_private)
