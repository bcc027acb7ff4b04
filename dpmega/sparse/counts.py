"""The clipped row counts of a logical batch, chunk by chunk on the mesh, and the CTR models' row ids.

:func:`make_count_fn` is to the row counts what
:func:`dpmega.train.accumulate.make_accumulate_fn` is to the gradient: a jitted
``count(counts, batch, mask) -> counts`` that each device runs on its own rows
of a chunk (:func:`dpmega.sparse.selection.clipped_row_counts`), reduced by a
``psum`` over the mesh and added to the running counts of the logical step
(selection happens once per logical step, on the accumulated counts, in the
update). The counts are replicated, in one of two layouts (:func:`zero_counts`):

* **compact** (:class:`TouchedRowCounts`, when ``max_touched < R``): the
  touched rows and their counts only, ``T = max_touched`` of each, merged
  chunk by chunk (a sort of the chunk's ``b n`` ids and binary searches): no
  ``R``-sized buffer at all, so a step's memory does not grow with the table;
* **dense** (:class:`RowCounts`): ``R`` floats per table (``1/d`` of the
  table) and a list of the touched rows.

A compact table whose touched rows would exceed ``T`` is turned dense before
the chunk that would overflow it (:func:`to_dense`): no row is ever dropped,
so the counts, and the selection's law, are the same in both layouts. Which
layout a step ends in depends on its number of touched rows, which only the
running time shows (as the selection's branch, :mod:`dpmega.sparse.selection`).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from dpmega import sharding
from dpmega.sparse import selection as sel

PyTree = Any
RowIdsFn = Callable[[PyTree], Sequence[jax.Array]]


class RowCounts(NamedTuple):
  """A table's running counts over a logical step, and the rows they touch (so selection needs no O(R) scan).

  Attributes:
    counts: ``[R]`` float32 clipped row counts.
    touched: ``[T]`` int32 the rows with a positive count, in arrival order, padded with ``R``
      (the first ``T`` only when more are touched).
    num_touched: int32, the number of rows with a positive count (may exceed ``T``).
  """

  counts: jax.Array
  touched: jax.Array
  num_touched: jax.Array


class TouchedRowCounts(NamedTuple):
  """A table's running counts over a logical step, for its touched rows only (the compact layout).

  Attributes:
    counts: ``[T]`` float32, the clipped count of ``touched[j]`` (0 at padding).
    touched: ``[T]`` int32 the distinct rows with a positive count, ascending, padded with ``R``.
    num_touched: int32, their number (``<= T``: :func:`make_count_fn` turns a table dense rather than drop one).
  """

  counts: jax.Array
  touched: jax.Array
  num_touched: jax.Array


def zero_counts(table_rows: Mapping[tuple[str, ...], int], max_touched: int, *,
                compact: bool | None = None) -> dict[tuple[str, ...], RowCounts | TouchedRowCounts]:
  """Empty counts for each table (the start of a logical step).

  ``compact``: :class:`TouchedRowCounts` of ``T = max_touched`` rows (no ``[R]`` vector); False:
  :class:`RowCounts`; None (default): compact for the tables with ``max_touched < R``.

  Example:
    >>> c = zero_counts({("a",): 10, ("b",): 4}, 6)
    >>> type(c[("a",)]).__name__, c[("a",)].counts.shape, type(c[("b",)]).__name__, c[("b",)].counts.shape
    ('TouchedRowCounts', (6,), 'RowCounts', (4,))
  """
  out = {}
  for t, r in table_rows.items():
    cap = min(int(max_touched), int(r))
    touched, num = jnp.full((cap,), r, jnp.int32), jnp.zeros((), jnp.int32)
    if (cap < r) if compact is None else compact:
      out[t] = TouchedRowCounts(jnp.zeros((cap,), jnp.float32), touched, num)
    else:
      out[t] = RowCounts(jnp.zeros((r,), jnp.float32), touched, num)
  return out


def to_dense(counts: TouchedRowCounts, rows: int) -> RowCounts:
  """The same counts as :class:`RowCounts` (``[R]`` counts; the touched list keeps its ``T`` slots).

  Example:
    >>> import jax.numpy as jnp
    >>> d = to_dense(TouchedRowCounts(jnp.array([0.5, 2.0, 0.0]), jnp.array([1, 3, 4]), jnp.int32(2)), 4)
    >>> d.counts.tolist(), d.touched.tolist(), int(d.num_touched)
    ([0.0, 0.5, 0.0, 2.0], [1, 3, 4], 2)
  """
  dense = jnp.zeros((rows,), jnp.float32).at[counts.touched].set(counts.counts, mode="drop")
  return RowCounts(dense, counts.touched, counts.num_touched)


def _merge_touched(tc: TouchedRowCounts, ids: jax.Array, vals: jax.Array, rows: int) -> TouchedRowCounts:
  """Adds a chunk's ``(ids, vals)`` (:func:`dpmega.sparse.selection.clipped_row_touches`) to compact counts.

  One sort of the chunk's ``m = b n`` ids and binary searches: the chunk's distinct rows ``u`` and their sums,
  then a merge of two ascending lists (a running row ``j`` moves up by the new rows below it; a new row lands
  after the running rows below it). ``num_touched`` of the result is the true number of distinct rows; when it
  exceeds ``T`` the rows beyond were dropped from ``touched`` and the caller must not use the result
  (:func:`make_count_fn` does not).
  """
  t, m = tc.touched.shape[0], ids.shape[0]
  s = jnp.sort(ids)
  first = jnp.concatenate([jnp.ones((1,), bool), s[1:] != s[:-1]]) & (s < rows)
  u = jnp.full((m,), rows, jnp.int32).at[jnp.where(first, jnp.cumsum(first) - 1, m)].set(s, mode="drop")
  uc = jnp.zeros((m,), jnp.float32).at[jnp.searchsorted(u, ids)].add(vals, mode="drop")  # ids = rows add 0
  real_u = u < rows
  at = jnp.searchsorted(tc.touched, u).astype(jnp.int32)  # running rows below u_i
  hit = real_u & (tc.touched.at[at].get(mode="fill", fill_value=rows) == u)
  counts = tc.counts.at[jnp.where(hit, at, t)].add(uc, mode="drop")
  new = real_u & ~hit
  run_hit = jnp.zeros((t,), jnp.int32).at[jnp.where(hit, at, t)].set(1, mode="drop")
  below = jnp.searchsorted(u, tc.touched).astype(jnp.int32) - (jnp.cumsum(run_hit) - run_hit)  # new rows below j
  run_pos = jnp.where(tc.touched < rows, jnp.arange(t, dtype=jnp.int32) + below, t)
  new_pos = jnp.where(new, jnp.cumsum(new, dtype=jnp.int32) - 1 + at, t)
  touched = (jnp.full((t,), rows, jnp.int32).at[run_pos].set(tc.touched, mode="drop")
             .at[new_pos].set(u, mode="drop"))
  out = jnp.zeros((t,), jnp.float32).at[run_pos].set(counts, mode="drop").at[new_pos].set(uc, mode="drop")
  return TouchedRowCounts(out, touched, tc.num_touched + jnp.sum(new, dtype=jnp.int32))


def _add_touched(rc: RowCounts, ids: jax.Array, before: jax.Array) -> RowCounts:
  """Appends the distinct rows of ``ids`` (``R`` = none) whose count was 0 before this chunk."""
  rows = before.shape[0]
  s = jnp.sort(ids.reshape(-1))
  first = jnp.concatenate([jnp.ones((1,), bool), s[1:] != s[:-1]]) & (s < rows)
  new = first & (before.at[s].get(mode="fill", fill_value=1.0) == 0)
  pos = jnp.where(new, rc.num_touched + jnp.cumsum(new) - 1, rc.touched.shape[0])
  touched = rc.touched.at[pos].set(s, mode="drop")
  return RowCounts(rc.counts, touched, rc.num_touched + jnp.sum(new, dtype=jnp.int32))


def make_count_fn(row_ids_fn: RowIdsFn, table_rows: Mapping[tuple[str, ...], int], mesh: Mesh, *,
                  count_clip: float) -> Callable[..., dict]:
  """A ``count(counts, batch, mask) -> counts`` adding one chunk's clipped row counts.

  ``counts`` is :func:`zero_counts`'s dict at the start of a logical step (its
  ``max_touched`` should be the selection's); each table keeps its layout
  (module docstring), except that a compact table that would hold more than
  ``T`` touched rows is turned dense (:func:`to_dense`) and the chunk counted
  again: no row is dropped.

  Guarantee: each example's contribution to the counts, over all tables, has
  L2 norm ``<= count_clip`` whatever the chunking, the mesh or the layout (it
  is computed on the one device that holds the example); masked rows add 0.

  Args:
    row_ids_fn: ``batch -> [ids_t for t in table_rows]``, ``ids_t`` ``[b, n_t]``
      int: the rows of table ``t`` each example reaches (e.g. :func:`ctr_row_ids`).
    table_rows: rows of each table, by parameter path, in ``row_ids_fn``'s order.
    mesh: the run's mesh.
    count_clip: C1 > 0.
  """
  names = tuple(table_rows)
  rows = tuple(int(table_rows[t]) for t in names)
  axes = sharding.batch_axes(mesh)
  bspec = P(axes)

  def step(counts, batch, mask):
    compact = tuple(isinstance(counts[t], TouchedRowCounts) for t in names)

    def local(batch, mask):  # dense tables: the chunk's [R] counts, summed; compact: every device's touches
      ids = row_ids_fn(batch)
      touches = sel.clipped_row_touches(ids, mask, rows, count_clip)
      out = []
      for (i, v), r, c in zip(touches, rows, compact):
        if c:
          out.append((jax.lax.all_gather(i, axes, tiled=True), jax.lax.all_gather(v, axes, tiled=True)))
        else:
          out.append(jax.lax.psum(jnp.zeros((r,), jnp.float32).at[i].add(v, mode="drop"), axes))
      return tuple(out)

    new = jax.shard_map(local, mesh=mesh, in_specs=(bspec, bspec), out_specs=P(), check_vma=False)(batch, mask)
    out = {}
    for t, r, c, n, ids in zip(names, rows, compact, new, row_ids_fn(batch)):
      if c:
        out[t] = _merge_touched(counts[t], n[0], n[1], r)
        continue
      ids = jnp.asarray(ids, jnp.int32)
      live = (jnp.asarray(mask)[:, None] > 0) & (ids >= 0) & (ids < r)
      rc = _add_touched(counts[t], jnp.where(live, ids, r), counts[t].counts)
      out[t] = rc._replace(counts=counts[t].counts + n)
    return out

  rep, bsh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  donating = jax.jit(step, in_shardings=(rep, bsh, bsh), out_shardings=rep, donate_argnums=0)
  keeping = jax.jit(step, in_shardings=(rep, bsh, bsh), out_shardings=rep)  # compact: the input may be needed again
  densify = jax.jit(to_dense, static_argnums=1, out_shardings=rep)

  def count(counts, batch, mask):
    if not any(isinstance(counts[t], TouchedRowCounts) for t in names):
      return donating(counts, batch, mask)
    out = keeping(counts, batch, mask)
    full = [t for t in names if isinstance(out[t], TouchedRowCounts)
            and int(out[t].num_touched) > out[t].touched.shape[0]]
    if not full:
      return out
    counts = {**counts, **{t: densify(counts[t], table_rows[t]) for t in full}}
    return count(counts, batch, mask)

  count.compact_jitted = keeping  # for inspection (tests lower it): the step without donation
  return count


def ctr_row_ids(buckets: Sequence[int], tables: Sequence[tuple[str, ...]] = (
    ("embed", "table", "embedding"), ("linear", "table", "embedding"))) -> RowIdsFn:
  """Row ids of :class:`dpmega.models.ctr.GroupedEmbed` tables of one width: ``sparse[:, f] + offset_f``.

  Example:
    >>> import numpy as np
    >>> ids = ctr_row_ids([3, 5], tables=[("embed", "table", "embedding")])({"sparse": np.array([[2, 4]])})
    >>> ids[0].tolist()
    [[2, 7]]
  """
  offsets = np.cumsum([0] + list(buckets[:-1])).astype(np.int32)

  def row_ids(batch):
    ids = jnp.asarray(batch["sparse"], jnp.int32) + offsets
    return [ids] * len(tables)

  return row_ids
