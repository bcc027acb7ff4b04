"""Per-example clipping: per-example gradients, global L2 norms, clip, masked sum.

The one job of this module is to compute

    clipped_sum = sum_i mask_i * finite_i * min(1, C / ||g_i||) * g_i

where ``g_i`` is the gradient of the per-example loss of example ``i`` with
respect to *all* differentiated parameters (one global norm per example).

Guarantee: whatever the micro-batching and whatever the values, each
example's contribution to the returned float32 sum has L2 norm at most
``clip_norm * (1 + 1e-5)`` over the whole parameter pytree (the ``1e-5`` is
float32 rounding: norms are scaled and summed by trees of bounded depth, see
:func:`sum_nonneg`); padding rows (``mask == 0``) and examples whose gradient
is not finite contribute exactly zero. Every params leaf must be a float
array (:func:`validate_params`).

Edge cases (mirrored by ``tests/test_clipping.py``):

=====================  ==============================================
input                  behaviour
=====================  ==============================================
``clip_norm == 0``     every contribution is 0 (factor 0)
``clip_norm == inf``   no clipping (factor 1); still masked
``||g_i|| == 0``       factor 1 (no division by zero)
NaN/Inf in ``g_i``     ``g_i`` zeroed, counted in ``num_nonfinite``
``||g_i|| > 3.4e38``   norm overflows: zeroed, counted as non-finite
entries ``1e-20``      scaled norm, no underflow (clipped as usual)
integer params leaf    ``ValueError`` naming the leaf, in every mode
``mask_i == 0``        zero contribution, even if ``g_i`` is NaN
=====================  ==============================================
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

PyTree = Any

# Per-micro-batch clipped-sum implementations, by the name `clipping=` takes.
# Each has the signature of `clipped_sum_vmap`.
_MICROBATCH_IMPLS: dict[str, Callable[..., Any]] = {}


class ClipStats(NamedTuple):
  """What clipping did to a batch (sums, so they add across micro-batches).

  Attributes:
    num_examples: examples that took part (``mask == 1``), finite or not.
    num_clipped: examples whose norm exceeded ``clip_norm``.
    num_nonfinite: examples whose gradient had a NaN or Inf (zeroed).
    norm_sum: sum of the finite per-example norms before clipping.
    norm_max: largest finite per-example norm before clipping.
    loss_sum: sum of the per-example losses of the examples that took part.
  """

  num_examples: jax.Array
  num_clipped: jax.Array
  num_nonfinite: jax.Array
  norm_sum: jax.Array
  norm_max: jax.Array
  loss_sum: jax.Array

  @classmethod
  def zeros(cls) -> "ClipStats":
    i0 = jnp.zeros((), jnp.int32)
    f0 = jnp.zeros((), jnp.float32)
    return cls(i0, i0, i0, f0, f0, f0)

  def merge(self, other: "ClipStats") -> "ClipStats":
    return ClipStats(
        self.num_examples + other.num_examples,
        self.num_clipped + other.num_clipped,
        self.num_nonfinite + other.num_nonfinite,
        self.norm_sum + other.norm_sum,
        jnp.maximum(self.norm_max, other.norm_max),
        self.loss_sum + other.loss_sum,
    )

  @property
  def mean_norm(self) -> jax.Array:
    finite = self.num_examples - self.num_nonfinite
    return self.norm_sum / jnp.maximum(finite, 1)

  @property
  def mean_loss(self) -> jax.Array:
    return self.loss_sum / jnp.maximum(self.num_examples, 1)


def validate_clip_norm(clip_norm: float) -> None:
  """Raises ``ValueError`` unless ``clip_norm`` is a non-negative number (inf allowed)."""
  if isinstance(clip_norm, jax.core.Tracer):
    return
  try:
    value = float(clip_norm)
  except (TypeError, ValueError):
    raise ValueError(f"clip_norm must be a non-negative number, got {clip_norm=!r}.") from None
  if math.isnan(value) or value < 0:
    raise ValueError(f"clip_norm must be a non-negative number (inf disables clipping), got {clip_norm=}.")


# Unit roundoff of float32: every norm and sum here is accumulated in float32.
UNIT_ROUNDOFF = 2.0 ** -24
# Fan-in of the summation trees of non-negative terms (see `sum_nonneg`).
_TREE_FAN_IN = 16


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
    x = jnp.sum(x.reshape(x.shape[:-1] + (-1, _TREE_FAN_IN)), axis=-1)
    x = jax.lax.optimization_barrier(x)
  return jnp.sum(x, axis=-1)


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
  x = x.astype(jnp.float32).reshape(x.shape[0], -1)
  if x.shape[1] == 0:
    return jnp.zeros((x.shape[0],), jnp.float32)
  s = sum_nonneg(jnp.square(x))
  lo = x.shape[1] * _FAST_SQ_MIN_PER_TERM
  safe = jnp.all(((s >= lo) & (s <= jnp.finfo(jnp.float32).max)) | jnp.isnan(s))
  return jax.lax.cond(safe, lambda: jnp.sqrt(s), lambda: _scaled_norms_slow(x))


def hypot(norms: list[jax.Array]) -> jax.Array:
  """``sqrt(sum_j norms_j**2)`` over a list of ``[b]`` norms, scaled (no under- or overflow)."""
  if len(norms) == 1:
    return norms[0]
  return scaled_norms(jnp.stack(norms, axis=1))


def global_norms(per_example_grads: PyTree) -> jax.Array:
  """L2 norm of each example's gradient over the whole pytree, in float32.

  Scaled per example and leaf, and summed by trees of bounded depth
  (:func:`scaled_norms`), so the norm is the true norm of these float32
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
  return hypot([scaled_norms(x) for x in leaves])


def validate_params(params: PyTree) -> None:
  """Raises ``ValueError`` naming the first params leaf that is not a float array.

  Integer (or bool, complex) leaves have no gradient to clip; every clipping
  mode refuses them the same way, before any compute.
  """
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    dtype = leaf.dtype if hasattr(leaf, "dtype") else jnp.result_type(leaf)
    if not jnp.issubdtype(dtype, jnp.floating):
      raise ValueError(
          f"params leaf {jax.tree_util.keystr(path)!r} has dtype {dtype}: only float leaves can be differentiated "
          "privately; close over it or split it out (nnx.split(model, nnx.Param, ...)).")


def clip_factors(norms: jax.Array, clip_norm: float | jax.Array) -> jax.Array:
  """``min(1, clip_norm / norm)``, safe for ``norm == 0`` and ``clip_norm in {0, inf}``."""
  clip_norm = jnp.asarray(clip_norm, jnp.float32)
  safe = jnp.where(norms > 0, norms, 1.0)
  return jnp.where(norms > clip_norm, clip_norm / safe, 1.0).astype(jnp.float32)


def combine(
    norms: jax.Array,
    mask: jax.Array,
    clip_norm: float | jax.Array,
    losses: jax.Array,
) -> tuple[jax.Array, ClipStats]:
  """Per-example weights (clip factor, 0 for padding and non-finite) and stats.

  Shared by every clipping implementation so that the weights and counts mean
  exactly the same thing whichever way the norms were computed.

  Args:
    norms: ``[b]`` per-example global gradient norms.
    mask: ``[b]`` 1 for real examples, 0 for padding.
    clip_norm: the L2 bound C.
    losses: ``[b]`` per-example losses (for the stats only).

  Returns:
    ``(weights [b] float32, ClipStats)``.
  """
  mask = mask.astype(bool)
  finite = jnp.isfinite(norms)
  ok = mask & finite
  weights = jnp.where(ok, clip_factors(jnp.where(finite, norms, 0.0), clip_norm), 0.0)
  clean_norms = jnp.where(ok, norms, 0.0)
  stats = ClipStats(
      num_examples=jnp.sum(mask, dtype=jnp.int32),
      num_clipped=jnp.sum(ok & (norms > jnp.asarray(clip_norm, jnp.float32)), dtype=jnp.int32),
      num_nonfinite=jnp.sum(mask & ~finite, dtype=jnp.int32),
      norm_sum=jnp.sum(clean_norms),
      norm_max=jnp.max(clean_norms, initial=0.0),
      loss_sum=jnp.sum(jnp.where(mask, losses.astype(jnp.float32), 0.0)),
  )
  return weights, stats


def weighted_sum(per_example_grads: PyTree, weights: jax.Array) -> PyTree:
  """``sum_i weights_i * g_i`` in float32; rows with weight 0 are dropped even if NaN."""

  def leaf_sum(g):
    w = weights.reshape((-1,) + (1,) * (g.ndim - 1))
    return jnp.sum(jnp.where(w > 0, g.astype(jnp.float32) * w, 0.0), axis=0)

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


def clipped_sum_vmap(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    mask: jax.Array,
    clip_norm: float | jax.Array,
    has_aux: bool = False,
) -> tuple[PyTree, Any, ClipStats]:
  """Clipped, masked sum of one micro-batch by materializing per-example grads.

  The general fallback: works for any differentiable ``loss_fn``; memory is
  ``b x |params|``.

  Returns:
    ``(grad_sum (float32, like params), aux (batched) or None, ClipStats)``.
  """
  losses, aux, grads = per_example_grads(loss_fn, params, batch, has_aux=has_aux)
  weights, stats = combine(global_norms(grads), mask, clip_norm, losses)
  return weighted_sum(grads, weights), aux, stats


_MICROBATCH_IMPLS["vmap"] = clipped_sum_vmap


def register_clipping(name: str, impl: Callable[..., Any]) -> None:
  """Makes ``impl`` (same signature as :func:`clipped_sum_vmap`) available as ``clipping=name``."""
  _MICROBATCH_IMPLS[name] = impl


def clipping_modes() -> tuple[str, ...]:
  return tuple(sorted(_MICROBATCH_IMPLS))


def leading_size(batch: PyTree) -> int:
  """The common leading (example) axis of every leaf of ``batch``; ValueError if they differ."""
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves:
    raise ValueError("batch has no array leaves.")
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in leaves}
  if None in sizes or len(sizes) != 1:
    raise ValueError(
        f"every leaf of batch must have the same leading (batch) axis, got sizes {sorted(map(str, sizes))}.")
  return sizes.pop()


def validate_microbatch_size(microbatch_size: int | None) -> None:
  """Raises ``ValueError`` unless ``microbatch_size`` is None or a positive int."""
  if microbatch_size is not None and (
      isinstance(microbatch_size, bool) or not isinstance(microbatch_size, int) or microbatch_size <= 0):
    raise ValueError(f"microbatch_size must be a positive int or None, got {microbatch_size=!r}.")


def check_batch(batch: PyTree, mask: jax.Array | None, microbatch_size: int | None) -> int:
  """Validates batch, mask and micro-batch size; returns the batch size.

  Raises:
    ValueError: naming ``batch``, ``mask`` or ``microbatch_size``.
  """
  b = leading_size(batch)
  if mask is not None and tuple(jnp.shape(mask)) != (b,):
    raise ValueError(f"mask must have shape ({b},) to match the batch, got mask.shape={tuple(jnp.shape(mask))}.")
  validate_microbatch_size(microbatch_size)
  if microbatch_size is not None:
    if b % microbatch_size:
      raise ValueError(
          f"microbatch_size must divide the batch size {b}, got {microbatch_size=} "
          f"(pad the batch with masked rows to a multiple of it).")
  return b


def clipped_grad_sum(
    loss_fn: Callable[..., Any],
    params: PyTree,
    batch: PyTree,
    mask: jax.Array | None = None,
    *,
    clip_norm: float | jax.Array,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    clipping: str = "auto",
) -> tuple[PyTree, Any, ClipStats]:
  """Sum of per-example clipped gradients over a batch, micro-batch by micro-batch.

  A batch of ``k * m`` examples is processed as ``k`` micro-batches of ``m``
  with ``jax.lax.scan``, so memory is bounded by ``m``. No noise is added: use
  this piece when accumulating over several calls, then add noise ONCE with
  :func:`dpmega.noise.privatize`.

  Guarantee: each example's contribution to ``grad_sum`` has L2 norm
  ``<= clip_norm`` over all of ``params`` (sensitivity ``clip_norm`` under
  add/remove-one); masked and non-finite examples contribute 0.

  Args:
    loss_fn: ``loss_fn(params, example) -> loss`` (or ``(loss, aux)``) for ONE example.
    params: the pytree to differentiate (Linen params, an NNX ``nnx.State``, ...).
    batch: pytree of arrays with a common leading batch axis.
    mask: optional ``[b]`` array, 1 for real examples and 0 for padding.
    clip_norm: L2 bound C on each example's gradient.
    microbatch_size: examples per scan step (must divide the batch); None: one step.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``; aux is returned per example.
    clipping: ``"auto"`` (default: ghost norms + book-keeping for the layers
      :mod:`dpmega.clipping.ghost` recognises, per-layer choice of Gram vs materialized
      norms, ``vmap`` for the other parameters), ``"ghost"`` (the same with
      Gram norms only), ``"vmap"`` (materialize every per-example gradient).
      All modes give the same result to float tolerance.

  Returns:
    ``(grad_sum, aux, stats)``: float32 pytree like ``params``; per-example aux
    with a leading ``[b]`` axis (or None); :class:`ClipStats`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from dpmega.clipping import clipped_grad_sum
    >>> loss = lambda w, ex: jnp.sum((ex["x"] @ w - ex["y"]) ** 2)
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.zeros((8,))}
    >>> g, _, stats = clipped_grad_sum(loss, jnp.ones(3), batch, clip_norm=1.0, microbatch_size=4)
    >>> round(float(jnp.linalg.norm(g)), 4)  # 8 identical examples, each clipped to norm 1
    8.0
    >>> int(stats.num_clipped)
    8
  """
  validate_clip_norm(clip_norm)
  if clipping not in _MICROBATCH_IMPLS:
    raise ValueError(f"clipping must be one of {clipping_modes()}, got {clipping=!r}.")
  validate_params(params)
  b = check_batch(batch, mask, microbatch_size)
  impl = _MICROBATCH_IMPLS[clipping]
  mask = jnp.ones((b,), jnp.float32) if mask is None else jnp.asarray(mask)
  m = b if microbatch_size is None else microbatch_size
  k = b // m
  if k == 1:
    return impl(loss_fn, params, batch, mask, clip_norm, has_aux)

  reshape = lambda x: jnp.reshape(x, (k, m) + jnp.shape(x)[1:])
  micro_batches = jax.tree_util.tree_map(reshape, batch)
  micro_masks = reshape(mask)
  zero_sum = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

  def step(carry, xs):
    acc, stats = carry
    mb, mk = xs
    g, aux, s = impl(loss_fn, params, mb, mk, clip_norm, has_aux)
    acc = jax.tree_util.tree_map(jnp.add, acc, g)
    return (acc, stats.merge(s)), aux

  (grad_sum, stats), aux = jax.lax.scan(step, (zero_sum, ClipStats.zeros()), (micro_batches, micro_masks))
  if has_aux:
    aux = jax.tree_util.tree_map(lambda x: jnp.reshape(x, (b,) + x.shape[2:]), aux)
  return grad_sum, aux, stats


# Registers "auto" and "ghost" (dpmega.clipping.ghost imports this module, so it comes last).
from dpmega.clipping import ghost as _ghost  # noqa: E402,F401  pylint: disable=g-import-not-at-top,unused-import
