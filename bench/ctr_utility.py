"""Utility and calibration of private CTR training on generated Criteo-format data (issue 18).

Every run is the real trainer (``dpmega.train.train``) on ``configs/ctr_<model>.py``
(small variant: its recipe -- clip norm, optimizer, learning rate -- is the
config's default) with the overrides of its arm, on one generated dataset
(train and a disjoint evaluation file from the same hidden model):

1. **Arms** (fair, tuned baselines): non-private (no clipping, no noise),
   clipped-no-noise (the recipe's clip norm, sigma = 1e-9) and private at each
   epsilon (sigma calibrated to the whole schedule), every arm with the same
   optimizer family and its own learning-rate grid (the config's rate times
   ``--lr_grid``); the best of each arm and the whole grid are reported, with
   AUC, log loss, normalized entropy (NE) and ECE, plus the noise-to-signal
   ratio per step of the private runs (``sigma C sqrt(P) / B`` over the clipped
   mean gradient's norm, estimated from the released noisy norm).
2. **Optimizer and clipping families** at ``--batch_epsilon``: the recipe against
   the alternatives (``--families``: optimizers, adaptive clip norm, clip groups,
   normalized clipping), each at its own default learning rate.
3. **Batch size** at ``--batch_epsilon`` and a fixed number of epochs (``--batch_epochs``), with
   CowClip and its scaling rules (:func:`dpmega.train.optim.scale_for_batch`:
   table learning rate kept, L2 times the batch factor, dense learning rate
   times its square root), and the non-private CowClip curve beside it.

PNG plots (AUC vs epsilon, AUC vs batch size, reliability diagram of the best
run of each arm) go to ``--plots`` when matplotlib is installed (the ``plot`` extra).

  python bench/ctr_utility.py            # sized for 2 busy CPU cores: DeepFM, 5 x 10^4 rows (~1 h at load 10)
  python bench/ctr_utility.py --full     # the issue's size: DeepFM and DLRM, 10^6 / 10^5 rows, batch to 65,536
                                         # (1 epoch per arm, 2 for the batch table; ~4 min a run at load 10)
  python bench/ctr_utility.py --quick    # smoke: 2 arms, 1 rate, 20k rows

Writes its section of ``bench/RESULTS.md`` (between its markers; other sections
are kept) and ``--json``; ``--resume`` reuses finished runs from ``--json``
(the data is deterministic), so an interrupted benchmark continues.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpmega import metrics as metrics_lib  # noqa: E402
from dpmega import train as train_lib  # noqa: E402
from dpmega.data import criteo_synthetic  # noqa: E402
from dpmega.models import ctr as ctr_models  # noqa: E402
from dpmega.tasks import ctr as ctr_task  # noqa: E402
from dpmega.train import config as config_lib  # noqa: E402
from dpmega.train import optim  # noqa: E402

# Alternatives to the recipe for table 2: name -> optimizer overrides (each at its own default rate).
FAMILIES = {
    "recipe": {},
    "adam_bc": {"optimizer.name": "adam_bc", "optimizer.learning_rate": 0.01, "optimizer.adam_bc_floor": 1e-4},
    # Floors ~10x and ~100x the noise variance (sigma C / B)^2 = 2.4e-4 at eps = 3, B = 1,024, C = 20.
    "adam_bc_f10": {"optimizer.name": "adam_bc", "optimizer.learning_rate": 0.01, "optimizer.adam_bc_floor": 2.5e-3},
    "adam_bc_f100": {"optimizer.name": "adam_bc", "optimizer.learning_rate": 0.01, "optimizer.adam_bc_floor": 2.5e-2},
    # The old step size (momentum 0.3 at C = 1) with the new clip norm: lr 0.3 / 20.
    "momentum_c20": {"optimizer.name": "momentum", "optimizer.learning_rate": 0.015},
    "momentum_c1": {"optimizer.name": "momentum", "optimizer.learning_rate": 0.3, "clip_norm": 1.0},
    "adagrad_tables": {"optimizer.table_name": "adagrad", "optimizer.table_learning_rate": 0.05},
    "sgd_tables": {"optimizer.table_name": "sgd", "optimizer.table_learning_rate": 1.0},
    # Clipping options on the recipe (item 2 of issue 18). Adaptive clip norm (Andrew et al. 2021): C starts at the
    # recipe's and tracks the quantile; the noisy clipped count (std ~ B / 20 at B = 4,096, their suggestion) is
    # accounted, so sigma of the gradient is recalibrated a little higher for the same epsilon.
    "adaptive_q0.5": {"adaptive_clip": True, "adaptive_clip_quantile": 0.5, "metrics": "private",
                      "clipped_count_noise": 200.0},
    "adaptive_q0.9": {"adaptive_clip": True, "adaptive_clip_quantile": 0.9, "metrics": "private",
                      "clipped_count_noise": 200.0},
    # Per-group clip budgets, tables vs dense layers (total sensitivity still C).
    "groups_tables_dense": {"clip_groups": "embedding=0.5;.*=0.5"},
    "groups_tables_0.8": {"clip_groups": "embedding=0.8;.*=0.2"},
    "normalized": {"normalized_clipping": True},
    # The recipe at other clip norms (C = 20 clips ~15% of DeepFM's examples at batch 16,384; a smaller C lowers the
    # noise sigma C with the signal of the unclipped examples kept).
    "c5": {"clip_norm": 5.0},
    "c10": {"clip_norm": 10.0},
    # The recipe with sigma calibrated by the PLD accountant (tighter than RDP: at eps 1, 1,485 steps of q = 0.016,
    # sigma 2.98 instead of 3.17 for the same guarantee).
    "pld": {"accountant": "pld"},
    # Half the hashed rows per feature (26 x 500 x (8 + 1) table coordinates instead of 26 x 1,000 x 9): fewer
    # noisy coordinates, more collisions.
    "b500": {"task.model.buckets": 500},
    # Adam's update is ~lr in every coordinate whose second moment is noise: at eps 1, batch 16,384, C = 20 the noise
    # std on the mean gradient is sigma C / B = 3.9e-3. An epsilon of that size damps the noise-only coordinates;
    # DP-AdamBC subtracts the noise variance (3.9e-3)^2 = 1.5e-5 from the second moment instead (floor at it).
    "eps4e-3": {"optimizer.eps": 4e-3},
    "eps1e-3": {"optimizer.eps": 1e-3},
    "adam_bc_e1": {"optimizer.name": "adam_bc", "optimizer.learning_rate": 0.01, "optimizer.adam_bc_floor": 1.5e-5},
    "adam_bc_e1_f10": {"optimizer.name": "adam_bc", "optimizer.learning_rate": 0.01, "optimizer.adam_bc_floor": 1.5e-4},
}


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=["deepfm"])
  p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
  p.add_argument("--rows", type=int, default=50_000)
  p.add_argument("--eval_rows", type=int, default=10_000)
  p.add_argument("--batch_size", type=int, default=1024, help="tables 1 and 2: expected batch size")
  p.add_argument("--epochs", type=float, default=1.0, help="epochs of every run (table 3: --batch_epochs)")
  p.add_argument("--batch_epochs", type=float, default=None, help="table 3: epochs of every run (default --epochs; "
                 "enough that the largest batch takes >= 30 steps)")
  p.add_argument("--only", nargs="+", default=["arms", "families", "batch", "seeds"],
                 choices=["arms", "families", "batch", "seeds"], help="tables to run (the others are only rendered)")
  p.add_argument("--merge", nargs="*", default=[], help="more --json files whose runs are rendered with these")
  p.add_argument("--batch_lr_grid", type=float, nargs="+", default=[1.0],
                 help="table 3: learning rates tried at each batch size, as multiples of the CowClip-scaled ones "
                 "(the table shows the best of each arm)")
  p.add_argument("--batch_seeds", type=int, default=1, help="table 3: init seeds of every run (the table shows the "
                 "mean over seeds of the learning rate of best mean)")
  p.add_argument("--batch_clip_only", action="store_true", help="table 3: also the clipped-no-noise arm")
  p.add_argument("--batch_arms", nargs="+", default=["private", "nonprivate"],
                 choices=["private", "nonprivate", "clip_only"], help="table 3: the arms to run (--private_only and "
                 "--batch_clip_only edit this list)")
  p.add_argument("--batch_ema", type=float, default=0.0, help="table 3: optimizer.ema_decay of every run (0: off; "
                 "the runs then evaluate the average of the parameters, and record the last iterate's too)")
  p.add_argument("--batch_family", default="recipe", help=f"table 3: the clipping/optimizer family of every run, "
                 f"from {sorted(FAMILIES)} (the non-private arm too: its optimizer; it never clips)")
  p.add_argument("--batch_recal", type=int, default=0, help="table 3: recalibration.steps of every private run (0: "
                 "off): a private temperature and bias fitted after training, accounted (the same epsilon)")
  p.add_argument("--private_only", action="store_true", help="table 3: only the private arm (the non-private "
                 "runs are already in --json)")
  p.add_argument("--lr_grid", type=float, nargs="+", default=[0.3, 1.0],
                 help="table 1: learning rates tried, as multiples of the config's")
  p.add_argument("--families", nargs="*", default=["adam_bc", "momentum_c1"],
                 help=f"table 2: alternatives to the recipe, from {sorted(FAMILIES)}")
  p.add_argument("--batch_sizes", type=int, nargs="*", default=[1024, 4096, 16384], help="table 3")
  p.add_argument("--batch_epsilon", type=float, default=3.0)
  p.add_argument("--seeds", type=int, default=1, help="init seeds (>= 3 to separate arms closer than 0.005 AUC) "
                 "of the non-private, clipped and eps = --batch_epsilon arms at the config's rate")
  p.add_argument("--delta_exponent", type=float, default=1.1, help="delta = 1 / N^this")
  p.add_argument("--data_dir", default="", help="default: a temporary directory")
  p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
  p.add_argument("--json", default=str(ROOT / "bench" / "results" / "ctr_utility.json"))
  p.add_argument("--plots", default=str(ROOT / "bench" / "results"), help="directory of the PNG plots")
  p.add_argument("--section", default="", help="name of this RESULTS.md section (several can coexist)")
  p.add_argument("--full", action="store_true", help="the issue's size (needs hours on a CPU; a GPU is better)")
  p.add_argument("--quick", action="store_true", help="smoke run")
  p.add_argument("--resume", action="store_true", help="reuse the runs already in --json with the same settings")
  p.add_argument("--render_only", action="store_true", help="rewrite the RESULTS.md section and plots from --json")
  args = p.parse_args(argv)
  if args.full:  # the size; an option given on the command line wins
    full = {"models": ["deepfm", "dlrm"], "rows": 1_000_000, "eval_rows": 100_000, "batch_size": 4096,
            "batch_sizes": [1024, 4096, 16384, 65536], "epochs": 1.0,
            "batch_epochs": 2.0,  # batch 65,536 then takes 30 steps
            "families": ["adaptive_q0.5", "adaptive_q0.9", "groups_tables_dense", "normalized"]}
    given = {a[2:].split("=")[0] for a in argv if a.startswith("--")}
    for name, value in full.items():
      if name not in given:
        setattr(args, name, value)
  if args.quick:
    args.models, args.epsilons, args.rows, args.eval_rows = ["deepfm"], [3.0], 20_000, 5_000
    args.lr_grid, args.families, args.batch_sizes = [1.0], [], [1024, 4096]
  return args


def markers(section: str) -> tuple[str, str]:
  name = "ctr_utility" + (f":{section}" if section else "")
  return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def _set(config, key: str, value) -> None:
  *parents, leaf = key.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = value


def oracle_platt_ne(labels, logits, iters: int = 50) -> tuple[float, float, float]:
  """NE after the best ``a * logit + b`` fitted ON THE EVALUATION SET (Newton on the log loss): a diagnostic of
  how much a recalibration could buy, NOT a private or deployable number. Returns ``(ne, a, b)``."""
  y = np.asarray(labels, np.float64)
  z = np.asarray(logits, np.float64)
  x = np.stack([z, np.ones_like(z)], axis=1)
  w = np.array([1.0, 0.0])
  for _ in range(iters):
    p = 1.0 / (1.0 + np.exp(-(x @ w)))
    grad = x.T @ (p - y) / len(y)
    hess = (x * (p * (1 - p))[:, None]).T @ x / len(y) + 1e-9 * np.eye(2)
    w = w - np.linalg.solve(hess, grad)
  return metrics_lib.normalized_entropy(y, x @ w), float(w[0]), float(w[1])


def run_one(spec: dict, data, args, workdir: pathlib.Path) -> dict:
  """One training run described by ``spec`` (model, arm, epsilon, lr_factor, batch_size, family, cowclip, seed)."""
  config = config_lib.load_config(str(ROOT / "configs" / f"ctr_{spec['model']}.py"))
  config.task.data.train_dir, config.task.data.eval_dir = str(data[0]), str(data[1])
  config.workdir = str(workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  config.num_steps = 1
  config.epochs = spec.get("epochs") or args.epochs
  config.optimizer.warmup_steps = 0
  config.batch_schedule = f"constant:{spec['batch_size']}"
  config.delta = 1.0 / args.rows ** args.delta_exponent
  config.log_every = config.checkpoint_every = config.eval_every = 0
  config.tensorboard = False
  config.init_seed = spec.get("seed", 0)
  config.optimizer.ema_decay = spec.get("ema_decay", 0.0)
  config.recalibration.steps = spec.get("recalibration_steps", 0)
  for key, value in FAMILIES[spec.get("family", "recipe")].items():
    _set(config, key, value)
  o = config.optimizer
  o.learning_rate *= spec["lr_factor"]
  if o.table_learning_rate is not None:
    o.table_learning_rate *= spec["lr_factor"]
  if spec.get("cowclip"):
    o.cowclip = True
    base = config_lib.validate(config).optimizer
    scaled = optim.scale_for_batch(base, spec["batch_size"] / args.batch_size)
    o.learning_rate, o.table_learning_rate = scaled.learning_rate, scaled.table_learning_rate
    o.table_weight_decay = scaled.table_weight_decay
  arm = spec["arm"]
  if arm == "nonprivate":  # no clipping, no noise (sigma must be > 0: 1e-9 * 1e9 = 1 per coordinate / B... tiny)
    config.target_epsilon, config.noise_multiplier, config.clip_norm = None, 1e-12, 1e9
  elif arm == "clip_only":
    config.target_epsilon, config.noise_multiplier = None, 1e-9
  else:
    config.target_epsilon, config.noise_multiplier = spec["epsilon"], None
  start = time.monotonic()
  result = train_lib.train(config, out=lambda line: None)
  model = ctr_models.make_model(ctr_task.model_config(config.task))
  _, evaluation = ctr_task.sources(config.task)
  labels, raw_logits = ctr_task.make_predict(model, evaluation)(result.params)
  logits = metrics_lib.recalibrated_logits(raw_logits, result.calibration)  # what the run deploys
  table = metrics_lib.calibration_table(labels, logits, num_buckets=10, binning="quantile")
  oracle_ne, oracle_a, oracle_b = oracle_platt_ne(labels, logits)
  num_params = sum(int(np.prod(x.shape)) for x in __import__("jax").tree_util.tree_leaves(result.params))
  b = spec["batch_size"]
  noise_norm = result.noise_multiplier * config.clip_norm * math.sqrt(num_params) / b
  noisy = [r["noisy_grad_norm"] for r in result.history if "noisy_grad_norm" in r]
  signal = math.sqrt(max(float(np.mean(np.square(noisy))) - noise_norm ** 2, 0.0)) if noisy else float("nan")
  row = {
      **spec, "epsilon_spent": round(result.epsilon, 3) if arm == "private" else None,
      "sigma": round(result.noise_multiplier, 4) if arm == "private" else None, "steps": result.steps,
      "clip_norm": config.clip_norm, "optimizer": o.name, "table_optimizer": o.table_name,
      "learning_rate": o.learning_rate, "table_learning_rate": o.table_learning_rate,
      "clipped_fraction": round(float(np.mean([r.get("clipped_fraction", 0.0) for r in result.history])), 3),
      "noise_to_signal": round(noise_norm / signal, 3) if arm == "private" and signal > 0 else None,
      "seconds": round(time.monotonic() - start, 1),
      **{k: round(v, 4) for k, v in result.eval_metrics.items()},
      **({"last_iterate": {k: round(v, 4) for k, v in result.last_iterate_metrics.items()}}
         if result.last_iterate_metrics else {}),
      **({"calibration": result.calibration,
          "uncalibrated": {k: round(v, 4) for k, v in result.uncalibrated_metrics.items()}}
         if result.calibration else {}),
      "oracle_platt": {"normalized_entropy": round(oracle_ne, 4), "a": round(oracle_a, 4), "b": round(oracle_b, 4)},
      "reliability": table.rows(),
      **({"reliability_uncalibrated": metrics_lib.calibration_table(labels, raw_logits, num_buckets=10,
                                                                    binning="quantile").rows()}
         if result.calibration else {}),
  }
  print(json.dumps({k: v for k, v in row.items() if k != "reliability"}), flush=True)
  return row


def plan(args) -> list[dict]:
  """Every run, most important first (an interrupted benchmark keeps the runs that matter most)."""
  runs = []
  arms = [("nonprivate", None), ("private", args.batch_epsilon), ("clip_only", None)] + [
      ("private", e) for e in args.epsilons if e != args.batch_epsilon]
  for model in args.models if "arms" in args.only else []:
    for arm, eps in arms:
      for f in args.lr_grid:
        runs.append({"table": "arms", "model": model, "arm": arm, "epsilon": eps, "lr_factor": f,
                     "batch_size": args.batch_size})
  model = args.models[0]
  for fam in args.families if "families" in args.only else []:
    runs.append({"table": "families", "model": model, "arm": "private", "epsilon": args.batch_epsilon,
                 "lr_factor": 1.0, "batch_size": args.batch_size, "family": fam})
  for seed in range(args.batch_seeds):  # seed 0 carries no "seed" key: the runs saved before seeds still match
    for b in args.batch_sizes if "batch" in args.only else []:
      for f in args.batch_lr_grid:
        names = [a for a in args.batch_arms if not (args.private_only and a == "nonprivate")]
        names += ["clip_only"] if args.batch_clip_only and "clip_only" not in names else []
        for arm, eps in [(a, args.batch_epsilon if a == "private" else None) for a in names]:
          runs.append({"table": "batch", "model": model, "arm": arm, "epsilon": eps, "lr_factor": f,
                       "batch_size": b, "cowclip": True, **({"epochs": args.batch_epochs} if args.batch_epochs else {}),
                       **({"seed": seed} if seed else {}), **({"ema_decay": args.batch_ema} if args.batch_ema else {}),
                       **({"family": args.batch_family} if args.batch_family != "recipe" else {}),
                       **({"recalibration_steps": args.batch_recal} if args.batch_recal and arm == "private" else {})})
  for seed in range(1, args.seeds if "seeds" in args.only else 1):
    for arm, eps in (("nonprivate", None), ("clip_only", None), ("private", args.batch_epsilon)):
      runs.append({"table": "seeds", "model": model, "arm": arm, "epsilon": eps, "lr_factor": 1.0,
                   "batch_size": args.batch_size, "seed": seed})
  return runs


def _key(spec: dict) -> str:
  keep = ("table", "model", "arm", "epsilon", "lr_factor", "batch_size", "family", "cowclip", "seed", "epochs",
          "ema_decay", "recalibration_steps")
  return json.dumps({k: spec.get(k) for k in keep}, sort_keys=True)


def best(rows, **match):
  """The run of highest AUC among ``rows`` matching every ``key=value`` of ``match``."""
  found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
  return max(found, key=lambda r: r["auc"]) if found else None


def best_mean(rows, **match):
  """The learning rate of highest mean AUC over seeds among ``rows`` matching ``match``: its first run, with
  ``auc``/``normalized_entropy`` replaced by the means and ``seeds``/``auc_sd`` added (None if nothing matches)."""
  found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
  if not found:
    return None
  by_lr = {}
  for r in found:
    by_lr.setdefault(r["lr_factor"], []).append(r)
  group = max(by_lr.values(), key=lambda g: np.mean([r["auc"] for r in g]))
  aucs = [r["auc"] for r in group]
  return dict(group[0], auc=float(np.mean(aucs)), seeds=len(group),
              auc_sd=float(np.std(aucs, ddof=1)) if len(group) > 1 else None,
              normalized_entropy=float(np.mean([r["normalized_entropy"] for r in group])))


def _mean_text(r) -> str:
  return f"{r['auc']:.4f}" + (f" ({r['seeds']} seeds, sd {r['auc_sd']:.4f})" if r["seeds"] > 1 else "")


def markdown(args, saved: dict) -> str:
  rows, begin_end = saved["runs"], markers(args.section)
  lines = [begin_end[0], "## CTR utility and calibration on generated Criteo-format data (`bench/ctr_utility.py`"
           + (f", {args.section}" if args.section else "") + ")", ""]
  lines += [f"Command: `{saved['command']}` -- {saved['date']}, {saved['machine']}; "
            f"{saved.get('wall_minutes', float('nan')):.0f} min wall, load average {saved.get('load', 'n/a')} at the "
            f"end" + ("" if "wall_minutes" in saved else " (INTERRUPTED: partial results)") + ".",
            f"Data: {args.rows:,} generated training rows, {args.eval_rows:,} evaluation rows (default "
            f"`SyntheticSpec`; evaluation positive rate {saved['positive_rate']:.3f}; AUC of the hidden model, the "
            f"ceiling: {saved['oracle_auc']:.4f}); delta = 1/N^{args.delta_exponent:g} = "
            f"{1 / args.rows ** args.delta_exponent:.3g}; {args.epochs:g} epoch(s) per run, Poisson sampling, RDP.",
            f"Recipe (the configs' default): {saved['recipe']}.", ""]
  for model in args.models:
    lines += [f"### {model}: arms at batch {args.batch_size:,} (best of the learning-rate grid x "
              f"{', '.join(f'{f:g}' for f in args.lr_grid)})", "",
              "| arm | best lr | AUC | log loss | NE | ECE | sigma | clipped | noise/signal | grid AUC (lr) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    arms = [("non-private", dict(arm="nonprivate")), ("clipped, no noise", dict(arm="clip_only"))] + [
        (f"eps = {e:g}", dict(arm="private", epsilon=e)) for e in args.epsilons]
    for name, match in arms:
      grid = [r for r in rows if r["table"] == "arms" and r["model"] == model
              and all(r.get(k) == v for k, v in match.items())]
      r = best(grid)
      if r is None:
        lines.append(f"| {name} | not run |" + " |" * 8)
        continue
      grid_text = ", ".join(f"{g['auc']:.4f} ({g['learning_rate']:.3g})" for g in sorted(grid, key=lambda g:
                                                                                             g["lr_factor"]))
      lines.append(f"| {name} | {r['learning_rate']:.3g} | {r['auc']:.4f} | {r['log_loss']:.4f} | "
                   f"{r['normalized_entropy']:.4f} | {r['ece']:.4f} | {r['sigma'] or '-'} | "
                   f"{r['clipped_fraction']:.2f} | {r['noise_to_signal'] or '-'} | {grid_text} |")
    lines.append("")
  fam = [r for r in rows if r["table"] == "families"]
  if fam:
    lines += [f"### Optimizer and clipping families at eps = {args.batch_epsilon:g} ({args.models[0]}, batch "
              f"{args.batch_size:,}, each at its default rate)", "",
              "| family | optimizer (tables) | clip norm | lr | AUC | NE | ECE |", "|---|---|---|---|---|---|---|"]
    ref = best(rows, table="arms", model=args.models[0], arm="private", epsilon=args.batch_epsilon, lr_factor=1.0)
    for r in ([dict(ref, family="recipe")] if ref else []) + fam:
      lines.append(f"| {r['family']} | {r['optimizer']} ({r['table_optimizer']}) | {r['clip_norm']:g} | "
                   f"{r['learning_rate']:.3g} | {r['auc']:.4f} | {r['normalized_entropy']:.4f} | {r['ece']:.4f} |")
    lines.append("")
  if any(r["table"] == "seeds" for r in rows):
    lines += [f"### Init seeds at the config's rate ({args.models[0]}, batch {args.batch_size:,})", "",
              "| arm | seeds | AUC mean | AUC sd | NE mean |", "|---|---|---|---|---|"]
    for name, match in (("non-private", dict(arm="nonprivate")), ("clipped, no noise", dict(arm="clip_only")),
                        (f"eps = {args.batch_epsilon:g}", dict(arm="private", epsilon=args.batch_epsilon))):
      group = [r for r in rows if r["table"] in ("arms", "seeds") and r["model"] == args.models[0]
               and r["lr_factor"] == 1.0 and r["batch_size"] == args.batch_size
               and all(r.get(k) == v for k, v in match.items())]
      if group:
        aucs = [r["auc"] for r in group]
        sd = np.std(aucs, ddof=1) if len(aucs) > 1 else 0.0
        lines.append(f"| {name} | {len(group)} | {np.mean(aucs):.4f} | {sd:.4f} | "
                     f"{np.mean([r['normalized_entropy'] for r in group]):.4f} |")
    lines.append("")
  bt = [r for r in rows if r["table"] == "batch"]
  if bt:
    lines += [f"### AUC vs batch size at eps = {args.batch_epsilon:g}, {args.batch_epochs or args.epochs:g} epoch(s), "
              f"CowClip and its "
              f"scaling rules ({args.models[0]}; reference batch {args.batch_size:,})", "",
              "| batch | steps | sigma | dense lr | table lr | private AUC | private NE | non-private AUC | "
              "non-private NE | clipped, no noise AUC |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in sorted(args.batch_sizes):
      p = best_mean(bt, batch_size=b, arm="private", epsilon=args.batch_epsilon)
      n = best_mean(bt, batch_size=b, arm="nonprivate")
      c = best_mean(bt, batch_size=b, arm="clip_only")
      if p is None and n is None:
        continue
      r = p or n
      lines.append(f"| {b:,} | {r['steps']} | {p['sigma'] if p else '-'} | {r['learning_rate']:.3g} | "
                   f"{r['table_learning_rate'] or r['learning_rate']:.3g} | "
                   + (f"{_mean_text(p)} | {p['normalized_entropy']:.4f}" if p else "- | -") + " | "
                   + (f"{_mean_text(n)} | {n['normalized_entropy']:.4f}" if n else "- | -") + " | "
                   + (_mean_text(c) if c else "-") + " |")
    lines.append("")
  if saved.get("plots"):
    lines += ["Plots: " + ", ".join(f"`{p}`" for p in saved["plots"]), ""]
  lines += saved.get("reading", []) + ["", begin_end[1]]
  return "\n".join(lines)


def plots(args, rows: list[dict]) -> list[str]:
  """The PNG plots (AUC vs epsilon per model, AUC vs batch size, reliability diagrams); [] without matplotlib."""
  try:
    import matplotlib  # noqa: PLC0415 - optional (the plot extra)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    print("matplotlib not installed (pip install -e '.[plot]'): no plots", flush=True)
    return []
  out = pathlib.Path(args.plots)
  out.mkdir(parents=True, exist_ok=True)
  tag = f"_{args.section}" if args.section else ""
  written = []
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for model in args.models:
    pts = [(e, best(rows, table="arms", model=model, arm="private", epsilon=e)) for e in args.epsilons]
    pts = [(e, r["auc"]) for e, r in pts if r]
    if pts:
      line, = ax.plot(*zip(*pts), marker="o", label=f"{model} private")
      for arm, style in (("nonprivate", "--"), ("clip_only", ":")):
        r = best(rows, table="arms", model=model, arm=arm)
        if r:
          ax.axhline(r["auc"], linestyle=style, color=line.get_color(), label=f"{model} {arm}")
  ax.set_xscale("log")
  ax.set_xlabel("epsilon")
  ax.set_ylabel("AUC")
  ax.legend(fontsize=7)
  fig.tight_layout()
  written.append(str(out / f"ctr_auc_vs_epsilon{tag}.png"))
  fig.savefig(written[-1], dpi=120)
  plt.close(fig)
  bt = [r for r in rows if r["table"] == "batch"]
  if bt:
    fig, ax = plt.subplots(figsize=(5, 3.5))
    # One private curve per epsilon in the runs (the table's --batch_epsilon first), and the non-private one.
    epsilons = sorted({r["epsilon"] for r in bt if r["arm"] == "private"}, key=lambda e: (e != args.batch_epsilon, e))
    for arm, eps in [("private", e) for e in epsilons] + [("nonprivate", None)]:
      sizes = sorted({r["batch_size"] for r in bt if r["arm"] == arm and r.get("epsilon") == eps})
      pts = [(b, best_mean(bt, batch_size=b, arm=arm, epsilon=eps)["auc"]) for b in sizes]  # best lr, mean of seeds
      if pts:
        ax.plot(*zip(*pts), marker="o", label=f"{arm} (CowClip)" + (f", eps {eps:g}" if eps is not None else ""))
    ax.set_xscale("log", base=2)
    ax.set_xlabel("expected batch size")
    ax.set_ylabel("AUC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(str(out / f"ctr_auc_vs_batch{tag}.png"))
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
  fig, ax = plt.subplots(figsize=(4.5, 4.5))
  ax.plot([0, 1], [0, 1], color="gray", linewidth=0.8)
  model = args.models[0]
  for name, match in [("non-private", dict(arm="nonprivate")), ("clipped", dict(arm="clip_only"))] + [
      (f"eps {e:g}", dict(arm="private", epsilon=e)) for e in args.epsilons]:
    r = best(rows, table="arms", model=model, **match)
    if r:
      ax.plot([b["predicted"] for b in r["reliability"]], [b["observed"] for b in r["reliability"]], marker=".",
              label=f"{name} (ECE {r['ece']:.3f})")
  ax.set_xlabel("mean predicted probability (decile of predictions)")
  ax.set_ylabel("observed click rate")
  ax.legend(fontsize=7)
  fig.tight_layout()
  written.append(str(out / f"ctr_reliability{tag}.png"))
  fig.savefig(written[-1], dpi=120)
  plt.close(fig)
  return [str(pathlib.Path(p).relative_to(ROOT)) if p.startswith(str(ROOT)) else p for p in written]


def write_section(path: pathlib.Path, section: str, name: str = "") -> None:
  begin, end = markers(name)
  text = path.read_text() if path.exists() else "# Benchmark results\n"
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    text = head + section + rest.split(end, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  path.write_text(text)


def _recipe() -> str:
  c = config_lib.validate(_recipe_config())
  o = c.optimizer
  tables = "" if o.table_name == "same" else f", tables {o.table_name} at {o.table_learning_rate or o.learning_rate:g}"
  return (f"clip norm {c.clip_norm:g}, {o.name.value} at {o.learning_rate:g} ({o.schedule.value} decay){tables}, "
          f"batch {c.batch_schedule.to_spec()}")


def _recipe_config():
  config = config_lib.load_config(str(ROOT / "configs" / "ctr_deepfm.py"))
  config.noise_multiplier = 1.0
  return config


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  json_path = pathlib.Path(args.json)
  saved = json.loads(json_path.read_text()) if (args.resume or args.render_only) and json_path.exists() else {}
  if args.render_only:
    for extra in args.merge:  # runs of other invocations (e.g. another model run in parallel)
      other = json.loads(pathlib.Path(extra).read_text())
      saved["runs"] += other["runs"]
      saved["wall_minutes"] = saved.get("wall_minutes", 0.0) + other.get("wall_minutes", 0.0)
    saved["plots"] = plots(args, saved["runs"])
    section = markdown(args, saved)
    write_section(pathlib.Path(args.results), section, args.section)
    print(section)
    return
  start = time.monotonic()
  tmp = pathlib.Path(args.data_dir or tempfile.mkdtemp(prefix="dpmega-ctr-utility-"))
  tmp.mkdir(parents=True, exist_ok=True)  # --data_dir may not exist yet
  spec = criteo_synthetic.SyntheticSpec()
  cache = tmp / f"data_{args.rows}_{args.eval_rows}.json"  # the data is deterministic: generated once per size
  if cache.exists():
    oracle_auc, positive_rate = json.loads(cache.read_text())
  else:
    info = criteo_synthetic.generate_dataset(tmp / "train", args.rows, spec=spec, seed=0, row_seed=0)
    ev = criteo_synthetic.generate_dataset(tmp / "eval", args.eval_rows, spec=spec, seed=0, row_seed=1)
    oracle_auc, positive_rate = info.oracle_auc, ev.positive_rate
    cache.write_text(json.dumps([oracle_auc, positive_rate]))
  data = (tmp / "train", tmp / "eval")
  done = {_key(r): r for r in saved.get("runs", [])}
  saved.update({"command": "python bench/ctr_utility.py " + " ".join(sys.argv[1:] if argv is None else argv),
                "oracle_auc": oracle_auc, "positive_rate": positive_rate, "recipe": _recipe(),
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "machine": "CPU only (2 shared cores)", "args": {k: v for k, v in vars(args).items()}})
  rows = []
  saved["wall_minutes_before"] = saved.get("wall_minutes_before", 0.0) + sum(r["seconds"] for r in done.values()) / 60
  for spec_ in plan(args):
    key = _key(spec_)
    rows.append(done[key] if key in done else run_one(spec_, data, args, tmp / "run"))
    saved["runs"] = rows + [r for k, r in done.items() if k not in {_key(x) for x in rows}]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(saved, indent=1))
  saved["runs"] = rows + [r for k, r in done.items() if k not in {_key(x) for x in rows}]  # earlier grids too
  saved["wall_minutes"] = (time.monotonic() - start) / 60 + saved["wall_minutes_before"]
  saved["load"] = " ".join(f"{x:.1f}" for x in __import__("os").getloadavg())
  saved["plots"] = plots(args, rows)
  json_path.write_text(json.dumps(saved, indent=1))
  section = markdown(args, saved)
  print(section)
  write_section(pathlib.Path(args.results), section, args.section)
  if not args.data_dir:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
