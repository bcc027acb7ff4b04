"""Speed of dpmega.accounting against calling dp-accounting directly.

The schedule: 100,000 steps of an increasing batch size with 50 distinct sizes
(geometric from 1,024 to 2,097,152, 2,000 steps each), N = 1e9, σ = 1.0,
Poisson sampling, δ = 1e-9. Measured, for RDP and PLD:

* ε of the whole run: a fresh dp-accounting accountant composing the 50 events
  with ``count=`` (direct) vs ``compute_epsilon`` on a :class:`Ledger` holding
  the same 50 runs, with every dpmega cache cleared first (cold). The ledger
  must add <= 10%.
* the trainer's pattern: a ledger filled one ``record`` per step (100,000
  calls), then ``compute_epsilon`` after one more step (warm: only the new
  step is composed).
* one calibration of σ for the schedule to a target ε: dpmega (cached per
  distinct (q, σ), Brent on log σ, RDP seeds the PLD bracket) vs
  ``dp_accounting.calibrate_dp_mechanism`` on the same events (RDP; PLD with
  ``--naive_pld``, slow).

  python bench/accounting_speed.py
  python bench/accounting_speed.py --naive_pld
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dp_accounting  # noqa: E402
from dp_accounting.pld import pld_privacy_accountant  # noqa: E402
from dp_accounting.rdp import rdp_privacy_accountant  # noqa: E402
import numpy as np  # noqa: E402

from dpmega import accounting  # noqa: E402
from dpmega.accounting import events  # noqa: E402

N = 10**9
SIGMA = 1.0
DELTA = 1e-9
STEPS = 100_000
DISTINCT = 50
TARGET = 4.0


def schedule() -> list[tuple[int, int]]:
  """(batch_size, steps) runs: 50 increasing sizes, 2,000 steps each."""
  sizes = np.unique(np.round(np.geomspace(1024, 2_097_152, DISTINCT)).astype(int))
  assert len(sizes) == DISTINCT
  return [(int(b), STEPS // DISTINCT) for b in sizes]


def fresh(kind: str):
  if kind == "rdp":
    return rdp_privacy_accountant.RdpAccountant()
  return pld_privacy_accountant.PLDAccountant()


def event(b: int, sigma: float):
  return dp_accounting.PoissonSampledDpEvent(b / N, dp_accounting.GaussianDpEvent(sigma))


def direct_epsilon(kind: str, runs, sigma: float = SIGMA) -> float:
  acc = fresh(kind)
  for b, steps in runs:
    acc.compose(event(b, sigma), steps)
  return acc.get_epsilon(DELTA)


def clear_caches() -> None:
  events.rdp_of_event.cache_clear()
  events.pld_of_counts.cache_clear()


def timed(fn, *args, **kwargs):
  t = time.perf_counter()
  out = fn(*args, **kwargs)
  return out, time.perf_counter() - t


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--naive_pld", action="store_true",
                      help="also run dp_accounting.calibrate_dp_mechanism with PLD (slow)")
  parser.add_argument("--repeats", type=int, default=3, help="repeats of the epsilon timings")
  args = parser.parse_args()
  runs = schedule()
  print(f"schedule: {STEPS} steps, {len(runs)} distinct batch sizes "
        f"{runs[0][0]}..{runs[-1][0]}, N={N:g}, sigma={SIGMA}, delta={DELTA:g}, poisson")
  print(f"load average: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")

  ledger = accounting.Ledger()
  for b, steps in runs:
    ledger.record(batch_size=b, dataset_size=N, noise_multiplier=SIGMA, scheme="poisson",
                  steps=steps)

  results = {}
  for kind in ("rdp", "pld"):
    t_direct, t_ours = [], []
    for _ in range(args.repeats):
      eps_direct, t = timed(direct_epsilon, kind, runs)
      t_direct.append(t)
      clear_caches()
      cold = accounting.Ledger.from_dict(ledger.to_dict())  # no running total either
      eps_ours, t = timed(accounting.compute_epsilon, cold, DELTA, kind)
      t_ours.append(t)
    d, o = min(t_direct), min(t_ours)
    results[kind] = (eps_direct, eps_ours, d, o)
    print(f"[{kind}] epsilon: direct dp-accounting {d:.3f} s (eps={eps_direct:.6f}); "
          f"dpmega ledger, cold caches {o:.3f} s (eps={eps_ours:.6f}); "
          f"overhead {100 * (o / d - 1):+.1f}%  (best of {args.repeats})")

  # Trainer pattern: one record per step, then epsilon after each new step.
  clear_caches()
  per_step = accounting.Ledger()
  t = time.perf_counter()
  for b, steps in runs:
    for _ in range(steps):
      per_step.record(batch_size=b, dataset_size=N, noise_multiplier=SIGMA, scheme="poisson")
  t_record = time.perf_counter() - t
  assert per_step == ledger
  _, t_first = timed(accounting.compute_epsilon, per_step, DELTA)
  per_step.record(batch_size=runs[-1][0], dataset_size=N, noise_multiplier=SIGMA, scheme="poisson")
  _, t_next = timed(accounting.compute_epsilon, per_step, DELTA)
  print(f"\n[trainer] {STEPS} record() calls: {t_record:.3f} s "
        f"({1e6 * t_record / STEPS:.1f} us/step); ledger holds {len(per_step)} runs")
  print(f"[trainer] compute_epsilon rdp: first {t_first:.3f} s, after one more step "
        f"{1e3 * t_next:.2f} ms (running total)")

  # Calibration.
  sizes = np.repeat([b for b, _ in runs], [s for _, s in runs])
  print()
  for kind in ("rdp", "pld"):
    clear_caches()
    before = events.rdp_of_event.cache_info()
    sigma, t = timed(accounting.calibrate_noise_multiplier, target_epsilon=TARGET, delta=DELTA,
                     dataset_size=N, batch_sizes=sizes, accountant=kind)
    info = events.rdp_of_event.cache_info()
    check = direct_epsilon(kind, runs, sigma)
    print(f"[{kind}] calibrate: sigma={sigma:.6f} in {t:.2f} s; RDP curves computed "
          f"{info.misses - before.misses} (= distinct (q, sigma) pairs), reused {info.hits - before.hits}; "
          f"direct dp-accounting epsilon at sigma: {check:.6f} (target {TARGET})")
    if kind == "rdp" or args.naive_pld:
      composed = lambda s: dp_accounting.ComposedDpEvent(
          [dp_accounting.SelfComposedDpEvent(event(b, s), c) for b, c in runs])
      naive, t_naive = timed(
          dp_accounting.calibrate_dp_mechanism, lambda: fresh(kind), composed, TARGET, DELTA,
          dp_accounting.LowerEndpointAndGuess(0.1, 1.0), tol=1e-4)
      print(f"[{kind}] dp_accounting.calibrate_dp_mechanism on the same events: "
            f"sigma={naive:.6f} in {t_naive:.2f} s")


if __name__ == "__main__":
  main()
