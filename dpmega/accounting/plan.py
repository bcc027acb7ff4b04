"""What will run: the ε of a planned schedule, σ for a target, the steps a budget allows, the printed plan.

:class:`Plan` is the one description of a run's privacy before it starts --
``num_steps`` steps of a batch-size schedule over ``dataset_size`` examples,
sampled by ``scheme``, accounted by ``accountant`` at ``delta``, with the noise
sampler's ``tail`` -- used by both ``dpmega train`` (:class:`dpmega.train.Trainer`)
and ``dpmega epsilon`` / ``dpmega calibrate`` (:mod:`dpmega.cli.accounting`).
Building one checks every field and that the accountant can account for the
scheme (:func:`dpmega.accounting.accountants.check_supported`), before any
accounting. The functions below are the same computations on loose arguments.

Guarantees:

* ε of a prefix of the schedule is the ε of the ledger those steps would
  record (:meth:`Plan.expected_ledger`): both compose the same events.
* ``q_grid`` (off by default) rounds every batch size up to a geometric grid of
  relative spacing ``q_grid``: an upper bound on ε with fewer distinct events.
* :func:`fits_budget` is the budget stop: the step that would take ε(δ) past
  the target is not taken (invariant 6).

Example:
  >>> from dpmega import schedules
  >>> plan = Plan(dataset_size=60000, schedule=schedules.Constant(256), num_steps=1000, delta=1e-5)
  >>> sigma = plan.calibrate(2.0)
  >>> plan.epsilon(sigma) <= 2.0 < plan.epsilon(sigma, num_steps=1001)
  True
  >>> plan.max_steps(2.0, sigma)
  1000
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import numpy as np

from dpmega import schedules as schedules_lib
from dpmega import truncation
from dpmega import validation
from dpmega.accounting import events
from dpmega.accounting.accountants import DEFAULT_PLD_DISCRETIZATION
from dpmega.accounting.accountants import AccountantType
from dpmega.accounting.accountants import as_accountant
from dpmega.accounting.accountants import check_discretization
from dpmega.accounting.accountants import check_supported
from dpmega.accounting.accountants import relation_label
from dpmega.accounting.calibrate import Progress
from dpmega.accounting.calibrate import calibrate_noise_multiplier
from dpmega.accounting.ledger import Ledger
from dpmega.accounting.ledger import compute_epsilon
from dpmega.sampling import SamplingScheme
from dpmega.sampling import as_scheme

__all__ = ["Plan", "epsilon_for_schedule", "tail_delta_for_schedule", "max_steps", "fits_budget", "describe",
           "delta_warning", "TAIL_NEGLIGIBLE"]

# δ_tail below this fraction of δ is not worth a word in a one-line summary (always in JSON).
TAIL_NEGLIGIBLE = 1e-3


def epsilon_for_schedule(*, noise_multiplier: float, delta: float, dataset_size: int,
                         batch_sizes: Any, num_steps: int | None = None,
                         scheme: SamplingScheme | str = "poisson",
                         accountant: AccountantType | str = "rdp",
                         pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                         q_grid: float | None = None,
                         tail: truncation.TailModel | None = None) -> float:
  """ε of a planned run: one batch size per step (or a schedule + ``num_steps``).

  ``q_grid`` (off by default) rounds every batch size up to a geometric grid of
  relative spacing ``q_grid`` first: an upper bound on ε, computed with fewer
  distinct events (useful for ramps with thousands of distinct batch sizes).
  ``tail``: as in :func:`dpmega.accounting.compute_epsilon` (ε at ``delta`` minus the sampler's ``δ_tail``).
  """
  sigma = events.check_sigma(noise_multiplier)
  delta = events.check_delta(delta)
  dataset_size = validation.check_int("dataset_size", dataset_size, 1, integral_floats=True)
  scheme = as_scheme(scheme)
  accountant = as_accountant(accountant)
  discretization = check_discretization(pld_discretization)
  tail = events.check_tail(tail)
  counts = events.schedule_counts(dataset_size, batch_sizes, num_steps, sigma, scheme, q_grid)
  check_supported(scheme, accountant, events.key_batches(counts))
  return events.epsilon_at(counts, delta, accountant, discretization, tail)


def tail_delta_for_schedule(*, noise_multiplier: float, dataset_size: int, batch_sizes: Any,
                            tail: truncation.TailModel, num_steps: int | None = None,
                            scheme: SamplingScheme | str = "poisson", delta: float | None = None) -> float:
  """``δ_tail`` of a planned run: :func:`dpmega.accounting.tail_delta_of` of :func:`epsilon_for_schedule`'s steps."""
  sigma = events.check_sigma(noise_multiplier)
  dataset_size = validation.check_int("dataset_size", dataset_size, 1, integral_floats=True)
  counts = events.schedule_counts(dataset_size, batch_sizes, num_steps, sigma, as_scheme(scheme))
  return events.tail_share(counts, events.check_tail(tail), delta)


def max_steps(*, target_epsilon: float, delta: float, dataset_size: int, batch_sizes: Any,
              noise_multiplier: float, scheme: SamplingScheme | str = "poisson",
              accountant: AccountantType | str = "rdp",
              pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
              q_grid: float | None = None, limit: int = 10**9,
              tail: truncation.TailModel | None = None) -> int:
  """Most steps of the schedule that keep ε(δ) <= ``target_epsilon``.

  ``batch_sizes`` is a schedule (object, spec, dict or int batch size). Returns
  0 when even one step exceeds the budget, ``limit`` when ``limit`` steps fit.
  ε is non-decreasing in steps (with a tail model too: ``δ_tail`` grows with
  them), so this is a doubling then bisection search.
  """
  target = events.check_epsilon(target_epsilon, "target_epsilon", allow_zero=False)
  limit = validation.check_int("limit", limit, 1, integral_floats=True)

  def fits(n: int) -> bool:
    return epsilon_for_schedule(
        noise_multiplier=noise_multiplier, delta=delta, dataset_size=dataset_size,
        batch_sizes=batch_sizes, num_steps=n, scheme=scheme, accountant=accountant,
        pld_discretization=pld_discretization, q_grid=q_grid, tail=tail) <= target

  if not fits(1):
    return 0
  lo, hi = 1, 2
  while hi <= limit and fits(hi):
    lo, hi = hi, hi * 2
  if hi > limit:
    if fits(limit):
      return limit
    hi = limit
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if fits(mid):
      lo = mid
    else:
      hi = mid
  return lo


def fits_budget(ledger: Ledger, *, next_batch_size: int, dataset_size: int,
                noise_multiplier: float, scheme: SamplingScheme | str, target_epsilon: float,
                delta: float, accountant: AccountantType | str = "rdp",
                pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                tail: truncation.TailModel | None = None) -> bool:
  """Whether ε(δ) stays <= ``target_epsilon`` after one more step (ledger unchanged; ``tail``: compute_epsilon)."""
  target = events.check_epsilon(target_epsilon, "target_epsilon", allow_zero=False)
  trial = ledger.copy()
  trial.record(batch_size=next_batch_size, dataset_size=dataset_size,
               noise_multiplier=noise_multiplier, scheme=scheme, steps=1)
  return compute_epsilon(trial, delta, accountant, pld_discretization=pld_discretization, tail=tail) <= target


def describe(epsilon: float, delta: float, scheme: SamplingScheme | str,
             accountant: AccountantType | str, delta_tail: float | None = None) -> str:
  """One printable line: ε, δ, accountant, sampling scheme and neighbouring relation.

  ``delta_tail``: the noise sampler's share of ``delta``, named when it is more
  than :data:`TAIL_NEGLIGIBLE` of it.

  Example:
    >>> describe(1.5, 1e-5, "poisson", "rdp", delta_tail=2e-6).split("; ")[1]
    'delta includes delta_tail = 2e-06 of the noise sampler)'
    >>> "delta_tail" in describe(1.5, 1e-5, "poisson", "rdp", delta_tail=1e-9)  # negligible
    False
  """
  scheme = as_scheme(scheme)
  accountant = as_accountant(accountant)
  line = (f"epsilon = {epsilon:.4g} at delta = {delta:g} ({accountant.value.upper()}, "
          f"{scheme.value.replace('_', ' ')} sampling, {relation_label(scheme)} neighbours")
  if delta_tail is not None and delta_tail > TAIL_NEGLIGIBLE * delta:
    line += f"; delta includes delta_tail = {delta_tail:.3g} of the noise sampler"
  return line + ")"


def delta_warning(delta: float, dataset_size: int) -> str | None:
  """A one-line warning when ``delta >= 1 / dataset_size``, else None.

  With δ >= 1/N a mechanism that publishes one random example in full is
  (0, δ)-DP: such a δ promises nothing about any one person. The usual rule is
  δ well below 1/N (often 1/N^1.1 or smaller).

  Example:
    >>> print(delta_warning(0.5, 1000))
    warning: delta = 0.5 is not below 1/dataset_size = 0.001: at this delta a mechanism that publishes a random example in full meets the guarantee; choose delta well below 1/N (e.g. 0.0001 or smaller)
    >>> delta_warning(1e-6, 1000) is None
    True
  """
  delta = events.check_delta(delta)
  dataset_size = validation.check_int("dataset_size", dataset_size, 1, integral_floats=True)
  if delta < 1 / dataset_size:
    return None
  suggestion = 10.0 ** math.floor(math.log10(dataset_size ** -1.1 if dataset_size > 1 else 0.1))
  return (f"warning: delta = {delta:g} is not below 1/dataset_size = {1 / dataset_size:.3g}: at this delta a "
          f"mechanism that publishes a random example in full meets the guarantee; choose delta well below 1/N "
          f"(e.g. {suggestion:g} or smaller)")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What will run: ``num_steps`` steps of ``schedule`` over ``dataset_size`` examples, and how they are accounted.

  ``noise_multiplier`` arguments below are the σ the accountant sees (for a
  run with a noisy clipped count, the effective one).

  Attributes:
    dataset_size: N (``1e6`` accepted).
    schedule: the batch-size schedule (object, spec string, dict or int).
    num_steps: steps of the whole run.
    delta: the δ every ε is stated at, in (0, 1) (``δ_tail`` included when ``tail`` is given).
    scheme: the sampling scheme.
    accountant: the accountant.
    tail: the noise sampler's support and noised coordinates, or None (ideal Gaussian).
    pld_discretization: PLD ``value_discretization_interval``.
    q_grid: None (exact) or the relative spacing of the grid batch sizes are rounded up to (an upper bound).

  Raises:
    ValueError: a field out of range, or a batch size larger than the dataset.
    UnsupportedAccountingError: the accountant cannot account for the scheme with these batch sizes.
  """

  dataset_size: int
  schedule: schedules_lib.Schedule
  num_steps: int
  delta: float
  scheme: SamplingScheme = SamplingScheme.POISSON
  accountant: AccountantType = AccountantType.RDP
  tail: truncation.TailModel | None = None
  pld_discretization: float = DEFAULT_PLD_DISCRETIZATION
  q_grid: float | None = None

  def __post_init__(self):
    num_steps = validation.check_int("num_steps", self.num_steps, 0, integral_floats=True)
    fields = dict(
        dataset_size=validation.check_int("dataset_size", self.dataset_size, 1, integral_floats=True),
        schedule=schedules_lib.as_schedule(self.schedule, num_steps=num_steps), num_steps=num_steps,
        delta=events.check_delta(self.delta), scheme=as_scheme(self.scheme),
        accountant=as_accountant(self.accountant), tail=events.check_tail(self.tail),
        pld_discretization=check_discretization(self.pld_discretization),
        q_grid=validation.check_real("q_grid", self.q_grid, 0, 1, lo_open=True, optional=True))
    for name, value in fields.items():
      object.__setattr__(self, name, value)
    sizes, _ = events.size_counts(self.schedule, num_steps, self.dataset_size)
    check_supported(self.scheme, self.accountant, [(int(b), self.dataset_size) for b in sizes])

  def with_accountant(self, accountant: AccountantType | str) -> "Plan":
    """The same run accounted by ``accountant`` (checked like a new plan)."""
    return dataclasses.replace(self, accountant=as_accountant(accountant))

  def _steps(self, num_steps: int | None) -> int:
    return self.num_steps if num_steps is None else validation.check_int("num_steps", num_steps, 0)

  def batch_sizes(self, num_steps: int | None = None) -> np.ndarray:
    """The expected batch size of each of the first ``num_steps`` steps (default: all)."""
    return self.schedule.batch_sizes(self._steps(num_steps))

  def epsilon(self, noise_multiplier: float, num_steps: int | None = None, *,
              accountant: AccountantType | str | None = None) -> float:
    """ε(delta) after the first ``num_steps`` steps (default: all) at σ = ``noise_multiplier``."""
    return epsilon_for_schedule(
        noise_multiplier=noise_multiplier, delta=self.delta, dataset_size=self.dataset_size,
        batch_sizes=self.schedule, num_steps=self._steps(num_steps), scheme=self.scheme,
        accountant=self.accountant if accountant is None else accountant,
        pld_discretization=self.pld_discretization, q_grid=self.q_grid, tail=self.tail)

  def tail_delta(self, noise_multiplier: float, num_steps: int | None = None, *, floor: bool = False) -> float:
    """``δ_tail`` of the first ``num_steps`` steps: its share of ``delta`` (inf: all of it), or with ``floor``
    the part that no δ given to the accountant removes. 0 without a tail model."""
    if self.tail is None:
      return 0.0
    return tail_delta_for_schedule(
        noise_multiplier=noise_multiplier, dataset_size=self.dataset_size, batch_sizes=self.schedule,
        num_steps=self._steps(num_steps), scheme=self.scheme, tail=self.tail, delta=None if floor else self.delta)

  def calibrate(self, target_epsilon: float, *, rtol: float | None = None, progress: Progress | None = None) -> float:
    """The smallest σ whose whole-run ε(delta) is <= ``target_epsilon`` (:func:`calibrate_noise_multiplier`).

    ``progress``: called after each ε evaluation (:func:`dpmega.accounting.calibrate.progress_printer` prints a
    line every few seconds; a ramp with many distinct batch sizes takes minutes).
    """
    return calibrate_noise_multiplier(
        target_epsilon=target_epsilon, delta=self.delta, dataset_size=self.dataset_size,
        batch_sizes=self.schedule, num_steps=self.num_steps, scheme=self.scheme, accountant=self.accountant,
        pld_discretization=self.pld_discretization, q_grid=self.q_grid, rtol=rtol, tail=self.tail,
        progress=progress)

  def delta_warning(self) -> str | None:
    """:func:`delta_warning` for this plan's δ and dataset size: the line the printed plan shows, or None."""
    return delta_warning(self.delta, self.dataset_size)

  def max_steps(self, target_epsilon: float, noise_multiplier: float) -> int:
    """Most of the ``num_steps`` steps that keep ε(delta) <= ``target_epsilon`` at σ (0: not even one)."""
    if self.num_steps == 0:
      return 0
    return max_steps(
        target_epsilon=target_epsilon, delta=self.delta, dataset_size=self.dataset_size,
        batch_sizes=self.schedule, noise_multiplier=noise_multiplier, scheme=self.scheme,
        accountant=self.accountant, pld_discretization=self.pld_discretization, q_grid=self.q_grid,
        limit=self.num_steps, tail=self.tail)

  def expected_ledger(self, noise_multiplier: float, num_steps: int | None = None) -> Ledger:
    """The ledger that the first ``num_steps`` steps record when they run at σ = ``noise_multiplier``."""
    ledger = Ledger()
    for b, group in itertools.groupby(self.batch_sizes(num_steps).tolist()):
      ledger.record(batch_size=b, dataset_size=self.dataset_size, noise_multiplier=noise_multiplier,
                    scheme=self.scheme, steps=sum(1 for _ in group))
    return ledger

  def fits_budget(self, ledger: Ledger, *, step: int, noise_multiplier: float, target_epsilon: float) -> bool:
    """Whether ``ledger`` plus step ``step`` of the schedule (0-based) at σ keeps ε(delta) <= ``target_epsilon``."""
    return fits_budget(
        ledger, next_batch_size=self.schedule.batch_size(step), dataset_size=self.dataset_size,
        noise_multiplier=noise_multiplier, scheme=self.scheme, target_epsilon=target_epsilon, delta=self.delta,
        accountant=self.accountant, pld_discretization=self.pld_discretization, tail=self.tail)

  def describe(self, epsilon: float, delta_tail: float | None = None) -> str:
    """:func:`describe` for this plan's δ, scheme and accountant."""
    return describe(epsilon, self.delta, self.scheme, self.accountant, delta_tail)
