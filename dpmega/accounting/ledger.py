"""What ran: the :class:`Ledger` of DP-SGD steps, and the ε / δ / ``δ_tail`` it has spent.

A ledger is a list of :class:`Run`: ``steps`` consecutive identical steps
``(batch_size, dataset_size, noise_multiplier, scheme)``. Each step is one
dp-accounting event (:mod:`dpmega.accounting.events`); nothing here re-derives
RDP or PLD math.

Invariants kept here (``docs/design.md``, privacy invariants):

5. *The accountant is fed exactly what ran.* A :class:`Run` holds the
   ``(B_t, N, σ_t)`` of the steps as they ran and their sampling scheme; a
   ledger holds one scheme (``record`` with another is a ``ValueError``: the
   neighbouring relations differ), and the event of each step carries that
   scheme's sensitivity (``C`` add/remove-one, ``2C`` replace-one, so
   without-replacement steps reach dp-accounting as ``σ / 2``). An
   accountant that cannot account for the scheme raises
   :class:`UnsupportedAccountingError` instead of approximating.
6. *ε never decreases.* ``record`` only appends (runs are immutable, a copy
   shares nothing mutable), and ε of a ledger is a composition over all of its
   steps, so ε after ``record`` is >= ε before. The workdir's ledger is built
   from its append-only journal (:mod:`dpmega.accounting.journal`), which
   holds every step whose noisy update was ever computed; the step that would
   exceed a budget is refused before it runs by
   :func:`dpmega.accounting.plan.fits_budget`, on a copy of this ledger.

Guarantee: ``compute_epsilon(ledger, delta, accountant)`` is the ε that
``dp_accounting``'s ``RdpAccountant`` / ``PLDAccountant`` reports after
composing every step of the ledger. For RDP the ledger keeps a running total,
so a query after ``record`` only adds what is new. With ``tail=`` (invariant
8) the ε reported for ``delta`` is the accountant's ε at ``delta - δ_tail``,
so the stated ``(ε, delta)`` covers the sampler that ran;
:func:`compute_delta` returns the accountant's δ plus ``δ_tail``.

Edge cases:

* an empty ledger has ε = 0 and δ(ε) = 0;
* ``noise_multiplier == 0`` gives ε = inf (both accountants);
* ``q = 1`` (the whole dataset every step) is allowed;
* with a tail model whose ``δ_tail`` alone reaches ``delta``, ε = inf (no finite
  ε holds at that δ); :func:`tail_delta_of` gives the floor to print.

Example:
  >>> ledger = Ledger()
  >>> ledger.record(batch_size=256, dataset_size=60000, noise_multiplier=1.1, scheme="poisson", steps=100)
  >>> e1 = compute_epsilon(ledger, 1e-5)
  >>> ledger.record(batch_size=512, dataset_size=60000, noise_multiplier=1.1, scheme="poisson")
  >>> 0 < e1 <= compute_epsilon(ledger, 1e-5), ledger.num_steps, len(ledger)
  (True, 101, 2)
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Iterable, Mapping

import numpy as np
from dp_accounting.rdp import rdp_privacy_accountant

from dpmega import truncation
from dpmega import validation
from dpmega.accounting import events
from dpmega.accounting.accountants import DEFAULT_PLD_DISCRETIZATION
from dpmega.accounting.accountants import AccountantType
from dpmega.accounting.accountants import as_accountant
from dpmega.accounting.accountants import check_discretization
from dpmega.accounting.accountants import check_supported
from dpmega.sampling import SamplingScheme
from dpmega.sampling import as_scheme

__all__ = ["Run", "Ledger", "compute_epsilon", "compute_delta", "tail_delta_of"]

_LEDGER_FORMAT = 1


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
    object.__setattr__(self, "steps", validation.check_int("steps", self.steps, 0, integral_floats=True))
    b, n = events.check_sizes(self.batch_size, self.dataset_size)
    object.__setattr__(self, "batch_size", b)
    object.__setattr__(self, "dataset_size", n)
    object.__setattr__(self, "noise_multiplier", events.check_sigma(self.noise_multiplier))
    object.__setattr__(self, "scheme", as_scheme(self.scheme))

  @property
  def sampling_probability(self) -> float:
    return self.batch_size / self.dataset_size

  @property
  def event_key(self) -> tuple:
    return events.event_key(self.scheme, self.batch_size, self.dataset_size, self.noise_multiplier)

  def to_dict(self) -> dict:
    return {"steps": self.steps, "batch_size": self.batch_size,
            "dataset_size": self.dataset_size, "noise_multiplier": self.noise_multiplier,
            "scheme": self.scheme.value}


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
    """Total RDP curve at :data:`events.RDP_ORDERS` (private; see compute_epsilon)."""
    if self._rdp_total is None:
      self._rdp_total = np.zeros(len(events.RDP_ORDERS))
    if self._rdp_pending:
      self._rdp_total = self._rdp_total + events.rdp_of_counts(self._rdp_pending)
      self._rdp_pending = {}
    return self._rdp_total


def _checked_counts(ledger: Ledger, accountant: Any) -> tuple[AccountantType, dict[tuple, int]]:
  accountant = as_accountant(accountant)
  counts = ledger.event_counts()
  if ledger.scheme is not None:
    check_supported(ledger.scheme, accountant, events.key_batches(counts))
  return accountant, counts


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
  delta = events.check_delta(delta)
  discretization = check_discretization(pld_discretization)
  tail = events.check_tail(tail)
  accountant, counts = _checked_counts(ledger, accountant)
  if not counts:
    return 0.0
  rdp = ledger._rdp() if accountant is AccountantType.RDP else None  # pylint: disable=protected-access
  return events.epsilon_at(counts, delta, accountant, discretization, tail, rdp)


def compute_delta(ledger: Ledger, epsilon: float, accountant: AccountantType | str = "rdp", *,
                  pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
                  tail: truncation.TailModel | None = None) -> float:
  """δ(ε) of every step in ``ledger`` (0 when empty). ``epsilon`` must be >= 0.

  With ``tail``: the accountant's δ(ε) plus the sampler's ``δ_tail``
  (:func:`dpmega.truncation.tail_delta`), capped at 1.
  """
  epsilon = events.check_epsilon(epsilon, "epsilon", allow_zero=True)
  discretization = check_discretization(pld_discretization)
  tail = events.check_tail(tail)
  accountant, counts = _checked_counts(ledger, accountant)
  if not counts:
    return 0.0
  if accountant is AccountantType.RDP:
    rdp = ledger._rdp()  # pylint: disable=protected-access
    ideal = float(rdp_privacy_accountant.compute_delta(events.RDP_ORDERS, rdp, epsilon)[0])
  else:
    ideal = float(events.pld_of_counts(tuple(counts.items()), discretization).get_delta(epsilon))
  ideal = events.checked_delta(ideal, counts, epsilon)  # dp-accounting's δ can round to 0 at a huge σ
  if tail is None:
    return ideal
  extra = truncation.tail_delta(events.tail_steps(counts), sensitivity=ledger.scheme.sensitivity, tail=tail,
                                accountant_delta=ideal)
  return min(1.0, ideal + extra)


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
  return events.tail_share(ledger.event_counts(), events.check_tail(tail), delta)
