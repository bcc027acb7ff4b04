"""Per-example norms of ``G = sum_s x_s y_s^T`` from Gram matrices, with a rigorous bound, and the fallback.

:func:`dense_norm_bounds` gives, for each example, the Gram estimate
``sum_{s,t} (x_s . x_t)(y_s . y_t)`` (the norm vmap would compute) and an
upper bound on the norm of what the book-keeping matmul of
:mod:`dpmega.clipping.ghost` adds for it, valid for every input: cancellation
(rows ``v`` and ``-v + d``), underflow and overflow included.
:func:`materialize` forms chosen examples' gradients for the examples whose
bound is loose.

Float-safety in short (the proofs are in the docstrings below):

* rounding: every dot product of length ``K`` errs by at most
  ``gamma_K sum |a b|`` (Higham 3.5), every positive sum by its tree's
  :func:`dpmega.clipping.floats.tree_gamma`; the error of the Gram estimate is
  bounded term by term from these;
* underflow: every float32 operation that underflows (flush-to-zero included)
  errs by at most ``2^-126`` absolute, which adds an absolute term to the bound:
  a row far below its example's largest (``2^-40`` beside ``2^100``) is never
  lost;
* flush-to-zero in the book-keeping product ``fl(w y)`` (tiny clip factor, huge
  features) is absolute too, and can enlarge a contribution: :func:`flush_term`
  bounds it, and the examples where it is not negligible are not left to the
  book-keeping;
* overflow makes the bound non-finite (then the example is scaled, or zeroed
  and counted by :func:`dpmega.clipping.stats.combine`), never small;
* fast path: one batch-level ``lax.cond`` takes the unscaled bound when it is
  provably as tight as the scaled one; otherwise operands are scaled per
  example by powers of two (exact).
"""

from __future__ import annotations

import math

import jax
from jax import lax
import jax.numpy as jnp

from dpmega.clipping import floats

_HIGHEST = lax.Precision.HIGHEST

# Absolute error of one float32 operation whose result underflows, flush-to-zero included (XLA's CPU runtime
# flushes subnormals): every bound below adds it to the relative (gamma) terms.
_ETA = 2.0 ** -126
# Fast path of `dense_norm_bounds`: the unscaled bound is used when, in every example, its underflow part is below
# this fraction of the rest (the bound then equals the scaled one to rounding).
FAST_REL2 = 2.0 ** -40
# Examples of at most this many rows get blocked Gram products (`floats.dot_rows`): scratch memory up to twice that
# of the operands (b n^2 K / 32 floats), and a rounding term of ~3e-6 instead of gamma_K. The demo's tied 512-row
# table (5 predictions): bound 5.4e-6 above its estimate instead of 3.2e-5; small BERT's 30,522-row one (20
# predictions): 1e-5 instead of 1.3e-3, its clipped sum from 5.3e-4 below vmap's to 2e-7, at no measurable cost
# (the products run at one einsum's speed). Up to 32 rows until session 15: a tied table at 40 or 63 predictions
# (BERT at sequence length 256 to 512) was 1.2e-3 / 1.8e-3 above the norm, 6.6e-6 / 8e-6 now (with `_abs_grams`).
BLOCKED_MAX_ROWS = 64


def bounds_in_units(xs, ys, ids, rs):
  """``(est2, err2, u_dense, u_rows, abs2, sx)`` for operands in whatever units they come in, ``[b]`` each.

  ``xs [b, n, K]``, ``ys [b, n, N]`` (and the summed rows ``rs [b, r, N]`` of a tied table) are the operands,
  scaled or not. ``est2`` is the computed Gram squared norm; ``err2`` bounds ``|est2 - ||G||^2|`` (``G`` the exact
  gradient of these operands) together with ``abs2``, the part of it that covers underflow; ``u_dense = sum_s
  |x_s| |y_s|`` and ``u_rows = sum_t |r_t|`` are upper bounds for the book-keeping's rounding. Nothing is assumed
  about the magnitudes (``sx >= sum_s |x_s|``, for :func:`flush_term`): an operation that overflows makes the
  result non-finite, and one that underflows errs by
  at most ``_ETA`` (absolute), so a length-``K`` dot product errs by at most ``gamma_K sum |a b| + 4 K _ETA``.
  """
  b, n, kx = xs.shape
  ny_dim = ys.shape[2]
  # A few rows (a tied output table's predictions): dot products summed in blocks, so their rounding term is
  # gamma(16 + 15 levels) instead of gamma_K (floats.dot_rows), for b n^2 K / 16 floats.
  blocked = n <= BLOCKED_MAX_ROWS
  alpha, beta = 4 * kx * _ETA, 4 * ny_dim * _ETA  # underflow in one entry of aa and of bb
  flat = lambda m: m.reshape(b, -1)
  aa, g_kx = floats.dot_rows(xs, xs, blocked)
  bb, g_ny = floats.dot_rows(ys, ys, blocked)
  # Upper bounds on the row norms from the Gram diagonals: aa_ss >= |x_s|^2 (1 - g) - alpha.
  nx = jnp.sqrt((jnp.diagonal(aa, axis1=1, axis2=2) + alpha) * (1.0 + 2.0 * g_kx))
  ny = jnp.sqrt((jnp.diagonal(bb, axis1=1, axis2=2) + beta) * (1.0 + 2.0 * g_ny))
  u_dense = floats.sum_nonneg(nx * ny)  # [b]
  terms = aa * bb
  # Only the estimate needs a tree of bounded depth: the error sums are non-negative, and summed in any order
  # (terms of <= 4 roundings each) they come out >= exact (1 - gamma(n^2 + 4)), which is divided out here (a
  # tree beyond 2^16 terms, where that factor would grow past 1.004).
  if n * n > 1 << 16:
    tree = lambda m: floats.sum_nonneg(flat(m)) / (1.0 - floats.tree_gamma(n * n) - floats.gamma(4))
  else:
    tree = lambda m: jnp.sum(flat(m), axis=1) / (1.0 - floats.gamma(n * n + 4))
  est2 = floats.sum_nonneg(flat(terms))
  s3 = tree(jnp.abs(terms))
  if rs is None or n < 2:
    # |aa_st - AA_st| <= g_kx sum_k |x_sk x_tk| <= g_kx nx_s nx_t (Cauchy-Schwarz), likewise for bb.
    s1 = tree(nx[:, :, None] * nx[:, None, :] * jnp.abs(bb))
    s2 = tree(jnp.abs(aa) * ny[:, :, None] * ny[:, None, :])
    u_book = u_dense
  else:
    # A tied table: sum_k |x_sk x_tk| itself (_abs_grams), far below nx_s nx_t where the rows' supports barely
    # overlap (softmax-minus-one-hot rows), and the book-keeping's rounding term from it.
    ax, ay = _abs_grams(xs, ys)
    s1 = tree(ax * jnp.abs(bb))
    s2 = tree(jnp.abs(aa) * ay)
    # (ax ay: 7 roundings per term, 3 more than `tree` divides out; the n^2 products and sums flushed: _ETA each.)
    frob = jnp.sqrt(tree(ax * ay) * (1.0 + floats.gamma(4)) + 2 * n * n * _ETA) * (1.0 + 4 * floats.UNIT_ROUNDOFF)
    u_book = jnp.minimum(u_dense, frob)
  big_x, big_y = jnp.max(nx, axis=1), jnp.max(ny, axis=1)
  # |aa_st - AA_st| <= g_kx nx_s nx_t + alpha and |bb_st| <= (1 + 2 g) big_y^2 + beta (likewise for bb), so the
  # underflow terms add n^2 (alpha big_y^2 + beta big_x^2) (1 + 2g) + 3 n^2 alpha beta; the n^2 products aa bb and
  # their sum add 2 n^2 _ETA, doubled for the underflow of these error terms themselves.
  abs2 = n * n * ((1.0 + 2.0 * max(g_kx, g_ny)) * (alpha * jnp.square(big_y) + beta * jnp.square(big_x))
                  + 3.0 * alpha * beta + 4.0 * _ETA)
  err2 = (g_kx * s1 + g_ny * s2 + g_kx * g_ny * jnp.square(u_dense)
          + (floats.tree_gamma(n * n) + floats.UNIT_ROUNDOFF) * s3)
  u_rows = jnp.zeros_like(u_dense)
  if rs is not None:
    n_rows, d = rs.shape[1], rs.shape[2]
    sr = floats.sum_nonneg(jnp.square(rs))  # [b, n_rows]; duplicates already summed
    nr = jnp.sqrt((sr + 4 * d * _ETA) * (1.0 + 2.0 * floats.tree_gamma(d)))
    # Cross terms between dense uses and lookups of a tied table: x_s . onehot(id_t) = x_s[id_t].
    xi = jnp.take_along_axis(xs, ids[:, None, :], axis=2)  # [b, n, n_rows], exact
    yi, g_yi = floats.dot_rows(ys, rs, blocked)
    cross = xi * yi
    rows2 = floats.sum_nonneg(sr)
    cross_sum = floats.sum_nonneg(flat(cross))
    gram2, est2 = est2, est2 + rows2 + 2.0 * cross_sum
    g_d = floats.tree_gamma(d) + floats.UNIT_ROUNDOFF
    err2 = err2 + (g_d * rows2
                   + 2.0 * g_yi * floats.sum_nonneg(flat(jnp.abs(xi) * ny[:, :, None] * nr[:, None, :]))
                   + 2.0 * (floats.tree_gamma(n * n_rows) + floats.UNIT_ROUNDOFF)
                   * floats.sum_nonneg(flat(jnp.abs(cross)))
                   # the two additions of the three parts
                   + 2.0 * floats.UNIT_ROUNDOFF * (jnp.abs(gram2) + rows2 + 2.0 * jnp.abs(cross_sum)))
    # Underflow: each squared row (4 d _ETA), each entry of yi (beta, times |xi| <= big_x), each product and sum.
    abs2 = abs2 + 2.0 * (n_rows * 4 * d * _ETA + n * n_rows * (2.0 * beta * big_x + 4.0 * _ETA))
    u_rows = floats.sum_nonneg(nr)
  return est2, err2 + abs2, u_book, u_rows, abs2, jnp.sum(nx, axis=1) * (1.0 + 2.0 * floats.gamma(n))


def _abs_grams(xs, ys):
  """``(ax, ay) [b, n, n]``: upper bounds on ``|x_s| . |x_t|`` and ``|y_s| . |y_t|`` (Gram matrices of the absolute
  values), for every input.

  They bound the rounding of the Gram matrices entry by entry (``|aa_st - AA_st| <= g_kx |x_s| . |x_t|``), and
  ``||A||_F^2 = sum_{s,t} ax_st ay_st`` for ``A = sum_s |x_s| |y_s|^T``, which bounds the book-keeping's rounding
  entry by entry (``gamma_{n+2} A``): at most ``U = sum_s |x_s| |y_s|`` (triangle inequality), ``~||G||`` instead of
  ``~sqrt(n) ||G||`` on a tied output table's softmax-minus-one-hot rows. Every term is non-negative, so each computed
  entry is ``>= exact (1 - gamma_K) - 2 K _ETA`` (rounding, and products or partial sums flushed to 0), which is undone
  here, up to this correction's own 2 roundings (and the constant's): 3 roundings per entry, at most. Overflow
  gives Inf, never less.
  """

  def gram_abs(m):
    m = jnp.abs(m)
    q, g = floats.dot_rows(m, m, blocked=False)  # one einsum, g = gamma_K
    return (q + 2 * m.shape[2] * _ETA) / (1.0 - g)

  return gram_abs(xs), gram_abs(ys)


def upper_bound(est2, err2, u_dense, u_rows, n: int):
  """The bound on the norm of what the book-keeping adds (same units as the operands)."""
  # 1.001 on the error terms only: room for their own rounding (they are positive sums of a few roundings).
  return (jnp.sqrt(jnp.maximum(est2, 0.0) + 1.001 * err2)
          + 1.001 * (floats.gamma(n + 2) * u_dense + 2 * floats.UNIT_ROUNDOFF * u_rows))


def dense_norm_bounds_scaled(x, y, ids, rows, with_x_sum: bool = False):
  """:func:`dense_norm_bounds` on operands scaled per example by powers of two (any finite values)."""
  ex = floats.exponent(x, (1, 2))
  ey = floats.exponent(y, (1, 2))
  e = ex + ey
  if rows is not None:
    # A common scale for the dense part and the rows of a tied table (the larger of the two is O(1)).
    e = jnp.maximum(e, floats.exponent(rows, (1, 2)))
  xs = floats.scale_pow2(x, ex)
  ys = floats.scale_pow2(y, e - ex)
  rs = None if rows is None else floats.scale_pow2(rows, e)
  est2, err2, u_dense, u_rows, _, sx = bounds_in_units(xs, ys, ids, rs)
  est_s = jnp.sqrt(jnp.maximum(est2, 0.0))
  upper_s = upper_bound(est2, err2, u_dense, u_rows, x.shape[1])
  out = floats.unscale_pow2(est_s, e), floats.unscale_pow2(upper_s, e)
  return out + (floats.unscale_pow2(sx, ex),) if with_x_sum else out


def dense_norm_bounds(x, y, ids, rows, mask=None, with_x_sum: bool = False):
  """``(estimate, bound)`` of the norm of one leaf's per-example gradient, ``[b]`` each.

  With ``with_x_sum``, also ``sx >= sum_s |x_s|`` (``[b]``, Inf where it overflows) for :func:`flush_term`.

  The gradient is ``G = sum_s x_s y_s^T`` (+ ``sum_t onehot(ids_t) rows_t^T`` for a tied table). The estimate
  is the Gram norm, as vmap would compute it. The bound is a rigorous upper bound on the
  norm of what the book-keeping sum adds for the example, ``fl(sum_s x_s (w y_s)^T)`` divided by its weight
  ``w``, whatever the cancellation: ``sqrt(max(n2, 0) + E) + gamma_{n+2} U`` where ``n2`` is the computed
  squared norm, ``E`` bounds its rounding error term by term and ``U = sum_s |x_s| |y_s|`` (Higham, 3.5) bounds
  the rounding of the book-keeping matmul (``n`` products summed per entry, one product by ``w``, one add of
  the rows). ``E`` includes an absolute term for underflow (``_ETA`` per operation; :func:`bounds_in_units`),
  so the bound holds for any operands, scaled or not, as long as nothing overflowed.

  Guarantee of the fast path (a batch-level ``lax.cond``): the bound is first computed on the operands as they
  are, which costs no scaling passes. It is rigorous whenever every number of it is finite: overflow anywhere
  (a product, a partial sum, a Gram entry) makes a Gram diagonal, a non-negative error sum or the estimate
  infinite or NaN, and underflow is inside ``E``. It is used for the whole batch when, in every example, it is
  finite and its underflow part is below ``2^-40`` of the rest of ``E`` plus the estimate (then it equals the
  scaled bound to rounding); examples with ``mask == 0`` (padding: weight 0 whatever their norm) are not asked.
  Otherwise (huge, tiny, all-zero, NaN or Inf operands in an example of the batch) the batch takes the scaled
  path: operands scaled per example by
  powers of two (exact) so that the largest entry of ``x``, ``y`` and the rows is below 1 and nothing
  overflows, and the same bound in those units. Either way the bound holds; only the speed depends on which.
  """
  est2, err2, u_dense, u_rows, abs2, sx = bounds_in_units(x, y, ids, rows)
  upper = upper_bound(est2, err2, u_dense, u_rows, x.shape[1])
  est = jnp.sqrt(jnp.maximum(est2, 0.0))
  rest = jnp.maximum(est2, 0.0) + (err2 - abs2)
  fine = jnp.isfinite(est2) & jnp.isfinite(upper) & (abs2 <= FAST_REL2 * rest)
  if mask is not None:
    fine = fine | (mask <= 0)
  fast = (est, upper, sx) if with_x_sum else (est, upper)
  return lax.cond(jnp.all(fine), lambda: fast, lambda: dense_norm_bounds_scaled(x, y, ids, rows, with_x_sum))


def dense_norm_estimate(x, y, ids, rows, mask=None):
  """``[b]`` Gram estimate of the norm of one leaf's per-example gradient, without its bound.

  The estimate of :func:`dense_norm_bounds`, on the same two paths: unscaled when, in every example (``mask > 0``),
  it is finite and its underflow part is below ``2^-40`` of it, else on operands scaled per example (a crafted
  cancellation, whose estimate is ~0, takes the scaled path too). The rounding-error sums are not computed (XLA
  drops them). For callers that cap each contribution by the norm of what it adds
  (:func:`dpmega.clipping.ghost._scanned_sum`): there an estimate that is wrong can only shrink a contribution.
  """
  est2, _, _, _, abs2, _ = bounds_in_units(x, y, ids, rows)
  fine = jnp.isfinite(est2) & (abs2 <= FAST_REL2 * jnp.maximum(est2, 0.0))
  if mask is not None:
    fine = fine | (mask <= 0)
  return lax.cond(jnp.all(fine), lambda: jnp.sqrt(jnp.maximum(est2, 0.0)),
                  lambda: dense_norm_bounds_scaled(x, y, ids, rows)[0])


# An example whose flush term (`flush_term`) exceeds this fraction of C is not left to the book-keeping.
FLUSH_REL = 2.0 ** -22


def flush_term(sx, n: int, k: int, m: int, n_rows: int, d: int) -> jax.Array:
  """``[b]`` absolute bound on what underflow adds to an example's book-keeping contribution (weighted units).

  The book-keeping adds, for an example of weight ``w <= 1``, the float32 matmul of its rows ``x_s`` (``[k]``)
  with ``yw_s = fl(w y_s)`` (``[m]``), plus ``fl(w r_t)`` for the ``n_rows`` summed rows (``[d]``) of a tied
  table. With flush-to-zero (XLA's CPU runtime flushes subnormals), a float32 product or sum errs by at most
  ``u |exact| + _ETA``: ``u |exact|`` when the result is normal, and ``|exact| < _ETA`` when it is subnormal
  and flushed to 0 (``_ETA 2^-24`` when it is kept subnormal). The relative parts are the ``gamma_{n+2} U``
  of :func:`upper_bound` (in unweighted units, times ``w``). The absolute parts are not proportional to the
  gradient, and they can enlarge a contribution, not only shrink it: with two rows ``x_1 = x_2 = x`` and
  ``w y_1 = 1.1 _ETA``, ``w y_2 = -0.9 _ETA``, the second product flushes to 0 and the example adds
  ``1.1 _ETA x`` instead of ``0.2 _ETA x`` (5.5 times its clipped gradient when ``|x| ~ C / (0.2 _ETA)``).
  They sum to at most

  * ``fl(w y_s)``: ``|f_s| <= _ETA sqrt(m)`` per row, so ``||sum_s x_s f_s^T|| <= _ETA sqrt(m) sum_s |x_s|
    <= _ETA sqrt(m) sx``;
  * the matmul: each entry is a sum of ``n`` products (``n`` multiplications, ``n - 1`` additions), each
    erring by at most ``_ETA`` beyond its relative rounding: ``2 n _ETA`` per entry, ``2 n _ETA sqrt(k m)``
    in norm;
  * the rows: ``fl(w r_t)`` errs by at most ``_ETA`` per entry beyond ``u |w r_t|``: ``_ETA sqrt(d)`` per row.

  So the contribution is at most ``w * bound + flush_term``. An example with ``flush_term <= FLUSH_REL C``
  keeps the guarantee (``2^-22 C`` of the ``1e-5 C`` room); only features near ``2^100 C`` exceed it, and
  :mod:`dpmega.clipping.ghost` then materializes the example (its contribution is ``fl(w g)`` entry by entry,
  which underflow only shrinks) or, beyond the budget, drops it from this leaf (contribution 0). A NaN or
  Inf ``sx`` gives a non-finite term (never a small one).
  """
  return _ETA * (math.sqrt(m) * sx + 2.0 * n * math.sqrt(float(k) * float(m)) + math.sqrt(d) * n_rows)


def materialize_one(x, y, ids, rows, k_rows: int) -> jax.Array:
  """``[K, N]`` gradient ``sum_s x_s y_s^T`` of one example (+ the summed lookup rows of a tied table)."""
  g = jnp.einsum("nk,nm->km", x, y, precision=_HIGHEST)
  if rows is not None:
    g = g + jnp.zeros((k_rows, rows.shape[-1]), jnp.float32).at[ids].add(rows, mode="drop")
  return g


def materialize(x, y, ids, rows, k_rows: int) -> jax.Array:
  """``[k, K, N]`` per-example gradients ``sum_s x_s y_s^T`` (+ the summed lookup rows of a tied table)."""
  if rows is None:
    return jax.vmap(lambda a, b: materialize_one(a, b, None, None, k_rows))(x, y)
  return jax.vmap(lambda a, b, i, r: materialize_one(a, b, i, r, k_rows))(x, y, ids, rows)
