"""Private row selection for embedding tables: clipped row-touch counts, noise, a threshold, a static cap.

One logical step of sparsity-preserving DP-SGD (Ghazi et al. 2023, DP-AdaFEST)
releases two things computed from the same Poisson-sampled batch:

1. **Selection.** Each example's row-touch indicator over every table (a row
   its ids reach, duplicate ids counted once; tables that share a selection,
   :class:`dpmega.sparse.SparseTables` ``shared``, are one count vector and
   count each row once) is scaled to L2 norm at most
   ``C1`` (:func:`clipped_row_counts`); the sum over the batch gets
   ``N(0, (σ1 C1)²)`` per row, and a row is selected when its noisy count
   is ``> τ`` (:func:`select_rows`).
2. **Gradient.** The clipped gradient sum (L2 sensitivity ``C`` over all
   parameters, as today) gets ``N(0, (σ2 C)²)`` on the dense leaves and on the
   selected rows of the tables only (:mod:`dpmega.sparse.noisy_update`).

Guarantee (accounting): scaled to unit noise, the pair (counts / (σ1 C1),
gradient / (σ2 C)) is a Gaussian mechanism whose L2 sensitivity under
add/remove-one is at most ``sqrt(σ1⁻² + σ2⁻²)``, so the step is exactly ONE
Gaussian mechanism with noise multiplier
``σ_eff = (σ1⁻² + σ2⁻²)^(-1/2)`` (:func:`effective_noise_multiplier`) on
the same Poisson sample; the accountant is fed ``σ_eff``. Releasing the noisy
gradient on the selected rows only, and any choice among the selected rows
made from the released selection alone (the cap below), is post-processing
of the full noisy gradient and the noisy counts. Under replace-one both
sensitivities double, which the accountant's sensitivity 2 covers. This is
the analysis of Ghazi et al. 2023 (Section 3, Theorem 3.1: the two Gaussian
mechanisms compose as one) and of Andrew et al. 2021 for the clipped count
(:func:`dpmega.train.step.effective_noise_multiplier` does the same).

Calibration split (:func:`split_noise_multiplier`): calibrate ``σ_eff`` to the
target ε over the schedule as for dense DP-SGD, then give a fixed fraction
``f`` of the noise budget ``σ_eff⁻²`` to selection:
``σ1 = σ_eff / sqrt(f)``, ``σ2 = σ_eff / sqrt(1 - f)``.

Zero-count rows without a draw per row (the fast branch of
:func:`select_rows`): a row no example touched has noisy count
``N(0, (σ1 C1)²)``, independently of every other row, and is selected with
probability ``p = P(N(0, 1) > τ / (σ1 C1))``. The selected zero rows are an
i.i.d. Bernoulli(p) subset of the ``n0 = R - nnz`` zero rows, so their
number is ``Binomial(n0, p)`` and, given the number ``m``, the subset is
uniform among the m-subsets (every m-subset has probability ``p^m (1-p)^(n0-m)``).
We draw the number, then a uniform m-subset of ranks in ``[0, n0)`` (rejection
of repeats, a procedure that only tests equality and so has a
permutation-invariant, hence uniform, result) mapped to row ids through the
sorted touched rows: the same law as a draw per row, in
O(touched + K log K) work. :func:`select_touched_rows` does this from the
touched rows' counts alone (the compact counts of :mod:`dpmega.sparse.counts`:
no ``[R]`` vector anywhere). :func:`select_rows` computes the dense, per-row
version instead when more than ``max_touched`` rows are touched (the same
law again; tests compare the two, and the two layouts of the counts).

The static cap ``K`` (``max_rows``): at most ``K`` rows per table are kept.
When more are selected, a uniformly random ``K``-subset of the selected rows
is kept (uniform priorities; the zero rows' ``K`` smallest priorities are
order statistics, ``S_j / (S_m + Gamma(M + 1 - m))`` with ``S`` partial sums of
exponentials). That choice uses only the selection and fresh randomness:
post-processing, privacy holds. ``num_selected`` (released) says when the
cap binds.

.. warning::
   Whether the fast or the dense branch runs (and whether the counts stay
   compact) depends on the number of touched rows, which is private; only the
   running time and memory show it (not the outputs, which have the same law).
   If timing is observable by the adversary, set ``max_touched`` at least to
   the rows a step can touch.

References:
  Ghazi, Huang, Kamath, Kumar, Manurangsi, Sinha, Zhang 2023, "Sparsity-Preserving
  Differentially Private Training of Large Embedding Models", NeurIPS.
  https://arxiv.org/abs/2311.08357
  Andrew, Thakkar, McMahan, Ramaswamy 2021, "Differentially Private Learning with
  Adaptive Clipping", NeurIPS. https://arxiv.org/abs/2103.03373
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from dpmega import threefry
from dpmega.validation import check_int, check_real

# The scale factor is rounded down by this much so that w * sqrt(n) <= C1 in float32 whatever the rounding.
_SAFETY = 1.0 - 2.0 ** -20


@dataclasses.dataclass(frozen=True)
class SelectionConfig:
  """The row selection of one table (or of all tables, the same values).

  Attributes:
    count_clip: C1, the L2 bound of each example's row-touch indicator (> 0).
    threshold: τ, a row is selected when its noisy clipped count is ``> τ``.
    selection_fraction: f in (0, 1), the share of the noise budget ``σ_eff⁻²``
      given to selection (:func:`split_noise_multiplier`).
    max_rows: K, static: rows kept per table and step at most (>= 1).
    max_touched: static: touched rows handled by the fast branch, and the
      size T of the compact counts (:func:`dpmega.sparse.zero_counts`) (>= 1);
      above it the counts turn dense and the step draws one noisy count per
      row of the table.
    threshold_in_noise_sd: ``threshold`` is in units of the selection noise's
      standard deviation: ``τ = threshold · σ1 · C1`` (so the chance that an
      untouched row passes, ``P(N(0, 1) > threshold)``, does not depend on σ);
      False: ``τ = threshold``, in count units.
  """

  count_clip: float = 1.0
  threshold: float = 1.0
  selection_fraction: float = 0.5
  max_rows: int = 4096
  max_touched: int = 8192
  threshold_in_noise_sd: bool = False

  def __post_init__(self):
    check_real("count_clip", self.count_clip, 0.0, lo_open=True)
    check_real("threshold", self.threshold, -math.inf)
    check_real("selection_fraction", self.selection_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
    check_int("max_rows", self.max_rows, 1)
    check_int("max_touched", self.max_touched, 1)
    if not isinstance(self.threshold_in_noise_sd, bool):
      raise ValueError(f"threshold_in_noise_sd must be True or False, got {self.threshold_in_noise_sd!r}.")

  def absolute_threshold(self, selection_noise):
    """τ in count units at selection noise multiplier ``σ1`` (a float or a traced scalar).

    Example:
      >>> SelectionConfig(count_clip=2.0, threshold=3.0, threshold_in_noise_sd=True).absolute_threshold(0.5)
      3.0
    """
    return self.threshold * selection_noise * self.count_clip if self.threshold_in_noise_sd else self.threshold


def effective_noise_multiplier(selection_noise: float, gradient_noise: float) -> float:
  """``(σ1⁻² + σ2⁻²)^(-1/2)``: the one Gaussian mechanism that selection + gradient are (module docstring).

  Example:
    >>> round(effective_noise_multiplier(2.0, 2.0), 6)
    1.414214
  """
  if selection_noise == 0 or gradient_noise == 0:
    return 0.0
  return float((selection_noise ** -2 + gradient_noise ** -2) ** -0.5)


def split_noise_multiplier(noise_multiplier, selection_fraction: float):
  """``(σ1, σ2) = (σ_eff / sqrt(f), σ_eff / sqrt(1 - f))``: inverse of :func:`effective_noise_multiplier`.

  Works on floats and traced values. ``σ_eff = 0`` (no noise) gives ``(0, 0)``.

  Example:
    >>> [round(s, 6) for s in split_noise_multiplier(1.0, 0.2)]
    [2.236068, 1.118034]
  """
  return noise_multiplier / math.sqrt(selection_fraction), noise_multiplier / math.sqrt(1.0 - selection_fraction)


def clipped_row_counts(ids: Sequence[jax.Array], mask: jax.Array, table_rows: Sequence[int],
                       count_clip: float) -> tuple[jax.Array, ...]:
  """Sum over the batch of each example's de-duplicated row-touch indicator, scaled to L2 norm <= ``count_clip``.

  Guarantee: example ``i`` adds ``w_i`` to each distinct in-range row its ids
  reach, over all tables, and nothing else, with
  ``w_i = mask_i min(1, C1 / sqrt(n_i))`` (``n_i`` its number of distinct
  rows): its contribution has L2 norm ``<= C1`` in float32. Ids out of
  ``[0, rows)`` touch nothing; masked examples add exactly 0.

  Args:
    ids: one ``[b, n_t]`` int array per table: the rows example i reaches.
    mask: ``[b]``, 1 for real examples, 0 for padding.
    table_rows: rows of each table.
    count_clip: C1 > 0.

  Returns:
    One ``[rows_t]`` float32 count vector per table.

  Example:
    >>> import jax.numpy as jnp
    >>> c, = clipped_row_counts([jnp.array([[2, 2, 0], [1, 1, 1]])], jnp.ones(2), [3], 1.0)
    >>> [round(float(x), 4) for x in c]  # example 0: rows {0, 2}, each 1/sqrt(2); example 1: row 1 once
    [0.7071, 1.0, 0.7071]
  """
  out = []
  for (s, vals), rows in zip(_touch_weights(ids, mask, table_rows, count_clip), table_rows):
    out.append(jnp.zeros((rows,), jnp.float32).at[s.reshape(-1)].add(vals.reshape(-1), mode="drop"))
  return tuple(out)


def clipped_row_touches(ids: Sequence[jax.Array], mask: jax.Array, table_rows: Sequence[int],
                        count_clip: float) -> tuple[tuple[jax.Array, jax.Array], ...]:
  """:func:`clipped_row_counts` before the sum: each example's weighted distinct rows, ``O(b n)``, not ``O(R)``.

  Summing ``vals`` by ``ids`` (ids ``rows`` touch nothing) gives :func:`clipped_row_counts` exactly.

  Returns:
    Per table ``(ids [b * n_t] int32, vals [b * n_t] float32)``: ``vals > 0`` exactly at the first occurrence
    of each distinct in-range row of a live example (its weight ``w_i``); elsewhere ``vals = 0`` and
    ``ids = rows``.

  Example:
    >>> import jax.numpy as jnp
    >>> (i, v), = clipped_row_touches([jnp.array([[2, 2, 0], [1, 1, 1]])], jnp.ones(2), [3], 1.0)
    >>> i.tolist(), [round(float(x), 4) for x in v]
    ([0, 2, 3, 1, 3, 3], [0.7071, 0.7071, 0.0, 1.0, 0.0, 0.0])
  """
  out = []
  for (s, vals), rows in zip(_touch_weights(ids, mask, table_rows, count_clip), table_rows):
    live = vals > 0
    out.append((jnp.where(live, s, rows).reshape(-1), jnp.where(live, vals, 0.0).reshape(-1)))
  return tuple(out)


def _touch_weights(ids, mask, table_rows, count_clip):
  """Per table ``(s, vals)``, ``[b, n_t]``: each example's ids sorted, ``w_i`` at its distinct in-range rows."""
  check_real("count_clip", count_clip, 0.0, lo_open=True)
  firsts = []
  for x, rows in zip(ids, table_rows):
    x = jnp.asarray(x, jnp.int32)
    s = jnp.sort(x, axis=-1)
    first = jnp.concatenate([jnp.ones_like(s[:, :1], bool), s[:, 1:] != s[:, :-1]], axis=-1)
    firsts.append((s, first & (s >= 0) & (s < rows)))
  n = sum(jnp.sum(f, axis=-1, dtype=jnp.float32) for _, f in firsts)
  scale = jnp.where(n > 0, jnp.minimum(1.0, count_clip * lax.rsqrt(jnp.maximum(n, 1.0))) * _SAFETY, 0.0)
  w = jnp.asarray(mask, jnp.float32) * scale
  return [(s, jnp.where(first, w[:, None], 0.0)) for s, first in firsts]


class Selection(NamedTuple):
  """The rows kept for one table: ``ids[K]``, distinct where ``valid``, then padding ``rows`` (= R)."""

  ids: jax.Array
  valid: jax.Array
  num_selected: jax.Array  # rows whose noisy count passed tau, before the cap (released)


def _keep_k(ids: jax.Array, priority: jax.Array, k: int, rows: int) -> tuple[jax.Array, jax.Array]:
  """The ``k`` entries of smallest finite priority (all finite ones when at most ``k``), padded with ``rows``.

  The branch taken depends on the number selected only, which is released.
  """
  keep = jnp.isfinite(priority)

  def compact():  # O(n): no sort when the cap does not bind
    pos = jnp.where(keep, jnp.cumsum(keep) - 1, k)
    return jnp.full((k,), rows, jnp.int32).at[pos].set(ids, mode="drop")

  def smallest():
    neg, idx = lax.top_k(-priority, k)
    return jnp.where(jnp.isfinite(neg), ids[idx], rows)

  out = lax.cond(jnp.sum(keep) <= k, compact, smallest)
  return out, out < rows


def _select_dense(counts, key, stddev, threshold, k):
  """Reference law: one noisy count per row of the table (O(R) draws)."""
  rows = counts.shape[0]
  k_noise, k_prio = jax.random.split(key)
  noisy = counts + stddev * threefry.wide_tail_normal(k_noise, (rows,))
  selected = noisy > threshold
  prio = jnp.where(selected, jax.random.uniform(k_prio, (rows,)), jnp.inf)
  ids, valid = _keep_k(jnp.arange(rows, dtype=jnp.int32), prio, k, rows)
  return Selection(ids, valid, jnp.sum(selected, dtype=jnp.int32))


def _distinct_ranks(key, m, n0, k):
  """``k`` slots; the first ``m`` hold a uniform m-subset of ``[0, n0)`` in random order (rejection of repeats)."""
  slot = jnp.arange(k, dtype=jnp.int32)
  live = slot < m

  def dups(u):
    v = jnp.where(live, u, -1 - slot)  # dead slots: distinct sentinels below 0
    order = jnp.argsort(v, stable=True)
    sv = v[order]
    later = jnp.concatenate([jnp.zeros((1,), bool), sv[1:] == sv[:-1]])
    return jnp.zeros((k,), bool).at[order].set(later)

  def body(carry):
    key, u, d = carry
    key, sub = jax.random.split(key)
    u = jnp.where(d, jax.random.randint(sub, (k,), 0, jnp.maximum(n0, 1)), u)
    return key, u, dups(u)

  key, sub = jax.random.split(key)
  u = jax.random.randint(sub, (k,), 0, jnp.maximum(n0, 1))
  _, u, _ = lax.while_loop(lambda c: jnp.any(c[2]), body, (key, u, dups(u)))
  return u


def _select_fast(rows, touched, touched_counts, key, stddev, threshold, k):
  """Same law as :func:`_select_dense`: noise on the touched rows, zero rows by Binomial + uniform subset.

  ``touched``: ``[t]`` distinct rows in ascending order, padded with ``rows``; ``touched_counts`` their counts.
  """
  t = touched.shape[0]
  k_touch, k_num, k_rank, k_prio, k_exp, k_gam = jax.random.split(key, 6)
  real = touched < rows
  nnz = jnp.sum(real, dtype=jnp.int32)
  noisy = touched_counts + stddev * threefry.wide_tail_normal(k_touch, (t,))
  sel_t = real & (noisy > threshold)
  # Zero rows: each passes with p = P(N(0, stddev^2) > tau), independently.
  z = jnp.where(stddev > 0, -threshold / jnp.where(stddev > 0, stddev, 1.0),
                jnp.where(threshold < 0, jnp.inf, -jnp.inf))  # no noise: every zero row passes iff tau < 0
  p = jax.scipy.special.ndtr(z)
  n0 = rows - nnz
  big_m = jax.random.binomial(k_num, n0.astype(jnp.float32), p).astype(jnp.int32)
  m = jnp.minimum(big_m, k)
  ranks = _distinct_ranks(k_rank, m, n0, k)
  gap = jnp.where(real, touched - jnp.arange(t, dtype=jnp.int32), jnp.iinfo(jnp.int32).max)  # nondecreasing
  zero_ids = ranks + jnp.searchsorted(gap, ranks, side="right").astype(jnp.int32)
  # Uniform priorities: touched i.i.d.; the zero group's m smallest of M are order statistics.
  prio_t = jnp.where(sel_t, jax.random.uniform(k_prio, (t,)), jnp.inf)
  s = jnp.cumsum(jax.random.exponential(k_exp, (k,)))
  s_m = s[jnp.maximum(m - 1, 0)]
  total = s_m + jax.random.gamma(k_gam, (big_m + 1 - m).astype(jnp.float32))
  prio_z = jnp.where(jnp.arange(k) < m, s / total, jnp.inf)
  ids, valid = _keep_k(jnp.concatenate([touched, zero_ids]), jnp.concatenate([prio_t, prio_z]), k, rows)
  return Selection(ids, valid, jnp.sum(sel_t, dtype=jnp.int32) + big_m)


def select_rows(counts: jax.Array, key: jax.Array, *, noise_std, threshold: float, max_rows: int,
                max_touched: int, touched: jax.Array | None = None, num_touched: jax.Array | None = None
                ) -> Selection:
  """Rows whose count + ``N(0, noise_std²)`` is ``> threshold``; a uniform ``max_rows``-subset if more.

  Args:
    counts: ``[R]`` clipped row counts (:func:`clipped_row_counts`), >= 0.
    key: a key of this step only.
    noise_std: ``σ1 C1`` (a float or a traced scalar), >= 0.
    threshold: τ.
    max_rows: K, static.
    max_touched: the fast branch's static bound on touched rows (module docstring).
    touched, num_touched: optional, the rows with a positive count (``[max_touched]``, padded with ``R``, any
      order) and their number, as :func:`dpmega.sparse.make_count_fn` keeps them: saves an O(R) scan.

  Returns:
    :class:`Selection`: ``ids[K]`` (distinct rows first, then padding ``R``),
    ``valid``, ``num_selected`` before the cap.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> s = select_rows(jnp.array([0.0, 3.0, 0.0, 5.0]), jax.random.key(0), noise_std=0.0, threshold=1.0,
    ...                 max_rows=3, max_touched=2)
    >>> sorted(s.ids.tolist()), s.valid.tolist(), int(s.num_selected)
    ([1, 3, 4], [True, True, False], 2)
  """
  k = check_int("max_rows", max_rows, 1)
  t = min(check_int("max_touched", max_touched, 1), counts.shape[0])
  k = min(k, counts.shape[0])
  stddev = jnp.asarray(noise_std, jnp.float32)
  threshold = jnp.asarray(threshold, jnp.float32)
  if touched is None:
    nnz = jnp.sum(counts > 0)
  else:
    if touched.shape != (t,):
      raise ValueError(f"touched must have shape ({t},) (max_touched), got {touched.shape}.")
    nnz = num_touched
  rows = counts.shape[0]

  def fast():
    if touched is None:
      ids = jnp.nonzero(counts > 0, size=t, fill_value=rows)[0].astype(jnp.int32)
    else:  # the count function's list, in any order, padded with rows
      ids = jnp.sort(touched)
    return _select_fast(rows, ids, counts.at[ids].get(mode="fill", fill_value=0.0), key, stddev, threshold, k)

  if t >= rows:  # nnz <= R = t always: the dense branch could never run, so it is not compiled
    return fast()
  return lax.cond(nnz <= t, fast, lambda: _select_dense(counts, key, stddev, threshold, k))


def select_touched_rows(touched_counts: jax.Array, touched: jax.Array, key: jax.Array, *, rows: int, noise_std,
                        threshold: float, max_rows: int) -> Selection:
  """:func:`select_rows` from the touched rows' counts alone (no ``[R]`` vector): the same law, O(T + K log K).

  Precondition: every row with a positive count is in ``touched`` (as
  :func:`dpmega.sparse.make_count_fn` keeps compact counts: it never drops
  one); the other rows have count 0 and are selected by the Binomial + uniform
  subset of the module docstring.

  Args:
    touched_counts: ``[T]`` float32 clipped counts of the rows in ``touched`` (0 at padding).
    touched: ``[T]`` int32 distinct rows, any order, padded with ``rows``.
    key: a key of this step only.
    rows: R, the table's rows (static).
    noise_std, threshold, max_rows: as in :func:`select_rows`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> s = select_touched_rows(jnp.array([5.0, 3.0, 0.0]), jnp.array([3, 1, 4]), jax.random.key(0), rows=4,
    ...                         noise_std=0.0, threshold=1.0, max_rows=3)
    >>> sorted(s.ids.tolist()), s.valid.tolist(), int(s.num_selected)
    ([1, 3, 4], [True, True, False], 2)
  """
  rows = check_int("rows", rows, 1)
  k = min(check_int("max_rows", max_rows, 1), rows)
  if touched.ndim != 1 or touched_counts.shape != touched.shape:
    raise ValueError(f"touched_counts and touched must be [T] arrays of one shape, got {touched_counts.shape} and "
                     f"{touched.shape}.")
  pair = (jnp.asarray(touched, jnp.int32), jnp.asarray(touched_counts, jnp.float32))
  ascending = jnp.all(pair[0][1:] >= pair[0][:-1])  # as make_count_fn keeps them: no sort
  ids, counts = lax.cond(ascending, lambda p: p, lambda p: tuple(lax.sort(p, num_keys=1)), pair)
  return _select_fast(rows, ids, counts, key, jnp.asarray(noise_std, jnp.float32),
                      jnp.asarray(threshold, jnp.float32), k)
