"""The smallest noise multiplier σ whose whole-schedule ε(δ) meets a target.

Brent's method on ``log σ``, as in ``dp_accounting.calibrate_dp_mechanism``,
over the event counts of the schedule (:mod:`dpmega.accounting.events`): every
evaluation composes each distinct batch size once with ``count=``, and for RDP
the curve of each distinct ``(q, σ)`` is cached, so no evaluation recomputes
another's. The σ returned is verified from scratch by a fresh dp-accounting
accountant.
"""

from __future__ import annotations

import math
from typing import Any

from dpmega import truncation
from dpmega import validation
from dpmega.accounting import events
from dpmega.accounting.accountants import DEFAULT_PLD_DISCRETIZATION
from dpmega.accounting.accountants import AccountantType
from dpmega.accounting.accountants import as_accountant
from dpmega.accounting.accountants import check_discretization
from dpmega.accounting.accountants import check_supported
from dpmega.errors import UsageError
from dpmega.sampling import SamplingScheme
from dpmega.sampling import as_scheme

__all__ = ["calibrate_noise_multiplier"]

_SIGMA_MIN = 1e-2
_SIGMA_MAX = 1e6


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, dataset_size: int,
                               batch_sizes: Any, scheme: SamplingScheme | str = "poisson",
                               accountant: AccountantType | str = "rdp",
                               num_steps: int | None = None,
                               pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                               q_grid: float | None = None,
                               rtol: float | None = None,
                               tail: truncation.TailModel | None = None) -> float:
  """Smallest σ whose whole-schedule ε(δ) is at most ``target_epsilon``.

  Guarantee: the returned σ is verified by recomputing ε of the full schedule
  at σ, and that ε is <= ``target_epsilon``; σ is within a relative ``rtol`` of
  the smallest such σ on the grid the root finder explores (Brent's method on
  log σ, as in ``dp_accounting.calibrate_dp_mechanism``). Every evaluation
  composes each distinct batch size once with ``count=``; for RDP, the curve of
  each distinct ``(q, σ)`` is cached, so no evaluation recomputes another's.
  For PLD the RDP answer seeds the bracket, so few PLD evaluations run.

  Args:
    target_epsilon: > 0.
    delta: in (0, 1).
    dataset_size: >= 1.
    batch_sizes: one batch size per step, or a schedule (object, spec string,
      dict or int) together with ``num_steps``.
    scheme: ``"poisson"`` or ``"without_replacement"``.
    accountant: ``"rdp"`` or ``"pld"``.
    num_steps: steps of the run when ``batch_sizes`` is a schedule.
    pld_discretization: PLD ``value_discretization_interval``.
    q_grid: off by default; see :func:`dpmega.accounting.plan.epsilon_for_schedule`
      (the σ returned then meets the target for the rounded-up, hence also the
      exact, schedule).
    rtol: relative tolerance on σ; default 1e-4 for RDP, 1e-3 for PLD (its ε
      moves in steps of the discretization, and each evaluation is costly).
    tail: the noise sampler's support and noised coordinates: the target is
      then met at ``delta`` with the sampler's ``δ_tail`` (which depends on σ)
      taken out of it first, as :func:`dpmega.accounting.compute_epsilon` reports it.

  Raises:
    UsageError: the target is unreachable for σ up to 1e6; the message gives
      the best achievable ε (and ``δ_tail`` when the tail alone exceeds δ).
    UnsupportedAccountingError: the accountant cannot account for the scheme.
    ValueError: any argument out of range (named), before any accounting.
  """
  from scipy import optimize  # pylint: disable=import-outside-toplevel

  target = events.check_epsilon(target_epsilon, "target_epsilon", allow_zero=False)
  delta = events.check_delta(delta)
  dataset_size = validation.check_int("dataset_size", dataset_size, 1, integral_floats=True)
  scheme = as_scheme(scheme)
  accountant = as_accountant(accountant)
  discretization = check_discretization(pld_discretization)
  if rtol is None:
    rtol = 1e-4 if accountant is AccountantType.RDP else 1e-3
  rtol = validation.check_real("rtol", rtol, 0, 0.1, lo_open=True, hi_open=True)
  tail = events.check_tail(tail)
  sizes, counts = events.size_counts(batch_sizes, num_steps, dataset_size)
  sizes, counts = events.bucket_up(sizes, counts, dataset_size, q_grid)
  check_supported(scheme, accountant, [(int(b), dataset_size) for b in sizes])
  if not counts.sum():
    return 0.0

  def counts_at(sigma: float) -> dict[tuple, int]:
    return {events.event_key(scheme, int(b), dataset_size, sigma): int(c) for b, c in zip(sizes, counts)}

  memo: dict[tuple[AccountantType, float], float] = {}

  def eps(sigma: float, kind: AccountantType = accountant) -> float:
    if (kind, sigma) not in memo:
      memo[(kind, sigma)] = events.epsilon_at(counts_at(sigma), delta, kind, discretization, tail)
    return memo[(kind, sigma)]

  def gap(log_sigma: float, kind: AccountantType = accountant) -> float:
    # Finite for Brent's method: ε is inf where δ_tail alone exceeds δ (a tail model, small σ).
    return min(eps(math.exp(log_sigma), kind) - target, 1e9)

  def unreachable(kind: AccountantType) -> UsageError:
    best = eps(_SIGMA_MAX, kind)
    why = ""
    if tail is not None and events.accountant_delta(delta, counts_at(_SIGMA_MAX), tail) is None:
      floor = truncation.tail_delta(events.tail_steps(counts_at(_SIGMA_MAX)), sensitivity=scheme.sensitivity,
                                    tail=tail)
      why = (f" The noise sampler's bounded support alone costs delta_tail >= {floor:.3g} over "
             f"{tail.num_coordinates} noised coordinates: use the wide-tail sampler or a larger delta.")
    return UsageError(
        f"target_epsilon={target_epsilon} is unreachable: even noise_multiplier="
        f"{_SIGMA_MAX:g} gives epsilon={best:.6g} ({kind.value}, delta={delta:g}); "
        f"the best achievable here is about {best:.6g}.{why}")

  def bracket(kind: AccountantType, guess: float) -> tuple[float | None, float]:
    """(lo, hi) in log σ with gap(lo) > 0 >= gap(hi) (lo None: σ = _SIGMA_MIN meets the target), or raises."""
    hi = math.log(guess)
    if gap(hi, kind) > 0:
      step = math.log(2.0)
      while gap(hi, kind) > 0:
        lo, hi = hi, hi + step
        step *= 2
        if hi > math.log(_SIGMA_MAX):
          raise unreachable(kind)
      return lo, hi
    # PLD is usually a few % below RDP: a first step of 10% brackets it at once.
    lo, step = hi, math.log(1 / 0.9)
    while gap(lo, kind) <= 0:
      hi, lo = lo, lo - step
      step *= 2
      if lo < math.log(_SIGMA_MIN):
        return None, hi  # even σ = _SIGMA_MIN meets the target
    return lo, hi

  def solve(kind: AccountantType, guess: float, tol: float) -> float:
    lo, hi = bracket(kind, guess)
    if lo is None:
      return math.exp(hi)
    root = optimize.brentq(lambda x: gap(x, kind), lo, hi, xtol=tol / 4)
    # Keep the feasible side: step towards hi until ε(σ) <= target.
    x = root
    while gap(x, kind) > 0:
      x = min(x + tol / 4, hi)
    return math.exp(x)

  sigma = solve(AccountantType.RDP, 1.0, min(rtol, 1e-4))
  if accountant is AccountantType.PLD:
    sigma = solve(AccountantType.PLD, sigma, rtol)
  # Verify from scratch: a fresh dp-accounting accountant, no cache involved.
  fresh = events.fresh_accountant(scheme, accountant, discretization)
  for key, c in counts_at(sigma).items():
    with events.summarised_absl_warnings(events.key_event(key)):
      fresh.compose(events.key_event(key), c)
  acc_delta = events.accountant_delta(delta, counts_at(sigma), tail)
  final = math.inf if acc_delta is None else fresh.get_epsilon(acc_delta)
  if not final <= target:
    raise RuntimeError(f"calibration failed verification: epsilon({sigma}) = {final} > {target}.")
  return sigma
