"""Float32 arithmetic with a bound for every input: rounding-error constants, summation trees, exact
power-of-two scaling and the scaled norms that clipping measures with.

Every norm that decides a clip factor is computed here (or from these pieces in
:mod:`dpmega.clipping.ghost`), so that no order of summation left to XLA, no
underflow and no overflow can hide part of an example's gradient:

* :func:`gamma` / :func:`tree_gamma`: Higham's ``gamma_n = n u / (1 - n u)``,
  the relative error of ``n`` float32 roundings, and that of :func:`sum_nonneg`;
* :func:`sum_nonneg`: sums as trees of fan-in 16 with optimization barriers,
  so the error bound holds whatever XLA does inside a level;
* :func:`scale_pow2` / :func:`unscale_pow2` / :func:`exponent`: multiplication
  by powers of two built from their bits (exact);
* :func:`scaled_norms` / :func:`scaled_norms_many` / :func:`hypot`: row norms
  with a batch-level fast path that is taken only where it is provably exact.

Guarantee: :func:`scaled_norms` returns each row's L2 norm within
``tree_gamma(n) / 2 + 2**-29`` relative error for any finite float32 values
(NaN or Inf in a row gives a non-finite norm).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# Unit roundoff of float32: every norm and sum here is accumulated in float32.
UNIT_ROUNDOFF = 2.0 ** -24
# Fan-in of the summation trees of non-negative terms (see `sum_nonneg`).
_TREE_FAN_IN = 16
_TREE_LEVEL_HALVINGS = 4  # 2 ** 4 == _TREE_FAN_IN
# Levels of `sum_nonneg` at least this long are summed by halvings (see there).
_HALVING_MIN_LENGTH = 1 << 16


def gamma(n: int) -> float:
  """Bound on the relative error of ``n`` successive float32 roundings: ``n u / (1 - n u)`` (Higham, Lemma 3.1).

  The error of any float32 sum of ``n + 1`` terms (any order, any tree, FMA or not) is at most
  ``gamma(n) * sum |terms|``.
  """
  nu = max(int(n), 0) * UNIT_ROUNDOFF
  if nu >= 0.5:
    raise ValueError(f"n is too large for a float32 rounding-error bound, got {n=}.")
  return nu / (1.0 - nu)


def tree_levels(length: int) -> int:
  """Levels of the summation tree that :func:`sum_nonneg` uses for ``length`` terms."""
  levels, length = 1, max(int(length), 1)
  while length > _TREE_FAN_IN:
    length = -(-length // _TREE_FAN_IN)
    levels += 1
  return levels


def tree_gamma(length: int) -> float:
  """Relative error bound of :func:`sum_nonneg` on ``length`` terms: ``gamma(15 * levels)``."""
  return gamma((_TREE_FAN_IN - 1) * tree_levels(length))


def sum_nonneg(x: jax.Array) -> jax.Array:
  """Sum over the last axis as a tree of fan-in 16, in float32.

  A plain ``jnp.sum`` leaves the order to XLA, and the only bound that holds
  for every order is ``gamma(n - 1)`` (0.06 for a million terms): a crafted
  gradient could then hide a visible part of its norm in rounding. With at most
  16 terms per level and an optimization barrier between levels (so that XLA
  cannot merge the levels back into one reduction), the error is at most
  :func:`tree_gamma` ``(n) * sum |x|`` whatever XLA does inside a level:
  ``gamma(75) = 4.5e-6`` up to a million terms.
  """
  x = x.astype(jnp.float32)
  while x.shape[-1] > _TREE_FAN_IN:
    pad = -x.shape[-1] % _TREE_FAN_IN
    if pad:
      x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    if x.shape[-1] >= _HALVING_MIN_LENGTH:
      # Entry j sums the 16 terms j + i m (m = length / 16) by four halvings (elementwise adds of two halves): any
      # partition into 16s will do, and on CPU this one runs at about memory speed where XLA's reduction of a minor
      # axis of 16 (below) ran 2-13x slower on long rows (squares of 1M terms: 0.06 vs 0.19 ms; 15.6M, one example's
      # 30,522 x 512 table: 1.5 vs 21 ms). On short ones it is not faster.
      for _ in range(_TREE_LEVEL_HALVINGS):
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    else:
      x = jnp.sum(x.reshape(x.shape[:-1] + (-1, _TREE_FAN_IN)), axis=-1)
    x = jax.lax.optimization_barrier(x)
  return jnp.sum(x, axis=-1)


def dot_rows(a: jax.Array, c: jax.Array, blocked: bool) -> tuple[jax.Array, float]:
  """``(p, g)``: ``p [b, n, r]`` the float32 dot products of the rows of ``a [b, n, K]`` and ``c [b, r, K]``.

  ``g`` bounds each entry's rounding: ``|p - exact| <= g sum_k |a_k c_k|`` (plus underflow, at most one
  ``2**-126`` per operation). Plain: one batched product, each entry a length-``K`` dot product in any order,
  ``g = gamma(K)``. With ``blocked`` (and ``K`` large enough for it to help): dot products of 16 terms each, an
  optimization barrier (so XLA cannot merge them back into one contraction), and their sum by
  :func:`sum_nonneg`, so ``g = gamma(16 + 15 * tree_levels(K / 16))``: ``2.7e-6`` instead of ``3.1e-5`` at
  ``K = 512`` (taken where it at least halves ``g``, ``K >= 62``). Its scratch memory is ``b n r K / 16`` floats,
  half that when ``a is c`` (callers block only where ``n <= gram.BLOCKED_MAX_ROWS``, 64).
  """
  k = a.shape[2]
  blocks = -(-k // _TREE_FAN_IN)
  g_blocked = _TREE_FAN_IN + (_TREE_FAN_IN - 1) * tree_levels(blocks)
  if not blocked or 2 * g_blocked > k:  # blocking must at least halve the bound
    return jnp.einsum("bsk,btk->bst", a, c, precision=jax.lax.Precision.HIGHEST), gamma(k)
  # Block j holds the entries k = i * blocks + j, i < 16 (any partition into 16s will do). Its products are added in
  # 16 elementwise steps over the major axis i, vectorized along j, one row of `a` at a time (only t >= s when a is
  # c: the Gram matrix is symmetric). On CPU this runs at about the speed of one einsum: 0.25 vs 0.22 ms at the
  # demo's 256 x 5 x 512, 8.8 vs 4.9 ms at 8 x 20 x 30,522; as one [b, n, n, K / 16] fusion it took 0.7 / 10-30 ms,
  # and as 16-term dot products in a batched matmul of tiny matrices 0.9 / 13-27 ms.
  pad = [(0, 0), (0, 0), (0, blocks * _TREE_FAN_IN - k)]
  split = lambda m: jnp.pad(m, pad).reshape(m.shape[0], m.shape[1], _TREE_FAN_IN, blocks)
  symmetric = a is c
  sa = split(a)
  sc = sa if symmetric else split(c)
  n, r = a.shape[1], c.shape[1]
  rows = []
  for row in range(n):
    first = row if symmetric else 0
    part = sa[:, row:row + 1, 0] * sc[:, first:, 0]
    for i in range(1, _TREE_FAN_IN):
      part = part + sa[:, row:row + 1, i] * sc[:, first:, i]
    rows.append(part)  # [b, r - first, blocks]
  partial = jnp.concatenate(rows, axis=1)
  sums = sum_nonneg(jax.lax.optimization_barrier(partial))  # [b, pairs]
  if symmetric:
    upper_s, upper_t = np.triu_indices(n)
    index = np.zeros((n, n), np.int32)
    index[upper_s, upper_t] = index[upper_t, upper_s] = np.arange(upper_s.size)
    return sums[:, index], gamma(g_blocked)
  return sums.reshape(sums.shape[0], n, r), gamma(g_blocked)


def _exact_pow2(p: jax.Array) -> jax.Array:
  """``2.0 ** p`` as float32 for integer ``p`` in ``[-126, 127]``, built from its bits (exact on every backend)."""
  return jax.lax.bitcast_convert_type(((p.astype(jnp.int32) + 127) << 23).astype(jnp.int32), jnp.float32)


def _pow2(e: jax.Array, x: jax.Array, steps: int) -> jax.Array:
  """``x * 2**e`` exactly, in steps of normal powers of two (monotone, so no step under/overflows early)."""
  e = e.astype(jnp.int32)
  for _ in range(steps):
    p = jnp.clip(e, -126, 127)
    x = x * _exact_pow2(p)
    e = e - p
  return x


def exponent(x: jax.Array, axes) -> jax.Array:
  """Per-slice ``e`` with ``max |x| < 2**e`` (0 for an all-zero slice; NaN/Inf propagate via the caller)."""
  m = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=axes)
  _, e = jnp.frexp(jnp.where(jnp.isfinite(m), m, 1.0))
  return e.astype(jnp.int32)


def scale_pow2(x: jax.Array, e: jax.Array, steps: int = 3) -> jax.Array:
  """``x * 2**-e`` with ``e`` broadcast over the trailing axes of ``x``; exact (tiny entries may flush to 0)."""
  e = e.reshape(e.shape + (1,) * (x.ndim - e.ndim))
  return _pow2(-e, x.astype(jnp.float32), steps)  # 3 steps: |e| up to 378, a sum of float32 exponents


def unscale_pow2(x: jax.Array, e: jax.Array) -> jax.Array:
  """``x * 2**e`` exactly (Inf where the result overflows float32); ``|e|`` up to 378 (a sum of exponents)."""
  return _pow2(e, x, 3)


# Fast path of `scaled_norms`: an unscaled sum of squares s >= n * 2**-96 has lost at most 2n * 2**-126 <= 2**-29 s
# to underflow (each of its 2n float32 operations flushes at most 2**-126), and a finite one has not overflowed.
_FAST_SQ_MIN_PER_TERM = 2.0 ** -96


def _scaled_norms_slow(x: jax.Array) -> jax.Array:
  """:func:`scaled_norms` by explicit per-example scaling (any finite values)."""
  e = exponent(x, 1)
  xs = scale_pow2(x, e, steps=2)  # one float32 exponent: |e| <= 149
  return _pow2(e, jnp.sqrt(sum_nonneg(jnp.square(xs))), 2)


def scaled_norms(x: jax.Array) -> jax.Array:
  """``[b]`` L2 norms of the rows of ``x [b, ...]`` with no under- or overflow, in float32.

  Each example is scaled by the power of two of its largest entry (exact), its
  squares summed by :func:`sum_nonneg`, and the norm scaled back: a gradient of
  entries ``1e-20`` (whose squares flush to 0) or ``1e20`` (whose squares
  overflow) gets its true norm to ``tree_gamma / 2`` relative error. NaN or Inf
  anywhere in a row gives a non-finite norm.

  Guarantee: the scaling is skipped (one pass instead of three) only when the
  unscaled sum of squares proves it unnecessary for the whole batch: every row's
  sum is finite (nothing overflowed: all terms are non-negative) and at least
  ``n * 2**-96`` (underflow cost at most ``2**-29`` relative, on top of
  ``tree_gamma``), or NaN (a NaN row is NaN either way). Otherwise (an all-zero,
  tiny or huge row anywhere in the batch) the batch takes the scaled path, so the
  result meets the bound above for every input; only the speed depends on it.
  """
  return scaled_norms_many([x])[0]


def scaled_norms_many(xs: list[jax.Array]) -> list[jax.Array]:
  """:func:`scaled_norms` of each array of ``xs`` (same leading axis), with ONE batch-level ``lax.cond`` for all.

  The fast path is taken only when it is safe for every array (the guarantee of :func:`scaled_norms`, checked
  per array and row), so the result is the same as calling :func:`scaled_norms` on each; one predicate and one
  branch instead of one per array saves the conditionals' synchronisation on small models.
  """
  xs = [x.astype(jnp.float32).reshape(x.shape[0], -1) for x in xs]
  live = [i for i, x in enumerate(xs) if x.shape[1]]
  out = [jnp.zeros((x.shape[0],), jnp.float32) for x in xs]
  if not live:
    return out
  sums = [sum_nonneg(jnp.square(xs[i])) for i in live]
  safe = jnp.all(jnp.stack([
      jnp.all(((s >= xs[i].shape[1] * _FAST_SQ_MIN_PER_TERM) & (s <= jnp.finfo(jnp.float32).max)) | jnp.isnan(s))
      for i, s in zip(live, sums)]))
  norms = jax.lax.cond(safe, lambda: [jnp.sqrt(s) for s in sums], lambda: [_scaled_norms_slow(xs[i]) for i in live])
  for i, n in zip(live, norms):
    out[i] = n
  return out


def hypot(norms: list[jax.Array]) -> jax.Array:
  """``sqrt(sum_j norms_j**2)`` over a list of ``[b]`` norms, scaled (no under- or overflow)."""
  if len(norms) == 1:
    return norms[0]
  return scaled_norms(jnp.stack(norms, axis=1))
