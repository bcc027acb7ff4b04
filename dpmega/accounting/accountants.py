"""Which accountant, and what each one can account for: the one place of that rule.

Light on purpose (no dp-accounting, no scipy), so that configs and flags can be
checked before any accounting is loaded.

==========================  =======================  =========================
sampling scheme             RDP                      PLD
==========================  =======================  =========================
``POISSON``                 yes                      yes
``WITHOUT_REPLACEMENT``     yes                      only when every batch is
                                                     the whole dataset (B = N)
==========================  =======================  =========================

dp-accounting 0.6 accepts ``SampledWithoutReplacementDpEvent`` only in its RDP
accountant; with ``B = N`` a step is one Gaussian (no sampling), which PLD
accounts exactly. Nothing is approximated silently: every other combination
raises :class:`UnsupportedAccountingError`.

Example:
  >>> check_supported("without_replacement", "pld", [(1000, 1000)])  # B = N: one Gaussian
  >>> try:
  ...   check_supported("without_replacement", "pld")  # batch sizes not known yet: refused
  ... except UnsupportedAccountingError as e:
  ...   print(str(e)[:75])
  accountant 'pld' cannot account for sampling 'without_replacement' with a b
"""

from __future__ import annotations

import enum
from typing import Any, Iterable

from dpmega import validation
from dpmega.errors import UsageError
from dpmega.sampling import SamplingScheme
from dpmega.sampling import as_scheme

__all__ = ["AccountantType", "UnsupportedAccountingError", "DEFAULT_PLD_DISCRETIZATION", "as_accountant",
           "relation_label", "check_supported"]

# dp-accounting's own default (``PLDAccountant(value_discretization_interval)``):
# ε is over-estimated by at most about this much per composition tree level.
DEFAULT_PLD_DISCRETIZATION = 1e-4


class AccountantType(enum.Enum):
  """The dp-accounting accountant that composes the steps."""

  RDP = "rdp"
  PLD = "pld"


class UnsupportedAccountingError(UsageError):
  """An accountant cannot account for a sampling scheme (never approximated)."""


def as_accountant(value: Any) -> AccountantType:
  """``value`` (``"rdp"``, ``"PLD"`` or the enum) as an :class:`AccountantType`."""
  if isinstance(value, AccountantType):
    return value
  try:
    return AccountantType(str(value).lower())
  except ValueError:
    raise ValueError(
        f"accountant must be one of {[a.value for a in AccountantType]}, got accountant={value!r}.") from None


def relation_label(scheme: SamplingScheme | str) -> str:
  """The neighbouring relation of ``scheme``, for printing next to every ε."""
  return as_scheme(scheme).relation_label


def check_supported(scheme: SamplingScheme | str, accountant: AccountantType | str,
                    batches: Iterable[tuple[int, int]] | None = None) -> None:
  """Raises :class:`UnsupportedAccountingError` unless ``accountant`` can account for ``scheme`` (module table).

  Args:
    scheme: the sampling scheme.
    accountant: the accountant.
    batches: the ``(batch_size, dataset_size)`` of the steps to be accounted;
      None when they are not known yet (then any batch may be smaller than
      the dataset).
  """
  scheme, accountant = as_scheme(scheme), as_accountant(accountant)
  if scheme is not SamplingScheme.WITHOUT_REPLACEMENT or accountant is not AccountantType.PLD:
    return
  if batches is None or any(b != n for b, n in batches):
    raise UnsupportedAccountingError(
        "accountant 'pld' cannot account for sampling 'without_replacement' with a batch smaller than the "
        "dataset: dp-accounting 0.6 supports it only in the RDP accountant (replace-one neighbours); use "
        "accountant 'rdp' or Poisson sampling.")


def check_discretization(value: Any) -> float:
  """The PLD ``value_discretization_interval``, in ``(0, 1]``."""
  return validation.check_real("pld_discretization", value, 0, 1, lo_open=True)
