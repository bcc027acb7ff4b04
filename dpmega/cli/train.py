"""``dpmega train``: private training from a config file, with a privacy budget flag.

  dpmega train --config configs/synthetic_ctr.py --target_epsilon 3 --delta 1e-6
  dpmega train --config configs/synthetic_ctr.py --noise_multiplier 1.1 --set num_steps=100
  dpmega train --config configs/synthetic_ctr.py --workdir runs/x --resume
  dpmega train --config configs/synthetic_ctr.py --overwrite     # start afresh in the same workdir
  dpmega train --config configs/synthetic_ctr.py --noise_multiplier 1.1 --batch_size 4096 --epochs 3 --clip_norm 1
  dpmega train --config configs/synthetic_ctr.py --workdir runs/x --resume --set num_steps=80   # extend a run
  dpmega train --config configs/synthetic_ctr.py --insecure_reproducible_seed 0   # debugging: NOT private

Every run draws a fresh secret for its noise and sampling from the OS CSPRNG and keeps it in its
checkpoints only (--resume reuses it; --overwrite and a new workdir draw a new one). One run at a time per
workdir: a second one exits with code 2 naming the process that holds it. A finished run is extended by
--resume with more steps (num_steps or --epochs): the workdir's epsilon keeps accumulating and the budget
(--target_epsilon) still stops it. SIGTERM (a preemption) ends the run after the step under way with a
checkpoint and exit code 143; Ctrl-C, a full disk or an unwritable file end it with one line naming the step
--resume continues from. Before the first step (building the dataset, calibrating sigma, restoring), SIGTERM
(rc 143) and Ctrl-C (rc 130) stop at once with one line naming the stage and what the workdir holds.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

from dpmega.train import config as config_lib

_BUDGET_HELP = (
    "The budget flags replace the config's pair (noise_multiplier, target_epsilon) as a whole: "
    "--target_epsilon alone calibrates sigma for the whole schedule; --noise_multiplier alone fixes sigma "
    "and reports epsilon as it goes; both fix sigma and stop before the step that would exceed the target.")


def add_parser(subparsers) -> None:
  p = subparsers.add_parser(
      "train", help="train a model with DP-SGD at mega-batch sizes",
      description="Train privately (DP-SGD with Poisson sampling) from a Python config file. " + _BUDGET_HELP)
  p.add_argument("--config", required=True, help="Python file whose get_config() returns a ConfigDict "
                 "(FILE:ARG passes ARG to get_config)")
  p.add_argument("--target_epsilon", type=float, default=None, help="privacy budget epsilon")
  p.add_argument("--noise_multiplier", type=float, default=None, help="fixed noise multiplier sigma")
  p.add_argument("--delta", type=float, default=None, help="delta of (epsilon, delta)-DP (config: delta)")
  p.add_argument("--clip_norm", type=float, default=None, help="L2 bound C of each example's gradient "
                 "(config: clip_norm)")
  p.add_argument("--batch_size", type=int, default=None, help="constant expected batch size per step "
                 "(config: batch_schedule='constant:B')")
  p.add_argument("--epochs", type=float, default=None, help="passes over the data: the run is the fewest steps "
                 "whose expected batches add up to epochs * N (replaces num_steps; config: epochs)")
  p.add_argument("--workdir", default=None, help="checkpoints, metrics.jsonl, summary.json (config: workdir)")
  p.add_argument("--insecure_reproducible_seed", type=int, default=None, metavar="N",
                 help="tests and debugging only: derive the noise and the sampling from this PUBLIC seed instead "
                 "of a fresh secret from the OS CSPRNG; anyone who knows N can regenerate and remove the noise, "
                 "so the run is NOT a private release (config: insecure_reproducible_seed)")
  p.add_argument("--resume", action="store_true", help="continue exactly from the newest checkpoint")
  p.add_argument("--resume_step", type=int, default=None,
                 help="continue from this checkpoint step (newer checkpoints are set aside)")
  p.add_argument("--overwrite", action="store_true",
                 help="start afresh, deleting checkpoints of an earlier run in the workdir")
  p.add_argument("--distributed", action="store_true",
                 help="multi-host: call jax.distributed.initialize() first (auto-detected on TPU pods, SLURM, "
                 "Open MPI; else give the three flags below) and train on a mesh of every process's devices")
  p.add_argument("--coordinator_address", default=None, help="host:port of process 0 (implies --distributed)")
  p.add_argument("--num_processes", type=int, default=None, help="number of processes (with --distributed)")
  p.add_argument("--process_id", type=int, default=None, help="this process, 0..num_processes-1")
  p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="FIELD=VALUE",
                 help="override config fields, e.g. --set num_steps=100 optimizer.learning_rate=0.01")
  p.set_defaults(func=run)


def build_config(args: argparse.Namespace, say=lambda line: None):
  """The config of ``args``: file, then ``--set`` overrides, then the dedicated flags.

  ``say`` gets a ``plan:`` line when a budget flag replaces a budget the config file set.
  """
  config = config_lib.load_config(args.config)
  config_lib.apply_overrides(config, args.overrides)
  if args.target_epsilon is not None or args.noise_multiplier is not None:
    if args.target_epsilon is None and config.target_epsilon is not None:
      say(f"plan: --noise_multiplier {args.noise_multiplier:g} replaces the config's target epsilon "
          f"{config.target_epsilon:g}: sigma is fixed and no budget stops the run (add --target_epsilon to keep one)")
    config.target_epsilon = args.target_epsilon
    config.noise_multiplier = args.noise_multiplier
  if args.clip_norm is not None:
    config.clip_norm = args.clip_norm
  if args.batch_size is not None:
    config.batch_schedule = f"constant:{args.batch_size}"
  if args.epochs is not None:
    config.epochs = args.epochs
  if args.delta is not None:
    config.delta = args.delta
  if args.workdir is not None:
    config.workdir = args.workdir
  if args.insecure_reproducible_seed is not None:
    config.insecure_reproducible_seed = args.insecure_reproducible_seed
  return config


def run(args: argparse.Namespace) -> int:
  import logging  # noqa: PLC0415

  from dpmega import train as train_lib  # noqa: PLC0415 - keeps `dpmega epsilon` free of Flax/Orbax

  # dp-accounting warns when it drops an RDP order it cannot evaluate; epsilon stays valid (the
  # minimum over the remaining orders), so keep the progress output readable.
  logging.getLogger("absl").setLevel(logging.ERROR)
  config = build_config(args, say=lambda line: print(line, flush=True))
  if args.distributed or args.coordinator_address is not None:
    from dpmega import sharding  # noqa: PLC0415

    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    config.mesh.enabled = True
  from dpmega.train import report  # noqa: PLC0415

  _drop_late_orbax_callbacks()
  stop, stage = threading.Event(), report.Stage()

  def on_sigterm():
    stop.set()  # in the loop: the step under way ends, with a checkpoint
    if not stage.in_loop:  # before it (dataset, calibration, restore): stop now
      raise report.StoppedBeforeLoop()

  try:
    with _on_sigterm(on_sigterm):
      result = train_lib.train(config, resume=args.resume, resume_step=args.resume_step, overwrite=args.overwrite,
                               stop=stop, stage=stage)
  except report.StoppedBeforeLoop:
    print(f"dpmega train: {report.stopped_before_loop('stopped by SIGTERM', stage, config.workdir)}.",
          file=sys.stderr)
    return 128 + signal.SIGTERM
  except KeyboardInterrupt:
    if stage.in_loop:
      raise  # report.Interrupted: its text names the step --resume continues from
    print(f"dpmega train: {report.stopped_before_loop('interrupted (Ctrl-C)', stage, config.workdir)}.",
          file=sys.stderr)
    return 130
  except train_lib.TrainingError as e:
    print(f"dpmega train: error: {e}", file=sys.stderr)
    return 1
  except OSError as e:  # a write outside the checkpoints and the log (config.json, summary.json)
    print(f"dpmega train: error: could not write to the workdir ({type(e).__name__}: {report.error_reason(e)}); "
          "free space or fix the cause, then run again with --resume (it continues from the newest checkpoint).",
          file=sys.stderr)
    return 1
  if stop.is_set():
    print(f"dpmega train: stopped by SIGTERM: the checkpoint of step {result.steps} is saved; run again with "
          f"--resume, which continues from step {result.steps}.", file=sys.stderr)
    return 128 + signal.SIGTERM
  return 0 if result.steps > 0 or result.stop_reason is None else 1


_LATE_CALLBACK_ERRORS = ("Event loop is closed", "cannot schedule new futures after")


def _drop_late_orbax_callbacks() -> None:
  """Keeps the one error line of a failed or interrupted save last and alone.

  When a checkpoint write fails (disk full) or is interrupted, the writes still in flight in TensorStore finish
  later and their callbacks find Orbax's event loop closed; Python prints each as an "unraisable" traceback,
  up to the interpreter's exit. Only those two RuntimeErrors are dropped; anything else goes to the previous
  hook. Set for the process of the ``dpmega train`` command, which ends with the command.
  """
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if not (isinstance(e, RuntimeError) and str(e).startswith(_LATE_CALLBACK_ERRORS)):
      previous(unraisable)

  sys.unraisablehook = hook


@contextlib.contextmanager
def _on_sigterm(handler):
  """Calls ``handler`` on SIGTERM (a preemption) instead of dying; the previous handler is back on exit."""
  if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
    yield
    return
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: handler())
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, previous)
