"""Mega-batch utility of private tiny-BERT pretraining on CPU (issue 20): one command per sweep.

Data: the installed-packages corpus (``task.source = "packages"``, :mod:`dpmega.data.package_corpus`; eval on
held-out packages) or, with ``--corpus stdlib``, the stdlib docstrings. Model, masking and optimizer (Adam,
constant learning rate) are those of ``configs/bert_tiny_mlm.py``.

Sweeps (``--sweep``):

* ``reference``: the non-private ceiling -- a plain Adam loop on the mean loss (no clipping, no noise), a
  learning-rate grid for ``--ref_grid_steps`` steps, then the best rate for ``--ref_steps`` steps with its curve.
* ``batch``: at fixed epsilon (5.36 and 2) and a fixed number of examples processed (``--examples``), batch B
  from 256 to the largest that keeps >= 30 steps, learning rate per B on ``--lrs``. Arms run as the
  effective-noise simulation (:mod:`dpmega.train.simulation`) at batch ``--sim_batch`` (k = B / sim_batch),
  sigma calibrated for the real run at B; ``--confirm`` reruns the B = 256 and the best B of epsilon 5.36 for real.
* ``schedule``: at epsilon 5.36 and final batch B (``--schedule_batch``), the geometric schedule B/8 -> B
  against fixed B over the same steps (with ``--match_examples``: the ramp, then batch B until it has processed
  as many examples as the fixed run, epsilon accounted for all its steps); accuracy against examples processed
  (simulated, or real with ``--real``); with ``--seeds 0,1,2`` each seed, then the seed means and their plot.
* ``simulation``: one real run at ``--sim_check_batch`` against its simulations at k in {4, 16}.
* ``ceiling``: the trainer's recipe with clipping and no noise at ``--ref_batch`` for ``--examples``, its curve.
* ``long``: private runs for ``--examples`` at each of ``--batches``, with their curves: real, simulated at
  ``--sim_batch`` with ``--simulate``, or clipped without noise with ``--noise_free``.
* ``noise_floor``: no training; sigma and the noise per step sigma C / B at ``--floor_steps`` steps for each of
  ``--batches``, on this corpus and on 10x and 100x its rows (where the per-step noise stops falling with B).

The DP arms use the config's Adam; ``--optimizer adam_bc``, ``--adam_eps`` and ``--b2`` change it.

Every arm is cached in ``--cache`` (JSON, keyed by its settings) so sweeps share arms and a rerun resumes.
Tables go to stdout; a PNG per sweep goes next to ``--out``. ``--full`` gives the issue's sizes (hours on CPU).

  python bench/bert_utility.py --sweep reference
  python bench/bert_utility.py --sweep batch --confirm
  python bench/bert_utility.py --sweep schedule
  python bench/bert_utility.py --sweep simulation
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpmega import accounting  # noqa: E402
from dpmega import schedules  # noqa: E402
from dpmega import tasks  # noqa: E402
from dpmega import train as train_lib  # noqa: E402
from dpmega.train import config as config_lib  # noqa: E402
from dpmega.train import simulation  # noqa: E402

DELTA = 1e-6

# Every arm builds a new trainer: the persistent compilation cache lets arms that share shapes (the clipped
# sum does not depend on the batch size, sigma or k) skip the XLA compile, minutes each on a loaded CPU.
jax.config.update("jax_compilation_cache_dir", os.environ.get("DPMEGA_BENCH_JAX_CACHE", "/tmp/dpmega_bench_jax"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def base_config(args, lr: float) -> object:
  config = config_lib.load_config(str(ROOT / "configs" / "bert_tiny_mlm.py"))
  config.task.source = args.corpus
  config.task.cache_dir = args.cache_dir
  config.optimizer.learning_rate = lr
  config.log_every = 0
  config.eval_every = 0
  config.checkpoint_every = 0
  config.tensorboard = False
  config.delta = DELTA
  config.microbatch_size = 64
  config.max_microbatches = 16
  config.init_seed = args.seed  # public, init only: the DP runs key noise and sampling by a fresh secret
  config.optimizer.b2 = args.b2
  config.optimizer.name = args.optimizer
  config.optimizer.eps = args.adam_eps
  config.optimizer.adam_bc_floor = args.adam_bc_floor
  return config


_TASKS = {}


def task_of(args):
  if args.corpus not in _TASKS:
    _TASKS[args.corpus] = tasks.build_task(base_config(args, 1e-3))
  return _TASKS[args.corpus]


def calibrate(args, spec: str, steps: int, epsilon: float, dataset_size: int | None = None) -> float:
  """sigma of the real run (``spec`` for ``steps`` over the corpus, or ``dataset_size`` rows) at ``epsilon``,
  ``DELTA``."""
  n = len(task_of(args).train_source) if dataset_size is None else dataset_size
  plan = accounting.Plan(dataset_size=n, schedule=schedules.parse_schedule(spec), num_steps=steps, delta=DELTA,
                         scheme="poisson", accountant="rdp")
  return plan.calibrate(epsilon)


def fidelity(args, row: dict) -> float:
  """The effective-noise simulation's own fidelity bound r (:func:`dpmega.train.simulation.sampling_excess_bound`)
  for a simulated arm of constant batch: its extra sampling variance as a fraction of the DP noise's."""
  b = int(row["schedule"].split(":")[1])
  shapes = jax.eval_shape(task_of(args).init_params, jax.random.key(0))
  d = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
  return simulation.sampling_excess_bound(row["sigma"], np.array([b]), np.array([b // row["k"]]), d)


def _cached(args, key: dict, fn) -> dict:
  path = pathlib.Path(args.cache)
  cache = json.loads(path.read_text()) if path.is_file() else {}
  name = json.dumps(key, sort_keys=True)
  if name not in cache:
    cache[name] = {**key, **fn()}
    path.parent.mkdir(parents=True, exist_ok=True)
    cache = {**(json.loads(path.read_text()) if path.is_file() else {}), name: cache[name]}
    path.write_text(json.dumps(cache, indent=1))
  print(json.dumps({k: v for k, v in cache[name].items() if k != "curve"}), flush=True)
  return cache[name]


def optimizer_key(args) -> dict:
  """The cache key's optimizer fields where they differ from the config's Adam (old keys stay valid)."""
  return {**({"optimizer": args.optimizer} if args.optimizer != "adam" else {}),
          **({"adam_eps": args.adam_eps} if args.adam_eps != 1e-8 else {}),
          **({"adam_bc_floor": args.adam_bc_floor} if args.optimizer == "adam_bc" else {})}


def run_dp(args, spec: str, steps: int, lr: float, *, epsilon: float, k: int = 0, eval_every: int = 0,
           noise_free: bool = False) -> dict:
  """One DP arm through ``dpmega.train``: real (``k = 0``, sigma calibrated to ``epsilon``) or simulated.

  With ``noise_free``: the same trainer, sampling and clipping with sigma = 1e-9 (not private; ``epsilon`` is
  only a label): the ceiling of every private run at this batch and number of examples.
  """
  key = {"arm": "dp", "corpus": args.corpus, "schedule": spec, "steps": steps, "lr": lr, "epsilon": epsilon,
         "k": k, "eval_every": eval_every, "seed": args.seed, **({"noise_free": True} if noise_free else {}),
         **({"b2": args.b2} if args.b2 != 0.999 else {}), **optimizer_key(args)}

  def go():
    config = base_config(args, lr)
    config.num_steps, config.batch_schedule, config.eval_every = steps, spec, eval_every
    if noise_free:
      config.noise_multiplier, config.target_epsilon = 1e-9, None
    elif k:
      config.noise_multiplier, config.target_epsilon, config.simulate_k = calibrate(args, spec, steps, epsilon), None, k
    else:
      config.noise_multiplier, config.target_epsilon = None, epsilon
    full = schedules.parse_schedule(spec).batch_sizes(steps)
    with tempfile.TemporaryDirectory() as workdir:
      config.workdir = workdir
      start = time.perf_counter()
      result = train_lib.Trainer(config_lib.validate(config), task_of(args), out=lambda s: None,
                                 config_dict=config).run()
      seconds = time.perf_counter() - start
    done = np.cumsum(full)
    curve = [(int(done[r["step"] - 1]), r["eval_mlm_accuracy"]) for r in result.history if "eval_mlm_accuracy" in r]
    curve.append((int(done[result.steps - 1]), result.eval_metrics["mlm_accuracy"]))
    return {"sigma": result.noise_multiplier, "epsilon_real": None if k or noise_free else result.epsilon,
            "seconds": seconds,
            "examples": int(done[-1]), "computed_examples": int(done[-1] // max(k, 1)), "curve": curve,
            **result.eval_metrics}
  return _cached(args, key, go)


def run_non_private(args, batch: int, steps: int, lr: float, eval_every: int = 0) -> dict:
  """A plain Adam loop on the mean loss over uniform batches (no clipping, no noise), same masking."""
  key = {"arm": "non-private", "corpus": args.corpus, "batch": batch, "steps": steps, "lr": lr,
         "eval_every": eval_every, "seed": args.seed}

  def go():
    task = task_of(args)
    optimizer = optax.adam(lr)
    params = task.init_params(jax.random.fold_in(jax.random.key(args.seed), 0))  # the trainer's init
    opt_state = optimizer.init(params)

    def mean_loss(p, b):
      losses, _ = jax.vmap(task.loss_fn, in_axes=(None, 0))(p, b)
      return jnp.mean(losses)

    @jax.jit
    def step(p, s, b):
      updates, s = optimizer.update(jax.grad(mean_loss)(p, b), s, p)
      return optax.apply_updates(p, updates), s

    rng = np.random.default_rng(args.seed)
    n, curve = len(task.train_source), []
    start = time.perf_counter()
    for t in range(steps):
      rows = task.train_source.take(rng.integers(0, n, batch))
      params, opt_state = step(params, opt_state, task.prepare_batch(rows, jax.random.fold_in(jax.random.key(1), t)))
      if eval_every and (t + 1) % eval_every == 0 and t + 1 < steps:
        curve.append(((t + 1) * batch, task.evaluate(params)["mlm_accuracy"]))
    final = task.evaluate(params)
    curve.append((steps * batch, final["mlm_accuracy"]))
    return {"seconds": time.perf_counter() - start, "examples": steps * batch, "curve": curve, **final}
  return _cached(args, key, go)


# ---------------------------------------------------------------------------------------------- the sweeps
def sweep_reference(args) -> list[dict]:
  rows = [run_non_private(args, args.ref_batch, args.ref_grid_steps, lr) for lr in args.lrs]
  best = max(rows, key=lambda r: r["mlm_accuracy"])["lr"]
  rows.append(run_non_private(args, args.ref_batch, args.ref_steps, best, eval_every=max(1, args.ref_steps // 20)))
  curve = rows[-1]["curve"]
  tail = [a for _, a in curve[-4:]]
  rows[-1]["plateau"] = f"last 4 evals within {max(tail) - min(tail):.4f}"
  plot(args, "reference", {f"non-private lr {best:g}": curve}, "non-private reference")
  return rows


def batch_sizes(args) -> list[int]:
  sizes, b = [], 256
  while args.examples // b >= 30:
    sizes.append(b)
    b *= 2
  return sizes


def sweep_batch(args) -> list[dict]:
  rows, best = [], {}
  # With --noise_free, the same arms without noise too (label epsilon 0): what any sigma at this B and example
  # budget can reach.
  for eps, free in [(eps, False) for eps in args.epsilons] + ([(0.0, True)] if args.noise_free else []):
    for b in batch_sizes(args):
      k = 0 if args.real or free else max(1, b // args.sim_batch)
      arms = [run_dp(args, f"constant:{b}", args.examples // b, lr, epsilon=eps, k=k, noise_free=free)
              for lr in args.lrs]
      rows += arms
      best[(eps, b)] = max(arms, key=lambda r: r["mlm_accuracy"])
  if args.confirm and not args.real:
    eps = args.epsilons[0]
    top = max((r for (e, _), r in best.items() if e == eps), key=lambda r: r["mlm_accuracy"])
    for r in {best[(eps, 256)]["schedule"]: best[(eps, 256)], top["schedule"]: top}.values():
      rows.append(run_dp(args, r["schedule"], r["steps"], r["lr"], epsilon=eps))
  series = {}
  for (eps, b), r in sorted(best.items()):
    label = ("clipped, no noise (best lr)" if r.get("noise_free")
             else f"eps {eps:g} (best lr{'' if args.real else ', simulated'})")
    series.setdefault(label, []).append((b, r["mlm_accuracy"]))
  plot(args, "batch", series, f"MLM accuracy vs batch size at {args.examples:,} examples", xlabel="batch size")
  return rows


def reach(curve: list, target: float) -> tuple[int | None, float | None]:
  """Examples at the first evaluation of ``curve`` at or above ``target``, and linearly interpolated between the
  evaluations around it (None, None if it never gets there)."""
  for i, (x, a) in enumerate(curve):
    if a >= target:
      if i == 0:
        return x, float(x)
      (x0, a0) = curve[i - 1]
      return x, x0 + (target - a0) / (a - a0) * (x - x0)
  return None, None


def sweep_schedule(args) -> list[dict]:
  return schedule_seeds(args) if len(args.seeds) > 1 else schedule_one(args)


def schedule_one(args) -> list[dict]:
  """The fixed batch and the ramp at ``args.seed``; the ramp's row gets the examples it needs to reach the fixed
  run's final accuracy."""
  b, steps = args.schedule_batch, args.examples // args.schedule_batch
  k = 0 if args.real else max(1, b // 8 // (args.sim_batch // 2))  # the ramp starts at batch sim_batch / 2
  every = max(1, steps // 10)
  ramp = f"geometric:{b // 8}->{b}@{steps}"
  ramp_steps = steps
  if args.match_examples:  # the ramp, then batch B until it has processed as many examples as the fixed run
    sizes = schedules.parse_schedule(ramp).batch_sizes(steps)
    ramp_steps = steps + -(-max(steps * b - int(np.sum(sizes)), 0) // b)
  rows = [run_dp(args, spec, n, args.schedule_lr, epsilon=args.epsilons[0], k=k, eval_every=every)
          for spec, n in ((f"constant:{b}", steps), (ramp, ramp_steps))]
  plot(args, "schedule", {r["schedule"] + ("" if args.real else f" (simulated k={k})"): r["curve"] for r in rows},
       f"eps {args.epsilons[0]:g}: fixed vs increasing batch")
  fixed, ramp = rows
  first, _ = reach(ramp["curve"], fixed["mlm_accuracy"])
  ramp["examples_to_reach_fixed"] = first
  ramp["fraction_of_fixed_examples"] = None if first is None else first / fixed["examples"]
  return rows


def schedule_seeds(args) -> list[dict]:
  """The ``schedule`` sweep for each of ``--seeds`` (init, noise and sampling differ), then the seed means: the
  fraction of the fixed run's examples with which the ramp reaches the fixed run's final accuracy, per seed and on
  the mean curves (the arms evaluate at the same example counts in every seed), and one plot of the means."""
  out, rows = args.out, []
  for seed in args.seeds:
    args.seed, args.out = seed, str(pathlib.Path(out).parent / f"seed{seed}" / pathlib.Path(out).name)
    rows += schedule_one(args)
  args.out = out
  fixed, ramp = rows[0::2], rows[1::2]
  mean = lambda arms: [(x, float(np.mean([r["curve"][i][1] for r in arms])))  # noqa: E731
                       for i, (x, _) in enumerate(arms[0]["curve"])]
  fixed_mean, ramp_mean = mean(fixed), mean(ramp)
  total = fixed[0]["examples"]
  lines = ["| seed | fixed B: final | ramp: final | ramp reaches the fixed final at (first evaluation) | "
           "interpolated |", "|---:|---:|---:|---:|---:|"]
  entries = [(seed, f["mlm_accuracy"], r["curve"]) for seed, f, r in zip(args.seeds, fixed, ramp)]
  for label, target, curve in entries + [("mean", fixed_mean[-1][1], ramp_mean)]:
    first, interp = reach(curve, target)
    lines.append(f"| {label} | {target:.4f} | {curve[-1][1]:.4f} | "
                 + ("never |  |" if first is None else f"{first:,} ({first / total:.0%}) | {interp / total:.0%} |"))
  print("\n".join(lines))
  b = args.schedule_batch
  plot(args, "schedule_seeds", {f"constant:{b}, mean of {len(fixed)} seeds": fixed_mean,
                                f"{ramp[0]['schedule']}, then {b}, mean of {len(ramp)} seeds": ramp_mean},
       f"eps {args.epsilons[0]:g}, Adam b2 {args.b2:g}: fixed vs increasing batch")
  return rows


def sweep_simulation(args) -> list[dict]:
  b = args.sim_check_batch
  steps, eps = args.examples // b, args.epsilons[0]
  every = max(1, steps // 8)
  rows = [run_dp(args, f"constant:{b}", steps, args.schedule_lr, epsilon=eps, k=k, eval_every=every)
          for k in (0, 4, 16)]
  for r in rows[1:]:
    r["relative_error"] = r["mlm_accuracy"] / rows[0]["mlm_accuracy"] - 1
    r["sampling_excess_bound"] = fidelity(args, r)
  plot(args, "simulation", {("real" if r["k"] == 0 else f"simulated k={r['k']}"): r["curve"] for r in rows},
       f"B = {b}, eps {eps:g}: real vs effective-noise simulation")
  return rows


def sweep_ceiling(args) -> list[dict]:
  """The trainer's recipe with clipping and no noise (not private) at ``--ref_batch`` for ``--examples``, with its
  curve: the ceiling of every private arm of this model (the plain loop of ``reference`` plateaus lower)."""
  b = args.ref_batch
  steps = args.examples // b
  rows = [run_dp(args, f"constant:{b}", steps, args.lrs[0], epsilon=0.0, noise_free=True,
                 eval_every=max(1, steps // 16))]
  plot(args, "ceiling", {f"clipped, no noise, B = {b}": rows[0]["curve"]}, "the noise-free ceiling")
  return rows


def sweep_long(args) -> list[dict]:
  """Private runs at ``--epsilons[0]`` for ``--examples`` at each of ``--batches``, with curves: real, or with
  ``--simulate`` the effective-noise simulation of each (batch ``--sim_batch``, k = B / sim_batch, sigma / k; NOT
  private), which reaches batches and example budgets that real runs cannot here, or with ``--noise_free`` the
  clipped arm without noise. Each simulated arm records the simulation's fidelity bound r
  (``dpmega.train.simulation``; above 0.25 the prediction is not to be trusted)."""
  rows = []
  eps = 0.0 if args.noise_free else args.epsilons[0]  # the label of a noise-free arm, as in the batch sweep
  for b in args.batches:
    steps = args.examples // b
    k = b // args.sim_batch if args.simulate and not args.noise_free and b // args.sim_batch > 1 else 0
    rows.append(run_dp(args, f"constant:{b}", steps, args.lrs[0], epsilon=eps, k=k, eval_every=max(1, steps // 8),
                       noise_free=args.noise_free))
    if k:
      rows[-1]["sampling_excess_bound"] = fidelity(args, rows[-1])
  kind = "clipped, no noise" if args.noise_free else f"simulated at {args.sim_batch}" if args.simulate else ""
  plot(args, "long", {f"B = {r['schedule'].split(':')[1]}" + (f" ({kind})" if kind else ""): r["curve"]
                      for r in rows},
       f"eps {args.epsilons[0]:g}, {args.examples:,} examples")
  return rows


def sweep_noise_floor(args) -> list[dict]:
  """No training: sigma and the per-step noise sigma C / B (C = 1) at ``--epsilons[0]`` for ``--floor_steps`` steps of
  each of ``--batches``, on this corpus and on 10x and 100x as many rows. Once q = B / N passes ~0.1, sigma grows in
  proportion to B and the noise per step stops falling: the floor that no batch size gets under on this corpus."""
  n = len(task_of(args).train_source)
  eps, steps, rows, series = args.epsilons[0], args.floor_steps, [], {}
  for mult in (1, 10, 100):
    for b in args.batches:
      sigma = calibrate(args, f"constant:{b}", steps, eps, dataset_size=n * mult)
      rows.append({"rows": n * mult, "batch": b, "q": b / (n * mult), "sigma": sigma, "noise_per_step": sigma / b})
      series.setdefault(f"{n * mult:,} rows" + (" (this corpus)" if mult == 1 else ""), []).append((b, sigma / b))
  print(f"eps {eps:g}, delta {DELTA:g}, {steps} steps:")
  print("| rows | batch | q | sigma | sigma C / B |\n|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['rows']:,} | {r['batch']:,} | {r['q']:.4f} | {r['sigma']:.3f} | {r['noise_per_step']:.3g} |")
  plot(args, "noise_floor", series, f"noise per step at eps {eps:g}, {steps} steps", xlabel="batch size",
       ylabel="sigma C / B (C = 1)", logy=True)
  return []


def plot(args, name: str, series: dict, title: str, xlabel: str = "examples processed",
         ylabel: str = "held-out MLM accuracy", logy: bool = False) -> None:
  import matplotlib  # noqa: PLC0415
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # noqa: PLC0415
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, pts in series.items():
    xs, ys = zip(*pts)
    ax.plot(xs, ys, marker="o", label=label)
  if xlabel == "batch size":
    ax.set_xscale("log", base=2)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  if logy:
    ax.set_yscale("log")
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=8)
  fig.tight_layout()
  path = pathlib.Path(args.out).with_name(f"bert_{name}.png")
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=80)
  print(f"plot: {path}")


def table(rows: list[dict]) -> str:
  lines = ["| arm | schedule / batch | steps | lr | k | sigma | epsilon | examples | MLM acc | unigram | seconds |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    eps = "inf" if r["arm"] == "non-private" or r.get("noise_free") else f"{r['epsilon']:g}"
    arm = r["arm"] if r["arm"] == "non-private" else ("clipped, no noise" if r.get("noise_free") else
                                                     "DP" if not r["k"] else "simulated (not private)")
    lines.append(f"| {arm} | {r.get('schedule', r.get('batch'))} | {r['steps']} | {r['lr']:g} | {r.get('k', '')} | "
                 f"{r.get('sigma', 0):.3g} | {eps} | {r['examples']:,} | {r['mlm_accuracy']:.4f} | "
                 f"{r['unigram_accuracy']:.4f} | {r['seconds']:.0f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sweep", choices=("reference", "ceiling", "batch", "long", "schedule", "simulation",
                                          "noise_floor"),
                      required=True)
  parser.add_argument("--batches", default="512,2048,8192", help="long, noise_floor: the batch sizes, comma-separated")
  parser.add_argument("--floor_steps", type=int, default=512, help="noise_floor: the steps of every schedule")
  parser.add_argument("--full", action="store_true", help="the issue's sizes (hours on CPU; an accelerator)")
  parser.add_argument("--corpus", choices=("packages", "stdlib"), default="packages")
  parser.add_argument("--examples", type=int, default=None, help="examples processed per arm")
  parser.add_argument("--lrs", default=None, help="learning-rate grid, comma-separated")
  parser.add_argument("--epsilons", default="5.36,2")
  parser.add_argument("--sim_batch", type=int, default=64, help="batch the simulated arms sample")
  parser.add_argument("--real", action="store_true", help="run every arm for real (no simulation)")
  parser.add_argument("--confirm", action="store_true", help="batch sweep: rerun B = 256 and the best B for real")
  parser.add_argument("--noise_free", action="store_true",
                      help="batch sweep: also every B with clipping and no noise (not private: the ceiling)")
  parser.add_argument("--schedule_batch", type=int, default=None)
  parser.add_argument("--schedule_lr", type=float, default=None)
  parser.add_argument("--match_examples", action="store_true",
                      help="schedule sweep: continue the ramp at batch B until it has processed the fixed run's examples")
  parser.add_argument("--sim_check_batch", type=int, default=1024)
  parser.add_argument("--simulate", action="store_true", help="long: simulate each batch at --sim_batch (NOT private)")
  parser.add_argument("--ref_batch", type=int, default=256)
  parser.add_argument("--ref_grid_steps", type=int, default=None)
  parser.add_argument("--ref_steps", type=int, default=None)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--seeds", default=None, help="schedule sweep: comma-separated seeds, each run, then the "
                      "seed means (overrides --seed)")
  parser.add_argument("--b2", type=float, default=0.999, help="Adam's second-moment decay of the DP arms (a "
                      "shorter memory forgets the noisier small batches of a ramp sooner)")
  parser.add_argument("--optimizer", default="adam", choices=("adam", "adam_bc"), help="optimizer of the DP arms")
  parser.add_argument("--adam_eps", type=float, default=1e-8, help="Adam's epsilon (DP arms; near sigma C / B it "
                      "damps the coordinates whose update is noise)")
  parser.add_argument("--adam_bc_floor", type=float, default=1e-8, help="adam_bc: floor of the corrected second "
                      "moment (near (sigma C / B)^2)")
  parser.add_argument("--cache_dir", default=os.environ.get("DPMEGA_CACHE_DIR", ""))
  parser.add_argument("--cache", default=str(ROOT / "bench" / "results" / "bert_arms.json"))
  parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "bert_utility.json"))
  args = parser.parse_args(argv)
  # CPU defaults (a shared 2-core machine, one sweep well under an hour) and --full (the sizes).
  size = dict(examples=1 << 21, lrs="1e-3,3e-3,1e-2", schedule_batch=16384, ref_grid_steps=2000,
              ref_steps=40000) if args.full else dict(examples=1 << 16, lrs="3e-3,1e-2,3e-2",
                                                      schedule_batch=2048, ref_grid_steps=200, ref_steps=1500)
  for name, value in size.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  args.lrs = [float(x) for x in str(args.lrs).split(",")]
  args.epsilons = [float(x) for x in args.epsilons.split(",")]
  args.batches = [int(x) for x in args.batches.split(",")]
  args.seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else [args.seed]
  if args.schedule_lr is None:
    args.schedule_lr = 1e-2
  start = time.perf_counter()
  task = task_of(args)
  print(f"corpus {args.corpus}: {len(task.train_source):,} train rows of 32 tokens "
        f"({32 * len(task.train_source):,} token slots); {os.getloadavg()=}", flush=True)
  rows = globals()[f"sweep_{args.sweep}"](args)
  if rows:
    print(table(rows))
  for r in rows:
    extra = {k: r[k] for k in ("plateau", "relative_error", "sampling_excess_bound", "examples_to_reach_fixed",
                               "fraction_of_fixed_examples")
             if k in r}
    if extra:
      print(r.get("schedule", r.get("lr")), extra)
  out = pathlib.Path(args.out).with_name(f"bert_{args.sweep}.json")
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps({"args": vars(args), "device": str(jax.devices()[0]), "load": os.getloadavg(),
                             "seconds": time.perf_counter() - start, "rows": rows}, indent=1))
  print(f"done in {time.perf_counter() - start:.0f} s; load {os.getloadavg()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
