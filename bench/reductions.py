"""The two reductions of clipping that XLA's CPU runtime runs far below memory speed, old form vs dpmega's.

* the clipped sum over examples of materialized per-example gradients (``vmap`` mode, fallback leaves, and the
  outright path of ``"auto"``): ``jnp.sum(axis=0)`` vs :func:`dpmega.clipping.vmap.sum_examples` (pairwise);
* the tree sum of squares behind every clipping norm: the minor-axis fan-in-16 tree (each level one
  ``jnp.sum`` over an axis of 16) vs :func:`dpmega.clipping.floats.sum_nonneg` (levels of >= 2^16 terms by halvings).

Each jitted, min of ``--reps`` calls, the two forms interleaved; prints both times and their ratio:

  python bench/reductions.py --reps 40
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from dpmega.clipping import floats
from dpmega.clipping import vmap as vmap_lib

# (b, per-example shape): small BERT's MLM transform (512 x 512, batch 8), a 768 x 768 leaf at 64 examples, a 128 x
# 128 leaf at 256; below vmap._PAIRWISE_MIN_FLOATS (the same code both ways): tiny BERT's 32 x 32 kernels, a bias.
EXAMPLE_SUMS = [(8, (512, 512)), (64, (768, 768)), (256, (128, 128)), (256, (32, 32)), (256, (256,))]
# (rows, length) of sums of squares: one example's 512 x 2048 and 512 x 512 gradients (small BERT's scan), 8
# examples' Gram terms (128 x 128 rows), 8 rows of 30,522, one example's 30,522 x 512 tied table.
SQUARE_SUMS = [(1, 1 << 20), (1, 1 << 18), (8, 1 << 14), (8, 30522), (1, 30522 * 512)]


def _minor_tree(x):
  """The tree of `floats.sum_nonneg` before session 15: every level a reduction of a minor axis of 16."""
  while x.shape[-1] > 16:
    pad = -x.shape[-1] % 16
    if pad:
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    x = jax.lax.optimization_barrier(jnp.sum(x.reshape(x.shape[:-1] + (-1, 16)), axis=-1))
  return jnp.sum(x, axis=-1)


def _min_times(fns, args, reps):
  for f in fns:
    jax.block_until_ready(f(*args))
  best = [float("inf")] * len(fns)
  for _ in range(reps):
    for i, f in enumerate(fns):
      t = time.perf_counter()
      jax.block_until_ready(f(*args))
      best[i] = min(best[i], time.perf_counter() - t)
  return best


def main(reps: int) -> None:
  key = jax.random.key(0)
  print("sum over examples of w_i g_i: jnp.sum(axis=0) vs vmap.sum_examples (pairwise)")
  def weigh(g, w):
    w = w.reshape((-1,) + (1,) * (g.ndim - 1))
    return jnp.where(w > 0, g * w, 0.0)

  old = jax.jit(lambda g, w: jnp.sum(weigh(g, w), axis=0))
  new = jax.jit(lambda g, w: vmap_lib.sum_examples(weigh(g, w)))
  for b, shape in EXAMPLE_SUMS:
    g = jax.random.normal(key, (b,) + shape)
    w = jax.random.uniform(key, (b,))
    t_old, t_new = _min_times([old, new], (g, w), reps)
    print(f"  {b:4d} x {str(shape):12s} {1e3 * t_old:8.3f} ms -> {1e3 * t_new:8.3f} ms   new / old {t_new / t_old:.2f}")
  print("tree sum of squares: minor-axis levels vs floats.sum_nonneg")
  old = jax.jit(lambda x: _minor_tree(jnp.square(x)))
  new = jax.jit(lambda x: floats.sum_nonneg(jnp.square(x)))
  for rows, length in SQUARE_SUMS:
    x = jax.random.normal(key, (rows, length))
    t_old, t_new = _min_times([old, new], (x,), reps)
    print(f"  {rows:4d} x {length:<10d}    {1e3 * t_old:8.3f} ms -> {1e3 * t_new:8.3f} ms   "
          f"new / old {t_new / t_old:.2f}")


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=40)
  main(parser.parse_args().reps)
