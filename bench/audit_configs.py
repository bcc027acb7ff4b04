"""Audited vs claimed epsilon for the shipped configs (``configs/*.py``).

For each config: its noise multiplier (fixed, or calibrated to its target for
its whole schedule exactly as ``dpmega train`` does), its largest sampling rate
``q_max = max_t B_t / N`` and its whole-run ε. Then three audits
(:mod:`dpmega.audit`) at that σ:

* ``mechanism, q=1``: one private aggregation step without subsampling, white
  box (the strongest attack; the claim is the exact Gaussian ε of one step);
* ``mechanism, q_max``: one Poisson-subsampled step at the config's largest
  rate (the claim is the accountant's ε of that one step);
* ``one-run``: a tiny linear model trained ``--one_run_steps`` full-batch steps
  with 1000 canaries (Steinke, Nasr, Jagielski 2023), the claim is the
  accountant's ε of those steps.

An audit is a lower bound: a correct implementation must stay below the claim.
Then a sanity row per config shows that the same audit flags the mechanism
when the noise handed to the library is scaled by ``--weak_scale`` while the
accountant is still told σ.

  python bench/audit_configs.py                  # all configs, markdown table
  python bench/audit_configs.py --trials 100000 --configs configs/synthetic_ctr.py
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dpmega import accounting  # noqa: E402
from dpmega import audit  # noqa: E402
from dpmega.train import config as config_lib  # noqa: E402


def plan(path: str) -> dict:
  """σ, q_max, steps and whole-run ε of a config, as `dpmega train` would plan them."""
  config = config_lib.load_config(path)
  cfg = config_lib.validate(config)
  n = config.task.get("planning_dataset_size", None)
  if not n:
    from dpmega.tasks import build_task  # pylint: disable=import-outside-toplevel
    n = len(build_task(config).train_source)
  sizes = cfg.batch_schedule.batch_sizes(cfg.num_steps)
  if cfg.noise_multiplier is not None:
    sigma = cfg.noise_multiplier
  else:
    sigma = accounting.calibrate_noise_multiplier(
        target_epsilon=cfg.target_epsilon, delta=cfg.delta, dataset_size=n, batch_sizes=sizes,
        scheme=cfg.sampling, accountant=cfg.accountant)
  eps = accounting.epsilon_for_schedule(
      noise_multiplier=sigma, delta=cfg.delta, dataset_size=n, batch_sizes=sizes, scheme=cfg.sampling,
      accountant=cfg.accountant)
  return {"sigma": float(sigma), "q_max": float(sizes.max() / n), "steps": cfg.num_steps, "delta": cfg.delta,
          "dataset_size": int(n), "epsilon": float(eps), "accountant": cfg.accountant,
          "sampling": cfg.sampling.value, "clip_norm": cfg.clip_norm}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--configs", nargs="*", default=None, help="config files (default: configs/*.py)")
  p.add_argument("--trials", type=int, default=50_000, help="mechanism audit runs per input")
  p.add_argument("--one_run_steps", type=int, default=8)
  p.add_argument("--weak_scale", type=float, default=0.25)
  p.add_argument("--confidence", type=float, default=0.95)
  args = p.parse_args(argv)
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  paths = args.configs or sorted(glob.glob(os.path.join(root, "configs", "*.py")))

  print(f"confidence {args.confidence:g}; mechanism audits: {args.trials} runs per neighbouring input; "
        f"one-run: 1000 canaries, {args.one_run_steps} full-batch steps.\n")
  print("| config | σ | q_max | steps | whole-run ε (claimed) | audit | claimed ε | audited ε ≥ | verdict |")
  print("|---|---|---|---|---|---|---|---|---|")
  for path in paths:
    name = os.path.basename(path)
    try:
      pl = plan(path)
    except Exception as e:  # noqa: BLE001 - report and go on to the next config
      print(f"| {name} | - | - | - | - | plan failed: {type(e).__name__}: {str(e)[:80]} | | | |")
      continue
    head = (f"| {name} | {pl['sigma']:.4g} | {pl['q_max']:.3g} | {pl['steps']} | "
            f"{pl['epsilon']:.3g} (δ={pl['delta']:g}, {pl['accountant']}) |")
    delta = pl["delta"]
    # A without-replacement config is audited with replace-one neighbours against its replace-one claim
    # (sensitivity 2C); that audit runs on the whole batch, so it has no subsampled row.
    runs = [
        ("mechanism, q=1", lambda s=1.0: audit.mechanism_audit(
            noise_multiplier=pl["sigma"], delta=delta, trials=args.trials, confidence=args.confidence,
            noise_scale_for_testing=s, sampling=pl["sampling"])),
    ]
    if pl["sampling"] == "poisson":
      runs.append((f"mechanism, q={pl['q_max']:.3g}", lambda s=1.0: audit.mechanism_audit(
          noise_multiplier=pl["sigma"], delta=delta, trials=args.trials, confidence=args.confidence,
          sampling_rate=pl["q_max"] if pl["q_max"] < 1 else None, noise_scale_for_testing=s)))
    runs += [
        ("one-run", lambda s=1.0: audit.one_run_training_audit(
            noise_multiplier=pl["sigma"], delta=delta, steps=args.one_run_steps, confidence=args.confidence,
            noise_scale_for_testing=s)),
    ]
    for i, (label, fn) in enumerate(runs):
      start = time.time()
      r = fn()
      verdict = "VIOLATION" if r.violation else "ok"
      print(f"{head if i == 0 else '| | | | | |'} {label} | {r.claimed_epsilon:.3g} | "
            f"{r.epsilon_lower_bound:.3g} | {verdict} ({time.time() - start:.0f} s) |", flush=True)
    weak = runs[0][1](args.weak_scale)
    print(f"| | | | | | sanity: mechanism, q=1, noise x{args.weak_scale:g} | {weak.claimed_epsilon:.3g} | "
          f"{weak.epsilon_lower_bound:.3g} | {'detected' if weak.violation else 'NOT DETECTED'} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
