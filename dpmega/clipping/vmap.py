"""The general clipping path: per-example gradients by ``vmap(grad)``, their global norms, the clipped sum.

Works for any differentiable per-example loss; memory is ``b x |params|``.
:mod:`dpmega.clipping.ghost` uses it for the parameters it does not recognise.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dpmega.clipping import floats
from dpmega.clipping import rules
from dpmega.clipping import stats as stats_lib

PyTree = Any

def global_norms(per_example_grads: PyTree) -> jax.Array:
  """L2 norm of each example's gradient over the whole pytree, in float32.

  Scaled per example and leaf, and summed by trees of bounded depth
  (:func:`dpmega.clipping.floats.scaled_norms`), so the norm is the true norm of these float32
  gradients to a few ``1e-6`` relative for any values: no underflow, overflow
  or long-sum rounding can hide part of it.

  Args:
    per_example_grads: pytree whose leaves have a leading batch axis ``[b, ...]``.

  Returns:
    ``[b]`` float32 norms (NaN or Inf where a leaf is not finite).
  """
  leaves = jax.tree_util.tree_leaves(per_example_grads)
  if not leaves:
    raise ValueError("per_example_grads has no leaves: nothing to differentiate.")
  return floats.hypot([floats.scaled_norms(x) for x in leaves])


# Per-example size (floats) from which `weighted_sum` adds the examples pairwise: XLA's CPU runtime runs a reduction
# over the leading axis of a large array far below memory speed (8 x 512 x 512: 5.6-9 ms, pairwise 0.09-0.11 ms;
# 64 x 768 x 768: 185-228 ms vs 11-16 ms; bench/reductions.py). Below it the gain is small (256 x 32 x 32: 0.07 vs
# 0.05-0.09 ms) and the halvings' extra ops can cost more in a whole step (a bias of 256 floats at batch 256: 8 ops).
_PAIRWISE_MIN_FLOATS = 1 << 14


def sum_examples(x: jax.Array) -> jax.Array:
  """``sum_i x_i`` over the leading axis: pairwise (``x[:h] + x[h:]``, halving) for large examples, else ``jnp.sum``.

  The order of the additions only changes the rounding of the sum, not what each example adds: an example alone
  (every other row 0) comes out exactly.
  """
  if x.ndim < 2 or x.shape[0] == 0 or math.prod(x.shape[1:]) < _PAIRWISE_MIN_FLOATS:
    return jnp.sum(x, axis=0)
  while x.shape[0] > 1:
    if x.shape[0] % 2:
      x = jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])
    half = x.shape[0] // 2
    x = x[:half] + x[half:]
  return x[0]


def weighted_sum(per_example_grads: PyTree, weights: jax.Array) -> PyTree:
  """``sum_i weights_i * g_i`` in float32; rows with weight 0 are dropped even if NaN."""

  def leaf_sum(g):
    w = weights.reshape((-1,) + (1,) * (g.ndim - 1))
    return sum_examples(jnp.where(w > 0, g.astype(jnp.float32) * w, 0.0))

  return jax.tree_util.tree_map(leaf_sum, per_example_grads)


def per_example_grads(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    *,
    has_aux: bool = False,
) -> tuple[jax.Array, Any, PyTree]:
  """Per-example losses, aux and gradients by ``vmap(value_and_grad)``.

  Args:
    loss_fn: ``loss_fn(params, example) -> loss`` (or ``(loss, aux)``) for ONE example.
    params: the pytree to differentiate.
    batch: pytree whose leaves have a leading batch axis.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.

  Returns:
    ``(losses [b], aux (batched) or None, grads with a leading [b] axis)``.
  """
  vg = jax.value_and_grad(loss_fn, has_aux=has_aux)
  out, grads = jax.vmap(vg, in_axes=(None, 0))(params, batch)
  losses, aux = out if has_aux else (out, None)
  return losses, aux, grads


def group_norms(per_example_grads: PyTree, rule: rules.ClipRule) -> tuple[jax.Array, tuple[int, ...]]:
  """Per-example norms by clip group: ``([G, b] norms, group of each leaf)``, or ``([b], all 0)`` for one group."""
  flat = jax.tree_util.tree_flatten_with_path(per_example_grads)[0]
  if not rule.groups:
    return global_norms(per_example_grads), (0,) * len(flat)
  groups = rule.assign([jax.tree_util.keystr(path) for path, _ in flat])  # every parameter in a group, or an error
  if rule.num_groups == 1:
    return global_norms(per_example_grads), groups
  norms = [floats.scaled_norms(x) for _, x in flat]
  return jnp.stack([floats.hypot([n for n, g in zip(norms, groups) if g == j])
                    for j in range(rule.num_groups)]), groups


def clipped_sum_vmap(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    mask: jax.Array,
    clip_norm: float | jax.Array,
    has_aux: bool = False,
    rule: rules.ClipRule = rules.PLAIN,
) -> tuple[PyTree, Any, stats_lib.ClipStats]:
  """Clipped, masked sum of one micro-batch by materializing per-example grads.

  The general fallback: works for any differentiable ``loss_fn``; memory is
  ``b x |params|``. ``rule``: how norms become weights (:mod:`dpmega.clipping.rules`).

  Returns:
    ``(grad_sum (float32, like params), aux (batched) or None, ClipStats)``.
  """
  losses, aux, grads = per_example_grads(loss_fn, params, batch, has_aux=has_aux)
  norms, groups = group_norms(grads, rule)
  weights, stats = stats_lib.combine(norms, mask, clip_norm, losses, rule)
  if norms.ndim == 1:
    return weighted_sum(grads, weights), aux, stats
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  sums = [weighted_sum(x, weights[g]) for x, g in zip(leaves, groups)]
  return jax.tree_util.tree_unflatten(treedef, sums), aux, stats
