"""Exact per-example clipping without per-example weight gradients ("ghost" clipping).

For a parameter ``W`` that enters the loss only through products with
activations -- ``z = dot_general(a, W)`` (Flax ``Dense``, ``DenseGeneral``,
the projections of ``MultiHeadDotProductAttention``, ``Embed.attend``) or a
row lookup ``z = W[ids]`` (Flax ``Embed``, ``jnp.take``) -- the per-example
gradient is ``sum_u X_u^T Y_u`` over the uses ``u`` of ``W``, where one factor
is the activation ``a`` (or the one-hot ids) and the other is
``g = dL_i / dz``. We never form it for a whole batch:

* **norms**: ``||sum_u X_u^T Y_u||^2 = sum_{s,t} (x_s . x_t)(y_s . y_t)`` over
  all rows of all uses (the cross terms between uses included, so a tied or
  re-used weight is exact), or -- when cheaper, ``n^2 > K N`` -- by forming the
  one example's ``K x N`` gradient ("mixed ghost clipping", Bu et al. 2022).
  Row lookups go through :mod:`dpmega.clipping.rows` (duplicate ids summed).
* **clipped sum**: the book-keeping trick (Bu et al. 2023): with the clip
  factors ``c_i``, ``sum_i c_i X_i^T Y_i`` is one matmul over the batch (a
  scatter-add for lookups); no second backward pass.

Every other parameter (biases, LayerNorm scales, a weight used in any op not
listed above, inside ``custom_jvp``/``scan``/...) gets its per-example
gradient by ``vmap``, in the same backward pass, only for that parameter. The
per-example norm is the global norm over all parameters, and the weights and
stats come from :func:`dpmega.clipping.combine`, so every mode counts alike.

Layers are found by :mod:`dpmega.clipping.jaxpr` (the loss traced for one
example, each parameter leaf followed to the primitives that consume it).

Guarantee: for every input, finite or not, each example's contribution to
the returned float32 sum has L2 norm ``<= clip_norm * (1 + 1e-5)`` over all
parameters. The Gram norm ``sum_{s,t} (x_s . x_t)(y_s . y_t)`` can lose all
its digits to cancellation (rows ``v`` and ``-v + d``), and the book-keeping
matmul rounds differently from it, so each leaf also gets a rigorous bound on
what the book-keeping adds (:func:`dpmega.clipping.gram.dense_norm_bounds`:
Gram rounding bounded term by term, an absolute term for underflow, plus
``gamma_{n+2} sum_s |x_s| |y_s|`` for the matmul; operands scaled by powers of
two where a batch-level check cannot prove the unscaled bound as tight;
overflow gives a non-finite bound, never a small one). The bound is used only
where it exceeds the estimate by more than 5e-6 relative; and within a budget
of ``_MATERIALIZE_BUDGET`` floats per leaf, the examples with the loosest bound
are materialized and contribute exactly the gradient their norm was taken from
(skipped by one batch-level ``lax.cond`` unless some example's bound exceeds its
estimate by more than ``_FALLBACK_LOOSENESS`` = 1e-2: cancellation, not rounding). Underflow in
the book-keeping itself (``fl(w y)`` flushed to 0 can break a cancellation and enlarge a
contribution) is bounded by :func:`dpmega.clipping.gram.flush_term`; an example where
that bound is not below ``2^-22 C`` is materialized first, or dropped from the leaf. Lookups scatter each example's
duplicate-id rows summed (:func:`dpmega.clipping.rows.dedup_rows`), the rows
their norm came from.

Under ``"auto"`` (and ``"ghost"``, its alias) most multi-row dense leaves never need the bound, because
their clipped sum is taken from materialized gradients whose norms it was
clipped by: a leaf with at least ``_SCAN_MIN_ROWS`` (64) rows per example (a
transformer's positions) one example at a time in a ``lax.scan``
(:func:`_scanned_sum`: norms from the Gram estimate, each example's weight on
the leaf capped by the norm of what it adds, so the estimate's error can only
shrink a contribution; memory independent of the batch), and a leaf with 2 to
63 rows outright when the micro-batch's per-example gradients fit
``_MATERIALIZE_SMALL_LEAF`` floats (16 MiB), else in the scan too (1.3-3x the
bound's time on such a leaf). On benign inputs the result then
equals :func:`dpmega.clipping.vmap.clipped_sum_vmap` (same norms, clipped sum
and stats) to float rounding. A tied output table with 2 to ``_BOUND_MAX_ROWS``
(16) predictions per example takes the bound, whatever its size, and so does one
with 17 to 63 predictions beyond the 16 MiB (:func:`_leaf_plan`): scanning it would
write the whole table per example. Its bound comes from blocked Gram products
(:func:`dpmega.clipping.floats.dot_rows`) and its rounding terms from Gram matrices of
absolute values (:func:`dpmega.clipping.gram._abs_grams`), which a softmax's
softmax-minus-one-hot rows keep near 0 off the diagonal: on such operands the
bound exceeds the norm by 3.7e-6 to 8.5e-6 from 5 to 63 predictions
(4.9e-6 at small BERT's 30,522 x 512 and 20 predictions), so its clip
factors are vmap's to ~4e-6, without a per-example copy of the table. Where some
example's bound exceeds its estimate by more than ``_SCAN_LOOSENESS`` (1e-5: dense
output rows that overlap, as a distillation loss's or a squared error's on the
logits), one batch-level ``lax.cond`` sums that leaf in the scan instead, so
its clip factors stay within 5e-6 of vmap's on every benign input. Nothing
public is left to a looser bound: the pure Gram bound (:func:`clipped_sum_gram`,
conservative, below vmap's by the bound's excess on benign inputs, 1e-5 to 1e-3
relative for dense layers, ``bench/large_leaf.py``) is not a clipping mode; the
tests of the bound run it.
An op the fast path does not recognise only makes it slower (``vmap``
for the parameters involved), never different.

Edge cases (besides those of :mod:`dpmega.clipping`, which hold unchanged
because the weights come from ``combine``; mirrored by ``tests/test_ghost.py``
and ``tests/test_rows.py``):

===============================================  ==================================
input                                            behaviour
===============================================  ==================================
weight used twice / tied (``Embed.attend``)      one norm over all uses, cross terms
weight in an unrecognised op too (``sin(W)``)    whole weight by ``vmap``
weight inside ``custom_jvp`` / ``scan`` / cond   whole weight by ``vmap``
``stop_gradient`` on activations                 respected (it stays in the jaxpr)
lookup id out of range, fill / promise mode      row gets no gradient (dropped), as ``jax.grad``
lookup id out of range, ``mode="clip"``          clamped, as ``jax.grad`` (unsigned ids exact)
cancellation across positions or ids             bound, materialized, or capped in the scan
activations ``1e-19`` / ``1e19``                 scaled: no under- or overflow in the norm
a row ``2^-40`` beside a row ``2^100``           underflow term in the bound, or materialized
features near ``2^100 C`` (flushed ``w y``)      materialized, or beyond the budget dropped (leaf)
integer params leaf                              ``ValueError`` before any compute (every mode)
NaN in a masked or non-finite example            zeroed before the book-keeping sum
bf16 parameters or compute                       norms and sums in float32, bound on the f32 sums
===============================================  ==================================

.. warning::
   ``loss_fn`` is traced once per call for ONE example (to find the layers);
   Python side effects in it run at trace time, as under ``jax.jit``.

References:
  Li et al. 2022, "Large language models can be strong differentially private
  learners" (ghost clipping), https://arxiv.org/abs/2110.05679.
  Bu et al. 2022, "Scalable and efficient training of large convolutional
  neural networks with differential privacy" (mixed ghost clipping),
  https://arxiv.org/abs/2205.10683.
  Bu et al. 2023, "Differentially private optimization on large model at
  small cost" (book-keeping), https://arxiv.org/abs/2210.00038.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from dpmega.clipping import floats
from dpmega.clipping import gram as gram_lib
from dpmega.clipping import jaxpr as jaxpr_lib
from dpmega.clipping import rows as rows_lib
from dpmega.clipping import stats as stats_lib
from dpmega.clipping import rules
from dpmega.clipping import vmap as vmap_lib
# The analysis's public names, for callers of the fast path (plan_layers reports which leaves take it).
from dpmega.clipping.jaxpr import LayerPlan
from dpmega.clipping.jaxpr import NormMethod
from dpmega.clipping.jaxpr import plan_layers

__all__ = ["LayerPlan", "NormMethod", "clipped_sum_ghost", "clipped_sum_gram", "plan_layers"]

PyTree = Any


_HIGHEST = lax.Precision.HIGHEST
# Relative room between the norm estimate and its rigorous bound before the bound is used: of the 1e-5 that
# the guarantee allows, the rest covers the positive-sum rounding (<= 4.5e-6 up to 1e6 terms, halved in the
# norm) and the few roundings after the norm (clip factor, product by it).
_BOUND_SLACK = 5e-6
# Floats of materialized per-example gradients per GRAM leaf and micro-batch, for the examples whose bound is loose.
_MATERIALIZE_BUDGET = 1 << 16
# The fallback materializes (within that budget) only when some example's bound exceeds its estimate by more than
# this: cancellation, where clipping by the bound would cost a visible part of the example's gradient. The rounding
# terms alone (gamma_K, gamma_{n+2}: 1e-5 to 2e-3 on benign operands, e.g. a 30,522-row tied output table) stay
# below it, so a benign batch never pays for materializing a gradient (a whole table for a tied embedding: small
# BERT's 30,522 x 512 table alone, its clipped sum 1.38x -> 1.10x the non-private gradient) to gain that little;
# those examples are clipped by their bound (conservative).
_FALLBACK_LOOSENESS = 1e-2
# Under "auto", a dense leaf (or a tied table with more than _BOUND_MAX_ROWS predictions) with fewer than
# _SCAN_MIN_ROWS rows whose per-example gradients for the whole micro-batch fit in this many floats (16 MiB) is
# materialized outright: no Gram matrices, no bound, and the norm and the sum come from the same numbers (exactly
# vmap's). Beyond it, the scan (a tied table: the Gram bound) keeps memory independent of b.
_MATERIALIZE_SMALL_LEAF = 1 << 22
# Under "auto", a dense leaf with at least this many rows per example (a transformer's positions) is materialized one
# example at a time in a scan (`_leaf_plan`): exact like the outright path, memory independent of b, and faster than
# it on CPU (2-D products instead of a batched one: small BERT's clipped step 1.26x -> 1.14x). Not where the leaf fits
# _MATERIALIZE_SMALL_LEAF and its Gram estimate (the scan's norms) costs more than materializing it: outright there.
_SCAN_MIN_ROWS = 64
# Under "auto", a tied table (lookups and an output projection) with 2 to this many predictions per example is never
# materialized: its Gram bound, from blocked products (gram.BLOCKED_MAX_ROWS) and Gram matrices of absolute values
# (gram._abs_grams), exceeds the estimate by ~4e-6 on benign operands (3.8e-6 at most on the demo's tied 512 x 32
# table, 3.2e-5 from one einsum), so within _BOUND_SLACK of vmap's norm, while materializing it per example copies
# the whole table: the demo's clipped sum 1.34x -> 1.12x of the non-private gradient (pre-issue-15: 1.12x;
# bench/clip_ratio.py).
_BOUND_MAX_ROWS = 16
# Under "auto", a leaf left to its Gram bound (such a tied table) is summed in the scan instead (one batch-level
# lax.cond) when some example's bound exceeds its estimate by more than this: then its clip factors are within
# _SCAN_LOOSENESS - _BOUND_SLACK (5e-6) of vmap's. A softmax output's table stays below it (3.7e-6 to 8.5e-6 from 5
# to 63 predictions); dense output rows that overlap (distillation, a squared error on the logits: 1.1e-5 to 1.3e-5 at
# 63 predictions; random operands 1.1e-5 to 3.2e-5) take the scan.
_SCAN_LOOSENESS = 1e-5
# Floats of per-example gradients live in one step of that scan (2 MiB, about a core's cache): unrolled further,
# a 768 x 768 leaf's scan took 2.3x as long (7 examples a step vs 1, bench/large_leaf.py's shape 32,128,768,768).
_SCAN_STEP_FLOATS = 1 << 19


def _dot_factors(use: jaxpr_lib.Use, a: jax.Array, g: jax.Array):
  """``(A [b, n, K_A], G [b, n, K_G])``: A over the contracted param dims (ascending), G over the rest."""
  b = a.shape[0]
  a_nd = a.ndim - 1
  a_free = [d for d in range(a_nd) if d not in use.a_contract]
  pairs = sorted(zip(use.w_contract, use.a_contract))
  a_mat = jnp.transpose(a, [0] + [1 + d for d in a_free] + [1 + d for _, d in pairs])
  n = int(np.prod([a.shape[1 + d] for d in a_free], dtype=np.int64))
  a_mat = a_mat.reshape(b, n, -1)
  # Output dims: (lhs free..., rhs free...); the weight's free dims come in its operand's order.
  w_var_contract = [use.perm.index(p) for p in use.w_contract]
  w_free_var = [d for d in range(len(use.perm)) if d not in w_var_contract]
  w_free_param = [use.perm[d] for d in w_free_var]
  n_a, n_w = len(a_free), len(w_free_var)
  a_axes = list(range(n_a)) if use.w_side == 1 else list(range(n_w, n_w + n_a))
  w_axes = list(range(n_a, n_a + n_w)) if use.w_side == 1 else list(range(n_w))
  w_axes = [w_axes[j] for j in np.argsort(w_free_param)]
  g_mat = jnp.transpose(g, [0] + [1 + d for d in a_axes + w_axes]).reshape(b, n, -1)
  return a_mat, g_mat


def _from_canonical(mat: jax.Array, shape: tuple[int, ...], canon: frozenset[int]) -> jax.Array:
  order = sorted(canon) + [d for d in range(len(shape)) if d not in canon]
  full = mat.reshape([shape[d] for d in order])
  return jnp.transpose(full, np.argsort(order))


class _LeafPlan(NamedTuple):
  """How one dense leaf (or tied table) is clipped and summed (static, from shapes alone)."""

  scan: bool  # materialized one example at a time in a scan (:func:`_scanned_sum`), whatever the inputs
  n_sel: int  # examples materialized at once: b (outright), or the fallback's budget beside the Gram bound (top-k)
  scan_fallback: bool  # on the bound: summed in that scan instead when the bound exceeds the estimate (lax.cond)
  unroll: int  # examples per step of the scan, either way


def _gram_costs_more(n: int, k: int, m: int) -> bool:
  """Whether the Gram estimate (``n^2 (K + M)`` multiply-adds) costs more than materializing (``n K M``)."""
  return n * (int(k) + int(m)) >= int(k) * int(m)


def _leaf_plan(method: NormMethod, b: int, x, y, rows, auto: bool) -> _LeafPlan:
  """The path of a GRAM or MATERIALIZE leaf with factors ``x [b, n, K]``, ``y [b, n, M]`` (+ tied ``rows``).

  * MATERIALIZE (``n^2 > K M``): every example's gradient materialized outright.
  * Under "auto" (``auto``), a multi-row GRAM leaf is **scanned** (:func:`_scanned_sum`) with at least
    ``_SCAN_MIN_ROWS`` rows per example (unless it fits the outright size and its Gram estimate, ``n^2 (K + M)``
    multiply-adds, costs at least its materialization, ``n K M``: then outright, no Gram at all; a 128 x 128
    projection over 128 positions at batch 32: its clipped sum 1.04x -> 0.90x of the non-private gradient), or
    with 2 to 63 rows (no lookups) when its per-example gradients exceed ``_MATERIALIZE_SMALL_LEAF`` floats per
    micro-batch: memory independent of ``b``, each example's norm taken
    from the numbers it adds, one 2-D product per example (XLA's CPU runtime runs the batched ``[b, K, N]``
    product of outright materialization 1.5-3x slower than the same flops as 2-D products). There the Gram bound
    exceeds the norm by 1e-5 to 1e-3 on benign operands (its ``gamma_K`` and ``gamma_{n+2}`` terms; more where
    rows correlate, as attention's do), and the scan, exact, costs 1.3-1.6x the bound's time at 32-48 rows (~3x
    at 8-16 rows; ``bench/large_leaf.py``). Unrolled to as many examples as fit ``_SCAN_STEP_FLOATS`` (at most 16).
  * Under "auto", a smaller multi-row leaf is materialized **outright** (a tied table with more than
    ``_BOUND_MAX_ROWS`` predictions included), unless the budget is 0 (the bound alone, for the tests of it).
  * The rest is clipped by its **Gram bound**: one-row leaves without lookups (``G = x y^T``, no cancellation:
    the estimate is its own bound, nothing materialized), and tied tables (lookups and an output projection) with
    at most ``_BOUND_MAX_ROWS`` predictions, or up to 63 beyond the outright size: a table is never scanned below
    64 predictions statically, since that writes the whole table per example. Its softmax-minus-one-hot output
    rows barely overlap, so its bound, whose rounding terms come from Gram matrices of absolute values, exceeds
    the norm by only 3.7e-6 to 8.5e-6 from 5 to 63 predictions (small BERT's 30,522 x 512 table at 20: 4.9e-6).
    Beside the bound, the ``_MATERIALIZE_BUDGET`` fallback materializes the loosest examples (``n_sel`` of them,
    at least one) on cancellation. Under "auto" the leaf also has a **scan fallback**: when some example's bound
    still exceeds its estimate by more than ``_SCAN_LOOSENESS`` (dense output rows that overlap: a distillation
    loss's or a squared error's, 1.1e-5 and 1.3e-5 at 63 predictions; random operands, 1.1e-5 to 3.2e-5 from 20
    to 63), one batch-level ``lax.cond`` sums the leaf in the scan instead, so its clip factors stay vmap's.
  """
  n = x.shape[1]
  per_example = int(x.shape[2]) * int(y.shape[2])
  table = rows is not None
  unroll = int(min(16, max(1, _SCAN_STEP_FLOATS // per_example)))
  if method == NormMethod.MATERIALIZE:
    return _LeafPlan(False, b, False, unroll)
  small = b * per_example <= _MATERIALIZE_SMALL_LEAF
  many_rows = n >= _SCAN_MIN_ROWS and not (small and not table and _gram_costs_more(n, x.shape[2], y.shape[2]))
  if auto and n >= 2 and (many_rows or not (table or small)):
    return _LeafPlan(True, 0, False, unroll)
  if _MATERIALIZE_BUDGET <= 0:  # budget 0: the bound alone (the adversarial tests of the bound)
    return _LeafPlan(False, 0, False, unroll)
  if auto and n >= 2 and small and not (table and n <= _BOUND_MAX_ROWS):
    return _LeafPlan(False, b, False, unroll)  # a tied table too (its summed lookup rows added to the gradient)
  if n == 1 and not table:
    return _LeafPlan(False, 0, False, unroll)
  return _LeafPlan(False, int(min(b, max(1, _MATERIALIZE_BUDGET // max(per_example, 1)))), auto, unroll)


def _bookkeeping(xd, yd, ids, first, rows, k_rows: int, w_bk) -> jax.Array | None:
  """``[K, N]`` book-keeping sum of a leaf with weights ``w_bk`` (0: example left out); None when it has no uses."""
  keep = w_bk > 0
  total = None  # no zeros-and-add pass over a whole (embedding) table
  if xd is not None:
    xw = jnp.where(keep[:, None, None], xd, 0.0)
    yw = jnp.where(keep[:, None, None], yd * w_bk[:, None, None], 0.0)
    # One [b*n, K]^T [b*n, M] matmul: the layout of the non-private weight gradient.
    total = jnp.einsum("nk,nm->km", xw.reshape(-1, xw.shape[-1]), yw.reshape(-1, yw.shape[-1]), precision=_HIGHEST)
  if ids is not None:
    scattered = rows_lib.scatter_add_rows(ids, rows, k_rows, valid=first, weights=w_bk)
    total = scattered if total is None else total + scattered
  return total


def _scanned_sum(x, y, ids, rows, k_rows: int, weights, est, unroll: int) -> jax.Array:
  """``[K, N]`` clipped sum of a dense leaf, each example's gradient materialized in turn (a ``lax.scan``).

  ``weights`` come from the norms in which this leaf counted with its Gram estimate ``est``, which equals the
  norm of the materialized gradient to rounding on benign inputs but can be anything under cancellation. So each
  example's weight on this leaf is capped at ``weights est (1 + _BOUND_SLACK) / m``, ``m`` the (scaled, float-safe)
  norm of the gradient it adds: the leaf's part of a contribution is then at most ``weights est (1 + slack)``
  whatever the estimate's error, the bound the norms were combined with, and on benign inputs (``m <= est (1 +
  slack)``) the weight is vmap's. The contribution is ``fl(w g)`` entry by entry (underflow only shrinks it); a
  non-finite gradient gets weight 0. One 2-D product per example: XLA's CPU runtime runs a batched
  ``[b, K, N]`` product ~3x slower than the same flops as 2-D products (``bench/large_leaf.py``).
  """
  ops = (x, y, weights, est) + (() if rows is None else (ids, rows))

  def body(total, example):
    xe, ye, w, e, *lookups = example
    g = gram_lib.materialize_one(xe, ye, *(lookups or (None, None)), k_rows)
    m = floats.scaled_norms(g[None])[0]
    cap = e * (1.0 + _BOUND_SLACK)
    w = jnp.where(jnp.isfinite(m) & (w > 0), jnp.where(m > cap, w * (cap / m), w), 0.0)
    return total + jnp.where(w > 0, g * w, 0.0), None

  total, _ = lax.scan(body, jnp.zeros((k_rows, y.shape[2]), jnp.float32), ops, unroll=unroll)
  return total


def clipped_sum_ghost(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    mask: jax.Array,
    clip_norm: float | jax.Array,
    has_aux: bool = False,
    rule: rules.ClipRule = rules.PLAIN,
    *,
    method: NormMethod = NormMethod.AUTO,
) -> tuple[PyTree, Any, stats_lib.ClipStats]:
  """Clipped, masked sum of one micro-batch without per-example weight gradients.

  Same signature, result and guarantee as :func:`dpmega.clipping.clipped_sum_vmap`.

  Args:
    loss_fn: ``loss_fn(params, example) -> loss`` (or ``(loss, aux)``) for ONE example.
    params: pytree to differentiate.
    batch: pytree with a leading batch axis.
    mask: ``[b]``, 1 for real examples.
    clip_norm: the L2 bound C.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    rule: how norms become weights (:mod:`dpmega.clipping.rules`); with clip groups, each group's norm is
      taken over its own leaves, and each leaf's book-keeping uses its group's weights.
    method: norm method for recognised layers (:class:`NormMethod`).

  Returns:
    ``(grad_sum float32 like params, aux or None, ClipStats)``.
  """
  if method not in (NormMethod.AUTO, NormMethod.GRAM, NormMethod.MATERIALIZE):
    raise ValueError(f"method must be NormMethod.AUTO, GRAM or MATERIALIZE, got {method=!r}.")
  leaves, treedef = jax.tree_util.tree_flatten(params)
  if not leaves:
    raise ValueError("params has no leaves: nothing to differentiate.")
  leaves = [jnp.asarray(x) for x in leaves]
  groups = (0,) * len(leaves) if not rule.groups else rule.assign(
      [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]])
  ex_leaves, ex_def = jax.tree_util.tree_flatten(batch)
  ex_leaves = [jnp.asarray(x) for x in ex_leaves]
  b = ex_leaves[0].shape[0]
  example = [jax.ShapeDtypeStruct(x.shape[1:], x.dtype) for x in ex_leaves]
  out_def = []

  def flat_loss(p_leaves, e_leaves):
    out = loss_fn(jax.tree_util.tree_unflatten(treedef, p_leaves), jax.tree_util.tree_unflatten(ex_def, e_leaves))
    flat, tree = jax.tree_util.tree_flatten(out)
    out_def.append(tree)
    return flat

  closed = jax.make_jaxpr(flat_loss)(leaves, example)
  uses, fallback, avals, inlined = jaxpr_lib.analyze(closed, len(leaves))
  ghost, methods, fb = jaxpr_lib.partition(uses, fallback, leaves, avals, method)
  fb = sorted(fb)
  active = {u.path: u for us, _ in ghost.values() for u in us}
  perts0 = {p: jnp.zeros(avals[p].shape, avals[p].dtype) for p in active}

  def per_example(fb_vals, perts, e_leaves):
    args = list(leaves)
    for j, v in zip(fb, fb_vals):
      args[j] = v
    outs, captured = jaxpr_lib.evaluate(closed, active, inlined, args + list(e_leaves), perts)
    out = jax.tree_util.tree_unflatten(out_def[0], outs)
    loss, aux = out if has_aux else (out, None)
    return loss, (loss, aux, captured)

  grad_fn = jax.grad(per_example, argnums=(0, 1), has_aux=True)
  (fb_grads, g_perts), (losses, aux, captured) = jax.vmap(grad_fn, in_axes=(None, None, 0))(
      [leaves[j] for j in fb], perts0, ex_leaves)

  # Per-leaf factors in canonical orientation: dense (X [b,n,K], Y [b,n,N]) and lookups (ids, first, summed rows).
  factors = {}
  est_norms, upper_norms, item_groups = [], [], []  # [b] per leaf: the estimate, a rigorous bound on what is
  # added, and the leaf's clip group
  # Arrays whose plain (scaled) row norms are needed, taken after the loop (one fast-path cond each: merging them
  # into one cond, floats.scaled_norms_many, cost DeepFM at batch 16,384 ~17% of its clipped step; RESULTS.md).
  plain: list[jax.Array] = []
  plain_norm = lambda a: (plain.append(a), len(plain) - 1)[1]
  for leaf, (us, canon) in ghost.items():
    shape = tuple(leaves[leaf].shape)
    dense_x, dense_y, ids_l, valid_l, rows_l = [], [], [], [], []
    for u in us:
      g = g_perts[u.path].astype(jnp.float32)
      act = captured[u.path]
      if u.kind == "slice":
        v_rows, k = shape[0], u.slice_rows
        start = rows_lib.clamp_ids(act.reshape(b), v_rows - k)  # dynamic_slice clamps its start, as does its transpose
        ids_l.append(start[:, None] + jnp.arange(k, dtype=jnp.int32)[None])
        valid_l.append(jnp.ones((b, k), bool))
        rows_l.append(g.reshape(b, k, -1))
      elif u.kind == "gather":
        rows = g.reshape(b, -1, shape[1])
        ids, valid = rows_lib.gather_ids(act.reshape(b, rows.shape[1]), shape[0], u.mode)
        ids_l.append(ids)
        valid_l.append(valid)
        rows_l.append(jnp.where(valid[..., None], rows, 0.0))
      else:
        a_mat, g_mat = _dot_factors(u, act.astype(jnp.float32), g)
        x, y = (a_mat, g_mat) if u.split() == canon else (g_mat, a_mat)
        dense_x.append(x)
        dense_y.append(y)
    xd = jnp.concatenate(dense_x, axis=1) if dense_x else None
    yd = jnp.concatenate(dense_y, axis=1) if dense_y else None
    ids = first = rows = None
    if ids_l:
      # Duplicate ids summed once, here: the norm and the scatter below use the same summed rows.
      ids = jnp.concatenate(ids_l, axis=1)
      rows, first = rows_lib.dedup_rows(ids, jnp.concatenate(rows_l, axis=1), jnp.concatenate(valid_l, axis=1))
    sel = g_sel = used = danger = rescan = plan = None
    if xd is None:
      est = upper = (plain_norm(rows),)
    else:
      k_rows = int(np.prod([shape[d] for d in sorted(canon)], dtype=np.int64))
      plan = _leaf_plan(methods[leaf], b, xd, yd, rows, auto=method == NormMethod.AUTO)
      n_sel = plan.n_sel
      if plan.scan:
        # The Gram estimate, as vmap's norm to rounding on benign inputs; _scanned_sum caps what each example adds
        # by it, so no rounding bound (and no flush term: fl(w g) entry by entry) is needed.
        est = upper = gram_lib.dense_norm_estimate(xd, yd, ids, rows, mask)
      elif xd.shape[1] == 1 and rows is None:
        # One row: G = x y^T, ||G|| = ||x|| ||y|| with no cancellation, and the book-keeping adds each entry as
        # one product (relative error 2u): the estimate is its own bound.
        est = upper = (plain_norm(xd), plain_norm(yd))
      elif n_sel < b:
        est, upper, sx = gram_lib.dense_norm_bounds(xd, yd, ids, rows, mask, with_x_sum=True)
        # Examples whose book-keeping underflow could add more than FLUSH_REL C (features near 2^100 C; never on
        # benign inputs) are materialized first, and dropped from this leaf beyond the budget (gram.flush_term).
        n_rows_l, d_l = (0, 0) if rows is None else rows.shape[1:]
        flush = gram_lib.flush_term(sx, xd.shape[1], xd.shape[2], yd.shape[2], n_rows_l, d_l)
        danger = (mask > 0) & ~(flush <= gram_lib.FLUSH_REL * jnp.asarray(clip_norm, jnp.float32))
      if n_sel:
        # These examples' gradients are materialized, and both their norm and their contribution are taken from
        # the materialized numbers (as vmap does): exact wherever the bound above is loose (cancellation).
        materialize = lambda: gram_lib.materialize(xd[sel], yd[sel], None if ids is None else ids[sel],
                                           None if rows is None else rows[sel], k_rows)
        if n_sel == b:
          sel, used = jnp.arange(b), True
          g_sel = materialize()
          est = upper = floats.scaled_norms(g_sel)
        else:
          loose = jnp.where(est > 0, upper / jnp.where(est > 0, est, 1.0), jnp.where(upper > 0, jnp.inf, 0.0))
          loose = jnp.where((mask > 0) & ~jnp.isnan(loose), loose, -1.0)
          sel = lax.top_k(jnp.where(danger, jnp.inf, loose), n_sel)[1]
          # Skipped (one batch-level cond) unless some example's bound is loose beyond rounding: then every norm is
          # its estimate or its bound, and the book-keeping below adds every example.
          used = jnp.any(((mask > 0) & (upper > est * (1.0 + _FALLBACK_LOOSENESS))) | danger)

          def with_sel(est=est, upper=upper):
            g = materialize()
            m = floats.scaled_norms(g)
            return g, est.at[sel].set(m), upper.at[sel].set(m)

          g_shape = (n_sel, k_rows, yd.shape[2])
          g_sel, est, upper = lax.cond(used, with_sel, lambda: (jnp.zeros(g_shape, jnp.float32), est, upper))
      if plan.scan_fallback:
        # Some example's bound still above its estimate by more than rounding the slack absorbs: the whole leaf is
        # summed in the scan instead (below), which caps what each example adds by its estimate, so the estimate
        # is the leaf's norm (vmap's, to rounding, on benign inputs). Not taken on the softmax tables measured.
        rescan = jnp.any((mask > 0) & jnp.isfinite(est) & ~(upper <= est * (1.0 + _SCAN_LOOSENESS)))
        upper = jnp.where(rescan, est, upper)
    factors[leaf] = (xd, yd, ids, first, rows, sel, g_sel, used, danger, plan, rescan, est)
    est_norms.append(est)
    upper_norms.append(upper)
    item_groups.append(groups[leaf])
  for j, g in zip(fb, fb_grads):
    est_norms.append((plain_norm(g),))
    upper_norms.append(est_norms[-1])
    item_groups.append(groups[j])
  plain_norms = [floats.scaled_norms(a) for a in plain]
  resolve = lambda v: (functools.reduce(jnp.multiply, [plain_norms[i] for i in v]) if isinstance(v, tuple) else v)

  def group_norm(ests, uppers):
    if all(e is u for e, u in zip(ests, uppers)):  # no Gram bound: the estimate is its own bound
      return floats.hypot([resolve(v) for v in ests])
    if len(ests) == 1:
      est, upper = resolve(ests[0]), resolve(uppers[0])
    else:
      est, upper = floats.hypot([resolve(v) for v in ests]), floats.hypot([resolve(v) for v in uppers])
    # The estimate is what vmap would give; the bound is used only where it exceeds the estimate by more than
    # the slack, so benign examples keep vmap's clip factors and a crafted one is clipped by its bound.
    return jnp.maximum(est, upper / (1.0 + _BOUND_SLACK))

  if rule.num_groups == 1:
    norms = group_norm(est_norms, upper_norms)
  else:
    norms = jnp.stack([group_norm([e for e, g in zip(est_norms, item_groups) if g == j],
                                  [u for u, g in zip(upper_norms, item_groups) if g == j])
                       for j in range(rule.num_groups)])
  weights, stats = stats_lib.combine(norms, mask, clip_norm, losses, rule)
  leaf_weights = lambda leaf: weights if rule.num_groups == 1 else weights[groups[leaf]]
  out_leaves = [jnp.zeros(np.shape(x), jnp.float32) for x in leaves]  # unused leaves stay 0
  for leaf, (xd, yd, ids, first, rows, sel, g_sel, used, danger, plan, rescan, est) in factors.items():
    us, canon = ghost[leaf]
    shape = tuple(leaves[leaf].shape)
    order = sorted(canon) + [d for d in range(len(shape)) if d not in canon]
    k = int(np.prod([shape[d] for d in sorted(canon)], dtype=np.int64))
    w_leaf = leaf_weights(leaf)
    scanned = lambda: _scanned_sum(xd, yd, ids, rows, k, w_leaf, est, plan.unroll)

    def bound_sum():  # called (traced) in this iteration: the loop's names are this leaf's
      total, w_bk = None, w_leaf
      if sel is not None:
        total = vmap_lib.weighted_sum(g_sel, w_leaf[sel])
        # The materialized examples are not added again by the book-keeping below.
        w_bk = w_leaf.at[sel].set(0.0) if used is True else jnp.where(used, w_leaf.at[sel].set(0.0), w_leaf)
      if danger is not None:  # left to the book-keeping, underflow could add more than FLUSH_REL C: dropped
        w_bk = jnp.where(danger, 0.0, w_bk)
      if sel is None or sel.shape[0] < b:
        bk = _bookkeeping(xd, yd, ids, first, rows, k, w_bk)
        total = bk if total is None else total + bk
      return total

    if rescan is not None:
      total = lax.cond(rescan, scanned, bound_sum)
    elif plan is not None and plan.scan:
      total = scanned()  # nothing left to the book-keeping
    else:
      total = bound_sum()
    out_leaves[leaf] = _from_canonical(total, shape, canon) if order != list(range(len(shape))) else total.reshape(shape)
  if fb:
    for j, g in zip(fb, fb_grads):
      out_leaves[j] = vmap_lib.weighted_sum(g, leaf_weights(j))
  return jax.tree_util.tree_unflatten(treedef, out_leaves), aux, stats


def clipped_sum_gram(loss_fn, params, batch, mask, clip_norm, has_aux=False, rule=rules.PLAIN):
  """:func:`clipped_sum_ghost` with pure Gram (ghost) norms for every recognised layer, nothing scanned.

  Not a clipping mode: every example keeps the guarantee (at most ``C (1 + 1e-5)``), but on benign inputs the
  sums fall below vmap's by the bound's excess (1e-5 to 1e-3 relative for dense layers). For the tests of the
  bound and ``bench/large_leaf.py``.
  """
  return clipped_sum_ghost(loss_fn, params, batch, mask, clip_norm, has_aux, rule, method=NormMethod.GRAM)
