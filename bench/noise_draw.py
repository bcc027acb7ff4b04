"""The Gaussian draw of one DP-SGD step: dpmega vs jax.random vs peers, ns per coordinate.

DP-SGD adds N(0, (sigma C)^2) to every coordinate of the summed gradient once
per logical step, so for a model with a 10^6-row embedding table the draw
(17.2M coordinates) can cost more than the gradient itself. This compares,
side by side in one process, one draw shaped like each parameter array of the
step_overhead workloads:

* ``dpmega wide-tail``: :func:`dpmega.threefry.wide_tail_normal` (jitted), the
  draw :func:`dpmega.privatize` uses by default: support ±9.155 std (issue 15);
* ``dpmega jax-bounded``: :func:`dpmega.threefry.normal` (``sampler=
  "jax_bounded"``): ``jax.random.normal``'s numbers, unrolled, support
  [-5.42, 5.22]; the wide-tail target is <= 1.3x this row;
* ``jax.random.normal``: the jax-bounded numbers through JAX's CPU lowering (a
  rolled loop over the threefry rounds);
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
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from dpmega import threefry

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import step_overhead  # pylint: disable=wrong-import-position  (the workloads' parameter shapes)

WORKLOADS = {"mlp": "MLP 784-512-512-10", "bert": "tiny BERT MLM", "deepfm": "DeepFM, 10^6-row tables"}
WIDE = "dpmega wide-tail (default)"
BOUNDED = "dpmega jax-bounded (unrolled)"


def _median_times(cands, reps):
  """Interleaved rounds (every candidate once per round) after one warm-up call each."""
  for fn in cands.values():
    fn()
  times = {label: [] for label in cands}
  for _ in range(reps):
    for label, fn in cands.items():
      t = time.perf_counter()
      fn()
      times[label].append(time.perf_counter() - t)
  return {label: statistics.median(ts) for label, ts in times.items()}


def jax_candidates(shapes):
  """label -> zero-argument callable drawing one standard normal array per shape (one key each)."""
  def draw(normal):
    return jax.jit(lambda key: [normal(k, s) for k, s in zip(jax.random.split(key, len(shapes)), shapes)])
  wide, bounded = draw(threefry.wide_tail_normal), draw(threefry.normal)
  theirs = draw(lambda k, s: jax.random.normal(k, s, jnp.float32))
  key, rbg = jax.random.key(0), jax.random.key(0, impl="rbg")
  return {WIDE: lambda: jax.block_until_ready(wide(key)),
          BOUNDED: lambda: jax.block_until_ready(bounded(key)),
          "jax.random.normal (threefry)": lambda: jax.block_until_ready(theirs(key)),
          "jax.random.normal (rbg key)": lambda: jax.block_until_ready(theirs(rbg))}


def peer_candidates(shapes):
  """Peers' samplers on the same shapes; timed after the JAX rows (torch's threads would slow JAX)."""
  out = {}
  try:
    import torch  # pylint: disable=import-outside-toplevel
    gen = torch.Generator().manual_seed(0)
    out[f"torch.randn (torch {torch.__version__})"] = lambda: [torch.randn(s, generator=gen) for s in shapes]
  except ImportError:
    pass
  rng = np.random.default_rng(0)
  out[f"numpy standard_normal (numpy {np.__version__})"] = lambda: [
      rng.standard_normal(s, dtype=np.float32) for s in shapes]
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=20)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, devices {jax.devices()}")
  shapes = {}
  for name in WORKLOADS:
    _, params, _ = step_overhead.workload(name, jax.random.key(0))
    shapes[name] = [tuple(x.shape) for x in jax.tree_util.tree_leaves(params)]
  results = {name: _median_times(jax_candidates(s), args.reps) for name, s in shapes.items()}
  for name, s in shapes.items():
    results[name].update(_median_times(peer_candidates(s), args.reps))
  for name, times in results.items():
    n = sum(math.prod(s) for s in shapes[name])
    base = times[WIDE]
    print(f"\n== {WORKLOADS[name]}: {n:,} coordinates in {len(shapes[name])} parameter arrays")
    for label, t in times.items():
      print(f"   {label:42s} {t * 1e3:8.2f} ms {t / n * 1e9:6.2f} ns/coord {t / base:6.2f}x wide-tail")
    print(f"   wide-tail / jax-bounded: {times[WIDE] / times[BOUNDED]:.2f}x (target <= 1.3x)")


if __name__ == "__main__":
  main()
