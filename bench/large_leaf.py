"""Clipped sum of one dense leaf: "auto" (scanned materialization) vs the pure Gram bound vs non-private.

One ``nn.Dense(M, use_bias=False)`` shared over ``n`` positions (a transformer projection), ``b`` examples,
every example clipped. With at least ``_SCAN_MIN_ROWS`` (64) rows per example, or 2 to 63 beyond
``_MATERIALIZE_SMALL_LEAF`` floats per micro-batch, "auto" materializes the examples' gradients one at a time in a
scan and takes each example's norm from the numbers it adds (equal to vmap on benign inputs); with 2 to 63 rows
within it, outright. "gram" (``ghost.clipped_sum_gram``, not a clipping mode; the "ghost" mode until session 16)
clips by the Gram bound for every shape (conservative, ~1e-4 relative below vmap at n = 128). Prints, per shape, the
median time of each (interleaved calls), the ratio to the non-private gradient of the mean loss, XLA's temp
memory, and each mode's largest difference from vmap where vmap fits (relative to the largest entry).

  python bench/large_leaf.py --shape 32,128,768,768 --shape 8,512,768,768 --reps 5
"""

from __future__ import annotations

import argparse
import statistics

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpmega import clipping
from dpmega.clipping import ghost

import timing  # bench/timing.py (this directory)


def run(b: int, n: int, k: int, m: int, reps: int, vmap_limit: int) -> None:
  model = nn.Dense(m, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (b, n, k))
  params = model.init(jax.random.key(1), x[0])
  loss = lambda p, ex: jnp.mean(model.apply(p, ex) ** 2)
  clip = 1e-3  # below every example's norm: all clipped
  fns = {"non-private": jax.jit(jax.grad(lambda p, xs: jnp.mean(jax.vmap(lambda e: loss(p, e))(xs))))}
  fns["auto"] = jax.jit(lambda p, xs: clipping.clipped_grad_sum(loss, p, xs, clip_norm=clip, clipping="auto")[0])
  fns["gram"] = jax.jit(lambda p, xs: ghost.clipped_sum_gram(loss, p, xs, jnp.ones(xs.shape[0]), clip)[0])
  if b * k * m <= vmap_limit:
    fns["vmap"] = jax.jit(lambda p, xs: clipping.clipped_grad_sum(loss, p, xs, clip_norm=clip, clipping="vmap")[0])
  outs = {name: jax.block_until_ready(f(params, x)) for name, f in fns.items()}  # compile + warm
  times = timing.interleaved_times(fns, (params, x), reps)
  base = statistics.median(times["non-private"])
  print(f"\n(b, n, K, M) = ({b}, {n}, {k}, {m}); load {open('/proc/loadavg').read().split()[0]}")
  print(f"{'':12s} {'ms':>9s} {'ratio':>7s} {'temp MiB':>9s} {'vs vmap':>9s}")
  for name, f in fns.items():
    med = statistics.median(times[name])
    diff = ""
    if "vmap" in outs and name in ("auto", "gram"):
      want = np.asarray(outs["vmap"]["params"]["kernel"])
      got = np.asarray(outs[name]["params"]["kernel"])
      diff = f"{np.max(np.abs(got - want)) / np.max(np.abs(want)):.1e}"
    print(f"{name:12s} {1e3 * med:9.1f} {med / base:6.2f}x {timing.temp_mib(f, (params, x)):9.1f} {diff:>9s}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--shape", action="append", help="b,n,K,M (repeatable)")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--vmap_limit", type=int, default=1 << 26, help="run vmap where b K M is at most this")
  args = parser.parse_args()
  for shape in args.shape or ["32,128,768,768", "8,512,768,768", "64,16,768,768", "16,128,768,3072"]:
    run(*(int(v) for v in shape.split(",")), reps=args.reps, vmap_limit=args.vmap_limit)


if __name__ == "__main__":
  main()
