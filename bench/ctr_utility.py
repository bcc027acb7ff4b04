"""Utility of private CTR training on generated Criteo-format data.

Two tables, both from the real trainer (``dpmega.train.train``) and the
shipped ``configs/ctr_*.py`` (small variant), on one generated dataset (train
and a disjoint evaluation file from the same hidden model):

1. AUC of each model trained privately at epsilon = 1, 3, 8 (sigma calibrated
   to the whole schedule) and without privacy (no clipping, no noise: the
   trainer with C = 1e9 and sigma = 1e-9), at a fixed batch size and steps.
2. AUC of one model at fixed epsilon for growing expected batch sizes at a
   fixed number of epochs (so the same compute): the finding of Anil et al.
   2021 (https://arxiv.org/abs/2108.01624) that larger batches help under DP.

  python bench/ctr_utility.py                  # ~20-30 min on 2 busy CPU cores
  python bench/ctr_utility.py --quick          # one model, fewer runs (smoke)

Writes its section of ``bench/RESULTS.md`` (between its markers; other
sections are kept) and ``bench/results/ctr_utility.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpmega.train import config as config_lib  # noqa: E402
from dpmega import train as train_lib  # noqa: E402
from dpmega.data import criteo_synthetic  # noqa: E402

# Without clipping, the private configs' SGD learning rate is unstable (DLRM,
# momentum at 1.0: AUC 0.60 non-private); Adam at 0.01 gave 0.75-0.78 here.
NONPRIVATE_OPTIMIZER = ("adam", 0.01)
def markers(section: str) -> tuple[str, str]:
  name = "ctr_utility" + (f":{section}" if section else "")
  return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", nargs="+", default=["dlrm", "deepfm", "wide_deep"])
  p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0])
  p.add_argument("--rows", type=int, default=100_000)
  p.add_argument("--eval_rows", type=int, default=20_000)
  p.add_argument("--batch_size", type=int, default=4096, help="table 1's expected batch size")
  p.add_argument("--steps", type=int, default=50, help="table 1's steps")
  p.add_argument("--batch_sizes", type=int, nargs="+", default=[1024, 4096, 16384], help="table 2")
  p.add_argument("--epochs", type=float, default=2.0, help="table 2: epochs at every batch size")
  p.add_argument("--batch_model", default="deepfm", help="table 2's model")
  p.add_argument("--lr_scaling", choices=["linear", "none"], default="linear",
                 help="table 2: scale the config's learning rate by batch / --batch_size (Goyal et al. 2017)")
  p.add_argument("--batch_epsilon", type=float, default=3.0, help="table 2's epsilon")
  p.add_argument("--delta", type=float, default=1e-6)
  p.add_argument("--data_dir", default="", help="default: a temporary directory")
  p.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"))
  p.add_argument("--json", default=str(ROOT / "bench" / "results" / "ctr_utility.json"))
  p.add_argument("--quick", action="store_true", help="dlrm only, epsilon 3, two batch sizes")
  p.add_argument("--render_only", action="store_true", help="rewrite the RESULTS.md section from --json")
  p.add_argument("--buckets", type=int, default=0, help="hash buckets per feature (0: the configs' 1,000)")
  p.add_argument("--section", default="", help="name of this RESULTS.md section (several can coexist)")
  p.add_argument("--resume", action="store_true",
                 help="reuse the runs already in --json with the same settings (the data is deterministic)")
  args = p.parse_args(argv)
  if args.quick:
    args.models, args.epsilons, args.batch_sizes = ["dlrm"], [3.0], [1024, 4096]
  return args


def run_one(model: str, data, *, batch_size: int, steps: int, epsilon: float | None, delta: float,
            workdir: pathlib.Path, lr_factor: float = 1.0, kind: str = "private", buckets: int = 0) -> dict:
  """One training run; ``kind``: "private" (at ``epsilon``), "nonprivate" or "clip_only"."""
  config = config_lib.load_config(str(ROOT / "configs" / f"ctr_{model}.py"))
  config.task.data.train_dir, config.task.data.eval_dir = str(data[0]), str(data[1])
  config.workdir = str(workdir)
  shutil.rmtree(workdir, ignore_errors=True)
  config.num_steps = steps
  config.batch_schedule = f"constant:{batch_size}"
  config.delta = delta
  config.log_every = 0
  config.checkpoint_every = 0
  config.optimizer.learning_rate *= lr_factor
  if buckets:
    config.task.model.buckets = buckets
  if kind == "nonprivate":  # no clipping, no noise, its own (tuned) optimizer
    config.target_epsilon, config.noise_multiplier, config.clip_norm = None, 1e-9, 1e9
    name, lr = NONPRIVATE_OPTIMIZER
    config.optimizer.name, config.optimizer.learning_rate = name, lr
  elif kind == "clip_only":  # the private config's clipping and optimizer, without noise
    config.target_epsilon, config.noise_multiplier = None, 1e-9
  else:
    config.target_epsilon, config.noise_multiplier = epsilon, None
  start = time.monotonic()
  result = train_lib.train(config, out=lambda line: None)
  private = kind == "private"
  row = {
      "model": model, "kind": kind, "epsilon": round(result.epsilon, 3) if private else None,
      "target_epsilon": epsilon if private else None,
      "sigma": round(result.noise_multiplier, 4) if private else None,
      "batch_size": batch_size, "steps": result.steps, "learning_rate": config.optimizer.learning_rate,
      "seconds": round(time.monotonic() - start, 1),
      **{k: round(v, 4) for k, v in result.eval_metrics.items()},
  }
  print(json.dumps(row), flush=True)
  return row


# What the measured tables say, per section (written after looking at them).
READINGS = {
    "": [
        "Reading (these runs, this data):",
        "",
        "* Private training ranks far above a constant predictor (AUC 0.5) for all three models at every epsilon,",
        "  0.05-0.07 AUC below the non-private reference.",
        "* The noise costs nothing measurable here: the \"clipped, no noise\" column equals the private ones to",
        "  within 0.004 AUC. With 1,000-row tables, batch 4,096 and these learning rates, sigma * C / B (about",
        "  1e-4 to 4e-4 per coordinate) moves each parameter far less than the clipped signal does. The whole",
        "  gap to non-private is clipping (C = 1 clips 25-100% of the examples over a run) plus the SGD",
        "  learning rates that clipping allows (non-private uses Adam): these settings are clipping-limited,",
        "  not noise-limited.",
        "* So the batch-size table does NOT reproduce Anil et al.'s gain from larger batches: that gain comes",
        "  from a smaller noise-to-signal ratio per step, and noise is not what limits these runs; at 16,384",
        "  the 12 steps at learning rate 1.2 are simply too few and too large. Showing the effect needs a",
        "  noise-limited setting (larger tables, smaller datasets or stricter epsilon), which we did not run.",
        "* The private models are over-confident (normalized entropy > 1) although they rank well: the",
        "  miscalibration of clipped DP-SGD described by Bu et al. 2021 (https://arxiv.org/abs/2106.07830).",
        "  A temperature/bias fit on held-out data would fix the log loss without changing the ranking; not done.",
        "* Learning rates come from a handful of runs at epsilon = 3 (comments in `configs/common/ctr.py` and",
        "  `configs/ctr_*.py`), not tuned per epsilon or per batch size; Adam at the private settings lost",
        "  0.1-0.3 AUC (noise-only coordinates random-walk at the learning rate).",
    ],
    "big_tables": [
        "Reading: 65,536 buckets per feature (26 x 65,536 x 9 = 15.3M table parameters, 65x the default)",
        "to make the noise count for more. It still does not: the private run equals the clipped-no-noise",
        "run to 0.001 AUC, and the batch-size table shows the same pattern as with small tables. At these",
        "learning rates and 100,000 rows the runs stay clipping-limited; a noise-limited comparison (the",
        "regime of Anil et al.) is NOT demonstrated by this benchmark.",
    ],
}


def _kind(row: dict) -> str:
  # Rows written before "kind" existed: no target epsilon meant non-private.
  return row.get("kind") or ("nonprivate" if row["target_epsilon"] is None else "private")


def _key(row: dict) -> tuple:
  kind = _kind(row)
  return (row["model"], kind, row["target_epsilon"] if kind == "private" else None, row["batch_size"],
          row["steps"])


def markdown(args, oracle_auc, table1, table2) -> str:
  def find(model, kind, eps=None):
    for r in table1:
      if r["model"] == model and _kind(r) == kind and (kind != "private" or r["target_epsilon"] == eps):
        return r
    return None

  def cell(r, fmt):
    return "n/a" if r is None else fmt(r)

  begin, end = markers(getattr(args, "section", ""))
  buckets = getattr(args, "buckets", 0) or 1000
  lines = [
      begin,
      "## CTR utility on generated Criteo-format data (`bench/ctr_utility.py`"
      + (f", {args.section}" if getattr(args, "section", "") else "") + ")",
      "",
      f"Command: `python bench/ctr_utility.py --models {' '.join(args.models)} --epsilons "
      f"{' '.join(f'{e:g}' for e in args.epsilons)} --rows {args.rows} --eval_rows {args.eval_rows} "
      f"--batch_size {args.batch_size} --steps {args.steps} --batch_sizes {' '.join(map(str, args.batch_sizes))} "
      f"--epochs {args.epochs:g} --batch_model {args.batch_model} --batch_epsilon {args.batch_epsilon:g} "
      f"--lr_scaling {args.lr_scaling} --delta {args.delta:g}"
      + (f" --buckets {args.buckets} --section {args.section} --json bench/results/ctr_utility_{args.section}.json"
         if getattr(args, "section", "") else "")
      + f"` -- {time.strftime('%Y-%m-%d')}, "
      f"CPU only (2 shared cores), real trainer and `configs/ctr_*.py` (small variant, {buckets:,} buckets "
      "per feature, "
      "embedding width 8, SGD with momentum 0.9, cosine decay, clip norm 1, Poisson sampling, RDP).",
      f"Data: {args.rows:,} generated training rows and {args.eval_rows:,} evaluation rows from the same hidden model "
      f"(default `SyntheticSpec`: 26 Zipf categorical features with 3 to 2,000 values, 13 log-normal counts, "
      f"pairwise interactions); evaluation positive rate {table1[0]['positive_rate']:.3f}; AUC of the hidden "
      f"model's own probabilities on the training rows (the ceiling) {oracle_auc:.4f}. "
      f"A constant predictor has AUC 0.5. delta = {args.delta:g}. "
      f"Non-private: no clipping, no noise, {NONPRIVATE_OPTIMIZER[0]} at learning rate {NONPRIVATE_OPTIMIZER[1]:g}. "
      "Clipped, no noise: the private configuration with sigma = 1e-9 (separates the cost of clipping from "
      "the cost of noise).",
      "",
      f"### AUC by epsilon (batch {args.batch_size:,}, {args.steps} steps)",
      "",
      "| model | non-private | clipped, no noise | " + " | ".join(f"eps = {e:g}" for e in args.epsilons) + " |",
      "|---|---|---|" + "---|" * len(args.epsilons),
  ]
  for model in args.models:
    cells = [cell(find(model, "nonprivate"), lambda r: f"{r['auc']:.4f}"),
             cell(find(model, "clip_only"), lambda r: f"{r['auc']:.4f}")] + [
        cell(find(model, "private", e), lambda r: f"{r['auc']:.4f} (sigma {r['sigma']:.2f})") for e in args.epsilons]
    lines.append(f"| {model} | " + " | ".join(cells) + " |")
  lines += ["", "Log loss (normalized entropy: < 1 beats the base rate):", "",
            "| model | non-private | clipped, no noise | " + " | ".join(f"eps = {e:g}" for e in args.epsilons)
            + " |", "|---|---|---|" + "---|" * len(args.epsilons)]
  fmt = lambda r: f"{r['log_loss']:.4f} ({r['normalized_entropy']:.3f})"  # noqa: E731
  for model in args.models:
    cells = [cell(find(model, "nonprivate"), fmt), cell(find(model, "clip_only"), fmt)] + [
        cell(find(model, "private", e), fmt) for e in args.epsilons]
    lines.append(f"| {model} | " + " | ".join(cells) + " |")
  lines += [
      "",
      f"### AUC at epsilon = {args.batch_epsilon:g} for growing batch sizes ({args.batch_model}, "
      f"{args.epochs:g} epochs each, learning rate scaling: {args.lr_scaling})",
      "",
      "| expected batch | steps | sigma | learning rate | AUC | log loss |",
      "|---|---|---|---|---|---|",
  ]
  for r in table2:
    lines.append(f"| {r['batch_size']:,} | {r['steps']} | {r['sigma']:.3f} | {r['learning_rate']:.3g} | "
                 f"{r['auc']:.4f} | {r['log_loss']:.4f} |")
  lines += [
      "",
      *READINGS.get(getattr(args, "section", ""), []),
      "",
      end,
  ]
  return "\n".join(lines)


def write_section(path: pathlib.Path, section: str, name: str = "") -> None:
  begin, end = markers(name)
  text = path.read_text() if path.exists() else "# Benchmark results\n"
  if begin in text and end in text:
    head, rest = text.split(begin, 1)
    text = head + section + rest.split(end, 1)[1]
  else:
    text = text.rstrip("\n") + "\n\n" + section + "\n"
  path.write_text(text)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.render_only:
    saved = json.loads(pathlib.Path(args.json).read_text())
    saved_args = argparse.Namespace(**{**vars(args), **saved.get("args", {})})
    section = markdown(saved_args, saved["oracle_auc"], saved["table1"], saved["table2"])
    write_section(pathlib.Path(args.results), section, saved_args.section)
    print(section)
    return
  tmp = pathlib.Path(args.data_dir or tempfile.mkdtemp(prefix="dpmega-ctr-utility-"))
  spec = criteo_synthetic.SyntheticSpec()
  info = criteo_synthetic.generate_dataset(tmp / "train", args.rows, spec=spec, seed=0, row_seed=0)
  criteo_synthetic.generate_dataset(tmp / "eval", args.eval_rows, spec=spec, seed=0, row_seed=1)
  data = (tmp / "train", tmp / "eval")
  workdir = tmp / "run"
  done = {}
  if args.resume and pathlib.Path(args.json).exists():
    saved = json.loads(pathlib.Path(args.json).read_text())
    done = {_key(r): r for r in saved["table1"] + saved["table2"]}

  def run(model, *, batch_size, steps, epsilon=None, kind="private", lr_factor=1.0):
    key = (model, kind, epsilon if kind == "private" else None, batch_size, steps)
    if key in done:
      return done[key]
    return run_one(model, data, batch_size=batch_size, steps=steps, epsilon=epsilon, delta=args.delta,
                   workdir=workdir, kind=kind, lr_factor=lr_factor, buckets=args.buckets)

  table1 = []
  for model in args.models:
    for kind in ("nonprivate", "clip_only"):
      table1.append(run(model, batch_size=args.batch_size, steps=args.steps, kind=kind))
    for eps in args.epsilons:
      table1.append(run(model, batch_size=args.batch_size, steps=args.steps, epsilon=eps))
  table2 = []
  for b in args.batch_sizes:
    steps = max(1, round(args.epochs * args.rows / b))
    factor = b / args.batch_size if args.lr_scaling == "linear" else 1.0
    table2.append(run(args.batch_model, batch_size=b, steps=steps, epsilon=args.batch_epsilon, lr_factor=factor))
  section = markdown(args, info.oracle_auc, table1, table2)
  print(section)
  write_section(pathlib.Path(args.results), section, args.section)
  saved_args = {k: v for k, v in vars(args).items()
                if k not in ("results", "json", "render_only", "resume", "data_dir")}
  pathlib.Path(args.json).write_text(json.dumps({"table1": table1, "table2": table2, "oracle_auc": info.oracle_auc,
                                                 "args": saved_args}, indent=1))
  if not args.data_dir:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
