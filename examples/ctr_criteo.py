"""Private CTR training on Criteo-format data, end to end: text -> columns -> DP-SGD -> exact AUC.

With no data at hand it writes learnable Criteo-format text first (labels from
a hidden model with feature interactions), so the demo reads its data exactly
as it would read the real release:

  python examples/ctr_criteo.py                                   # generated, ~2 min on 2 CPU cores
  python examples/ctr_criteo.py --model deepfm --target_epsilon 8
  python examples/ctr_criteo.py --criteo ~/data/dac --layout kaggle --config_variant kaggle
  python examples/ctr_criteo.py --criteo ~/data/criteo1tb --layout terabyte --days 0 1

Real data is converted once (streaming, with a progress bar) into
``--data_dir``; a later run reuses the converted columns. Run it again as is:
the demo's own workdir (the default ``--workdir``) is started afresh; ``--resume``
continues it instead. Another ``--workdir`` that holds a run needs ``--resume``
or ``--overwrite``, as with ``dpmega train``.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpmega.train import config as config_lib  # noqa: E402
from dpmega import train as train_lib  # noqa: E402
from dpmega.data import criteo_tsv  # noqa: E402
from dpmega.data import criteo_synthetic  # noqa: E402
from dpmega.errors import UsageError  # noqa: E402


DEMO_WORKDIR = "runs/ctr_criteo"


def parse_args(argv):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", choices=["dlrm", "deepfm", "wide_deep"], default="dlrm")
  p.add_argument("--criteo", default="", help="directory of the Criteo release (empty: generate data)")
  p.add_argument("--layout", choices=[l.value for l in criteo_tsv.Layout], default="kaggle")
  p.add_argument("--days", type=int, nargs="*", default=None, help="terabyte layout: which day_N files")
  p.add_argument("--skip_malformed", action="store_true", help="skip (and count) malformed lines")
  p.add_argument("--config_variant", choices=["small", "kaggle"], default="small")
  p.add_argument("--data_dir", default="runs/ctr_criteo_data", help="where converted columns go")
  p.add_argument("--workdir", default=DEMO_WORKDIR)
  again = p.add_mutually_exclusive_group()
  again.add_argument("--resume", action="store_true", help="continue the run in --workdir")
  again.add_argument("--overwrite", action="store_true", help="start afresh in --workdir (deletes its run)")
  p.add_argument("--rows", type=int, default=100_000, help="generated training rows")
  p.add_argument("--eval_rows", type=int, default=20_000, help="generated evaluation rows")
  p.add_argument("--target_epsilon", type=float, default=3.0)
  p.add_argument("--delta", type=float, default=None, help="default: the config's")
  p.add_argument("--steps", type=int, default=None, help="default: the config's")
  p.add_argument("--batch_size", type=int, default=None, help="expected batch size (default: the config's)")
  p.add_argument("--quiet", action="store_true")
  p.add_argument("--insecure_reproducible_seed", type=int, default=None,
                 help="derive the noise and the sampling from this public seed: reproducible, NOT a private release")
  return p.parse_args(argv)


def prepare_data(args) -> tuple[pathlib.Path, pathlib.Path | None, float | None]:
  """(train columns, eval columns or None, oracle AUC or None)."""
  data_dir = pathlib.Path(args.data_dir)
  data_dir.mkdir(parents=True, exist_ok=True)
  if args.criteo:
    out = data_dir / f"criteo_{args.layout}"
    if not (out / "meta.json").exists():
      files = criteo_tsv.layout_files(args.criteo, args.layout, args.days)
      stats = criteo_tsv.convert(files, out, on_error="skip" if args.skip_malformed else "raise",
                             layout=args.layout, progress=not args.quiet)
      print(f"converted {stats.rows:,} rows ({stats.skipped:,} malformed skipped) in {stats.seconds:.0f}s")
    return out, None, None
  spec = criteo_synthetic.SyntheticSpec()
  train = criteo_synthetic.generate_dataset(data_dir / f"synthetic_train_{args.rows}", args.rows, spec=spec, seed=0,
                                            row_seed=0)
  criteo_synthetic.generate_dataset(data_dir / f"synthetic_eval_{args.eval_rows}", args.eval_rows, spec=spec,
                                    seed=0, row_seed=1)
  return (data_dir / f"synthetic_train_{args.rows}", data_dir / f"synthetic_eval_{args.eval_rows}",
          train.oracle_auc)


def main(argv=None) -> dict:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  train_dir, eval_dir, oracle_auc = prepare_data(args)
  variant = None if args.config_variant == "small" else args.config_variant
  config = config_lib.load_config(str(ROOT / "configs" / f"ctr_{args.model}.py") + (f":{variant}" if variant else ""))
  config.workdir = args.workdir
  config.task.data.train_dir = str(train_dir)
  config.task.data.eval_dir = str(eval_dir) if eval_dir else ""
  config.target_epsilon, config.noise_multiplier = args.target_epsilon, None
  if args.delta is not None:
    config.delta = args.delta
  if args.steps is not None:
    config.num_steps = args.steps
  if args.batch_size is not None:
    config.batch_schedule = f"constant:{args.batch_size}"
  if args.insecure_reproducible_seed is not None:
    config.insecure_reproducible_seed = args.insecure_reproducible_seed
  overwrite = args.overwrite
  if not (args.resume or overwrite) and args.workdir == DEMO_WORKDIR and os.path.isdir(args.workdir) \
      and os.listdir(args.workdir):
    print(f"note: starting afresh in the demo workdir {args.workdir} (--resume continues the previous run)")
    overwrite = True
  result = train_lib.train(config, resume=args.resume, overwrite=overwrite,
                           out=(lambda line: None) if args.quiet else None)
  m = result.eval_metrics
  print(f"{args.model}: epsilon {result.epsilon:.3g} (delta {result.delta:g}) after {result.steps} steps; "
        f"eval AUC {m['auc']:.4f} (constant predictor 0.5"
        + (f", hidden model {oracle_auc:.4f}" if oracle_auc else "") + f"), log loss {m['log_loss']:.4f}, "
        f"normalized entropy {m['normalized_entropy']:.4f}")
  return {"epsilon": result.epsilon, "steps": result.steps, "oracle_auc": oracle_auc, **m}


if __name__ == "__main__":
  try:
    main()
  except UsageError as e:  # bad flags, a workdir that holds another run: one line, as `dpmega train` says it
    print(f"ctr_criteo.py: error: {e}", file=sys.stderr)
    sys.exit(2)
