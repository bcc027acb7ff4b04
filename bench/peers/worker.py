"""Times one (implementation, workload) in this process and prints one JSON line.

Run by ``run.py`` in a fresh subprocess per measurement, so the peak RSS it
reports belongs to this implementation alone. What is timed: ``step()`` (one
full training step on a fixed, already-materialised batch: forward, backward,
per-example clipping and noise where private, SGD update) followed by a device
sync, after ``--warmup`` untimed steps (the first one compiles, for JAX).
Steps are timed until ``--min-time`` seconds and ``--min-steps`` steps have
passed; examples/s = steps * batch_size / elapsed. Memory: RSS after setup,
after warm-up, the peak over the timed steps alone (VmHWM reset after warm-up)
and the peak of the whole process (``ru_maxrss``, compilation included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # bench/, for procmem

import config  # pylint: disable=g-import-not-at-top,wrong-import-position
import procmem  # pylint: disable=g-import-not-at-top,wrong-import-position

MARKER = "@@RESULT@@ "


def _status_mb(field: str) -> float:
  kib = procmem.status_kib(field)
  return float("nan") if kib is None else kib / 1024


def _rss_mb() -> float:
  return _status_mb("VmRSS")


def measure(impl: str, workload: str, warmup: int, min_time: float, min_steps: int,
            max_time: float, threads: int) -> dict:
  w = config.WORKLOADS[workload]
  batch = config.make_batch(w)
  t0 = time.perf_counter()
  if impl in ("torch",) or impl.startswith("opacus:"):
    import torch  # pylint: disable=g-import-not-at-top
    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    import steps_torch as lib  # pylint: disable=g-import-not-at-top
  else:
    import steps_jax as lib  # pylint: disable=g-import-not-at-top
  step, sync, params = lib.build(impl, w, batch)
  result = {"num_params": lib.num_params(params), "rss_setup_mb": _rss_mb()}
  t1 = time.perf_counter()
  for _ in range(warmup):
    step()
  sync()
  t2 = time.perf_counter()
  rss_warm = _rss_mb()
  # Resetting VmHWM also resets ru_maxrss: keep the peak so far.
  peak_warm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  reset = procmem.reset_peak_rss()  # the peak of the timed steps excludes compilation
  times = []
  start = time.perf_counter()
  while True:
    s = time.perf_counter()
    step()
    sync()
    times.append(time.perf_counter() - s)
    elapsed = time.perf_counter() - start
    if len(times) >= min_steps and elapsed >= min_time:
      break
    if elapsed >= max_time and len(times) >= 1:
      break
  result.update(
      steps=len(times), seconds=elapsed,
      examples_per_s=len(times) * w.batch_size / elapsed,
      step_ms_median=sorted(times)[len(times) // 2] * 1e3,
      setup_s=t1 - t0, warmup_s=t2 - t1, rss_after_warmup_mb=rss_warm,
      timed_peak_rss_mb=_status_mb("VmHWM") if reset else float("nan"),
      peak_rss_mb=max(peak_warm, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))
  if reset:  # ru_maxrss is sampled lazily; VmHWM can be a few pages higher.
    result["peak_rss_mb"] = max(result["peak_rss_mb"], result["timed_peak_rss_mb"])
  return result


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__)
  p.add_argument("--impl", required=True)
  p.add_argument("--workload", required=True, choices=sorted(config.WORKLOADS))
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--min-time", type=float, default=2.0)
  p.add_argument("--min-steps", type=int, default=3)
  p.add_argument("--max-time", type=float, default=30.0)
  p.add_argument("--threads", type=int, default=2)
  a = p.parse_args(argv)
  try:
    out = measure(a.impl, a.workload, a.warmup, a.min_time, a.min_steps, a.max_time, a.threads)
  except Exception as e:  # pylint: disable=broad-except
    msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    out = {"error": msg[:300], "traceback": traceback.format_exc()[-2000:],
           "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
  print(MARKER + json.dumps(out), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
