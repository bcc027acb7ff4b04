"""The sparse Gaussian release of one logical step: selection, then noise on the dense leaves and the selected rows.

:func:`sparse_privatize` is :func:`dpmega.noise.privatize` for a pytree with
embedding tables: from the step's one key it draws the row selection of every
table (:func:`dpmega.sparse.selection.select_rows`, noise ``σ1 C1``), then
``N(0, (σ2 C)²)`` on every coordinate of the dense leaves and on the selected
rows of the tables only -- ``K x d`` draws per table, never ``R x d`` -- and
divides by the expected batch size. ``noise_multiplier`` is the effective
``σ_eff`` that the accountant records; ``(σ1, σ2)`` come from it by the
configured split (:func:`dpmega.sparse.selection.split_noise_multiplier`).
The privacy analysis is in :mod:`dpmega.sparse.selection`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpmega import noise as noise_lib
from dpmega.sparse import counts as counts_lib
from dpmega.sparse import lazy
from dpmega.sparse import selection as sel

PyTree = Any


@dataclasses.dataclass(frozen=True)
class SparseTables:
  """Which parameter leaves are row tables with a private selection, and how it is made.

  Tables named together in ``shared`` have one selection: one count vector
  (keyed by the group's first table in the counts) and one set of selected
  rows, used by every table of the group. They must have the same rows and be
  reached by the same row ids for every example (DeepFM's ``embed`` and
  ``linear`` tables): an example's row-touch indicator then counts each of its
  rows once, not once per table, so with the same ``C1`` each row's count is
  ``sqrt(g)`` larger for a group of ``g`` tables, against the same selection
  noise. Privacy is unchanged: the counts of the selections, over all groups,
  still have L2 sensitivity ``C1`` (:func:`dpmega.sparse.clipped_row_counts`),
  and using one selection for several tables is post-processing.

  Attributes:
    tables: parameter paths of the tables (e.g. ``(("embed", "table"), ("linear", "table"))``).
    selection: the selection's values (the same for every table).
    shared: groups of two or more tables of ``tables`` that share a selection;
      every other table has its own.

  Example:
    >>> spec = SparseTables((("a",), ("b",), ("c",)), shared=((("a",), ("c",)),))
    >>> spec.groups()
    ((('a',), ('c',)), (('b',),))
  """

  tables: tuple[tuple[str, ...], ...]
  selection: sel.SelectionConfig = sel.SelectionConfig()
  shared: tuple[tuple[tuple[str, ...], ...], ...] = ()

  def __post_init__(self):
    if not self.tables:
      raise ValueError("tables must name at least one parameter path, got tables=().")
    norm = lambda t: tuple(str(k) for k in t)  # noqa: E731
    object.__setattr__(self, "tables", tuple(norm(t) for t in self.tables))
    object.__setattr__(self, "shared", tuple(tuple(norm(t) for t in g) for g in self.shared))
    seen = set()
    for g in self.shared:
      if len(g) < 2:
        raise ValueError(f"shared must group at least two tables each, got the group {g}.")
      for t in g:
        if t not in self.tables:
          raise ValueError(f"shared names {t}, which is not one of tables={self.tables}.")
        if t in seen:
          raise ValueError(f"shared names {t} in two groups; a table has one selection.")
        seen.add(t)

  def groups(self) -> tuple[tuple[tuple[str, ...], ...], ...]:
    """Every table in exactly one group, each group keyed (in the counts) by its first table; in table order."""
    out, done = [], set()
    for t in self.tables:
      if t in done:
        continue
      g = next((g for g in self.shared if t in g), (t,))
      g = tuple(x for x in self.tables if x in g)  # in table order: the first is the counts' key
      out.append(g)
      done.update(g)
    return tuple(out)

  def selection_rows(self, table_rows: Mapping[tuple[str, ...], int]) -> dict[tuple[str, ...], int]:
    """The rows of each selection's counts, keyed as the counts are (the first table of each of :meth:`groups`).

    Example:
      >>> SparseTables((("a",), ("b",)), shared=((("a",), ("b",)),)).selection_rows({("a",): 8, ("b",): 8})
      {('a',): 8}
    """
    return {g[0]: table_rows[g[0]] for g in self.groups()}


def _leaf_shapes(tree: PyTree) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Each leaf's shape, by its path (:func:`dpmega.sparse.lazy.key_path`)."""
  return {lazy.key_path(p): jnp.shape(x) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


class SparseRelease(NamedTuple):
  """The step's release: noisy mean gradient (tables as selected rows) and the selection of each table."""

  grads: PyTree
  rows: dict
  num_selected: dict


def sparse_privatize(grad_sum: PyTree, counts: Mapping[tuple[str, ...], Any], key: jax.Array, *,
                     spec: SparseTables, noise_multiplier, clip_norm, expected_batch_size,
                     sampler: noise_lib.NoiseSampler | str = noise_lib.NoiseSampler.WIDE_TAIL) -> SparseRelease:
  """Selection with ``σ1``, then the noisy mean with ``σ2`` on dense leaves and selected rows (module docstring).

  Args:
    grad_sum: the clipped sum over the whole logical batch (L2 sensitivity ``clip_norm``).
    counts: per selection (keyed by the first table of each of ``spec.groups()``), the
      :class:`dpmega.sparse.counts.RowCounts` of the same batch.
    key: the step's noise key (used once).
    spec: the tables and the selection's values.
    noise_multiplier: ``σ_eff`` (what the accountant records), >= 0.
    clip_norm: C.
    expected_batch_size: B, the public denominator.
    sampler: the Gaussian sampler of the gradient noise.

  Returns:
    :class:`SparseRelease`; its ``grads`` holds ``[K, ...]`` at each table leaf
    (zero at invalid slots), ``rows[path] = (ids, valid)``.
  """
  noise_lib.validate_noise_multiplier(noise_multiplier)
  noise_lib.validate_expected_batch_size(expected_batch_size)
  cfg = spec.selection
  sigma = jnp.asarray(noise_multiplier, jnp.float32)
  sigma1, sigma2 = sel.split_noise_multiplier(sigma, cfg.selection_fraction)
  k_sel, k_grad = jax.random.split(key)
  flat, treedef = jax.tree_util.tree_flatten_with_path(grad_sum)
  paths = [lazy.key_path(p) for p, _ in flat]
  missing = [t for t in spec.tables if t not in paths]
  if missing:
    raise ValueError(f"spec.tables names tables that are not parameters: {missing}; parameters: {paths}.")
  groups = spec.groups()
  keys = [g[0] for g in groups]
  if set(counts) != set(keys):
    raise ValueError(f"counts must be keyed by the first table of each selection {keys}, got "
                     f"{sorted(counts)}.")
  shapes = _leaf_shapes(grad_sum)
  for g in groups:
    rc = counts[g[0]]
    if isinstance(rc, counts_lib.TouchedRowCounts):  # compact: the rows are the table's
      if rc.counts.shape != rc.touched.shape:
        raise ValueError(f"compact counts must have counts and touched of one shape, got {rc.counts.shape} and "
                         f"{rc.touched.shape}.")
      r = shapes[g[0]][0] if shapes[g[0]] else 0
    else:
      r = rc.counts.shape[0]
    bad = [t for t in g if not shapes[t] or shapes[t][0] != r]
    if bad:
      raise ValueError(f"tables {bad} have not the {r} rows of their selection's counts "
                       f"(keyed {g[0]}); shapes: { {t: shapes[t] for t in g} }.")
  sel_keys = jax.random.split(k_sel, len(groups))
  rows, num_selected = {}, {}
  for g, k in zip(groups, sel_keys):
    rc = counts[g[0]]
    kw = dict(noise_std=sigma1 * cfg.count_clip, threshold=cfg.absolute_threshold(sigma1), max_rows=cfg.max_rows)
    if isinstance(rc, counts_lib.TouchedRowCounts):
      s = sel.select_touched_rows(rc.counts, rc.touched, k, rows=shapes[g[0]][0], **kw)
    else:
      s = sel.select_rows(rc.counts, k, max_touched=cfg.max_touched, touched=rc.touched,
                          num_touched=rc.num_touched, **kw)
    for t in g:  # one selection for the group: post-processing of its one noisy count vector
      rows[t], num_selected[t] = (s.ids, s.valid), s.num_selected
  draw = noise_lib.gaussian_noise_like
  leaf_keys = jax.random.split(k_grad, max(len(flat), 1))
  std = sigma2 * jnp.asarray(clip_norm, jnp.float32)
  denom = jnp.asarray(expected_batch_size, jnp.float32)
  out = []
  for (_, g), path, k in zip(flat, paths, leaf_keys):
    g = jnp.asarray(g, jnp.float32)
    if path in rows:
      ids, valid = rows[path]
      g = g.at[ids].get(mode="fill", fill_value=0.0)
      g = g + draw(g, k, std, sampler=sampler)
      g = jnp.where(valid.reshape(valid.shape + (1,) * (g.ndim - 1)), g, 0.0)
    else:
      g = g + draw(g, k, std, sampler=sampler)
    out.append(g / denom)
  return SparseRelease(jax.tree_util.tree_unflatten(treedef, out), rows, num_selected)


def sparse_step(optimizer: optax.GradientTransformation, spec: SparseTables, params: PyTree, opt_state: PyTree,
                grad_sum: PyTree, counts: Mapping[tuple[str, ...], Any], key: jax.Array, *, noise_multiplier,
                clip_norm, expected_batch_size, sampler: noise_lib.NoiseSampler | str = noise_lib.NoiseSampler.WIDE_TAIL
                ) -> tuple[PyTree, PyTree, dict[str, jax.Array]]:
  """:func:`sparse_privatize`, then ``optimizer`` lazily on it: ``(params, opt_state, metrics)``.

  ``optimizer`` gets the extra argument ``noise_std`` = ``σ2 C / B`` (the
  gradient noise of the mean). Metrics (functions of the release only):
  ``noisy_grad_norm``, ``update_norm``, ``params_finite`` (of what changed:
  rows not selected keep their values), ``selected_rows`` (kept, all
  tables), ``update_sparsity`` (kept / table rows), ``selection_cap_hit``
  (1.0 when a table selected more than ``max_rows``), ``selection_sigma``
  (σ1) and ``gradient_sigma`` (σ2).
  """
  release = sparse_privatize(grad_sum, counts, key, spec=spec, noise_multiplier=noise_multiplier,
                             clip_norm=clip_norm, expected_batch_size=expected_batch_size, sampler=sampler)
  sigma1, sigma2 = sel.split_noise_multiplier(noise_multiplier, spec.selection.selection_fraction)
  params, opt_state, updates = lazy.lazy_update(optimizer, params, opt_state, release.grads, release.rows,
                                                noise_std=sigma2 * clip_norm / expected_batch_size)
  finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(updates)]
  kept = sum(jnp.sum(v, dtype=jnp.int32) for _, v in release.rows.values())
  shapes = _leaf_shapes(params)
  total_rows = sum(shapes[g[0]][0] * len(g) for g in spec.groups())  # every table's rows
  cap = spec.selection.max_rows
  metrics = {"noisy_grad_norm": optax.tree.norm(release.grads), "update_norm": optax.tree.norm(updates),
             "params_finite": jnp.all(jnp.stack(finite)).astype(jnp.float32),
             "selected_rows": kept.astype(jnp.float32), "update_sparsity": kept / total_rows,
             "selection_cap_hit": jnp.any(jnp.stack([n > cap for n in release.num_selected.values()])
                                          ).astype(jnp.float32),
             "selection_sigma": sigma1, "gradient_sigma": sigma2}
  return params, opt_state, metrics
