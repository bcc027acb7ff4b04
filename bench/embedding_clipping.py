"""Sparse vs naive per-example clipping of embedding lookups (issue 6).

Model: 26 categorical lookups per example into one ``[V, 16]`` table plus a
small MLP head; the clipped gradient sum of a batch (no noise), jitted.

* sparse: ``clipping="auto"`` -- per-example gradients w.r.t. the looked-up
  rows only (:mod:`dpmega.clipping.rows`): memory O(batch x lookups x dim);
* naive: ``clipping="vmap"`` -- per-example gradients of the whole table:
  memory O(batch x V x dim).

Reports examples/s (median of ``--reps``) and the compiled temp memory (XLA
memory analysis). Naive runs that need more than ``--max_gib`` GiB of temp are
not run and reported as out of memory.

Usage:
  python bench/embedding_clipping.py [--batch 256] [--reps 5] [--max_gib 4]
"""

from __future__ import annotations

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp

import dpmega


class Lookup(nn.Module):
  rows: int
  dim: int = 16

  @nn.compact
  def __call__(self, ids):
    e = nn.Embed(self.rows, self.dim)(ids)
    return nn.Dense(1)(nn.relu(nn.Dense(64)(e.reshape(-1))))[0]


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--batch", type=int, default=256)
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--max_gib", type=float, default=4.0)
  parser.add_argument("--rows", default="10000,100000,1000000")
  args = parser.parse_args()
  print(f"jax {jax.__version__}, {jax.devices()}; batch {args.batch}, 26 lookups/example, dim 16")
  print(f"{'rows':>9s} {'mode':>7s} {'examples/s':>11s} {'temp MiB':>10s}")
  for v in map(int, args.rows.split(",")):
    m = Lookup(v)
    k1, k2, k3 = jax.random.split(jax.random.key(v), 3)
    ids = jax.random.randint(k1, (args.batch, 26), 0, v)
    ids = ids.at[:, 1].set(ids[:, 0])  # duplicates inside examples
    batch = {"ids": ids, "y": jax.random.bernoulli(k2, 0.3, (args.batch,)).astype(jnp.float32)}
    params = m.init(k3, ids[0])

    def loss(p, ex, m=m):
      z = m.apply(p, ex["ids"])
      return jnp.maximum(z, 0) - z * ex["y"] + jnp.log1p(jnp.exp(-jnp.abs(z)))

    for mode, label in (("auto", "sparse"), ("vmap", "naive")):
      fn = jax.jit(lambda p, x, mode=mode, loss=loss: dpmega.clipped_grad_sum(loss, p, x, clip_norm=1.0,
                                                                             clipping=mode))
      mem = fn.lower(params, batch).compile().memory_analysis()
      temp = mem.temp_size_in_bytes / 2**20 if mem is not None else float("nan")
      if temp > args.max_gib * 1024:
        print(f"{v:9d} {label:>7s} {'OOM':>11s} {temp:10.1f}  (needs {temp / 1024:.1f} GiB: not run)")
        continue
      jax.block_until_ready(fn(params, batch))
      times = []
      for _ in range(args.reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(params, batch))
        times.append(time.perf_counter() - t)
      print(f"{v:9d} {label:>7s} {args.batch / statistics.median(times):11.0f} {temp:10.1f}")


if __name__ == "__main__":
  main()
