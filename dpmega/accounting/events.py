"""Steps as dp-accounting events, and the ε of a multiset of them: the one place that calls dp-accounting.

A step is named by an *event key*; steps with equal keys are the same
``DpEvent`` and are composed once with ``count=`` (composition is commutative).
Both the ledger (what ran) and the plan (what will run) reduce to
``{event_key: steps}`` and ask this module for ε, δ or ``δ_tail``:

=========================  ===================================================  ==============  ==========
scheme                     event of one step                                    neighbours      accountants
=========================  ===================================================  ==============  ==========
``POISSON``                ``PoissonSampledDpEvent(q, GaussianDpEvent(σ))``      add/remove-one  RDP, PLD
                           with ``q = batch_size / dataset_size``
``WITHOUT_REPLACEMENT``    ``SampledWithoutReplacementDpEvent(N, B,             replace-one     RDP
                           GaussianDpEvent(σ / 2))``
``WITHOUT_REPLACEMENT``,   ``GaussianDpEvent(σ / 2)`` (no sampling: the batch   replace-one     RDP, PLD
``B = N``                  is the whole dataset every step)
=========================  ===================================================  ==============  ==========

Sensitivity: dp-accounting's noise multiplier is the noise std over the L2
sensitivity *under the neighbouring relation*. Removing one example moves the
clipped sum by at most ``C``; replacing one moves it by up to ``2C`` (its
clipped gradient ``g`` becomes ``-g``). The noise std is ``σC`` in both cases,
so a without-replacement step is accounted with noise multiplier ``σ / 2``
(:attr:`dpmega.sampling.SamplingScheme.sensitivity`, the one place this factor
lives; the truncation term ``δ_tail`` uses it too). dp-accounting's PLD reads a
``REPLACE_ONE`` Gaussian differently (as ``±sensitivity`` around zero, already
doubled), so the ``B = N`` row is composed in a PLD accountant whose relation is
add/remove-one, where ``GaussianDpEvent(σ / 2)`` means exactly "shift 2C, std
σC" (checked against the closed form of Balle & Wang 2018 in the tests).

Speed: the RDP curve of each distinct event is cached (``rdp_of_event``), so
no ε query recomputes another's; the PLD of the last few multisets is cached.

ε = 0 only where proven: at a huge σ dp-accounting's RDP rounds to 0 (and its ε with it);
:func:`checked_epsilon` replaces such a value (:mod:`dpmega.accounting.tiny_rdp`).

The noise sampler's bounded support (invariant 8): with a
:class:`dpmega.truncation.TailModel`, ε at a stated ``delta`` is the
accountant's ε at ``delta - δ_tail`` (:func:`dpmega.truncation.accountant_delta`,
with the steps' ``(q, σ)`` and the scheme's sensitivity).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import numbers
import warnings
from typing import Any, Iterable, Mapping

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np

from dpmega import schedules as schedules_lib
from dpmega import truncation
from dpmega import validation
from dpmega.accounting import pld
from dpmega.accounting import tiny_rdp
from dpmega.accounting.accountants import AccountantType
from dpmega.sampling import SamplingScheme
from dpmega.sampling import as_scheme

RDP_ORDERS = tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
_log = logging.getLogger(__name__)

EventKey = tuple  # (POISSON, q, σ) or (WITHOUT_REPLACEMENT, N, B, σ)


# ------------------------------------------------------------------ checks


def check_sigma(value: Any, name: str = "noise_multiplier") -> float:
  return validation.check_real(name, value, 0, math.inf, hi_open=True)


def check_sizes(batch_size: Any, dataset_size: Any, batch_name: str = "batch_size") -> tuple[int, int]:
  """``(batch_size, dataset_size)`` as ints with ``1 <= batch_size <= dataset_size`` (``1e6`` accepted)."""
  dataset_size = validation.check_int("dataset_size", dataset_size, 1, integral_floats=True)
  batch_size = validation.check_int(batch_name, batch_size, 1, integral_floats=True)
  if batch_size > dataset_size:
    raise ValueError(
        f"{batch_name} ({batch_size}) must not exceed dataset_size ({dataset_size}): the sampling "
        f"probability q = {batch_name} / dataset_size must be in (0, 1], got "
        f"{batch_size / dataset_size:.6g}.")
  return batch_size, dataset_size


def check_delta(delta: Any, name: str = "delta") -> float:
  return validation.check_real(name, delta, 0, 1, lo_open=True, hi_open=True)


def check_epsilon(epsilon: Any, name: str, allow_zero: bool) -> float:
  return validation.check_real(name, epsilon, 0, math.inf, lo_open=not allow_zero, hi_open=True)


def check_tail(tail: Any) -> truncation.TailModel | None:
  if tail is not None and not isinstance(tail, truncation.TailModel):
    raise ValueError(f"tail must be a dpmega.truncation.TailModel or None, got tail={tail!r}.")
  return tail


# -------------------------------------------------------------- event keys


def event_key(scheme: SamplingScheme, batch_size: int, dataset_size: int, sigma: float) -> EventKey:
  """Steps with equal keys are the same ``DpEvent``."""
  if scheme is SamplingScheme.POISSON:
    return (scheme, batch_size / dataset_size, sigma)
  return (scheme, dataset_size, batch_size, sigma)


def key_event(key: EventKey) -> dp_accounting.DpEvent:
  """The ``DpEvent`` of one step (the module table)."""
  scheme, *params = key
  # dp-accounting's noise multiplier is std / sensitivity under the relation (module docstring).
  gaussian = dp_accounting.GaussianDpEvent(params[-1] / scheme.sensitivity)
  if scheme is SamplingScheme.POISSON:
    return dp_accounting.PoissonSampledDpEvent(params[0], gaussian)
  n, b, _ = params
  if b == n:  # the whole dataset every step: no sampling, one Gaussian (also what PLD accepts)
    return gaussian
  return dp_accounting.SampledWithoutReplacementDpEvent(n, b, gaussian)


def key_q_sigma(key: EventKey) -> tuple[float, float]:
  """``(q, σ)`` of an event key: the probability that one example is in the batch, and σ."""
  scheme, *params = key
  if scheme is SamplingScheme.POISSON:
    return params[0], params[1]
  n, b, sigma = params
  return b / n, sigma


def key_batches(keys: Iterable[EventKey]) -> list[tuple[int, int]]:
  """``(batch_size, dataset_size)`` of without-replacement keys, for :func:`accountants.check_supported`."""
  return [(k[2], k[1]) for k in keys if k[0] is SamplingScheme.WITHOUT_REPLACEMENT]


def neighboring_relation(scheme: SamplingScheme | str) -> dp_accounting.NeighboringRelation:
  """dp-accounting's relation of ``scheme``: add/remove-one (Poisson) or replace-one (fixed size)."""
  if as_scheme(scheme) is SamplingScheme.POISSON:
    return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
  return dp_accounting.NeighboringRelation.REPLACE_ONE


def step_event(*, batch_size: int, dataset_size: int, noise_multiplier: float,
               scheme: SamplingScheme | str = SamplingScheme.POISSON) -> dp_accounting.DpEvent:
  """The ``dp_accounting`` event of one DP-SGD step (see the module table)."""
  b, n = check_sizes(batch_size, dataset_size)
  return key_event(event_key(as_scheme(scheme), b, n, check_sigma(noise_multiplier)))


# --------------------------------------------------------------- RDP / PLD


class _ExcludedOrders(logging.Filter):
  """Collects dp-accounting's per-order "failed to converge" warnings.

  For larger q, dp-accounting's series for fractional orders below ~2 may not
  converge; it then sets that order's RDP to inf, which only drops the order
  from the minimisation (ε stays a valid upper bound). One summary line per
  process replaces thousands of identical warnings.
  """

  def __init__(self):
    super().__init__()
    self.count = 0

  def filter(self, record: logging.LogRecord) -> bool:
    if "failed to converge" in record.getMessage():
      self.count += 1
      return False
    return True


class ExcludedOrdersWarning(UserWarning):
  """dp-accounting could not evaluate some RDP orders; they were dropped (ε stays a valid upper bound).

  Python's warning filters decide how often it shows (by default once per place it is raised); a caller
  silences it with ``warnings.simplefilter("ignore", ExcludedOrdersWarning)``.
  """


@contextlib.contextmanager
def summarised_absl_warnings(what: Any):
  """Runs dp-accounting RDP code with its per-order absl warnings replaced by one :class:`ExcludedOrdersWarning`."""
  absl_logger = logging.getLogger("absl")
  collect = _ExcludedOrders()
  absl_logger.addFilter(collect)
  try:
    yield
  finally:
    absl_logger.removeFilter(collect)
  if collect.count:
    # One fixed text: the default filter then shows it once per call site, however many events it concerns.
    warnings.warn("dp-accounting could not evaluate some low fractional RDP orders (series that do not converge "
                  "at large q); they are excluded from the minimisation and epsilon stays a valid upper bound.",
                  ExcludedOrdersWarning, stacklevel=3)
    _log.debug("excluded %d RDP orders for %s", collect.count, what)


@functools.lru_cache(maxsize=1 << 15)
def rdp_of_event(key: EventKey) -> np.ndarray:
  """RDP curve of one step at :data:`RDP_ORDERS`, from dp-accounting's own ``RdpAccountant`` (read-only)."""
  accountant = rdp_privacy_accountant.RdpAccountant(orders=RDP_ORDERS,
                                                    neighboring_relation=neighboring_relation(key[0]))
  event = key_event(key)
  with summarised_absl_warnings(event):
    curve = accountant.compose(event).rdp
  curve.setflags(write=False)
  return curve


def rdp_of_counts(counts: Mapping[EventKey, int]) -> np.ndarray:
  # The RdpAccountant's own composition rule: rdp += count * rdp(event).
  total = np.zeros(len(RDP_ORDERS))
  for key, count in counts.items():
    total = total + count * rdp_of_event(key)
  return total


def fresh_accountant(scheme: SamplingScheme, accountant: AccountantType,
                     discretization: float) -> dp_accounting.PrivacyAccountant:
  """A new dp-accounting accountant for steps of ``scheme`` (no cache involved)."""
  if accountant is AccountantType.RDP:
    return rdp_privacy_accountant.RdpAccountant(orders=RDP_ORDERS, neighboring_relation=neighboring_relation(scheme))
  # PLD sees without-replacement steps only as GaussianDpEvent(σ / 2) (B = N), whose noise
  # multiplier already carries the replace-one sensitivity 2C. PLD's REPLACE_ONE would double
  # it again (it models ±sensitivity around 0); its add/remove relation reads a Gaussian event
  # as "shift of 1 noise-multiplier unit", exactly the mechanism that runs.
  return pld_privacy_accountant.PLDAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
      value_discretization_interval=discretization)


@functools.lru_cache(maxsize=8)
def pld_of_counts(items: tuple, discretization: float) -> pld.Composed:
  """The PLD of ``items`` (``((key, count), ...)``), as ``fresh_accountant(..., PLD)`` composes it; cached.

  Built by :func:`dpmega.accounting.pld.compose`, ~10x faster per distinct step (a ramp has one per batch size):
  the accountant's distribution bit for bit when every step repeats, and at most its ε (within ~1e-7 relative)
  when some occur once. ``get_epsilon(delta)`` and ``get_delta(epsilon)`` as on the accountant.
  """
  return pld.compose([(key_event(key), count) for key, count in items], discretization)


def _epsilon_of_counts(counts: Mapping[EventKey, int], delta: float, accountant: AccountantType,
                       discretization: float, rdp: np.ndarray | None = None) -> float:
  if not counts:
    return 0.0
  if accountant is AccountantType.RDP:
    if rdp is None:
      rdp = rdp_of_counts(counts)
    with tiny_rdp.negative_rdp_unlogged():  # the 0 dp-accounting then returns is replaced by checked_epsilon
      return float(rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, rdp, delta)[0])
  return float(pld_of_counts(tuple(counts.items()), discretization).get_epsilon(delta))


# ------------------------------------------------- ε = 0 only where proven


def _tiny_steps(counts: Mapping[EventKey, int]) -> list[tuple[str, float, float, int]]:
  return [(k[0].value, float(key_q_sigma(k)[0]), key_q_sigma(k)[1] / k[0].sensitivity, int(c))
          for k, c in counts.items()]


def checked_epsilon(epsilon: float, counts: Mapping[EventKey, int], delta: float) -> float:
  """An accountant's ``epsilon`` for ``counts`` at the accountant's ``delta``: kept when positive, else proven.

  At a huge σ dp-accounting's RDP rounds to 0 at some orders, and its ε to 0 whatever the steps. Such a 0 (or
  NaN) becomes :func:`tiny_rdp.epsilon`: 0 only where proven, else positive with a ``tiny_rdp.EpsilonRoundingWarning``.
  """
  if epsilon > 0 or not counts:  # inf too; NaN and <= 0 fall through
    return float(epsilon)
  return tiny_rdp.epsilon(_tiny_steps(counts), delta, replaces=epsilon)


def checked_delta(delta: float, counts: Mapping[EventKey, int], epsilon: float) -> float:
  """An accountant's δ(``epsilon``) for ``counts``: kept when positive, else :func:`tiny_rdp.delta` (> 0)."""
  return float(delta) if delta > 0 or not counts else tiny_rdp.delta(_tiny_steps(counts), epsilon)


# ------------------------------------------------------------------ δ_tail


def tail_steps(counts: Mapping[EventKey, int]) -> list[tuple[int, float, float]]:
  """``(count, q, σ)`` groups for :mod:`dpmega.truncation`, one per distinct σ.

  ``tail_delta`` is ``Σ count·q·η(σ)`` plus a term in ``Σ count``: merging the
  steps of one σ into ``(Σ count, Σ count·q / Σ count, σ)`` keeps both sums, and
  computes ``η`` once per σ instead of once per batch size (a ramp has thousands).
  """
  groups: dict[float, list[float]] = {}
  for key, count in counts.items():
    q, sigma = key_q_sigma(key)
    total = groups.setdefault(sigma, [0, 0.0])
    total[0] += int(count)
    total[1] += int(count) * q
  return [(c, cq / c, sigma) for sigma, (c, cq) in groups.items() if c]


def scheme_of(counts: Mapping[EventKey, int]) -> SamplingScheme | None:
  return next(iter(counts))[0] if counts else None


def accountant_delta(delta: float, counts: Mapping[EventKey, int],
                     tail: truncation.TailModel | None) -> float | None:
  """The δ the ideal-Gaussian accountant gets for a stated ``delta`` (None: δ_tail alone >= delta)."""
  if tail is None or not counts:
    return delta
  try:
    return truncation.accountant_delta(delta, tail_steps(counts), sensitivity=scheme_of(counts).sensitivity,
                                       tail=tail)
  except ValueError:
    return None


def epsilon_at(counts: Mapping[EventKey, int], delta: float, accountant: AccountantType, discretization: float,
               tail: truncation.TailModel | None, rdp: np.ndarray | None = None) -> float:
  """ε of ``counts`` at the stated ``delta``, the tail's share taken out first (``rdp``: their RDP, if known)."""
  if not counts:
    return 0.0
  if any(key_q_sigma(k)[1] == 0 for k in counts):
    return math.inf  # no noise: no δ helps, and the tail bound is 1 per step
  acc_delta = accountant_delta(delta, counts, tail)
  if acc_delta is None:
    return math.inf
  return checked_epsilon(_epsilon_of_counts(counts, acc_delta, accountant, discretization, rdp), counts, acc_delta)


def tail_share(counts: Mapping[EventKey, int], tail: truncation.TailModel, delta: float | None) -> float:
  """``δ_tail`` of ``counts``: the floor (``delta`` None) or the share of a stated ``delta`` (inf: all of it)."""
  if not counts:
    return 0.0
  if delta is None:
    return truncation.tail_delta(tail_steps(counts), sensitivity=scheme_of(counts).sensitivity, tail=tail)
  delta = check_delta(delta)
  acc_delta = accountant_delta(delta, counts, tail)
  return math.inf if acc_delta is None else delta - acc_delta


# --------------------------------------------------------------- schedules


def schedule_counts(dataset_size: int, batch_sizes: Any, num_steps: int | None, sigma: float,
                    scheme: SamplingScheme, q_grid: float | None = None) -> dict[EventKey, int]:
  """Event counts of a whole planned run: ``{event_key: steps}`` (see :func:`size_counts`, :func:`bucket_up`)."""
  sizes, counts = size_counts(batch_sizes, num_steps, dataset_size)
  sizes, counts = bucket_up(sizes, counts, dataset_size, q_grid)
  return {event_key(scheme, int(b), dataset_size, sigma): int(c) for b, c in zip(sizes, counts)}


def size_counts(batch_sizes: Any, num_steps: int | None, dataset_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Distinct batch sizes and their step counts, from a sequence or a schedule (each checked against N)."""
  if isinstance(batch_sizes, (str, Mapping, numbers.Integral, schedules_lib.Constant,
                              schedules_lib.Steps, schedules_lib.Linear, schedules_lib.Geometric)):
    if num_steps is None:
      raise ValueError("num_steps is needed when batch_sizes is a schedule, not a sequence.")
    num_steps = validation.check_int("num_steps", num_steps, 0, integral_floats=True)
    sizes, counts = schedules_lib.as_schedule(batch_sizes, num_steps=num_steps).batch_size_counts(num_steps)
  else:
    arr = np.asarray(batch_sizes)
    if arr.ndim != 1:
      raise ValueError(f"batch_sizes must be a 1-D sequence of ints, got shape {arr.shape}.")
    if num_steps is not None and validation.check_int("num_steps", num_steps, 0,
                                                      integral_floats=True) != arr.shape[0]:
      raise ValueError(
          f"num_steps ({num_steps}) must equal len(batch_sizes) ({arr.shape[0]}) when both are given.")
    if arr.size and not (np.issubdtype(arr.dtype, np.integer) or np.all(np.mod(arr, 1) == 0)):
      raise ValueError("batch_sizes must hold integers.")
    arr = arr.astype(np.int64)
    if arr.size and arr.min() < 1:
      raise ValueError(f"batch_sizes must be >= 1, got {int(arr.min())}.")
    sizes, counts = np.unique(arr, return_counts=True)
  for b in sizes:
    check_sizes(int(b), dataset_size)
  return sizes, counts


def bucket_up(sizes: np.ndarray, counts: np.ndarray, dataset_size: int,
              q_grid: float | None) -> tuple[np.ndarray, np.ndarray]:
  """Rounds every batch size UP to the grid ``ceil((1 + q_grid) ** k)`` (capped at N).

  ε is non-decreasing in the batch size (in q), so accounting the rounded-up
  sizes gives an upper bound on the exact ε with fewer distinct events.
  """
  if q_grid is None:
    return sizes, counts
  q_grid = validation.check_real("q_grid", q_grid, 0, 1, lo_open=True)
  if not sizes.size:
    return sizes, counts
  ratio = math.log1p(q_grid)
  k = np.ceil(np.log(sizes.astype(np.float64)) / ratio - 1e-9)
  up = np.ceil(np.exp(k * ratio) - 1e-6).astype(np.int64)
  up = np.minimum(np.maximum(up, sizes), dataset_size)
  merged, inverse = np.unique(up, return_inverse=True)
  totals = np.zeros(merged.shape, np.int64)
  np.add.at(totals, inverse, counts)
  return merged, totals
