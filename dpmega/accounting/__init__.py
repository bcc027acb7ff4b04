"""Privacy accounting for whole DP-SGD schedules, on top of ``dp-accounting``.

What ran is kept in a :class:`Ledger`: runs of identical steps
``(steps, batch_size, dataset_size, noise_multiplier, scheme)``. Each step is
one ``dp_accounting`` event, and nothing here re-derives RDP or PLD math:

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
(:attr:`SamplingScheme.sensitivity`, the one place this factor lives; the
truncation term ``δ_tail`` uses it too). dp-accounting's PLD reads a
``REPLACE_ONE`` Gaussian differently (as ``±sensitivity`` around zero, already
doubled), so the ``B = N`` row is composed in a PLD accountant whose relation is
add/remove-one, where ``GaussianDpEvent(σ / 2)`` means exactly "shift 2C, std
σC" (checked against the closed form of Balle & Wang 2018 in the tests).

Guarantee: ``compute_epsilon(ledger, delta, accountant)`` is the ε that
``dp_accounting``'s ``RdpAccountant`` / ``PLDAccountant`` reports after
composing every step of the ledger as in the table. Steps with the same
``(q, σ)`` are composed once with ``count=`` (composition is commutative); for
RDP the per-event RDP curve is cached and the ledger keeps a running total, so a
query after ``record`` only adds what is new. A scheme an accountant cannot
account for (PLD with sampling without replacement of ``B < N``) raises
:class:`UnsupportedAccountingError`; nothing is approximated silently.

The noise sampler's bounded support (invariant 8): with ``tail=`` a
:class:`dpmega.truncation.TailModel`, the ε reported for ``delta`` is the
accountant's ε at ``delta - δ_tail`` (:func:`dpmega.truncation.accountant_delta`,
with the run's ``(q, σ, T)`` and the scheme's sensitivity), so that the stated
``(ε, delta)`` covers the sampler that runs, not only the ideal Gaussian;
:func:`compute_delta` returns the accountant's δ plus ``δ_tail``.

Edge cases:

* an empty ledger has ε = 0 and δ(ε) = 0;
* ``noise_multiplier == 0`` gives ε = inf (both accountants);
* a ledger mixes no schemes: the neighbouring relations differ, so ``record``
  with another scheme is a ``ValueError``;
* ``q = 1`` (the whole dataset every step) is allowed;
* with a tail model whose ``δ_tail`` alone reaches ``delta``, ε = inf (no finite
  ε holds at that δ); :func:`tail_delta_of` gives the floor to print.

References:
  Abadi et al. 2016, "Deep Learning with Differential Privacy".
  Mironov, Talwar, Zhang 2019, "Rényi Differential Privacy of the Sampled
  Gaussian Mechanism".
  Anil et al. 2021, "Large-Scale Differentially Private BERT",
  https://arxiv.org/abs/2108.01624 (increasing batch-size schedules).
  Wang, Balle, Kasiviswanathan 2019, "Subsampled Rényi Differential Privacy and
  Analytical Moments Accountant" (sampling without replacement, replace-one).
  Balle & Wang 2018, "Improving the Gaussian Mechanism for Differential
  Privacy", https://arxiv.org/abs/1805.06530 (the exact ε of one Gaussian).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import enum
import functools
import logging
import math
import numbers
from typing import Any, Iterable, Mapping

import dp_accounting
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np
from scipy import optimize

from dpmega import schedules as schedules_lib
from dpmega import truncation
from dpmega.errors import UsageError

__all__ = [
    "SamplingScheme",
    "AccountantType",
    "UnsupportedAccountingError",
    "Run",
    "Ledger",
    "DEFAULT_PLD_DISCRETIZATION",
    "RDP_ORDERS",
    "relation_label",
    "step_event",
    "ledger_event",
    "compute_epsilon",
    "compute_delta",
    "epsilon_for_schedule",
    "calibrate_noise_multiplier",
    "max_steps",
    "fits_budget",
    "tail_delta_of",
    "tail_delta_for_schedule",
    "describe",
]

# dp-accounting's own default (``PLDAccountant(value_discretization_interval)``):
# ε is over-estimated by at most about this much per composition tree level.
DEFAULT_PLD_DISCRETIZATION = 1e-4
RDP_ORDERS = tuple(rdp_privacy_accountant.DEFAULT_RDP_ORDERS)
_LEDGER_FORMAT = 1
_log = logging.getLogger(__name__)


class UnsupportedAccountingError(UsageError):
  """An accountant cannot account for a sampling scheme (never approximated)."""


class SamplingScheme(enum.Enum):
  """How each logical batch is drawn; decides the event and the neighbours."""

  POISSON = "poisson"
  WITHOUT_REPLACEMENT = "without_replacement"

  @property
  def neighboring_relation(self) -> dp_accounting.NeighboringRelation:
    if self is SamplingScheme.POISSON:
      return dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
    return dp_accounting.NeighboringRelation.REPLACE_ONE

  @property
  def relation_label(self) -> str:
    """``"add/remove-one"`` (Poisson) or ``"replace-one"`` (without replacement)."""
    return relation_label(self)

  @property
  def sensitivity(self) -> float:
    """L2 sensitivity of the clipped sum under this scheme's relation, in units of C.

    1 for add/remove-one (one clipped gradient appears or not), 2 for
    replace-one (a clipped gradient ``g`` may become ``-g``). The accountant's
    noise multiplier is ``σ / sensitivity`` and ``δ_tail`` shifts the noise by
    ``sensitivity / σ`` standard deviations: both read it from here.
    """
    return 1.0 if self is SamplingScheme.POISSON else 2.0


class AccountantType(enum.Enum):
  RDP = "rdp"
  PLD = "pld"


def relation_label(scheme: SamplingScheme | str) -> str:
  """The neighbouring relation of ``scheme``, for printing next to every ε."""
  scheme = _as_scheme(scheme)
  return "add/remove-one" if scheme is SamplingScheme.POISSON else "replace-one"


def _as_scheme(scheme: Any, name: str = "scheme") -> SamplingScheme:
  if isinstance(scheme, SamplingScheme):
    return scheme
  try:
    return SamplingScheme(str(scheme).lower().replace("-", "_"))
  except ValueError:
    raise ValueError(
        f"{name} must be one of {[s.value for s in SamplingScheme]}, got {scheme!r}.") from None


def _as_accountant(accountant: Any) -> AccountantType:
  if isinstance(accountant, AccountantType):
    return accountant
  try:
    return AccountantType(str(accountant).lower())
  except ValueError:
    raise ValueError(
        f"accountant must be one of {[a.value for a in AccountantType]}, got {accountant!r}."
    ) from None


def _check_int(name: str, value: Any, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    if isinstance(value, float) and value.is_integer():
      value = int(value)
    else:
      raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  if value < minimum:
    raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
  return int(value)


def _check_sigma(value: Any, name: str = "noise_multiplier") -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
      0 <= value < math.inf):
    raise ValueError(f"{name} must be a finite number >= 0, got {value!r}.")
  return float(value)


def _check_delta(delta: Any, name: str = "delta") -> float:
  if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
    raise ValueError(f"{name} must be in the open interval (0, 1), got {delta!r}.")
  return float(delta)


def _check_epsilon(epsilon: Any, name: str, allow_zero: bool) -> float:
  ok = isinstance(epsilon, numbers.Real) and not isinstance(epsilon, bool) and (
      (0 <= epsilon if allow_zero else 0 < epsilon) and epsilon < math.inf)
  if not ok:
    rng = "[0, inf)" if allow_zero else "(0, inf)"
    raise ValueError(f"{name} must be a finite number in {rng}, got {epsilon!r}.")
  return float(epsilon)


def _check_discretization(value: Any) -> float:
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value <= 1:
    raise ValueError(f"pld_discretization must be in (0, 1], got {value!r}.")
  return float(value)


def _check_sizes(batch_size: Any, dataset_size: Any, batch_name: str = "batch_size") -> tuple[int, int]:
  dataset_size = _check_int("dataset_size", dataset_size, 1)
  batch_size = _check_int(batch_name, batch_size, 1)
  if batch_size > dataset_size:
    raise ValueError(
        f"{batch_name} ({batch_size}) must not exceed dataset_size ({dataset_size}): the sampling "
        f"probability q = {batch_name} / dataset_size must be in (0, 1], got "
        f"{batch_size / dataset_size:.6g}.")
  return batch_size, dataset_size


@dataclasses.dataclass(frozen=True)
class Run:
  """``steps`` consecutive identical DP-SGD steps.

  ``batch_size`` is the expected batch size under Poisson sampling
  (``q = batch_size / dataset_size``) and the fixed batch size without
  replacement.
  """

  steps: int
  batch_size: int
  dataset_size: int
  noise_multiplier: float
  scheme: SamplingScheme

  def __post_init__(self):
    object.__setattr__(self, "steps", _check_int("steps", self.steps, 0))
    b, n = _check_sizes(self.batch_size, self.dataset_size)
    object.__setattr__(self, "batch_size", b)
    object.__setattr__(self, "dataset_size", n)
    object.__setattr__(self, "noise_multiplier", _check_sigma(self.noise_multiplier))
    object.__setattr__(self, "scheme", _as_scheme(self.scheme))

  @property
  def sampling_probability(self) -> float:
    return self.batch_size / self.dataset_size

  @property
  def event_key(self) -> tuple:
    return _event_key(self.scheme, self.batch_size, self.dataset_size, self.noise_multiplier)

  def to_dict(self) -> dict:
    return {"steps": self.steps, "batch_size": self.batch_size,
            "dataset_size": self.dataset_size, "noise_multiplier": self.noise_multiplier,
            "scheme": self.scheme.value}


def _event_key(scheme: SamplingScheme, batch_size: int, dataset_size: int, sigma: float) -> tuple:
  """Steps with equal keys are the same ``DpEvent``."""
  if scheme is SamplingScheme.POISSON:
    return (scheme, batch_size / dataset_size, sigma)
  return (scheme, dataset_size, batch_size, sigma)


def _key_event(key: tuple) -> dp_accounting.DpEvent:
  scheme, *params = key
  # dp-accounting's noise multiplier is std / sensitivity under the relation (module docstring).
  gaussian = dp_accounting.GaussianDpEvent(params[-1] / scheme.sensitivity)
  if scheme is SamplingScheme.POISSON:
    return dp_accounting.PoissonSampledDpEvent(params[0], gaussian)
  n, b, _ = params
  if b == n:  # the whole dataset every step: no sampling, one Gaussian (also what PLD accepts)
    return gaussian
  return dp_accounting.SampledWithoutReplacementDpEvent(n, b, gaussian)


def _key_q_sigma(key: tuple) -> tuple[float, float]:
  """``(q, σ)`` of an event key: the probability that one example is in the batch, and σ."""
  scheme, *params = key
  if scheme is SamplingScheme.POISSON:
    return params[0], params[1]
  n, b, sigma = params
  return b / n, sigma


def step_event(*, batch_size: int, dataset_size: int, noise_multiplier: float,
               scheme: SamplingScheme | str = SamplingScheme.POISSON) -> dp_accounting.DpEvent:
  """The ``dp_accounting`` event of one DP-SGD step (see the module table)."""
  b, n = _check_sizes(batch_size, dataset_size)
  return _key_event(_event_key(_as_scheme(scheme), b, n, _check_sigma(noise_multiplier)))


class Ledger:
  """What ran: a compact, JSON-serialisable list of :class:`Run`.

  ``record`` appends steps, merging into the last run when identical. One
  ledger holds one sampling scheme. Two ledgers are equal when their runs are.
  The ledger also keeps a private running RDP total so that
  :func:`compute_epsilon` after each ``record`` costs only the new steps.
  """

  def __init__(self, runs: Iterable[Run] = ()):
    self._runs: list[Run] = []
    self._counts: dict[tuple, int] = {}
    self._rdp_total: np.ndarray | None = None
    self._rdp_pending: dict[tuple, int] = {}
    for run in runs:
      if not isinstance(run, Run):
        raise ValueError(f"runs must hold Run objects, got {run!r}.")
      self._append(run)

  # ----------------------------------------------------------------- writing
  def record(self, *, batch_size: int, dataset_size: int, noise_multiplier: float,
             scheme: SamplingScheme | str, steps: int = 1) -> None:
    """Records ``steps`` steps at this ``(batch_size, dataset_size, σ, scheme)``.

    Raises:
      ValueError: naming the argument, for a batch size or dataset size < 1, a
        batch larger than the dataset (q > 1), σ < 0 or not finite, steps < 0,
        or a scheme other than the one already in the ledger.
    """
    self._append(Run(steps=steps, batch_size=batch_size, dataset_size=dataset_size,
                     noise_multiplier=noise_multiplier, scheme=scheme))

  def _append(self, run: Run) -> None:
    if run.steps == 0:
      return
    if self._runs and run.scheme is not self._runs[0].scheme:
      raise ValueError(
          f"scheme must match the ledger's sampling scheme {self._runs[0].scheme.value!r} "
          f"(neighbouring relations differ), got {run.scheme.value!r}.")
    last = self._runs[-1] if self._runs else None
    if last is not None and (last.batch_size, last.dataset_size, last.noise_multiplier,
                             last.scheme) == (run.batch_size, run.dataset_size,
                                              run.noise_multiplier, run.scheme):
      merged = copy.copy(last)  # fields already validated: skip __post_init__
      object.__setattr__(merged, "steps", last.steps + run.steps)
      self._runs[-1] = merged
    else:
      self._runs.append(run)
    key = run.event_key
    self._counts[key] = self._counts.get(key, 0) + run.steps
    self._rdp_pending[key] = self._rdp_pending.get(key, 0) + run.steps

  # ----------------------------------------------------------------- reading
  @property
  def runs(self) -> tuple[Run, ...]:
    return tuple(self._runs)

  @property
  def num_steps(self) -> int:
    return sum(r.steps for r in self._runs)

  @property
  def scheme(self) -> SamplingScheme | None:
    """The ledger's sampling scheme, ``None`` while empty."""
    return self._runs[0].scheme if self._runs else None

  def event_counts(self) -> dict[tuple, int]:
    """Distinct step events (keys) and how many steps each; a copy."""
    return dict(self._counts)

  def copy(self) -> "Ledger":
    """An independent ledger with the same runs (runs are immutable, so shared)."""
    other = Ledger()
    other._runs = list(self._runs)
    other._counts = dict(self._counts)
    other._rdp_total = self._rdp_total  # replaced, never mutated in place
    other._rdp_pending = dict(self._rdp_pending)
    return other

  def __len__(self) -> int:
    return len(self._runs)

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Ledger):
      return NotImplemented
    return self._runs == other._runs

  __hash__ = None  # mutable

  def __repr__(self) -> str:
    return f"Ledger(num_steps={self.num_steps}, runs={self._runs!r})"

  # ----------------------------------------------------------- serialisation
  def to_dict(self) -> dict:
    """JSON-able: ``{"format": 1, "runs": [{steps, batch_size, ...}, ...]}``."""
    return {"format": _LEDGER_FORMAT, "runs": [r.to_dict() for r in self._runs]}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "Ledger":
    """Inverse of :meth:`to_dict`; ``ValueError`` naming ``runs[i].field``."""
    if not isinstance(d, Mapping) or not isinstance(d.get("runs"), (list, tuple)):
      raise ValueError(f"ledger must be a mapping with a 'runs' list, got {d!r}.")
    if d.get("format", _LEDGER_FORMAT) != _LEDGER_FORMAT:
      raise ValueError(f"ledger format must be {_LEDGER_FORMAT}, got {d.get('format')!r}.")
    fields = ("steps", "batch_size", "dataset_size", "noise_multiplier", "scheme")
    ledger = cls()
    for i, r in enumerate(d["runs"]):
      if not isinstance(r, Mapping) or set(r) != set(fields):
        raise ValueError(f"runs[{i}] must have exactly the fields {list(fields)}, got {r!r}.")
      try:
        ledger._append(Run(**{f: r[f] for f in fields}))
      except ValueError as e:
        raise ValueError(f"runs[{i}]: {e}") from None
    return ledger

  # ------------------------------------------------------------------- RDP
  def _rdp(self) -> np.ndarray:
    """Total RDP curve at :data:`RDP_ORDERS` (private; see compute_epsilon)."""
    if self._rdp_total is None:
      self._rdp_total = np.zeros(len(RDP_ORDERS))
    if self._rdp_pending:
      self._rdp_total = self._rdp_total + _rdp_of_counts(self._rdp_pending)
      self._rdp_pending = {}
    return self._rdp_total


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


_warned_excluded_orders = False


@contextlib.contextmanager
def _summarised_absl_warnings(what: Any):
  """Runs dp-accounting RDP code with its per-order warnings replaced by one line per process."""
  global _warned_excluded_orders
  absl_logger = logging.getLogger("absl")
  collect = _ExcludedOrders()
  absl_logger.addFilter(collect)
  try:
    yield
  finally:
    absl_logger.removeFilter(collect)
  if collect.count and not _warned_excluded_orders:
    _warned_excluded_orders = True
    _log.warning(
        "dp-accounting could not evaluate %d low fractional RDP orders for %s; they are "
        "excluded from the minimisation (epsilon stays a valid upper bound). Shown once.",
        collect.count, what)


@functools.lru_cache(maxsize=1 << 15)
def _rdp_of_event(key: tuple) -> np.ndarray:
  """RDP curve of one step, from dp-accounting's own ``RdpAccountant``."""
  accountant = rdp_privacy_accountant.RdpAccountant(
      orders=RDP_ORDERS, neighboring_relation=key[0].neighboring_relation)
  event = _key_event(key)
  with _summarised_absl_warnings(event):
    curve = accountant.compose(event).rdp
  curve.setflags(write=False)
  return curve


def _rdp_of_counts(counts: Mapping[tuple, int]) -> np.ndarray:
  # The RdpAccountant's own composition rule: rdp += count * rdp(event).
  total = np.zeros(len(RDP_ORDERS))
  for key, count in counts.items():
    total = total + count * _rdp_of_event(key)
  return total


def _check_supported(scheme: SamplingScheme | None, accountant: AccountantType,
                     keys: Iterable[tuple] = ((None,),)) -> None:
  """PLD cannot account for sampling without replacement, except of the whole dataset.

  ``keys``: the event keys to be accounted (the default stands for "some batch
  smaller than the dataset", for checks made before the schedule is known).
  """
  if scheme is SamplingScheme.WITHOUT_REPLACEMENT and accountant is AccountantType.PLD and any(
      k[0] is None or k[1] != k[2] for k in keys):
    raise UnsupportedAccountingError(
        "accountant 'pld' cannot account for sampling scheme 'without_replacement' with a batch "
        "smaller than the dataset: dp-accounting 0.6 supports it only in the RDP accountant "
        "(replace-one neighbours); use accountant 'rdp' or Poisson sampling.")


def _fresh_accountant(scheme: SamplingScheme, accountant: AccountantType,
                      discretization: float) -> dp_accounting.PrivacyAccountant:
  if accountant is AccountantType.RDP:
    return rdp_privacy_accountant.RdpAccountant(
        orders=RDP_ORDERS, neighboring_relation=scheme.neighboring_relation)
  # PLD sees without-replacement steps only as GaussianDpEvent(σ / 2) (B = N), whose noise
  # multiplier already carries the replace-one sensitivity 2C. PLD's REPLACE_ONE would double
  # it again (it models ±sensitivity around 0); its add/remove relation reads a Gaussian event
  # as "shift of 1 noise-multiplier unit", exactly the mechanism that runs.
  return pld_privacy_accountant.PLDAccountant(
      neighboring_relation=dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE,
      value_discretization_interval=discretization)


@functools.lru_cache(maxsize=8)
def _pld_of_counts(items: tuple, discretization: float) -> pld_privacy_accountant.PLDAccountant:
  accountant = _fresh_accountant(items[0][0][0], AccountantType.PLD, discretization)
  for key, count in items:
    accountant.compose(_key_event(key), count)
  return accountant


def _epsilon_of_counts(counts: Mapping[tuple, int], delta: float, accountant: AccountantType,
                       discretization: float, rdp: np.ndarray | None = None) -> float:
  if not counts:
    return 0.0
  if accountant is AccountantType.RDP:
    if rdp is None:
      rdp = _rdp_of_counts(counts)
    return float(rdp_privacy_accountant.compute_epsilon(RDP_ORDERS, rdp, delta)[0])
  return float(_pld_of_counts(tuple(counts.items()), discretization).get_epsilon(delta))


def _tail_steps(counts: Mapping[tuple, int]) -> list[tuple[int, float, float]]:
  """``(count, q, σ)`` groups for :mod:`dpmega.truncation`, one per distinct σ.

  ``tail_delta`` is ``Σ count·q·η(σ)`` plus a term in ``Σ count``: merging the
  steps of one σ into ``(Σ count, Σ count·q / Σ count, σ)`` keeps both sums, and
  computes ``η`` once per σ instead of once per batch size (a ramp has thousands).
  """
  groups: dict[float, list[float]] = {}
  for key, count in counts.items():
    q, sigma = _key_q_sigma(key)
    total = groups.setdefault(sigma, [0, 0.0])
    total[0] += int(count)
    total[1] += int(count) * q
  return [(c, cq / c, sigma) for sigma, (c, cq) in groups.items() if c]


def _check_tail(tail: Any) -> truncation.TailModel | None:
  if tail is not None and not isinstance(tail, truncation.TailModel):
    raise ValueError(f"tail must be a dpmega.truncation.TailModel or None, got {tail!r}.")
  return tail


def _scheme_of(counts: Mapping[tuple, int]) -> SamplingScheme | None:
  return next(iter(counts))[0] if counts else None


def _accountant_delta(delta: float, counts: Mapping[tuple, int],
                      tail: truncation.TailModel | None) -> float | None:
  """The δ the ideal-Gaussian accountant gets for a stated ``delta`` (None: δ_tail alone >= delta)."""
  if tail is None or not counts:
    return delta
  try:
    return truncation.accountant_delta(delta, _tail_steps(counts), sensitivity=_scheme_of(counts).sensitivity,
                                       tail=tail)
  except ValueError:
    return None


def _epsilon_at(counts: Mapping[tuple, int], delta: float, accountant: AccountantType, discretization: float,
                tail: truncation.TailModel | None, rdp: np.ndarray | None = None) -> float:
  """ε of ``counts`` at the stated ``delta``, the tail's share taken out first."""
  if not counts:
    return 0.0
  if any(_key_q_sigma(k)[1] == 0 for k in counts):
    return math.inf  # no noise: no δ helps, and the tail bound is 1 per step
  acc_delta = _accountant_delta(delta, counts, tail)
  if acc_delta is None:
    return math.inf
  return _epsilon_of_counts(counts, acc_delta, accountant, discretization, rdp)


def ledger_event(ledger: Ledger) -> dp_accounting.DpEvent:
  """The whole ledger as one ``dp_accounting`` event (steps grouped by event)."""
  return dp_accounting.ComposedDpEvent([
      dp_accounting.SelfComposedDpEvent(_key_event(k), c)
      for k, c in ledger.event_counts().items()])


def compute_epsilon(ledger: Ledger, delta: float, accountant: AccountantType | str = "rdp", *,
                    pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                    tail: truncation.TailModel | None = None) -> float:
  """ε(δ) spent by every step in ``ledger`` (0 when empty, inf when some σ is 0).

  Guarantee: with ``tail``, every step's noise drawn by a sampler of that
  support makes the ledger's steps (ε, ``delta``)-DP: ε is the accountant's ε at
  ``delta - δ_tail`` (:func:`dpmega.truncation.accountant_delta`). Without it,
  ε is for the ideal (unbounded) Gaussian.

  Args:
    ledger: the steps that ran.
    delta: in (0, 1), the total δ to state (δ_tail included when ``tail`` is given).
    accountant: ``"rdp"`` (fast; a running total is cached in the ledger) or
      ``"pld"`` (tighter; cost grows with the number of distinct (q, σ)).
    pld_discretization: PLD ``value_discretization_interval``; smaller is
      tighter and slower.
    tail: the noise sampler's support and noised coordinates, or None.

  Returns:
    ε >= 0; inf when some σ is 0 or when ``δ_tail`` alone reaches ``delta``.

  Raises:
    ValueError: delta outside (0, 1), unknown accountant, tail not a TailModel.
    UnsupportedAccountingError: PLD on a without-replacement ledger with B < N.
  """
  delta = _check_delta(delta)
  accountant = _as_accountant(accountant)
  discretization = _check_discretization(pld_discretization)
  tail = _check_tail(tail)
  counts = ledger.event_counts()
  _check_supported(ledger.scheme, accountant, counts)
  if not counts:
    return 0.0
  rdp = ledger._rdp() if accountant is AccountantType.RDP else None  # pylint: disable=protected-access
  return _epsilon_at(counts, delta, accountant, discretization, tail, rdp)


def compute_delta(ledger: Ledger, epsilon: float, accountant: AccountantType | str = "rdp", *,
                  pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                  tail: truncation.TailModel | None = None) -> float:
  """δ(ε) of every step in ``ledger`` (0 when empty). ``epsilon`` must be >= 0.

  With ``tail``: the accountant's δ(ε) plus the sampler's ``δ_tail``
  (:func:`dpmega.truncation.tail_delta`), capped at 1.
  """
  epsilon = _check_epsilon(epsilon, "epsilon", allow_zero=True)
  accountant = _as_accountant(accountant)
  discretization = _check_discretization(pld_discretization)
  tail = _check_tail(tail)
  counts = ledger.event_counts()
  _check_supported(ledger.scheme, accountant, counts)
  if not counts:
    return 0.0
  if accountant is AccountantType.RDP:
    rdp = ledger._rdp()  # pylint: disable=protected-access
    ideal = float(rdp_privacy_accountant.compute_delta(RDP_ORDERS, rdp, epsilon)[0])
  else:
    ideal = float(_pld_of_counts(tuple(counts.items()), discretization).get_delta(epsilon))
  if tail is None:
    return ideal
  extra = truncation.tail_delta(_tail_steps(counts), sensitivity=ledger.scheme.sensitivity, tail=tail,
                                accountant_delta=ideal)
  return min(1.0, ideal + extra)


def _tail_share(counts: Mapping[tuple, int], tail: truncation.TailModel, delta: float | None) -> float:
  if not counts:
    return 0.0
  if delta is None:
    return truncation.tail_delta(_tail_steps(counts), sensitivity=_scheme_of(counts).sensitivity, tail=tail)
  acc_delta = _accountant_delta(_check_delta(delta), counts, tail)
  return math.inf if acc_delta is None else delta - acc_delta


def tail_delta_of(ledger: Ledger, tail: truncation.TailModel, *, delta: float | None = None) -> float:
  """``δ_tail`` of the steps in ``ledger`` under ``tail`` (0 when empty), for printing.

  Args:
    ledger: the steps that ran.
    tail: the noise sampler's support and number of noised coordinates.
    delta: None: the floor ``Σ_t q_t η_t`` that no δ given to the accountant
      removes. A stated δ: the share of it the tail takes, ``delta`` minus the
      δ given to the accountant (inf when nothing is left), which also covers
      the ``1/Z`` scaling of the accountant's δ (negligible for the wide-tail
      sampler).
  """
  return _tail_share(ledger.event_counts(), _check_tail(tail), delta)


# ------------------------------------------------------------- schedules


def _schedule_counts(dataset_size: int, batch_sizes: Any, num_steps: int | None,
                     sigma: float, scheme: SamplingScheme,
                     q_grid: float | None = None) -> dict[tuple, int]:
  """Event counts of a whole schedule: ``{event_key: steps}``."""
  sizes, counts = _size_counts(batch_sizes, num_steps)
  for b in sizes:
    _check_sizes(int(b), dataset_size)
  sizes, counts = _bucket_up(sizes, counts, dataset_size, q_grid)
  return {_event_key(scheme, int(b), dataset_size, sigma): int(c) for b, c in zip(sizes, counts)}


def _size_counts(batch_sizes: Any, num_steps: int | None) -> tuple[np.ndarray, np.ndarray]:
  """Distinct batch sizes and their step counts, from a sequence or a schedule."""
  if isinstance(batch_sizes, (str, Mapping, numbers.Integral, schedules_lib.Constant,
                              schedules_lib.Steps, schedules_lib.Linear, schedules_lib.Geometric)):
    if num_steps is None:
      raise ValueError("num_steps is needed when batch_sizes is a schedule, not a sequence.")
    num_steps = _check_int("num_steps", num_steps, 0)
    schedule = schedules_lib.as_schedule(batch_sizes, num_steps=num_steps)
    return schedule.batch_size_counts(num_steps)
  arr = np.asarray(batch_sizes)
  if arr.ndim != 1:
    raise ValueError(f"batch_sizes must be a 1-D sequence of ints, got shape {arr.shape}.")
  if num_steps is not None and _check_int("num_steps", num_steps, 0) != arr.shape[0]:
    raise ValueError(
        f"num_steps ({num_steps}) must equal len(batch_sizes) ({arr.shape[0]}) when both are given.")
  if arr.size and not (np.issubdtype(arr.dtype, np.integer) or np.all(np.mod(arr, 1) == 0)):
    raise ValueError("batch_sizes must hold integers.")
  arr = arr.astype(np.int64)
  if arr.size and arr.min() < 1:
    raise ValueError(f"batch_sizes must be >= 1, got {int(arr.min())}.")
  sizes, counts = np.unique(arr, return_counts=True)
  return sizes, counts


def _bucket_up(sizes: np.ndarray, counts: np.ndarray, dataset_size: int,
               q_grid: float | None) -> tuple[np.ndarray, np.ndarray]:
  """Rounds every batch size UP to the grid ``ceil((1 + q_grid) ** k)`` (capped at N).

  ε is non-decreasing in the batch size (in q), so accounting the rounded-up
  sizes gives an upper bound on the exact ε with fewer distinct events.
  """
  if q_grid is None:
    return sizes, counts
  if isinstance(q_grid, bool) or not isinstance(q_grid, numbers.Real) or not 0 < q_grid <= 1:
    raise ValueError(f"q_grid must be in (0, 1] (relative grid spacing), got {q_grid!r}.")
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
  ``tail``: as in :func:`compute_epsilon` (ε at ``delta`` minus the sampler's ``δ_tail``).
  """
  sigma = _check_sigma(noise_multiplier)
  delta = _check_delta(delta)
  dataset_size = _check_int("dataset_size", dataset_size, 1)
  scheme = _as_scheme(scheme)
  accountant = _as_accountant(accountant)
  discretization = _check_discretization(pld_discretization)
  tail = _check_tail(tail)
  counts = _schedule_counts(dataset_size, batch_sizes, num_steps, sigma, scheme, q_grid)
  _check_supported(scheme, accountant, counts)
  return _epsilon_at(counts, delta, accountant, discretization, tail)


def tail_delta_for_schedule(*, noise_multiplier: float, dataset_size: int, batch_sizes: Any,
                            tail: truncation.TailModel, num_steps: int | None = None,
                            scheme: SamplingScheme | str = "poisson", delta: float | None = None) -> float:
  """``δ_tail`` of a planned run (see :func:`tail_delta_of`; arguments as :func:`epsilon_for_schedule`)."""
  sigma = _check_sigma(noise_multiplier)
  dataset_size = _check_int("dataset_size", dataset_size, 1)
  scheme = _as_scheme(scheme)
  counts = _schedule_counts(dataset_size, batch_sizes, num_steps, sigma, scheme)
  return _tail_share(counts, _check_tail(tail), delta)


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
    q_grid: off by default; see :func:`epsilon_for_schedule` (the σ returned
      then meets the target for the rounded-up, hence also the exact, schedule).
    rtol: relative tolerance on σ; default 1e-4 for RDP, 1e-3 for PLD (its ε
      moves in steps of the discretization, and each evaluation is costly).
    tail: the noise sampler's support and noised coordinates: the target is
      then met at ``delta`` with the sampler's ``δ_tail`` (which depends on σ)
      taken out of it first, as :func:`compute_epsilon` reports it.

  Raises:
    UsageError: the target is unreachable for σ up to 1e6; the message gives
      the best achievable ε (and ``δ_tail`` when the tail alone exceeds δ).
    ValueError: any argument out of range (named), before any accounting.
  """
  target = _check_epsilon(target_epsilon, "target_epsilon", allow_zero=False)
  delta = _check_delta(delta)
  dataset_size = _check_int("dataset_size", dataset_size, 1)
  scheme = _as_scheme(scheme)
  accountant = _as_accountant(accountant)
  discretization = _check_discretization(pld_discretization)
  if rtol is None:
    rtol = 1e-4 if accountant is AccountantType.RDP else 1e-3
  if isinstance(rtol, bool) or not isinstance(rtol, numbers.Real) or not 0 < rtol < 0.1:
    raise ValueError(f"rtol must be in (0, 0.1), got {rtol!r}.")
  tail = _check_tail(tail)
  sizes, counts = _size_counts(batch_sizes, num_steps)
  for b in sizes:
    _check_sizes(int(b), dataset_size)
  sizes, counts = _bucket_up(sizes, counts, dataset_size, q_grid)
  _check_supported(scheme, accountant, [_event_key(scheme, int(b), dataset_size, 1.0) for b in sizes])
  if not counts.sum():
    return 0.0

  def counts_at(sigma: float) -> dict[tuple, int]:
    return {_event_key(scheme, int(b), dataset_size, sigma): int(c) for b, c in zip(sizes, counts)}

  memo: dict[tuple[AccountantType, float], float] = {}

  def eps(sigma: float, kind: AccountantType = accountant) -> float:
    if (kind, sigma) not in memo:
      memo[(kind, sigma)] = _epsilon_at(counts_at(sigma), delta, kind, discretization, tail)
    return memo[(kind, sigma)]

  def gap(log_sigma: float, kind: AccountantType = accountant) -> float:
    # Finite for Brent's method: ε is inf where δ_tail alone exceeds δ (a tail model, small σ).
    return min(eps(math.exp(log_sigma), kind) - target, 1e9)

  def bracket(kind: AccountantType, guess: float) -> tuple[float, float]:
    """(lo, hi) in log σ with gap(lo) > 0 >= gap(hi), or raises."""
    hi = math.log(guess)
    if gap(hi, kind) > 0:
      step = math.log(2.0)
      while gap(hi, kind) > 0:
        lo, hi = hi, hi + step
        step *= 2
        if hi > math.log(_SIGMA_MAX):
          best = eps(_SIGMA_MAX, kind)
          why = ""
          if tail is not None and _accountant_delta(delta, counts_at(_SIGMA_MAX), tail) is None:
            floor = truncation.tail_delta(_tail_steps(counts_at(_SIGMA_MAX)), sensitivity=scheme.sensitivity,
                                          tail=tail)
            why = (f" The noise sampler's bounded support alone costs delta_tail >= {floor:.3g} over "
                   f"{tail.num_coordinates} noised coordinates: use the wide-tail sampler or a larger delta.")
          raise UsageError(
              f"target_epsilon={target_epsilon} is unreachable: even noise_multiplier="
              f"{_SIGMA_MAX:g} gives epsilon={best:.6g} ({kind.value}, delta={delta:g}); "
              f"the best achievable here is about {best:.6g}.{why}")
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
  fresh = _fresh_accountant(scheme, accountant, discretization)
  for key, c in counts_at(sigma).items():
    with _summarised_absl_warnings(_key_event(key)):
      fresh.compose(_key_event(key), c)
  acc_delta = _accountant_delta(delta, counts_at(sigma), tail)
  final = math.inf if acc_delta is None else fresh.get_epsilon(acc_delta)
  if not final <= target:
    raise RuntimeError(f"calibration failed verification: epsilon({sigma}) = {final} > {target}.")
  return sigma


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
  target = _check_epsilon(target_epsilon, "target_epsilon", allow_zero=False)
  limit = _check_int("limit", limit, 1)

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
  target = _check_epsilon(target_epsilon, "target_epsilon", allow_zero=False)
  trial = ledger.copy()
  trial.record(batch_size=next_batch_size, dataset_size=dataset_size,
               noise_multiplier=noise_multiplier, scheme=scheme, steps=1)
  return compute_epsilon(trial, delta, accountant, pld_discretization=pld_discretization, tail=tail) <= target


# δ_tail below this fraction of δ is not worth a word in a one-line summary (always in JSON).
TAIL_NEGLIGIBLE = 1e-3


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
  scheme = _as_scheme(scheme)
  accountant = _as_accountant(accountant)
  line = (f"epsilon = {epsilon:.4g} at delta = {delta:g} ({accountant.value.upper()}, "
          f"{scheme.value.replace('_', ' ')} sampling, {relation_label(scheme)} neighbours")
  if delta_tail is not None and delta_tail > TAIL_NEGLIGIBLE * delta:
    line += f"; delta includes delta_tail = {delta_tail:.3g} of the noise sampler"
  return line + ")"
