"""``dpmega audit``: check empirically that a configuration leaks no more than claimed.

Examples::

  dpmega audit --noise_multiplier 1.1 --clip_norm 1.0 --delta 1e-5 --trials 20000
  dpmega audit --noise_multiplier 1.1 --sampling_rate 0.01 --json audit.json
  dpmega audit --kind one-run --noise_multiplier 2 --steps 8 --canaries 1000
  dpmega audit --noise_multiplier 2 --sampling without_replacement   # replace-one neighbours
  dpmega audit --kind sparse --noise_multiplier 1.1 --selection_fraction 0.5 --threshold 0   # sparse tables

``--kind mechanism`` (the default) runs the library's private aggregation step
``--trials`` times on neighbouring inputs (with and without a canary) and bounds
ε from below (Clopper–Pearson, holdout threshold); ``--kind one-run`` trains a
tiny model once with ``--canaries`` canaries (Steinke, Nasr, Jagielski 2023;
needs the ``audit`` extra); ``--kind both`` does both. ``--sampling
without_replacement`` audits replace-one neighbours: the canary replaces an
example whose gradient is its opposite (the sum moves by 2C), against the
replace-one claim (sensitivity 2C). ``--kind sparse`` audits the sparse-table
step (:func:`dpmega.audit.sparse_mechanism_audit`: the row selection with σ1
and the gradient with σ2 on the selected rows, on one Poisson sample) at the
σ_eff the ledger records (``--noise_multiplier``, e.g. the trainer's
calibrated σ) split by ``--selection_fraction``. The table shows the
claimed ε (accountant), the audited lower bound, the confidence and the number
of trials; ``--json FILE`` also writes them, atomically.

Exit status: 0 when every audited lower bound is at most the claimed ε, 1 when
one exceeds it (the implementation leaks more than the accountant says), 2 for
bad input (one line naming the flag, before any computation).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

from dpmega import validation
from dpmega.errors import UsageError


def _number(text: str) -> float:
  try:
    value = float(text.replace("_", ""))
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
  return value


def _int_in(lo: int, hi: int):
  """An argparse type: an int in ``[lo, hi]`` (``1e4`` accepted); argparse names the flag."""
  def parse(text: str) -> int:
    return validation.check_int("value", _number(text), lo, hi, integral_floats=True,
                                error=argparse.ArgumentTypeError)
  return parse


def _float_in(lo: float, hi: float, *, lo_open: bool, hi_open: bool):
  """An argparse type: a finite number in the range; argparse names the flag."""
  def parse(text: str) -> float:
    return validation.check_real("value", _number(text), lo, hi, lo_open=lo_open, hi_open=hi_open,
                                 error=argparse.ArgumentTypeError)
  return parse


def add_parser(subparsers) -> None:
  p = subparsers.add_parser(
      "audit", help="empirical lower bound on epsilon vs the accountant's claim",
      description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="\n".join(__doc__.splitlines()[2:]))
  p.add_argument("--kind", choices=("mechanism", "one-run", "both", "sparse"), default="mechanism",
                 help="which audit to run (default: mechanism)")
  p.add_argument("--noise_multiplier", type=_float_in(0, 1e6, lo_open=True, hi_open=False),
                 required=True, help="sigma, in (0, 1e6]")
  p.add_argument("--clip_norm", type=_float_in(0, 1e12, lo_open=True, hi_open=False), default=1.0,
                 help="C, in (0, 1e12] (default 1)")
  p.add_argument("--sampling_rate", type=_float_in(0, 1, lo_open=True, hi_open=False), default=None,
                 help="mechanism audit: Poisson rate q in (0, 1]; omit for no subsampling")
  p.add_argument("--sampling", choices=("poisson", "without_replacement"), default="poisson",
                 help="mechanism audit: poisson (add/remove-one: the canary is added) or without_replacement "
                 "(replace-one: the canary replaces its opposite; whole batch, no --sampling_rate) "
                 "(default poisson)")
  p.add_argument("--trials", type=_int_in(20, 10**7), default=20_000,
                 help="mechanism audit: runs per neighbouring input, in [20, 1e7] (default 20000)")
  p.add_argument("--confidence", type=_float_in(0.5, 1, lo_open=False, hi_open=True), default=0.95,
                 help="confidence of the lower bound, in [0.5, 1) (default 0.95)")
  p.add_argument("--delta", type=_float_in(0, 1, lo_open=True, hi_open=True), default=1e-5,
                 help="delta, in (0, 1) (default 1e-5)")
  p.add_argument("--accountant", choices=("pld", "rdp"), default="pld",
                 help="accountant of the claimed epsilon (default pld)")
  p.add_argument("--seed", type=_int_in(0, 2**31 - 1), default=0, help="seed of the audit")
  p.add_argument("--canaries", type=_int_in(2, 10**4), default=1000,
                 help="one-run audit: number of canaries m, in [2, 1e4] (default 1000)")
  p.add_argument("--steps", type=_int_in(1, 10**5), default=8,
                 help="one-run audit: DP-SGD steps, in [1, 1e5] (default 8)")
  p.add_argument("--background", type=_int_in(0, 10**4), default=256,
                 help="one-run audit: non-canary training examples, in [0, 1e4] (default 256)")
  p.add_argument("--batch_size", type=_int_in(1, 2 * 10**4), default=None,
                 help="one-run audit: expected batch size; omit for every example every step")
  p.add_argument("--selection_fraction", type=_float_in(0, 1, lo_open=True, hi_open=True), default=0.5,
                 help="sparse audit: f, the selection's share of the noise budget, in (0, 1) (default 0.5)")
  p.add_argument("--threshold", type=_float_in(-10, 10, lo_open=False, hi_open=False), default=0.0,
                 help="sparse audit: tau in units of sigma1 C1, in [-10, 10] (default 0)")
  p.add_argument("--count_clip", type=_float_in(0, 1e12, lo_open=True, hi_open=False), default=1.0,
                 help="sparse audit: C1, the row-count clip, in (0, 1e12] (default 1)")
  p.add_argument("--json", metavar="FILE", default=None, help="also write the results to FILE")
  p.set_defaults(func=run)


def _check_output_path(path: str) -> str:
  if not path or not path.strip():
    raise UsageError("--json must be a file path, got an empty string.")
  if "\x00" in path:
    raise UsageError(f"--json must be a valid file path, got {path!r}.")
  full = os.path.abspath(path)
  parent = os.path.dirname(full)
  if os.path.isdir(full):
    raise UsageError(f"--json must be a file path, got a directory: {path!r}.")
  if not os.path.isdir(parent):
    raise UsageError(f"--json directory does not exist: {parent!r}.")
  if not os.access(parent, os.W_OK):
    raise UsageError(f"--json directory is not writable: {parent!r}.")
  return full


def _validate(args: argparse.Namespace) -> None:
  """Cross-flag checks, before any computation."""
  if args.json is not None:
    args.json = _check_output_path(args.json)
  if args.sampling_rate is not None and args.kind == "one-run":
    raise UsageError("--sampling_rate applies to the mechanism audit; use --batch_size for --kind one-run.")
  if args.kind == "sparse" and args.sampling == "without_replacement":
    raise UsageError("--kind sparse audits add/remove-one neighbours (Poisson sampling): drop --sampling "
                     "without_replacement.")
  if args.sampling == "without_replacement":
    if args.kind != "mechanism":
      raise UsageError("--sampling without_replacement applies to --kind mechanism only (the one-run audit "
                       "includes or leaves out canaries: add/remove-one).")
    if args.sampling_rate not in (None, 1.0):
      raise UsageError(f"--sampling_rate must be omitted with --sampling without_replacement (the replace-one "
                       f"audit runs on the whole batch), got {args.sampling_rate:g}.")
  if args.kind in ("one-run", "both"):
    from dpmega import audit  # pylint: disable=import-outside-toplevel  (numpy and scipy only)
    try:
      audit.check_one_run_size(args.canaries, args.background)
    except ValueError as e:
      raise UsageError(f"--canaries and --background: {e}") from None
    n = args.background + args.canaries
    if args.batch_size is not None and args.batch_size > n:
      raise UsageError(
          f"--batch_size must be at most --background + --canaries = {n}, got {args.batch_size}.")
    try:
      import jax_privacy.auditing  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      raise UsageError("--kind one-run needs the audit extra: pip install 'dpmega[audit]'.") from None


def run(args: argparse.Namespace) -> int:
  _validate(args)
  from dpmega import audit  # pylint: disable=import-outside-toplevel  (imports JAX)

  results = []
  if args.kind in ("mechanism", "both"):
    results.append(audit.mechanism_audit(
        noise_multiplier=args.noise_multiplier, clip_norm=args.clip_norm, delta=args.delta,
        trials=args.trials, confidence=args.confidence, sampling_rate=args.sampling_rate,
        seed=args.seed, accountant=args.accountant, sampling=args.sampling))
  if args.kind == "sparse":
    results.append(audit.sparse_mechanism_audit(
        noise_multiplier=args.noise_multiplier, selection_fraction=args.selection_fraction,
        threshold=args.threshold, count_clip=args.count_clip, clip_norm=args.clip_norm, delta=args.delta,
        trials=args.trials, confidence=args.confidence, sampling_rate=args.sampling_rate, seed=args.seed,
        accountant=args.accountant))
  if args.kind in ("one-run", "both"):
    results.append(audit.one_run_training_audit(
        noise_multiplier=args.noise_multiplier, num_canaries=args.canaries,
        num_background=args.background, steps=args.steps, batch_size=args.batch_size,
        clip_norm=args.clip_norm, delta=args.delta, confidence=args.confidence, seed=args.seed,
        accountant=args.accountant))
  print(audit.format_table(results))
  if args.json is not None:
    audit.write_json(results, args.json)
  violations = [r for r in results if r.violation]
  for r in violations:
    print(f"dpmega audit: VIOLATION: the {r.method} audit proves epsilon >= {r.epsilon_lower_bound:.4g} "
          f"at confidence {r.confidence:g}, above the claimed {r.claimed_epsilon:.4g}.", file=sys.stderr)
  return 1 if violations else 0
