"""Clipped sum (``clipping="auto"``, no noise) over the non-private gradient, for A/B runs across source trees.

One workload of ``bench/step_overhead.py``, both functions jitted and called interleaved ``REPS`` times; prints the
ratio of the minima (robust to load spikes on a shared machine) and of the medians. Run from a tree's root with
that tree on ``PYTHONPATH``: ``dpmega`` and the workloads (``bench/step_overhead.py``) both come from it, so the
same script times any tree (the pre-issue-15 tree included):

  for t in /tmp/tree-f597161 "$PWD"; do (cd "$t" && PYTHONPATH="$t" python "$OLDPWD/bench/clip_ratio.py" \
      bert_small 9); done
"""

from __future__ import annotations

import pathlib
import statistics
import sys

import jax
import jax.numpy as jnp

# The timed tree's workloads; bench/timing.py from that tree, or from this script's directory (sys.path[1]) when
# the tree predates it.
sys.path.insert(0, str(pathlib.Path.cwd() / "bench"))
import step_overhead  # noqa: E402  pylint: disable=wrong-import-position
import timing  # noqa: E402  pylint: disable=wrong-import-position

import dpmega  # noqa: E402  pylint: disable=wrong-import-position
from dpmega import clipping  # noqa: E402  pylint: disable=wrong-import-position


def main(name: str, reps: int) -> None:
  loss, params, batch = step_overhead.workload(name, jax.random.key(0), None)
  fns = {"non-private": jax.jit(jax.grad(lambda p, b: jnp.mean(jax.vmap(lambda e: loss(p, e))(b)))),
         "clip": jax.jit(lambda p, b: clipping.clipped_grad_sum(loss, p, b, clip_norm=1e-3, clipping="auto")[0])}
  for f in fns.values():
    jax.block_until_ready(f(params, batch))
  times = timing.interleaved_times(fns, (params, batch), reps)
  lo, mid = ({k: agg(v) for k, v in times.items()} for agg in (min, statistics.median))
  print(f"{pathlib.Path(dpmega.__file__).parents[1]}  {name}: non-private min {1e3 * lo['non-private']:.1f} ms, "
        f"clip min {1e3 * lo['clip']:.1f} ms; ratio of minima {lo['clip'] / lo['non-private']:.3f}, "
        f"of medians {mid['clip'] / mid['non-private']:.3f}")


if __name__ == "__main__":
  main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 9)
