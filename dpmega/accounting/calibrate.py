"""The smallest noise multiplier σ whose whole-schedule ε(δ) meets a target.

Brent's method on ``log σ``, as in ``dp_accounting.calibrate_dp_mechanism``,
over the event counts of the schedule (:mod:`dpmega.accounting.events`): every
evaluation composes each distinct batch size once with ``count=``, and for RDP
the curve of each distinct ``(q, σ)`` is cached, so no evaluation recomputes
another's. The σ returned is verified from scratch by a fresh dp-accounting
accountant.

The search stays in [1e-2, 1e6] and evaluates both ends before it gives up. No
ε rounded to 0 by dp-accounting at a huge σ is used, in the search or in the
verification (:func:`dpmega.accounting.events.checked_epsilon`); an RDP ε of 0
(proven there) is not taken as an answer either. dp-accounting's warnings about the σ it only
tries are dropped (scoped to the search); ``progress`` reports each evaluation
(a long ramp takes minutes).
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from typing import Any, Callable, TextIO

from dpmega import truncation
from dpmega import validation
from dpmega.accounting import events
from dpmega.accounting import tiny_rdp
from dpmega.accounting.accountants import DEFAULT_PLD_DISCRETIZATION
from dpmega.accounting.accountants import AccountantType
from dpmega.accounting.accountants import as_accountant
from dpmega.accounting.accountants import check_discretization
from dpmega.accounting.accountants import check_supported
from dpmega.errors import UsageError
from dpmega.sampling import SamplingScheme
from dpmega.sampling import as_scheme

__all__ = ["calibrate_noise_multiplier", "progress_printer"]

_SIGMA_MIN = 1e-2
_SIGMA_MAX = 1e6

# Called after each new ε evaluation with (evaluations so far, σ tried, its ε).
Progress = Callable[[int, float, float], None]


def progress_printer(stream: TextIO | None = None, *, every: float = 5.0, label: str = "calibrating") -> Progress:
  """A :data:`Progress` callback printing one line to ``stream`` (default stderr) at most every ``every`` seconds.

  Silent for the first ``every`` seconds, so quick calibrations print nothing.
  """
  start = time.monotonic()
  last = [start]

  def report(evaluations: int, sigma: float, epsilon: float) -> None:
    now = time.monotonic()
    if now - last[0] >= every:
      last[0] = now
      print(f"{label}: {evaluations} evaluations, {now - start:.0f} s; last noise_multiplier={sigma:.6g} "
            f"-> epsilon={epsilon:.6g}", file=stream or sys.stderr, flush=True)
  return report


class _SearchWarnings(logging.Filter):
  """Counts and drops dp-accounting's warnings about the σ the search tries (they are not the user's σ)."""

  def __init__(self):
    super().__init__()
    self.count = 0

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if "failed to converge" in message or "could not evaluate" in message:
      self.count += 1
      return False
    return True


@contextlib.contextmanager
def _quiet_search():
  """Drops, for the search only, dp-accounting's excluded-RDP-order warnings about the σ it tries (1.0, ...): they
  are not the user's σ. The verification of the σ returned still warns when that σ excludes orders. Scoped: the
  logging filters and warning filters are restored on exit."""
  loggers = [logging.getLogger("absl"), logging.getLogger(events.__name__)]
  drop = _SearchWarnings()
  for logger in loggers:
    logger.addFilter(drop)
  try:
    with warnings.catch_warnings():
      for category in (events.ExcludedOrdersWarning, tiny_rdp.EpsilonRoundingWarning):
        warnings.simplefilter("ignore", category)
      yield
  finally:
    for logger in loggers:
      logger.removeFilter(drop)


def calibrate_noise_multiplier(*, target_epsilon: float, delta: float, dataset_size: int,
                               batch_sizes: Any, scheme: SamplingScheme | str = "poisson",
                               accountant: AccountantType | str = "rdp",
                               num_steps: int | None = None,
                               pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                               q_grid: float | None = None,
                               rtol: float | None = None,
                               tail: truncation.TailModel | None = None,
                               progress: Progress | None = None) -> float:
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
    progress: called after each new ε evaluation (see :func:`progress_printer`); a long ramp takes minutes.

  Raises:
    UsageError: the target is unreachable for σ up to 1e6 (both ends of
      [1e-2, 1e6] are evaluated); the message gives the best achievable ε and
      why (``δ_tail`` when the tail alone exceeds δ; RDP's conversion floor,
      which PLD does not have). Where every RDP order rounds to 0 (huge σ),
      RDP has no answer: such a σ is never taken as meeting the target.
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
  zeroed: set[float] = set()  # σ where every RDP order rounds to 0

  def eps(sigma: float, kind: AccountantType = accountant) -> float:
    if (kind, sigma) not in memo:
      value = events.epsilon_at(counts_at(sigma), delta, kind, discretization, tail)
      if kind is AccountantType.RDP and value == 0.0:
        # events.checked_epsilon gives 0 only where the KL bound proves it (dp-accounting's rounded 0s are
        # replaced there), at a σ far above what PLD needs for the same target: the search does not take it,
        # and reports RDP's conversion floor and accountant 'pld' instead.
        value = math.inf
        zeroed.add(sigma)
      memo[(kind, sigma)] = value
      if progress is not None:
        progress(len(memo), sigma, value)
    return memo[(kind, sigma)]

  def gap(log_sigma: float, kind: AccountantType = accountant) -> float:
    # Finite for Brent's method: ε is inf where δ_tail alone exceeds δ (a tail model, small σ).
    return min(eps(math.exp(log_sigma), kind) - target, 1e9)

  def unreachable(kind: AccountantType) -> UsageError:
    tried = [(e, s) for (k, s), e in memo.items() if k is kind and math.isfinite(e)]
    best, at = min(tried) if tried else (math.inf, _SIGMA_MAX)
    why = ""
    if tail is not None and events.accountant_delta(delta, counts_at(_SIGMA_MAX), tail) is None:
      floor = truncation.tail_delta(events.tail_steps(counts_at(_SIGMA_MAX)), sensitivity=scheme.sensitivity,
                                    tail=tail)
      why = (f" The noise sampler's bounded support alone costs delta_tail >= {floor:.3g} over "
             f"{tail.num_coordinates} noised coordinates: use the wide-tail sampler or a larger delta.")
    elif kind is AccountantType.RDP and math.isfinite(best):
      why = (" RDP's conversion to (epsilon, delta) has a floor set by delta and its largest order "
             f"({max(events.RDP_ORDERS):g}), whatever the noise: accountant 'pld' has none.")
    return UsageError(
        f"target_epsilon={target_epsilon:g} is unreachable for noise_multiplier up to {_SIGMA_MAX:g} "
        f"({kind.value}, delta={delta:g}): the best achievable here is about epsilon={best:.6g} "
        f"(at noise_multiplier={at:.4g}).{why}")

  log_min, log_max = math.log(_SIGMA_MIN), math.log(_SIGMA_MAX)

  def bracket(kind: AccountantType, guess: float) -> tuple[float | None, float]:
    """(lo, hi) in log σ with gap(lo) > 0 >= gap(hi) (lo None: σ = _SIGMA_MIN meets the target), or raises.

    Every step is clamped to [_SIGMA_MIN, _SIGMA_MAX] and evaluated there: the bounds themselves are tried
    before the search gives up (it used to jump past _SIGMA_MAX unevaluated and call a reachable target
    unreachable).
    """
    hi = min(max(math.log(guess), log_min), log_max)
    if gap(hi, kind) > 0:
      step, lo = math.log(2.0), log_min
      while gap(hi, kind) > 0:
        if math.exp(hi) in zeroed:
          return below_zeroed(kind, lo, hi)
        if hi >= log_max:
          raise unreachable(kind)
        lo, hi = hi, min(hi + step, log_max)
        step *= 2
      return lo, hi
    # PLD is usually a few % below RDP: a first step of 10% brackets it at once.
    lo, step = hi, math.log(1 / 0.9)
    while gap(lo, kind) <= 0:
      if lo <= log_min:
        return None, lo  # even σ = _SIGMA_MIN meets the target
      hi, lo = lo, max(lo - step, log_min)
      step *= 2
    return lo, hi

  def below_zeroed(kind: AccountantType, lo: float, hi: float) -> tuple[float, float]:
    """A bracket below ``hi``, where RDP rounds to 0; ε decreases up to that cut-off (bisection on log σ)."""
    while hi - lo > 1e-9:
      mid = (lo + hi) / 2
      if gap(mid, kind) <= 0:
        return lo, mid
      if math.exp(mid) in zeroed:
        hi = mid
      else:
        lo = mid
    raise unreachable(kind)

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

  with _quiet_search():
    sigma = _search(solve, accountant, rtol)
  # Verify from scratch: a fresh dp-accounting accountant, no cache involved.
  fresh = events.fresh_accountant(scheme, accountant, discretization)
  for key, c in counts_at(sigma).items():
    with events.summarised_absl_warnings(events.key_event(key)):
      fresh.compose(events.key_event(key), c)
  acc_delta = events.accountant_delta(delta, counts_at(sigma), tail)
  # checked_epsilon: a fresh accountant's ε that rounded to 0 is not taken as meeting the target either.
  final = math.inf if acc_delta is None else events.checked_epsilon(fresh.get_epsilon(acc_delta), counts_at(sigma),
                                                                     acc_delta)
  if not final <= target:
    raise RuntimeError(f"calibration failed verification: epsilon({sigma}) = {final} > {target}.")
  return sigma


def _search(solve: Callable[[AccountantType, float, float], float], accountant: AccountantType, rtol: float) -> float:
  """RDP from σ = 1, then (for PLD) PLD from the RDP answer (or from 1 when the target is below RDP's floor)."""
  if accountant is AccountantType.RDP:
    return solve(AccountantType.RDP, 1.0, min(rtol, 1e-4))
  try:  # the RDP answer is a cheap, close seed for PLD
    seed = solve(AccountantType.RDP, 1.0, min(rtol, 1e-4))
  except UsageError:  # below RDP's floor: PLD brackets on its own
    seed = 1.0
  return solve(AccountantType.PLD, seed, rtol)
