"""Privacy accounting for whole DP-SGD schedules, on top of ``dp-accounting``.

One package, one job per module; imports go one way (top to bottom):

====================  ==========================================================================
module                job
====================  ==========================================================================
``accountants``       which accountant (:class:`AccountantType`), and the one rule of what each
                      can account for (:func:`check_supported`); light: no dp-accounting
``events``            a step as a dp-accounting event (scheme, sensitivity, relation), the RDP /
                      PLD of a multiset of steps, ``δ_tail``; the only caller of dp-accounting
``ledger``            what ran: :class:`Ledger`, :func:`compute_epsilon`, :func:`compute_delta`,
                      :func:`tail_delta_of` (privacy invariants 5 and 6 are stated there)
``calibrate``         σ for a target ε over a whole schedule
``plan``              what will run: :class:`Plan` (shared by ``dpmega train`` and ``dpmega
                      epsilon`` / ``calibrate``), ε of a schedule, :func:`max_steps`,
                      :func:`fits_budget`, the printed line :func:`describe`, :func:`delta_warning`
``journal``           the workdir's append-only journal of every step ever computed
====================  ==========================================================================

The names below are re-exported lazily, so that ``import dpmega.accounting``
(and its light module ``accountants``, which configs use) does not load
dp-accounting or scipy; ``dpmega.accounting.Ledger`` loads them on first use.
:class:`SamplingScheme` lives in :mod:`dpmega.sampling`.

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

import importlib

_EXPORTS = {
    "SamplingScheme": "dpmega.sampling",
    "AccountantType": "dpmega.accounting.accountants",
    "UnsupportedAccountingError": "dpmega.accounting.accountants",
    "DEFAULT_PLD_DISCRETIZATION": "dpmega.accounting.accountants",
    "relation_label": "dpmega.accounting.accountants",
    "check_supported": "dpmega.accounting.accountants",
    "RDP_ORDERS": "dpmega.accounting.events",
    "step_event": "dpmega.accounting.events",
    "neighboring_relation": "dpmega.accounting.events",
    "Run": "dpmega.accounting.ledger",
    "Ledger": "dpmega.accounting.ledger",
    "compute_epsilon": "dpmega.accounting.ledger",
    "compute_delta": "dpmega.accounting.ledger",
    "tail_delta_of": "dpmega.accounting.ledger",
    "calibrate_noise_multiplier": "dpmega.accounting.calibrate",
    "Plan": "dpmega.accounting.plan",
    "epsilon_for_schedule": "dpmega.accounting.plan",
    "tail_delta_for_schedule": "dpmega.accounting.plan",
    "max_steps": "dpmega.accounting.plan",
    "fits_budget": "dpmega.accounting.plan",
    "describe": "dpmega.accounting.plan",
    "delta_warning": "dpmega.accounting.plan",
    "progress_printer": "dpmega.accounting.calibrate",
    "TAIL_NEGLIGIBLE": "dpmega.accounting.plan",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'dpmega.accounting' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(list(globals()) + __all__)
