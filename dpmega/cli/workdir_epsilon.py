"""``dpmega epsilon --workdir W --delta D``: ε(δ) of what a training run spent, at any δ (Opacus' ``get_epsilon``).

Reads the workdir's journal (``spent.jsonl``, :mod:`dpmega.accounting.journal`): every distinct step ever
computed there, in any generation, with the batch size, dataset size, σ and sampling scheme it ran with. The
result is the same ε the run reports (it never decreases over the workdir's history), here at the δ asked for.
Read only: nothing in the workdir is created or changed.

The noise sampler's ``δ_tail`` grows with the number of noised coordinates, which the journal does not hold:
``--num_noised_coordinates`` (default 1e9, more than most models, hence an upper bound on ε) sets it; the run's
own count in ``summary.json`` (parameters + a sparse run's table rows) is used when larger.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from dpmega import accounting
from dpmega import noise
from dpmega import truncation
from dpmega.accounting import journal
from dpmega.errors import UsageError

# Flags that describe a planned run; with --workdir the journal says all of it.
PLANNED_RUN_FLAGS = ("dataset_size", "batch_size", "batch_schedule", "q", "steps", "epochs", "noise_multiplier",
                     "sparse_selection_fraction", "sparse_table_rows", "sigma1", "sigma2")


def _summary(workdir: str) -> dict[str, Any]:
  try:
    with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
      summary = json.load(f)
  except (OSError, ValueError):
    return {}
  return summary if isinstance(summary, dict) else {}


def run(args: argparse.Namespace) -> int:
  """Prints ε(``--delta``) of every step the workdir's journal records, for each ``--accountant``."""
  given = [f"--{name}" for name in PLANNED_RUN_FLAGS if getattr(args, name, None) is not None]
  if given:
    raise UsageError(f"--workdir reads the run's schedule, noise multiplier and dataset size from its journal: "
                     f"drop {', '.join(given)}.")
  workdir = args.workdir
  if not os.path.isdir(workdir):
    raise UsageError(f"--workdir {workdir!r} is not a directory.")
  if not os.path.exists(os.path.join(workdir, journal.FILENAME)):
    raise UsageError(f"--workdir {workdir!r} has no {journal.FILENAME}: not a `dpmega train` workdir, or no step "
                     "has run there yet.")
  try:
    ledger = journal.Journal(workdir, writable=False).ledger()
  except journal.JournalError as e:
    raise UsageError(f"--workdir {workdir!r}: {e}") from None
  summary = _summary(workdir)
  sampler = noise.NoiseSampler(summary.get("noise_sampler", args.noise_sampler))
  # The run's own count (summary.json: parameters, the clipped count, a sparse run's table rows) when larger.
  num_noised = max(args.num_noised_coordinates, int(summary.get("num_noised_coordinates") or 0))
  tail = truncation.TailModel(noise.sampler_support(sampler), num_noised)
  accountants = ("rdp", "pld") if args.accountant == "both" else (args.accountant,)
  scheme = ledger.scheme or "poisson"
  try:
    eps = {a: accounting.compute_epsilon(ledger, args.delta, a, pld_discretization=args.pld_discretization,
                                         tail=tail) for a in accountants}
  except accounting.UnsupportedAccountingError as e:
    raise UsageError(f"--accountant {args.accountant}: {e}") from None
  delta_tail = accounting.tail_delta_of(ledger, tail, delta=args.delta) if len(ledger) else 0.0
  sizes = {r.dataset_size for r in ledger.runs}
  if args.json:
    print(json.dumps({"command": "epsilon", "workdir": workdir, "steps": ledger.num_steps, "delta": args.delta,
                      "sampling": accounting.SamplingScheme(scheme).value if ledger.scheme else None,
                      "epsilon": eps, "delta_tail": delta_tail, "noise_sampler": sampler.value,
                      "num_noised_coordinates": num_noised}, indent=2))
  else:
    lines = "; ".join(accounting.describe(e, args.delta, scheme, a, delta_tail) for a, e in eps.items())
    print(f"dpmega epsilon: workdir {workdir}: {ledger.num_steps} steps spent (every generation, from "
          f"{journal.FILENAME}), noise sampler {sampler.value} on {num_noised:.3g} coordinates\n"
          f"final: {lines}")
  for n in sorted(sizes):
    warning = accounting.delta_warning(args.delta, n)
    if warning:
      print(warning, file=sys.stderr)
  return 0
