"""Lazy optimizer updates: an optax transformation applied to the selected rows of each table only.

:func:`lazy_update` runs any *elementwise* optax transformation (sgd,
sgd + momentum, adam, adamw, adagrad, rmsprop...) on a view of the
parameters in which each table is replaced by its selected rows: the rows'
parameters and their optimizer state (every state leaf that mirrors the table:
``mu``, ``nu``, ``trace``, ``sum_of_squares``...) are gathered, updated, and
written back; rows not selected keep their parameters and state bit for bit
(lazy Adam / Adagrad semantics), so a row that no step selects cannot
random-walk on noise. Scalar state (Adam's ``count``) advances every step, as
in TF's ``LazyAdam``. The state is the inner transformation's own state over
the full parameters, so ``inner.init`` makes it and a checkpoint of a dense
run has the same shapes. Work and memory scale with the selected rows (the
table is updated in place when the caller donates it).

.. warning::
   Only elementwise transformations give lazy semantics. One that mixes
   coordinates (global-norm clipping, LAMB's per-layer trust ratio,
   Adafactor's factored moments) would see only the gathered rows and compute
   something else.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax

PyTree = Any
Path = tuple[str, ...]


def key_path(path) -> Path:
  """A pytree key path as a tuple of names (``("embed", "table")``)."""
  out = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        out.append(str(getattr(k, attr)))
        break
    else:
      out.append(str(k))
  return tuple(out)


def _table_of(path: Path, shape, tables: Mapping[Path, tuple]) -> Path | None:
  """The table whose shape ``shape`` is and whose path ends ``path`` (optax states mirror the params)."""
  for t, t_shape in tables.items():
    if tuple(shape) == tuple(t_shape) and path[len(path) - len(t):] == t:
      return t
  return None


def lazy_update(inner: optax.GradientTransformation, params: PyTree, opt_state: PyTree, grads: PyTree,
                rows: Mapping[Path, tuple[jax.Array, jax.Array]], **extra_args) -> tuple[PyTree, PyTree, PyTree]:
  """One lazy step: ``inner`` on the dense leaves and on the selected rows of each table.

  Args:
    inner: an elementwise optax transformation; ``opt_state`` is its state over ``params``.
    params: the full parameters.
    opt_state: ``inner``'s state over ``params``.
    grads: like ``params``, except that each table leaf is its selected rows'
      gradients ``[K, ...]`` (any value at invalid slots).
    rows: per table path, ``(ids[K], valid[K])``: distinct row ids where
      valid; invalid slots are ignored (ids out of range, e.g. R, recommended).
    **extra_args: passed to ``inner.update`` (an ``optax.GradientTransformationExtraArgs``).

  Returns:
    ``(params, opt_state, updates)``, ``updates`` shaped like ``grads``
    (zero at invalid slots).

  Example:
    >>> import jax.numpy as jnp, optax
    >>> p = {"t": jnp.zeros((4, 1)), "b": jnp.zeros(1)}
    >>> opt = optax.adam(0.1)
    >>> g = {"t": jnp.array([[1.0], [9.0]]), "b": jnp.ones(1)}
    >>> p2, s2, _ = lazy_update(opt, p, opt.init(p), g, {("t",): (jnp.array([2, 4]), jnp.array([True, False]))})
    >>> [round(float(x), 3) for x in p2["t"][:, 0]], round(float(p2["b"][0]), 3)  # row 2 moved; 0, 1, 3 untouched
    ([0.0, 0.0, -0.1, 0.0], -0.1)
  """
  flat_p, _ = jax.tree_util.tree_flatten_with_path(params)
  shapes = {key_path(p): jnp.shape(x) for p, x in flat_p}
  missing = [t for t in rows if t not in shapes]
  if missing:
    raise ValueError(f"rows names tables that are not parameters: {missing}; parameters: {sorted(shapes)}.")
  tables = {t: shapes[t] for t in rows}

  def gather(path, x):
    t = _table_of(key_path(path), jnp.shape(x), tables)
    return x if t is None else x.at[rows[t][0]].get(mode="fill", fill_value=0)

  params_rows = jax.tree_util.tree_map_with_path(gather, params)
  state_rows = jax.tree_util.tree_map_with_path(gather, opt_state)
  grads = jax.tree_util.tree_map_with_path(
      lambda path, g: jnp.where(_valid(rows, key_path(path), g), g, 0), grads)
  updates, new_state_rows = inner.update(grads, state_rows, params_rows, **extra_args)
  updates = jax.tree_util.tree_map_with_path(lambda path, u: jnp.where(_valid(rows, key_path(path), u), u, 0),
                                             updates)

  def put(path, full, part, add):
    t = _table_of(key_path(path), jnp.shape(full), tables)
    if t is None:
      return full + part if add else part
    ids, valid = rows[t]
    ids = jnp.where(valid, ids, full.shape[0])  # invalid slots dropped
    return full.at[ids].add(part, mode="drop") if add else full.at[ids].set(part, mode="drop")

  new_params = jax.tree_util.tree_map_with_path(lambda path, x, u: put(path, x, u.astype(x.dtype), True),
                                                params, updates)
  new_state = jax.tree_util.tree_map_with_path(lambda path, x, s: put(path, x, s, False), opt_state, new_state_rows)
  return new_params, new_state, updates


def _valid(rows, path: Path, x) -> jax.Array | bool:
  """The ``valid`` mask of table ``path`` broadcast to ``x``, or True for a dense leaf."""
  if path not in rows:
    return True
  valid = rows[path][1]
  return valid.reshape(valid.shape + (1,) * (jnp.ndim(x) - 1))
