"""What the step benchmarks share: interleaved timing of jitted functions and XLA's compiled scratch memory."""

from __future__ import annotations

import time

import jax


def interleaved_times(fns: dict, args: tuple, reps: int) -> dict[str, list[float]]:
  """Seconds of each ``fns[name](*args)`` over ``reps`` rounds, every function once a round (load hits all alike)."""
  times = {name: [] for name in fns}
  for _ in range(reps):
    for name, f in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(f(*args))
      times[name].append(time.perf_counter() - start)
  return times


def temp_mib(jitted, args: tuple) -> float:
  """XLA's compiled scratch memory (MiB) of one call of ``jitted(*args)``, NaN where the backend does not say."""
  try:
    mem = jitted.lower(*args).compile().memory_analysis()
    return mem.temp_size_in_bytes / 2**20 if mem is not None else float("nan")
  except Exception:  # pylint: disable=broad-except
    return float("nan")
