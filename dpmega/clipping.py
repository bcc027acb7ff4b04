"""Per-example clipping: per-example gradients, global L2 norms, clip, masked sum.

The one job of this module is to compute

    clipped_sum = sum_i mask_i * finite_i * min(1, C / ||g_i||) * g_i

where ``g_i`` is the gradient of the per-example loss of example ``i`` with
respect to *all* differentiated parameters (one global norm per example).

Guarantee: whatever the micro-batching, each example's contribution to the
returned sum has L2 norm at most ``clip_norm`` over the whole parameter pytree;
padding rows (``mask == 0``) and examples whose gradient is not finite
contribute exactly zero. The sum is accumulated in float32.

Edge cases (mirrored by ``tests/test_clipping.py``):

=====================  ==============================================
input                  behaviour
=====================  ==============================================
``clip_norm == 0``     every contribution is 0 (factor 0)
``clip_norm == inf``   no clipping (factor 1); still masked
``||g_i|| == 0``       factor 1 (no division by zero)
NaN/Inf in ``g_i``     ``g_i`` zeroed, counted in ``num_nonfinite``
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


def global_norms(per_example_grads: PyTree) -> jax.Array:
  """L2 norm of each example's gradient over the whole pytree, in float32.

  Args:
    per_example_grads: pytree whose leaves have a leading batch axis ``[b, ...]``.

  Returns:
    ``[b]`` float32 norms (NaN or Inf where a leaf is not finite).
  """
  leaves = jax.tree_util.tree_leaves(per_example_grads)
  if not leaves:
    raise ValueError("per_example_grads has no leaves: nothing to differentiate.")
  sq = [jnp.sum(jnp.square(x.astype(jnp.float32)).reshape(x.shape[0], -1), axis=1) for x in leaves]
  return jnp.sqrt(sum(sq))


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
      :mod:`dpmega.ghost` recognises, per-layer choice of Gram vs materialized
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


# Registers "auto" and "ghost" (dpmega.ghost imports this module, so it comes last).
from dpmega import ghost as _ghost  # noqa: E402,F401  pylint: disable=g-import-not-at-top,unused-import
