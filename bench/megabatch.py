"""Memory and speed of the mega-batch loop vs the logical batch size (a benchmark, not a test).

With the same micro-batch (and chunk) size, the peak memory of training should not
grow with the logical batch: the sampler holds only the step's indices (8 bytes
per sampled example) and one chunk of examples is in flight at a time.

For each logical batch size, a fresh process builds the built-in ``synthetic_ctr``
task with ``--dataset_size`` examples, runs ``--steps`` real DP-SGD steps through
:class:`dpmega.train.Trainer` (Poisson sampling, clipping, one noise draw per
step, ledger), and reports:

* ``train peak RSS``: the process's peak resident memory during training only
  (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs`` once the
  data is built and the first step has compiled);
* ``process peak RSS``: over the whole process, data generation included;
* ``examples/s``: sampled examples per second of the last step (compiled).

  python bench/megabatch.py                       # 16,384 vs 1,048,576 (+ two sizes between)
  python bench/megabatch.py --batches 16384,1048576 --microbatch 256 --max_microbatches 8

Target: train peak RSS at 1,048,576 / at 16,384 <= 1.1.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import procmem  # bench/procmem.py (this script's folder is on sys.path)


def _vm_kib(field: str) -> int:
  kib = procmem.status_kib(field)
  if kib is None:
    raise RuntimeError(f"{field} not in /proc/self/status")
  return kib


def child(args: argparse.Namespace) -> None:
  import logging  # noqa: PLC0415

  logging.getLogger("absl").setLevel(logging.ERROR)
  import jax  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  from dpmega.train import config as config_lib  # noqa: PLC0415
  from dpmega.tasks import builtin as tasks_builtin  # noqa: PLC0415
  from dpmega import train as train_lib  # noqa: PLC0415
  from dpmega.tasks import build_task  # noqa: PLC0415

  c = config_lib.base_config()
  c.task = tasks_builtin.default_task_config()
  c.task.num_train = args.dataset_size
  c.task.num_eval = 2000
  c.workdir = tempfile.mkdtemp(prefix="dpmega_bench_")
  c.num_steps = args.steps
  c.batch_schedule = f"constant:{args.child}"
  c.microbatch_size = args.microbatch
  c.max_microbatches = args.max_microbatches
  c.clipping = args.clipping
  c.noise_multiplier = 1.0
  c.log_every = 0
  c.tensorboard = False
  cfg = config_lib.validate(c)
  task = build_task(c)
  trainer = train_lib.Trainer(cfg, task, out=lambda s: None)
  state = trainer.initial_state()
  # Compile every chunk shape first (one tiny step per shape), outside the measured phase.
  from dpmega import sampling  # noqa: PLC0415

  params = state.params
  private_step = trainer.private_step  # the trainer's own step functions, on its (1 x 1) mesh
  for size in sampling.chunk_shapes(private_step.local_rows, private_step.max_microbatches):
    chunk = next(private_step.chunks(task.train_source, np.arange(size)))
    jax.block_until_ready(private_step.clipped_sum(params, [chunk]))
  process_before = _vm_kib("VmHWM")
  reset = procmem.reset_peak_rss()
  rss_start = _vm_kib("VmRSS")
  times, sampled = [], []
  for _ in range(cfg.num_steps):
    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, cfg.noise_multiplier)
    jax.block_until_ready(state.params)
    times.append(time.perf_counter() - t0)
    sampled.append(metrics["sampled"])
  print(json.dumps({
      "batch": args.child, "train_peak_kib": _vm_kib("VmHWM"), "train_start_kib": rss_start,
      "process_peak_kib": max(process_before, _vm_kib("VmHWM")), "peak_reset": reset,
      "examples_per_s": sampled[-1] / times[-1], "step_seconds": times, "sampled": sampled,
      "traces": trainer.num_traces,
  }))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batches", default="16384,65536,262144,1048576")
  p.add_argument("--dataset_size", type=int, default=2_097_152)
  p.add_argument("--microbatch", type=int, default=256)
  p.add_argument("--max_microbatches", type=int, default=8)
  p.add_argument("--clipping", default="vmap")
  p.add_argument("--steps", type=int, default=2)
  p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.child is not None:
    child(args)
    return
  batches = [int(b) for b in args.batches.split(",")]
  print(f"# dpmega bench/megabatch.py: synthetic_ctr, N = {args.dataset_size:,}, micro-batch {args.microbatch} x "
        f"{args.max_microbatches} per jitted call, clipping {args.clipping}, {args.steps} steps per size; "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
  rows = []
  for b in batches:
    cmd = [sys.executable, __file__, "--child", str(b), "--dataset_size", str(args.dataset_size), "--microbatch",
           str(args.microbatch), "--max_microbatches", str(args.max_microbatches), "--clipping", args.clipping,
           "--steps", str(args.steps)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    if out.returncode:
      sys.exit(f"batch {b} failed:\n{out.stderr[-3000:]}")
    rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
  print("| logical batch | train peak RSS (MiB) | process peak RSS (MiB) | examples/s | step time (s) | "
        "compiled chunk shapes |")
  print("|---:|---:|---:|---:|---:|---:|")
  for r in rows:
    print(f"| {r['batch']:,} | {r['train_peak_kib'] / 1024:.0f} | {r['process_peak_kib'] / 1024:.0f} | "
          f"{r['examples_per_s']:,.0f} | {r['step_seconds'][-1]:.2f} | {r['traces']} |")
  small = min(rows, key=lambda r: r["batch"])
  large = max(rows, key=lambda r: r["batch"])
  ratio = large["train_peak_kib"] / small["train_peak_kib"]
  print(f"\ntrain peak RSS ratio, batch {large['batch']:,} / {small['batch']:,}: {ratio:.3f} (target <= 1.1)"
        + ("" if all(r["peak_reset"] for r in rows) else "  [peak reset unavailable: process peaks]"))
  print(f"examples/s ratio, batch {large['batch']:,} / {small['batch']:,}: "
        f"{large['examples_per_s'] / small['examples_per_s']:.2f}")


if __name__ == "__main__":
  main()
