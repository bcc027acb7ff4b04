"""The clipped row counts of a logical batch, chunk by chunk on the mesh, and the CTR models' row ids.

:func:`make_count_fn` is to the row counts what
:func:`dpmega.train.accumulate.make_accumulate_fn` is to the gradient: a jitted
``count(counts, batch, mask) -> counts`` that each device runs on its own rows
of a chunk (:func:`dpmega.sparse.selection.clipped_row_counts`), reduced by a
``psum`` over the mesh and added to the running counts of the logical step
(selection happens once per logical step, on the accumulated counts, in the
update). The counts are replicated: ``R`` floats per table, ``1/d`` of the table.
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


def zero_counts(table_rows: Mapping[tuple[str, ...], int], max_touched: int) -> dict[tuple[str, ...], RowCounts]:
  """Empty :class:`RowCounts` for each table (the start of a logical step)."""
  out = {}
  for t, r in table_rows.items():
    cap = min(int(max_touched), int(r))
    out[t] = RowCounts(jnp.zeros((r,), jnp.float32), jnp.full((cap,), r, jnp.int32), jnp.zeros((), jnp.int32))
  return out


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
  """A jitted ``count(counts, batch, mask) -> counts`` adding one chunk's clipped row counts.

  ``counts`` is :func:`zero_counts`'s dict of :class:`RowCounts` at the start
  of a logical step (its ``max_touched`` should be the selection's).

  Guarantee: each example's contribution to the counts, over all tables, has
  L2 norm ``<= count_clip`` whatever the chunking or the mesh (it is computed
  on the one device that holds the example); masked rows add 0.

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

  def local(batch, mask):
    counts = sel.clipped_row_counts(row_ids_fn(batch), mask, rows, count_clip)
    return tuple(jax.lax.psum(c, axes) for c in counts)

  per_device = jax.shard_map(local, mesh=mesh, in_specs=(bspec, bspec), out_specs=P(), check_vma=False)

  def step(counts, batch, mask):
    new = per_device(batch, mask)
    out = {}
    for t, r, c, ids in zip(names, rows, new, row_ids_fn(batch)):
      ids = jnp.asarray(ids, jnp.int32)
      live = (jnp.asarray(mask)[:, None] > 0) & (ids >= 0) & (ids < r)
      rc = _add_touched(counts[t], jnp.where(live, ids, r), counts[t].counts)
      out[t] = rc._replace(counts=counts[t].counts + c)
    return out

  rep, bsh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(rep, bsh, bsh), out_shardings=rep, donate_argnums=0)


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
