"""Sparse per-example clipping of embedding lookups.

An example touches a few rows of a table, so its gradient with respect to a
``[V, d]`` table is ``sum_j onehot(ids_j) (x) r_j`` where ``r_j`` is the
gradient with respect to the ``j``-th looked-up row (the embedding output).
This module works on ``(ids, r)`` only:

* :func:`dedup_rows`: each example's rows of duplicate ids summed into one
  row per distinct id (``r_a + r_b``), the rows that are both measured and
  scattered, so the norm that is clipped is the norm of what is added;
* :func:`row_grad_sq_norms`: per-example squared L2 norm of the table
  gradient, duplicates summed *before* the norm (``||r_a + r_b||^2``, not
  ``||r_a||^2 + ||r_b||^2``);
* :func:`scatter_add_rows`: ``sum_i w_i sum_j onehot(ids_ij) (x) r_ij`` into a
  float32 ``[V, d]`` table gradient.

Memory is ``O(batch x lookups x d)`` plus the one ``[V, d]`` summed gradient,
never ``O(batch x V x d)``. :mod:`dpmega.clipping.ghost` uses these two functions for
every ``gather`` from a parameter table it finds (Flax ``Embed``,
``jnp.take``, ``table[ids]``), so the sparse and the fast dense paths are one
mechanism and share one global per-example norm.

Guarantee: ``row_grad_sq_norms(ids, r)[i]`` equals ``||G_i||^2`` where ``G_i``
is the dense ``[V, d]`` per-example gradient, to float rounding; ids with
``valid == False`` (out of range under fill/drop semantics, padding that the
model drops) contribute nothing to either function.

Edge cases:

==========================  ============================================
input                        behaviour
==========================  ============================================
duplicate ids in a row       rows summed before the norm and the scatter
cancelling duplicates        clipped as summed (``fl(w (r_a + r_b))``)
same id in two examples      independent (norms are per example)
``valid[i, j] == False``     row ignored (norm and scatter)
``weights[i] == 0``          example dropped even if its rows are NaN
id outside ``[0, V)``        must be marked invalid (scatter drops it)
==========================  ============================================
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dpmega.clipping import floats

# Up to this many lookups per example, duplicate ids are found by rank (pairwise compares), beyond by sorting.
_RANK_MAX_LOOKUPS = 64


def _check_shapes(ids: jax.Array, rows: jax.Array, valid: jax.Array | None) -> None:
  if ids.ndim != 2:
    raise ValueError(f"ids must have shape [batch, lookups], got ids.shape={ids.shape}.")
  if rows.ndim != 3 or rows.shape[:2] != ids.shape:
    raise ValueError(
        f"rows must have shape [batch, lookups, dim] = {ids.shape} + (dim,), got rows.shape={rows.shape}.")
  if valid is not None and valid.shape != ids.shape:
    raise ValueError(f"valid must have the shape of ids {ids.shape}, got valid.shape={valid.shape}.")


def dedup_rows(ids: jax.Array, rows: jax.Array, valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Sums each example's rows of equal ids into the first (valid) lookup of that id.

  The clipped sum must scatter exactly the rows its norm was computed from:
  scattering ``w * r_a`` and ``w * r_b`` separately rounds each product on its
  own, and for ``r_a = v``, ``r_b = -v + d`` with ``|v| >> |d|`` that rounding
  (``u |w v|``) is larger than the clipped ``w d`` itself. Summed first, the
  example adds one row per distinct id, ``fl(w * (r_a + r_b))``, whose norm is
  the norm that was clipped.

  Args:
    ids: ``[b, n]`` integer row ids.
    rows: ``[b, n, d]`` row gradients.
    valid: optional ``[b, n]`` bool; False rows are ignored.

  Returns:
    ``(summed [b, n, d] float32, first [b, n] bool)``: ``summed[i, j]`` is the
    sum of example ``i``'s valid rows with id ``ids[i, j]`` where ``first[i, j]``
    (``j`` is the first valid lookup of that id), else 0.
  """
  _check_shapes(ids, rows, valid)
  b, n, d = rows.shape
  valid = jnp.ones(ids.shape, bool) if valid is None else valid.astype(bool)
  rows = jnp.where(valid[..., None], rows.astype(jnp.float32), 0.0)
  if n == 0:
    return rows, valid
  if n <= _RANK_MAX_LOOKUPS:
    # An id's rank among its example's ids (how many are smaller) is equal for equal ids and
    # distinct for distinct ones, so it can key the duplicate sum: n^2 integer compares,
    # 2.5x cheaper than XLA's comparator sort for the few dozen lookups of a CTR example.
    rank = jnp.sum(ids[:, None, :] < ids[:, :, None], axis=2, dtype=jnp.int32)
    summed = jax.vmap(lambda r, x: jax.ops.segment_sum(x, r, num_segments=n))(rank, rows)
    same_before = (ids[:, :, None] == ids[:, None, :]) & valid[:, None, :] & jnp.tril(jnp.ones((n, n), bool), -1)
    first = valid & ~jnp.any(same_before, axis=2)
    out = jnp.take_along_axis(summed, rank[..., None], axis=1)
    return jnp.where(first[..., None], out, 0.0), first

  def one(ex_ids, ex_rows, ex_valid):
    order = jnp.argsort(ex_ids, stable=True)  # equal ids keep their lookup order
    sorted_ids = ex_ids[order]
    new_segment = jnp.concatenate([jnp.zeros((1,), jnp.int32), (sorted_ids[1:] != sorted_ids[:-1]).astype(jnp.int32)])
    segment = jnp.cumsum(new_segment)
    summed = jax.ops.segment_sum(ex_rows[order], segment, num_segments=n, indices_are_sorted=True)
    v = ex_valid[order].astype(jnp.int32)
    before = jnp.cumsum(v) - v  # valid lookups before this one, over the sorted order
    seg_start = jax.ops.segment_min(before, segment, num_segments=n, indices_are_sorted=True)
    first_sorted = (v > 0) & (before == seg_start[segment])
    out_sorted = jnp.where(first_sorted[:, None], summed[segment], 0.0)
    return (jnp.zeros_like(ex_rows).at[order].set(out_sorted),
            jnp.zeros(ex_valid.shape, bool).at[order].set(first_sorted))

  return jax.vmap(one)(ids, rows, valid)


def row_grad_sq_norms(ids: jax.Array, rows: jax.Array, valid: jax.Array | None = None) -> jax.Array:
  """Per-example squared norm of a table gradient given by looked-up row gradients.

  Args:
    ids: ``[b, n]`` integer row ids of each example's lookups.
    rows: ``[b, n, d]`` gradient of each example's loss w.r.t. each looked-up row.
    valid: optional ``[b, n]`` bool; False rows are ignored.

  Returns:
    ``[b]`` float32: ``|| sum_j onehot(ids_ij) (x) rows_ij ||^2`` (duplicates summed
    first, by :func:`dedup_rows`). NaN/Inf in a valid row gives a non-finite norm.
  """
  _check_shapes(ids, rows, valid)
  b, n, d = rows.shape
  if n == 0 or d == 0:
    return jnp.zeros((b,), jnp.float32)
  summed, _ = dedup_rows(ids, rows, valid)
  return jnp.square(floats.scaled_norms(summed))


def scatter_add_rows(
    ids: jax.Array,
    rows: jax.Array,
    num_rows: int,
    valid: jax.Array | None = None,
    weights: jax.Array | None = None,
) -> jax.Array:
  """``sum_i weights_i sum_j onehot(ids_ij) (x) rows_ij`` as a float32 ``[num_rows, d]`` array.

  Args:
    ids: ``[b, n]`` integer row ids.
    rows: ``[b, n, d]`` row gradients.
    num_rows: V, the table's number of rows.
    valid: optional ``[b, n]`` bool; False rows are dropped.
    weights: optional ``[b]`` per-example factors (clip factors); examples with
      weight 0 are dropped even if their rows are not finite.

  Returns:
    ``[num_rows, d]`` float32.
  """
  _check_shapes(ids, rows, valid)
  if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
    raise ValueError(f"num_rows must be a non-negative int, got {num_rows=!r}.")
  b, n, d = rows.shape
  keep = jnp.ones(ids.shape, bool) if valid is None else valid.astype(bool)
  rows = rows.astype(jnp.float32)
  if weights is not None:
    if weights.shape != (b,):
      raise ValueError(f"weights must have shape ({b},), got weights.shape={weights.shape}.")
    w = weights.astype(jnp.float32)[:, None]
    keep = keep & (w > 0)
    rows = rows * w[..., None]
  rows = jnp.where(keep[..., None], rows, 0.0)
  # Dropped rows are sent out of range so the scatter ignores them.
  ids = jnp.where(keep, ids, num_rows)
  out = jnp.zeros((num_rows, d), jnp.float32)
  return out.at[ids.reshape(-1)].add(rows.reshape(-1, d), mode="drop")


def clamp_ids(idx: jax.Array, hi: int) -> jax.Array:
  """``clip(idx, 0, hi)`` in ``idx``'s own integer type, then int32 (a uint32 id >= 2^31 must not wrap to < 0)."""
  if jnp.issubdtype(idx.dtype, jnp.unsignedinteger):
    return jnp.minimum(idx, hi).astype(jnp.int32)
  return jnp.clip(idx, 0, hi).astype(jnp.int32)


def gather_ids(idx: jax.Array, v_rows: int, mode) -> tuple[jax.Array, jax.Array]:
  """``(ids int32, valid)`` of a row gather, with JAX's gradient semantics for out-of-range ids.

  ``clip`` clamps in the forward pass and in the gradient; ``fill`` and
  ``promise_in_bounds`` (plain ``E[ids]``) drop the row from the gradient
  (XLA's scatter skips out-of-bounds updates), whatever the forward pass read.
  Compared in ``idx``'s own type, so unsigned ids are exact.
  """
  if mode == jax.lax.GatherScatterMode.CLIP:
    return clamp_ids(idx, v_rows - 1), jnp.ones(idx.shape, bool)
  valid = idx < v_rows
  if not jnp.issubdtype(idx.dtype, jnp.unsignedinteger):
    valid = valid & (idx >= 0)
  return jnp.where(valid, idx, 0).astype(jnp.int32), valid
