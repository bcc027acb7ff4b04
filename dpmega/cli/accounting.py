"""``dpmega epsilon`` and ``dpmega calibrate``: offline privacy accounting.

No model, no JAX: only the schedule of a run. Examples::

  dpmega epsilon --dataset_size 60000 --batch_size 256 --epochs 60 \\
      --noise_multiplier 1.1 --delta 1e-5 --accountant both
  dpmega calibrate --target_epsilon 3 --delta 1e-6 --dataset_size 1e9 \\
      --batch_schedule geometric:1000->2000000@5000 --steps 20000 --json
  dpmega epsilon ... --plot eps.png          # needs the `plot` extra (matplotlib)

Every ε printed names δ, the accountant, the sampling scheme and its
neighbouring relation. Bad input prints one line naming the flag and exits 2.

The δ printed covers the noise sampler that runs (``--noise_sampler``): its
bounded support costs ``δ_tail`` (:mod:`dpmega.truncation`), which grows with
``--num_noised_coordinates`` and the steps; ε is computed at ``δ - δ_tail``.
``δ_tail`` is printed when it is more than 1e-3 of δ, and always in ``--json``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

import numpy as np

from dpmega import accounting
from dpmega import noise
from dpmega import schedules
from dpmega import truncation
from dpmega.errors import UsageError


# ------------------------------------------------------------ flag types


def _number(text: str) -> float:
  try:
    return float(text.replace("_", ""))
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def _positive_int(text: str) -> int:
  value = _number(text)
  if not (math.isfinite(value) and value.is_integer() and value >= 1):
    raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
  return int(value)


def _non_negative_int(text: str) -> int:
  value = _number(text)
  if not (math.isfinite(value) and value.is_integer() and value >= 0):
    raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
  return int(value)


def _positive_float(text: str) -> float:
  value = _number(text)
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
  return value


def _non_negative_float(text: str) -> float:
  value = _number(text)
  if not (math.isfinite(value) and value >= 0):
    raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
  return value


def _open_unit(text: str) -> float:
  value = _number(text)
  if not 0 < value < 1:
    raise argparse.ArgumentTypeError(f"must be in the open interval (0, 1), got {text!r}")
  return value


def _discretization(text: str) -> float:
  value = _number(text)
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
  return value


def _grid(text: str) -> float:
  value = _number(text)
  if not 0 < value <= 1:
    raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text!r}")
  return value


# Each distinct batch size costs one dp-accounting evaluation per sigma tried.
_MANY_DISTINCT = 300


# --------------------------------------------------------------- parsers


def _add_common(p: argparse.ArgumentParser, *, both: bool) -> None:
  p.add_argument("--dataset_size", type=_positive_int, required=True,
                 help="number of training examples N (1e6 and 1_000_000 are accepted)")
  batch = p.add_mutually_exclusive_group(required=True)
  batch.add_argument("--batch_size", type=_positive_int,
                     help="constant (expected) batch size; q = batch_size / dataset_size")
  batch.add_argument("--batch_schedule", metavar="SPEC",
                     help="constant:B | steps:B0@0,B1@S1,... | linear:START->END[@RAMP] | "
                     "geometric:START->END[@RAMP], optional ,round_to=M; without @RAMP the "
                     "ramp spans the whole run")
  length = p.add_mutually_exclusive_group(required=True)
  length.add_argument("--steps", type=_non_negative_int, help="number of training steps")
  length.add_argument("--epochs", type=_positive_float,
                      help="passes over the data; steps = fewest whose expected batch sizes "
                      "add up to epochs * dataset_size")
  p.add_argument("--delta", type=_open_unit, required=True, help="target delta, in (0, 1)")
  choices = ["rdp", "pld", "both"] if both else ["rdp", "pld"]
  p.add_argument("--accountant", choices=choices, default="rdp",
                 help="dp-accounting accountant (default: rdp)")
  p.add_argument("--sampling", choices=[s.value for s in accounting.SamplingScheme],
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
  p.add_argument("--pld_discretization", type=_discretization,
                 default=accounting.DEFAULT_PLD_DISCRETIZATION,
                 help="PLD value discretization interval (default: %(default)g)")
  p.add_argument("--q_grid", type=_grid, default=None, metavar="R",
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
  eps.add_argument("--noise_multiplier", type=_non_negative_float, required=True,
                   help="sigma: noise std / clip norm (>= 0)")
  eps.set_defaults(func=run_epsilon)

  cal = subparsers.add_parser(
      "calibrate", help="smallest noise multiplier for a target epsilon",
      description="Smallest noise multiplier whose whole-run epsilon(delta) meets a target.")
  _add_common(cal, both=False)
  cal.add_argument("--target_epsilon", type=_positive_float, required=True,
                   help="privacy budget epsilon (> 0)")
  cal.set_defaults(func=run_calibrate)


# ------------------------------------------------------------------ work


class _Plan:
  """The run the flags describe, validated before any accounting."""

  def __init__(self, args: argparse.Namespace):
    self.dataset_size = args.dataset_size
    self.scheme = accounting.SamplingScheme(args.sampling)
    self.delta = args.delta
    if args.accountant == "both":
      self.accountants = [accounting.AccountantType.RDP, accounting.AccountantType.PLD]
    else:
      self.accountants = [accounting.AccountantType(args.accountant)]
    self.pld_discretization = args.pld_discretization
    self.sampler = noise.NoiseSampler(args.noise_sampler)
    self.tail = truncation.TailModel(noise.sampler_support(self.sampler), args.num_noised_coordinates)

    if args.batch_size is not None:
      self.schedule = schedules.Constant(args.batch_size)
    else:
      try:
        self.schedule = schedules.parse_schedule(args.batch_schedule, num_steps=args.steps)
      except ValueError as e:
        if args.steps is None and "ramp length" in str(e):
          raise UsageError(
              f"--batch_schedule {args.batch_schedule!r} has no @RAMP_STEPS, so it needs "
              "--steps (not --epochs) to know the ramp length.") from None
        raise UsageError(f"--batch_schedule: {e}") from None
    if args.steps is not None:
      self.steps = args.steps
    else:
      try:
        self.steps = schedules.steps_for_epochs(self.schedule, args.epochs, self.dataset_size)
      except ValueError as e:
        raise UsageError(f"--epochs: {e}") from None
    sizes, _ = self.schedule.batch_size_counts(self.steps)
    if sizes.size and sizes.max() > self.dataset_size:
      flag = "--batch_size" if args.batch_size is not None else "--batch_schedule"
      raise UsageError(
          f"{flag} reaches batch size {int(sizes.max())}, larger than --dataset_size "
          f"{self.dataset_size}: q = batch size / dataset size must be in (0, 1].")
    if self.scheme is accounting.SamplingScheme.WITHOUT_REPLACEMENT and (
        accounting.AccountantType.PLD in self.accountants) and (
            sizes.size and sizes.min() < self.dataset_size):
      raise UsageError(
          f"--accountant {args.accountant} cannot account for --sampling without_replacement with "
          "batches smaller than --dataset_size: dp-accounting 0.6 supports it only with RDP "
          "(replace-one neighbours); use --accountant rdp.")
    self.points = _points(self.steps, args.points)
    self.q_grid = args.q_grid
    if self.q_grid is None and sizes.size > _MANY_DISTINCT:
      print(f"note: {sizes.size} distinct batch sizes, each accounted exactly (slow); "
            "round_to=M in --batch_schedule or --q_grid 0.01 (an upper bound) are faster.",
            file=sys.stderr)

  def epsilon(self, sigma: float, accountant, num_steps: int) -> float:
    return accounting.epsilon_for_schedule(
        noise_multiplier=sigma, delta=self.delta, dataset_size=self.dataset_size,
        batch_sizes=self.schedule, num_steps=num_steps, scheme=self.scheme,
        accountant=accountant, pld_discretization=self.pld_discretization,
        q_grid=self.q_grid, tail=self.tail)

  def delta_tail(self, sigma: float, num_steps: int, floor: bool = False) -> float:
    """The share of --delta the sampler's support takes (``floor``: the part no δ removes)."""
    return accounting.tail_delta_for_schedule(
        noise_multiplier=sigma, dataset_size=self.dataset_size, batch_sizes=self.schedule,
        num_steps=num_steps, scheme=self.scheme, tail=self.tail, delta=None if floor else self.delta)

  def check_tail(self, sigma: float) -> float:
    """``δ_tail`` of the whole run, or a UsageError naming the flags when it leaves nothing of --delta."""
    share = self.delta_tail(sigma, self.steps)
    if math.isinf(share):
      floor = self.delta_tail(sigma, self.steps, floor=True)
      support = self.tail.support
      raise UsageError(
          f"--noise_sampler {self.sampler.value}: its bounded support [{support.lo:.4g}, {support.hi:.4g}] "
          f"(standard deviations) over --num_noised_coordinates {_count(self.tail.num_coordinates)} and "
          f"{self.steps} steps costs delta_tail >= {floor:.3g}"
          + " and scales the accountant's delta by the mass it cuts off"
          + f", which leaves nothing of --delta {self.delta:g}: use --noise_sampler wide_tail (the default), "
          "fewer --num_noised_coordinates, or a larger --delta.")
    return share

  def rows(self, sigma: float) -> list[dict[str, Any]]:
    rows = []
    for step in self.points:
      sizes, counts = self.schedule.batch_size_counts(step)
      batch = self.schedule.batch_size(step - 1)
      rows.append({
          "step": step,
          "epochs": float(np.dot(sizes.astype(np.float64), counts)) / self.dataset_size,
          "batch_size": batch,
          "sampling_probability": batch / self.dataset_size,
          "epsilon": {a.value: self.epsilon(sigma, a, step) for a in self.accountants},
          "delta_tail": self.delta_tail(sigma, step),
      })
    return rows

  def header(self) -> dict[str, Any]:
    return {
        "dataset_size": self.dataset_size,
        "batch_schedule": self.schedule.to_spec(),
        "steps": self.steps,
        "delta": self.delta,
        "sampling": self.scheme.value,
        "neighbouring_relation": accounting.relation_label(self.scheme),
        "accountants": [a.value for a in self.accountants],
        "pld_discretization": self.pld_discretization,
        "q_grid": self.q_grid,
        "noise_sampler": self.sampler.value,
        "noise_support": [self.tail.support.lo, self.tail.support.hi],
        "num_noised_coordinates": self.tail.num_coordinates,
    }


def _points(steps: int, n: int) -> list[int]:
  if steps == 0:
    return []
  return sorted({int(round(x)) for x in np.linspace(0, steps, n + 1)[1:]} - {0})


def _fmt_eps(x: float) -> str:
  return "inf" if math.isinf(x) else f"{x:.4f}"


def _table(plan: _Plan, rows: list[dict[str, Any]]) -> str:
  cols = ["step", "epochs", "batch_size", "q"] + [f"eps ({a.value.upper()})" for a in plan.accountants]
  lines = ["  ".join(f"{c:>12}" for c in cols)]
  for r in rows:
    cells = [str(r["step"]), f"{r['epochs']:.3f}", str(r["batch_size"]),
             f"{r['sampling_probability']:.4g}"]
    cells += [_fmt_eps(r["epsilon"][a.value]) for a in plan.accountants]
    lines.append("  ".join(f"{c:>12}" for c in cells))
  return "\n".join(lines)


def _context(plan: _Plan) -> str:
  return (f"delta = {plan.delta:g}, {plan.scheme.value.replace('_', ' ')} sampling "
          f"({accounting.relation_label(plan.scheme)} neighbours), dataset_size = "
          f"{plan.dataset_size}, batch schedule {plan.schedule.to_spec()}, steps = {plan.steps}"
          + (f", batch sizes rounded up to a {plan.q_grid:g} grid (upper bound)"
             if plan.q_grid else "")
          + f", noise sampler {plan.sampler.value} on {_count(plan.tail.num_coordinates)} coordinates")


def _count(n: int) -> str:
  """1000000000 -> "1e9": short, and still what the flag accepts."""
  return f"{n:.3g}".replace("e+0", "e").replace("e+", "e")


def _tail_line(plan: _Plan, delta_tail: float) -> str:
  """A line on δ_tail when it is not negligible, else nothing."""
  if not delta_tail > accounting.TAIL_NEGLIGIBLE * plan.delta:
    return ""
  return (f"\ndelta_tail = {delta_tail:.3g} of delta = {plan.delta:g} is the {plan.sampler.value} noise "
          f"sampler's bounded support over {_count(plan.tail.num_coordinates)} noised coordinates (it grows with "
          "--num_noised_coordinates and the steps); epsilon is computed at delta - delta_tail.")


def _plot(path: str, plan: _Plan, sigma: float, title: str) -> None:
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UsageError(
        "--plot needs matplotlib: pip install 'dpmega[plot]' (or matplotlib).") from None
  fig, ax = plt.subplots(figsize=(6, 4))
  for accountant in plan.accountants:
    # RDP is cheap (cached per (q, sigma)); PLD recomposes, so fewer points.
    n = 100 if accountant is accounting.AccountantType.RDP else len(plan.points)
    xs = _points(plan.steps, n)
    ys = [plan.epsilon(sigma, accountant, x) for x in xs]
    ax.plot(xs, ys, label=accountant.value.upper())
  ax.set_xlabel("steps")
  ax.set_ylabel(f"epsilon at delta={plan.delta:g}")
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
  plan = _Plan(args)
  sigma = args.noise_multiplier
  delta_tail = plan.check_tail(sigma) if sigma > 0 else 0.0
  rows = plan.rows(sigma)
  final = rows[-1]["epsilon"] if rows else {a.value: 0.0 for a in plan.accountants}
  if args.plot:
    _plot(args.plot, plan, sigma, f"noise_multiplier={sigma:g}, "
          f"{accounting.relation_label(plan.scheme)} neighbours")
  payload = {"command": "epsilon", **plan.header(), "noise_multiplier": sigma,
             "epsilon": final, "delta_tail": delta_tail, "points": rows}
  summary = "; ".join(
      accounting.describe(final[a.value], plan.delta, plan.scheme, a, delta_tail) for a in plan.accountants)
  text = (f"dpmega epsilon: noise_multiplier = {sigma:g}, {_context(plan)}\n\n"
          f"{_table(plan, rows)}\n\nfinal: {summary}{_tail_line(plan, delta_tail)}")
  _emit(args, payload, text)
  return 0


def run_calibrate(args: argparse.Namespace) -> int:
  plan = _Plan(args)
  accountant = plan.accountants[0]
  if plan.steps == 0:
    raise UsageError("--steps must be >= 1 to calibrate a noise multiplier.")
  try:
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=args.target_epsilon, delta=plan.delta, dataset_size=plan.dataset_size,
        batch_sizes=plan.schedule, num_steps=plan.steps, scheme=plan.scheme,
        accountant=accountant, pld_discretization=plan.pld_discretization, q_grid=plan.q_grid,
        tail=plan.tail)
  except UsageError as e:
    if "delta_tail" not in str(e):
      raise
    plan.check_tail(1e6)  # names the flags when the sampler alone is the reason
    raise
  delta_tail = plan.check_tail(sigma)
  rows = plan.rows(sigma)
  achieved = rows[-1]["epsilon"][accountant.value]
  if args.plot:
    _plot(args.plot, plan, sigma, f"calibrated noise_multiplier={sigma:.4g} for "
          f"target epsilon {args.target_epsilon:g}")
  payload = {"command": "calibrate", **plan.header(), "target_epsilon": args.target_epsilon,
             "noise_multiplier": sigma, "epsilon": {accountant.value: achieved}, "delta_tail": delta_tail,
             "points": rows}
  text = (f"dpmega calibrate: target epsilon = {args.target_epsilon:g}, {_context(plan)}\n\n"
          f"noise_multiplier = {sigma:.6g}  ->  "
          f"{accounting.describe(achieved, plan.delta, plan.scheme, accountant, delta_tail)}"
          f"{_tail_line(plan, delta_tail)}\n\n"
          f"{_table(plan, rows)}")
  _emit(args, payload, text)
  return 0


def main(argv=None) -> int:  # pragma: no cover - `python -m dpmega` is the entry point
  from dpmega import cli  # pylint: disable=import-outside-toplevel
  return cli.main(argv)


if __name__ == "__main__":  # pragma: no cover
  sys.exit(main())
