"""The Gaussian draw of one DP-SGD step: dpmega vs jax.random vs peers, ns per coordinate.

DP-SGD adds N(0, (sigma C)^2) to every coordinate of the summed gradient once
per logical step, so for a model with a 10^6-row embedding table the draw
(17.2M coordinates) can cost more than the gradient itself. This compares,
side by side in one process, for parameter counts of the step_overhead
workloads:

* ``dpmega``: :func:`dpmega.threefry.normal` (jitted), the draw
  :func:`dpmega.privatize` uses: ``jax.random.normal``'s numbers, unrolled;
* ``jax.random.normal``: the same numbers through JAX's CPU lowering (a rolled
  loop over the threefry rounds);
* ``jax rbg``: ``jax.random.normal`` with an ``rbg`` key (XLA's RngBitGenerator;
  not sharding-independent, so dpmega does not use it);
* ``torch.randn`` (Opacus draws its noise with it) and NumPy's
  ``Generator.standard_normal``, when importable (``.venv-bench``).

Usage:
  python bench/noise_draw.py                     # with .venv: JAX rows only
  .venv-bench/bin/python bench/noise_draw.py     # adds torch and numpy rows
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpmega import threefry

SIZES = {"MLP 784-512-512-10": 669_706, "tiny BERT": 1_480_000, "DeepFM, 10^6-row tables": 17_247_201}


def _median_s(fn, reps):
  fn()  # compile / warm up
  times = []
  for _ in range(reps):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def candidates(n):
  """label -> zero-argument callable that draws n standard normals and waits for them."""
  key = jax.random.key(0)
  rbg = jax.random.key(0, impl="rbg")
  ours = jax.jit(lambda k: threefry.normal(k, (n,)))
  theirs = jax.jit(lambda k: jax.random.normal(k, (n,), jnp.float32))
  out = {"dpmega (threefry, unrolled)": lambda: ours(key).block_until_ready(),
         "jax.random.normal (threefry)": lambda: theirs(key).block_until_ready(),
         "jax.random.normal (rbg key)": lambda: theirs(rbg).block_until_ready()}
  try:
    import torch  # pylint: disable=import-outside-toplevel
    gen = torch.Generator().manual_seed(0)
    out[f"torch.randn (torch {torch.__version__})"] = lambda: torch.randn(n, generator=gen)
  except ImportError:
    pass
  rng = np.random.default_rng(0)
  out[f"numpy standard_normal (numpy {np.__version__})"] = lambda: rng.standard_normal(n, dtype=np.float32)
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=10)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, devices {jax.devices()}")
  for name, n in SIZES.items():
    cands = candidates(n)
    times = {label: _median_s(fn, args.reps) for label, fn in cands.items()}
    base = times["dpmega (threefry, unrolled)"]
    print(f"\n== {name}: {n:,} coordinates")
    for label, t in times.items():
      print(f"   {label:42s} {t * 1e3:8.2f} ms {t / n * 1e9:6.2f} ns/coord {t / base:6.2f}x dpmega")


if __name__ == "__main__":
  main()
