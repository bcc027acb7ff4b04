"""``dpmega epsilon`` and ``dpmega calibrate``: offline privacy accounting.

No model: only the schedule of a run. Examples::

  dpmega epsilon --dataset_size 60000 --batch_size 256 --epochs 60 \\
      --noise_multiplier 1.1 --delta 1e-5 --accountant both
  dpmega calibrate --target_epsilon 3 --delta 1e-6 --dataset_size 1e9 \\
      --batch_schedule 'geometric:1000->2000000@5000' --steps 20000 --json
  dpmega epsilon --q 0.004 --dataset_size 60000 --steps 1000 --noise_multiplier 1.1 --delta 1e-5
  dpmega epsilon --workdir runs/ctr --delta 1e-6      # what a finished run spent, at any delta
  dpmega epsilon ... --plot eps.png          # needs the `plot` extra (matplotlib)
  dpmega calibrate ... --sparse_selection_fraction 0.2 --sparse_table_rows 33554432   # a sparse-table run
  dpmega epsilon ... --sigma1 2.5 --sigma2 1.2   # the same, from its two noise multipliers

Every ε printed names δ, the accountant, the sampling scheme and its
neighbouring relation. Bad input prints one line naming the flag and exits 2.
A δ that is not below 1/N gets a warning (such a δ protects no one). Steps are
counted from 1: the row "step k" is ε after the first k steps.

The δ printed covers the noise sampler that runs (``--noise_sampler``): its
bounded support costs ``δ_tail`` (:mod:`dpmega.truncation`), which grows with
``--num_noised_coordinates`` and the steps; ε is computed at ``δ - δ_tail``.
``δ_tail`` is printed when it is more than 1e-3 of δ, and always in ``--json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from typing import Any

import numpy as np

from dpmega import accounting
from dpmega import noise
from dpmega import sampling
from dpmega import schedules
from dpmega import truncation
from dpmega.cli import flag_types
from dpmega.cli import workdir_epsilon
from dpmega.errors import UsageError
from dpmega.sparse import selection


# ------------------------------------------------------------ flag types

_positive_int, _non_negative_int = flag_types.positive_int, flag_types.non_negative_int
_positive_float, _non_negative_float = flag_types.positive_float, flag_types.non_negative_float
_open_unit, _unit = flag_types.open_unit, flag_types.unit


# Each distinct batch size costs one dp-accounting evaluation per sigma tried.
_MANY_DISTINCT = 300


# --------------------------------------------------------------- parsers


def _add_common(p: argparse.ArgumentParser, *, both: bool) -> None:
  # `dpmega epsilon --workdir` needs none of the run's description: there the checks are in _request.
  required = not both
  p.add_argument("--dataset_size", type=_positive_int, required=required,
                 help="number of training examples N (1e6 and 1_000_000 are accepted)")
  batch = p.add_mutually_exclusive_group(required=required)
  batch.add_argument("--batch_size", type=_positive_int,
                     help="constant (expected) batch size; q = batch_size / dataset_size")
  batch.add_argument("--q", "--sampling_rate", "--sampling_probability", dest="q", type=_unit, metavar="Q",
                     help="sampling probability q in (0, 1] (Opacus' sample_rate): batch size q * dataset_size, "
                     "rounded up to a whole example (an upper bound on epsilon)")
  batch.add_argument("--batch_schedule", metavar="SPEC",
                     help="constant:B | steps:B0@1,B1@S1,... (steps count from 1) | linear:START->END[@RAMP] | "
                     "geometric:START->END[@RAMP], optional ,round_to=M; without @RAMP the "
                     "ramp spans the whole run. Quote it: unquoted, the shell reads -> as a redirection "
                     "(--batch_schedule 'geometric:1024->65536')")
  length = p.add_mutually_exclusive_group(required=required)
  length.add_argument("--steps", "--num_steps", dest="steps", type=_non_negative_int,
                      help="number of training steps")
  length.add_argument("--epochs", type=_positive_float,
                      help="passes over the data; steps = fewest whose expected batch sizes "
                      "add up to epochs * dataset_size")
  p.add_argument("--delta", type=_open_unit, required=True, help="target delta, in (0, 1)")
  choices = ["rdp", "pld", "both"] if both else ["rdp", "pld"]
  p.add_argument("--accountant", choices=choices, default="rdp",
                 help="dp-accounting accountant (default: rdp)")
  p.add_argument("--sampling", choices=[s.value for s in sampling.SamplingScheme],
                 default="poisson",
                 help="poisson (add/remove-one neighbours, sensitivity C) or without_replacement: "
                 "fixed-size batches (replace-one neighbours, sensitivity 2C; RDP only, unless every "
                 "batch is the whole dataset)")
  p.add_argument("--noise_sampler", choices=[s.value for s in noise.NoiseSampler],
                 default=noise.NoiseSampler.WIDE_TAIL.value,
                 help="the Gaussian sampler the run uses; its bounded support costs delta_tail, taken "
                 "out of --delta (default: %(default)s; jax_bounded is jax.random.normal, whose "
                 "delta_tail is often larger than delta)")
  p.add_argument("--num_noised_coordinates", type=_positive_int, default=10**9, metavar="D",
                 help="how many model parameters get noise each step; delta_tail grows with it "
                 "(default: 1e9)")
  p.add_argument("--sparse_selection_fraction", type=_open_unit, metavar="F",
                 help="the run uses sparse tables (`sparse.enabled`, DP-AdaFEST): the noise multiplier is the "
                 "effective sigma_eff the ledger records, split as `dpmega train` splits it: sigma1 = "
                 "sigma_eff/sqrt(F) on the row selection, sigma2 = sigma_eff/sqrt(1-F) on the gradient "
                 "(`sparse.selection_fraction`; both printed)")
  p.add_argument("--sparse_table_rows", type=_positive_int, metavar="R",
                 help="rows of the selections' counts, all together: one noisy count per row and step (tables "
                 "that share a selection, `sparse.share_selection`, count once; the run's summary.json says "
                 "`selection_rows`), so R is added to --num_noised_coordinates for delta_tail (needs "
                 "--sparse_selection_fraction)")
  p.add_argument("--pld_discretization", type=_unit,
                 default=accounting.DEFAULT_PLD_DISCRETIZATION,
                 help="PLD value discretization interval (default: %(default)g)")
  p.add_argument("--q_grid", type=_unit, default=None, metavar="R",
                 help="round every batch size UP to a geometric grid of relative spacing R "
                 "before accounting: an upper bound on epsilon, much faster for ramps with "
                 "thousands of distinct batch sizes (off: exact)")
  p.add_argument("--points", type=_positive_int, default=10,
                 help="rows of the table: epsilon at this many points along training")
  p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
  p.add_argument("--plot", metavar="FILE.png",
                 help="also write a plot of epsilon vs steps (needs matplotlib: the `plot` extra)")


def add_parser(subparsers) -> None:
  eps = subparsers.add_parser(
      "epsilon", help="epsilon of a described DP-SGD run",
      description="Epsilon(delta) of a DP-SGD run described by its schedule.")
  _add_common(eps, both=True)
  eps.add_argument("--noise_multiplier", "--sigma", dest="noise_multiplier", type=_non_negative_float,
                   help="sigma: noise std / clip norm (>= 0)")
  eps.add_argument("--selection_noise_multiplier", "--sigma1", dest="sigma1", type=_positive_float, metavar="S1",
                   help="a sparse-table run given by its two noise multipliers (with --sigma2, instead of "
                   "--noise_multiplier): epsilon of sigma_eff = (S1^-2 + S2^-2)^-1/2, the one Gaussian "
                   "mechanism the row selection and the gradient together are")
  eps.add_argument("--gradient_noise_multiplier", "--sigma2", dest="sigma2", type=_positive_float, metavar="S2",
                   help="the gradient's noise multiplier of a sparse-table run (with --sigma1)")
  eps.add_argument("--workdir", metavar="W",
                   help="epsilon at --delta of everything a `dpmega train` run spent in W (its journal; read "
                   "only), instead of a described run (Opacus' get_epsilon(delta))")
  eps.set_defaults(func=run_epsilon)

  cal = subparsers.add_parser(
      "calibrate", help="smallest noise multiplier for a target epsilon",
      description="Smallest noise multiplier whose whole-run epsilon(delta) meets a target.")
  _add_common(cal, both=False)
  cal.add_argument("--target_epsilon", "--epsilon", dest="target_epsilon", type=_positive_float, required=True,
                   help="privacy budget epsilon (> 0)")
  cal.add_argument("--progress_every", type=_non_negative_float, default=5.0, metavar="SECONDS",
                   help="a progress line on stderr at most this often while calibrating (default: %(default)g; "
                   "a ramp with many distinct batch sizes takes minutes)")
  cal.set_defaults(func=run_calibrate)


# ------------------------------------------------------------------ work


@dataclasses.dataclass(frozen=True)
class _Request:
  """The run the flags describe (an :class:`dpmega.accounting.Plan`) and how to print it."""

  plan: accounting.Plan
  accountants: tuple[accounting.AccountantType, ...]
  sampler: noise.NoiseSampler
  points: list[int]
  selection_fraction: float | None = None  # sparse tables: σ is σ_eff, split by this f


def _sparse_flags(args: argparse.Namespace) -> float | None:
  """The sparse-table flags, checked: the selection fraction f (None for a dense run).

  ``dpmega epsilon --sigma1 S1 --sigma2 S2`` becomes ``--noise_multiplier σ_eff`` with ``f = (σ_eff / S1)²``
  (:func:`dpmega.sparse.selection.effective_noise_multiplier`, :func:`~.split_noise_multiplier`).
  """
  s1, s2 = getattr(args, "sigma1", None), getattr(args, "sigma2", None)
  fraction = args.sparse_selection_fraction
  if (s1 is None) != (s2 is None):
    raise UsageError("--sigma1 and --sigma2 go together (a sparse-table run's selection and gradient noise "
                     "multipliers); give both, or --noise_multiplier (with --sparse_selection_fraction F).")
  if s1 is not None:
    if args.noise_multiplier is not None or fraction is not None:
      raise UsageError("--sigma1/--sigma2 give the noise and its split: not with --noise_multiplier or "
                       "--sparse_selection_fraction.")
    args.noise_multiplier = selection.effective_noise_multiplier(s1, s2)
    fraction = (args.noise_multiplier / s1) ** 2
  if args.sparse_table_rows is not None and fraction is None:
    raise UsageError("--sparse_table_rows needs --sparse_selection_fraction (or --sigma1/--sigma2): it counts "
                     "the selection's noisy row counts.")
  return fraction


def _sparse_payload(req: _Request, sigma: float) -> dict[str, Any] | None:
  """The ``"sparse"`` entry of ``--json``: f, σ1 and σ2 at ``sigma`` (= σ_eff); None for a dense run."""
  if req.selection_fraction is None:
    return None
  s1, s2 = selection.split_noise_multiplier(sigma, req.selection_fraction)
  return {"selection_fraction": req.selection_fraction, "selection_noise_multiplier": s1,
          "gradient_noise_multiplier": s2}


def _sparse_line(sparse: dict[str, Any] | None, sigma: float) -> str:
  """The text line of :func:`_sparse_payload`'s entry (nothing for a dense run)."""
  if sparse is None:
    return ""
  return (f"\nsparse tables: sigma_eff = {sigma:.6g} is selection f = {sparse['selection_fraction']:.6g}, sigma1 = "
          f"{sparse['selection_noise_multiplier']:.6g} (row counts) and sigma2 = "
          f"{sparse['gradient_noise_multiplier']:.6g} (gradient); the ledger records sigma_eff.")


def _request(args: argparse.Namespace) -> _Request:
  """Builds the plan from the flags, before any accounting; bad input is a UsageError naming the flag."""
  fraction = _sparse_flags(args)
  for names, given in (("--dataset_size", [args.dataset_size]),
                       ("--batch_size, --q or --batch_schedule", [args.batch_size, args.q, args.batch_schedule]),
                       ("--steps or --epochs", [args.steps, args.epochs]),
                       ("--noise_multiplier", [getattr(args, "noise_multiplier", 0.0)])):
    if all(v is None for v in given):
      raise UsageError(f"{names} is required (or --workdir W to read a finished run's journal).")
  if args.q is not None:
    exact = args.q * args.dataset_size
    batch = min(args.dataset_size, math.ceil(exact * (1 - 1e-12)))
    if batch != exact:
      print(f"note: --q {args.q:g} x --dataset_size {args.dataset_size} = {exact:.6g} examples: accounted as batch "
            f"size {batch} (q = {batch / args.dataset_size:.6g}, rounded up: an upper bound on epsilon).",
            file=sys.stderr)
    schedule = schedules.Constant(batch)
  elif args.batch_size is not None:
    schedule = schedules.Constant(args.batch_size)
  else:
    try:
      schedule = schedules.parse_schedule(args.batch_schedule, num_steps=args.steps)
    except ValueError as e:
      if args.steps is None and "ramp length" in str(e):
        raise UsageError(
            f"--batch_schedule {args.batch_schedule!r} has no @RAMP_STEPS, so it needs "
            "--steps (not --epochs) to know the ramp length.") from None
      raise UsageError(f"--batch_schedule: {e}") from None
  if args.steps is not None:
    steps = args.steps
  else:
    try:
      steps = schedules.steps_for_epochs(schedule, args.epochs, args.dataset_size)
    except ValueError as e:
      raise UsageError(f"--epochs: {e}") from None
  sizes, _ = schedule.batch_size_counts(steps)
  if sizes.size and sizes.max() > args.dataset_size:
    flag = "--batch_size" if args.batch_size is not None else "--batch_schedule"
    raise UsageError(
        f"{flag} reaches batch size {int(sizes.max())}, larger than --dataset_size "
        f"{args.dataset_size}: q = batch size / dataset size must be in (0, 1].")
  sampler = noise.NoiseSampler(args.noise_sampler)
  accountants = (("rdp", "pld") if args.accountant == "both" else (args.accountant,))
  try:
    plans = [accounting.Plan(
        dataset_size=args.dataset_size, schedule=schedule, num_steps=steps, delta=args.delta,
        scheme=args.sampling, accountant=a, pld_discretization=args.pld_discretization, q_grid=args.q_grid,
        tail=truncation.TailModel(noise.sampler_support(sampler),
                                  args.num_noised_coordinates + (args.sparse_table_rows or 0)))
             for a in accountants]
  except accounting.UnsupportedAccountingError as e:
    raise UsageError(f"--accountant {args.accountant} with --sampling {args.sampling}: {e}") from None
  warning = plans[0].delta_warning()
  if warning:
    print(warning, file=sys.stderr)
  if args.q_grid is None and sizes.size > _MANY_DISTINCT:
    print(f"note: {sizes.size} distinct batch sizes, each accounted exactly (slow); "
          "round_to=M in --batch_schedule or --q_grid 0.01 (an upper bound) are faster.",
          file=sys.stderr)
  return _Request(plans[0], tuple(p.accountant for p in plans), sampler, _points(steps, args.points), fraction)


def _check_tail(req: _Request, sigma: float) -> float:
  """``δ_tail`` of the whole run, or a UsageError naming the flags when it leaves nothing of --delta."""
  plan = req.plan
  share = plan.tail_delta(sigma)
  if math.isinf(share):
    floor = plan.tail_delta(sigma, floor=True)
    support = plan.tail.support
    raise UsageError(
        f"--noise_sampler {req.sampler.value}: its bounded support [{support.lo:.4g}, {support.hi:.4g}] "
        f"(standard deviations) over --num_noised_coordinates {_count(plan.tail.num_coordinates)} and "
        f"{plan.num_steps} steps costs delta_tail >= {floor:.3g}"
        + " and scales the accountant's delta by the mass it cuts off"
        + f", which leaves nothing of --delta {plan.delta:g}: use --noise_sampler wide_tail (the default), "
        "fewer --num_noised_coordinates, or a larger --delta.")
  return share


def _rows(req: _Request, sigma: float) -> list[dict[str, Any]]:
  plan, rows = req.plan, []
  for step in req.points:
    sizes, counts = plan.schedule.batch_size_counts(step)
    batch = plan.schedule.batch_size(step - 1)
    rows.append({
        "step": step,
        "epochs": float(np.dot(sizes.astype(np.float64), counts)) / plan.dataset_size,
        "batch_size": batch,
        "sampling_probability": batch / plan.dataset_size,
        "epsilon": {a.value: plan.epsilon(sigma, step, accountant=a) for a in req.accountants},
        "delta_tail": plan.tail_delta(sigma, step),
    })
  return rows


def _header(req: _Request) -> dict[str, Any]:
  plan = req.plan
  return {
      "dataset_size": plan.dataset_size,
      "batch_schedule": plan.schedule.to_spec(),
      "steps": plan.num_steps,
      "delta": plan.delta,
      "sampling": plan.scheme.value,
      "neighbouring_relation": plan.scheme.relation_label,
      "accountants": [a.value for a in req.accountants],
      "pld_discretization": plan.pld_discretization,
      "q_grid": plan.q_grid,
      "noise_sampler": req.sampler.value,
      "noise_support": [plan.tail.support.lo, plan.tail.support.hi],
      "num_noised_coordinates": plan.tail.num_coordinates,
  }


def _points(steps: int, n: int) -> list[int]:
  if steps == 0:
    return []
  return sorted({int(round(x)) for x in np.linspace(0, steps, n + 1)[1:]} - {0})


def _fmt_eps(x: float) -> str:
  return "inf" if math.isinf(x) else f"{x:.4f}"


def _table(req: _Request, rows: list[dict[str, Any]]) -> str:
  cols = ["step", "epochs", "batch_size", "q"] + [f"eps ({a.value.upper()})" for a in req.accountants]
  lines = ["  ".join(f"{c:>12}" for c in cols)]
  for r in rows:
    cells = [str(r["step"]), f"{r['epochs']:.3f}", str(r["batch_size"]),
             f"{r['sampling_probability']:.4g}"]
    cells += [_fmt_eps(r["epsilon"][a.value]) for a in req.accountants]
    lines.append("  ".join(f"{c:>12}" for c in cells))
  return "\n".join(lines)


def _context(req: _Request) -> str:
  plan = req.plan
  return (f"delta = {plan.delta:g}, {plan.scheme.value.replace('_', ' ')} sampling "
          f"({plan.scheme.relation_label} neighbours), dataset_size = "
          f"{plan.dataset_size}, batch schedule {plan.schedule.to_spec()}, steps = {plan.num_steps}"
          + (f", batch sizes rounded up to a {plan.q_grid:g} grid (upper bound)"
             if plan.q_grid else "")
          + f", noise sampler {req.sampler.value} on {_count(plan.tail.num_coordinates)} coordinates")


def _count(n: int) -> str:
  """1000000000 -> "1e9": short, and still what the flag accepts."""
  return f"{n:.3g}".replace("e+0", "e").replace("e+", "e")


def _tail_line(req: _Request, delta_tail: float) -> str:
  """A line on δ_tail when it is not negligible, else nothing."""
  plan = req.plan
  if not delta_tail > accounting.TAIL_NEGLIGIBLE * plan.delta:
    return ""
  return (f"\ndelta_tail = {delta_tail:.3g} of delta = {plan.delta:g} is the {req.sampler.value} noise "
          f"sampler's bounded support over {_count(plan.tail.num_coordinates)} noised coordinates (it grows with "
          "--num_noised_coordinates and the steps); epsilon is computed at delta - delta_tail.")


def _plot(path: str, req: _Request, sigma: float, title: str) -> None:
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UsageError(
        "--plot needs matplotlib: pip install 'dpmega[plot]' (or matplotlib).") from None
  fig, ax = plt.subplots(figsize=(6, 4))
  for accountant in req.accountants:
    # RDP is cheap (cached per (q, sigma)); PLD recomposes, so fewer points.
    n = 100 if accountant is accounting.AccountantType.RDP else len(req.points)
    xs = _points(req.plan.num_steps, n)
    ys = [req.plan.epsilon(sigma, x, accountant=accountant) for x in xs]
    ax.plot(xs, ys, label=accountant.value.upper())
  ax.set_xlabel("steps")
  ax.set_ylabel(f"epsilon at delta={req.plan.delta:g}")
  ax.set_title(title, fontsize=9)
  ax.grid(True, alpha=0.3)
  ax.legend()
  fig.tight_layout()
  try:
    fig.savefig(path)
  except (OSError, ValueError) as e:
    raise UsageError(f"--plot: cannot write {path!r}: {e}") from None
  finally:
    plt.close(fig)


def _emit(args, payload: dict[str, Any], text: str) -> None:
  if args.json:
    print(json.dumps(payload, indent=2))
  else:
    print(text)


def run_epsilon(args: argparse.Namespace) -> int:
  if args.workdir is not None:
    return workdir_epsilon.run(args)
  req = _request(args)
  plan, sigma = req.plan, args.noise_multiplier
  delta_tail = _check_tail(req, sigma) if sigma > 0 else 0.0
  rows = _rows(req, sigma)
  final = rows[-1]["epsilon"] if rows else {a.value: 0.0 for a in req.accountants}
  if args.plot:
    _plot(args.plot, req, sigma, f"noise_multiplier={sigma:g}, {plan.scheme.relation_label} neighbours")
  sparse = _sparse_payload(req, sigma)
  payload = {"command": "epsilon", **_header(req), "noise_multiplier": sigma, "sparse": sparse,
             "epsilon": final, "delta_tail": delta_tail, "points": rows}
  summary = "; ".join(
      accounting.describe(final[a.value], plan.delta, plan.scheme, a, delta_tail) for a in req.accountants)
  text = (f"dpmega epsilon: noise_multiplier = {sigma:g}, {_context(req)}\n\n"
          f"{_table(req, rows)}\n\nfinal: {summary}{_tail_line(req, delta_tail)}{_sparse_line(sparse, sigma)}")
  _emit(args, payload, text)
  return 0


def run_calibrate(args: argparse.Namespace) -> int:
  req = _request(args)
  plan = req.plan
  if plan.num_steps == 0:
    raise UsageError("--steps must be >= 1 to calibrate a noise multiplier.")
  try:
    sigma = plan.calibrate(args.target_epsilon, progress=accounting.progress_printer(
        every=args.progress_every, label="dpmega calibrate"))
  except UsageError as e:
    if "delta_tail" not in str(e):
      raise
    _check_tail(req, 1e6)  # names the flags when the sampler alone is the reason
    raise
  delta_tail = _check_tail(req, sigma)
  rows = _rows(req, sigma)
  achieved = rows[-1]["epsilon"][plan.accountant.value]
  if args.plot:
    _plot(args.plot, req, sigma, f"calibrated noise_multiplier={sigma:.4g} for "
          f"target epsilon {args.target_epsilon:g}")
  sparse = _sparse_payload(req, sigma)
  payload = {"command": "calibrate", **_header(req), "target_epsilon": args.target_epsilon,
             "noise_multiplier": sigma, "sparse": sparse,
             "epsilon": {plan.accountant.value: achieved}, "delta_tail": delta_tail,
             "points": rows}
  text = (f"dpmega calibrate: target epsilon = {args.target_epsilon:g}, {_context(req)}\n\n"
          f"noise_multiplier = {sigma:.6g}  ->  {plan.describe(achieved, delta_tail)}"
          f"{_tail_line(req, delta_tail)}{_sparse_line(sparse, sigma)}\n\n"
          f"{_table(req, rows)}")
  _emit(args, payload, text)
  return 0


def main(argv=None) -> int:  # pragma: no cover - `python -m dpmega` is the entry point
  from dpmega import cli  # pylint: disable=import-outside-toplevel
  return cli.main(argv)


if __name__ == "__main__":  # pragma: no cover
  sys.exit(main())
