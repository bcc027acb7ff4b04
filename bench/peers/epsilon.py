"""ε for one DP-SGD schedule, from dpmega, jax_privacy and Opacus' accountants.

Prints one JSON line (``MARKER`` + list of rows). Each row: library,
accountant, ε, seconds to compute it, or the error.
"""

from __future__ import annotations

import json
import sys
import time

MARKER = "@@EPSILON@@ "

SCHEDULE = {"dataset_size": 60_000, "batch_size": 256, "noise_multiplier": 1.1,
            "epochs": 60, "delta": 1e-5, "sampling": "Poisson"}


def steps() -> int:
  return SCHEDULE["epochs"] * SCHEDULE["dataset_size"] // SCHEDULE["batch_size"]


def _dpmega(accountant):
  from dpmega import accounting  # pylint: disable=g-import-not-at-top
  ledger = accounting.Ledger()
  ledger.record(batch_size=SCHEDULE["batch_size"], dataset_size=SCHEDULE["dataset_size"],
                noise_multiplier=SCHEDULE["noise_multiplier"], scheme="poisson", steps=steps())
  return accounting.compute_epsilon(ledger, SCHEDULE["delta"], accountant=accountant)


def _jax_privacy(config_name):
  from jax_privacy import accounting  # pylint: disable=g-import-not-at-top
  cfg = getattr(accounting, config_name)()
  params = accounting.DpParams(
      noise_multipliers=SCHEDULE["noise_multiplier"], num_samples=SCHEDULE["dataset_size"],
      delta=SCHEDULE["delta"], batch_size=SCHEDULE["batch_size"],
      sampling_method=accounting.SamplingMethod.POISSON)
  return accounting.DpsgdTrainingAccountant(cfg).compute_epsilon(steps(), params)


def _opacus(name):
  from opacus.accountants import create_accountant  # pylint: disable=g-import-not-at-top
  acc = create_accountant(name)
  acc.history = [(SCHEDULE["noise_multiplier"],
                  SCHEDULE["batch_size"] / SCHEDULE["dataset_size"], steps())]
  return acc.get_epsilon(delta=SCHEDULE["delta"])


CASES = [
    ("dpmega", "RDP", lambda: _dpmega("rdp")),
    ("dpmega", "PLD", lambda: _dpmega("pld")),
    ("jax_privacy", "RDP", lambda: _jax_privacy("RdpAccountantConfig")),
    ("jax_privacy", "PLD", lambda: _jax_privacy("PldAccountantConfig")),
    ("Opacus", "RDP", lambda: _opacus("rdp")),
    ("Opacus", "PRV", lambda: _opacus("prv")),
]


def main() -> int:
  # Imports first, so the seconds below are the accounting alone.
  import dpmega.accounting.ledger, jax_privacy.accounting, opacus.accountants  # noqa: F401  (pre-import: the timings are the accounting alone)
  rows = []
  for lib, acc, fn in CASES:
    t = time.perf_counter()
    try:
      rows.append({"library": lib, "accountant": acc, "epsilon": float(fn()),
                   "seconds": time.perf_counter() - t})
    except Exception as e:  # pylint: disable=broad-except
      rows.append({"library": lib, "accountant": acc, "error": f"{type(e).__name__}: {e}"[:300]})
  print(MARKER + json.dumps({"schedule": {**SCHEDULE, "steps": steps()}, "rows": rows}), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
