"""Per-example clipping: the micro-batch driver, its input checks and the table of clipping modes.

The one job of this package is to compute

    clipped_sum = sum_i mask_i * finite_i * min(1, C / ||g_i||) * g_i

where ``g_i`` is the gradient of the per-example loss of example ``i`` with
respect to *all* differentiated parameters (one global norm per example).

Guarantee: whatever the micro-batching and whatever the values, each
example's contribution to the returned float32 sum has L2 norm at most
``clip_norm * (1 + 1e-5)`` over the whole parameter pytree (the ``1e-5`` is
float32 rounding: norms are scaled and summed by trees of bounded depth, see
:func:`dpmega.clipping.floats.sum_nonneg`); padding rows (``mask == 0``) and examples whose gradient
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

Modules (imports go one way, down this list; this ``__init__`` imports them all):

=================  ==========================================================
``floats``         rounding bounds (gamma), summation trees, power-of-two
                   scaling, scaled norms
``rules``          how a norm becomes a weight: plain, normalized, per-group
``stats``          ``ClipStats``, clip factors, ``combine`` (shared weights)
``vmap``           per-example gradients, global norms, the vmap clipped sum
``jaxpr``          which parameters take the fast path (``plan_layers``)
``rows``           row (lookup) gradients: dedup, norms, scatter
``gram``           Gram norms with a rigorous bound; materialized fallback
``ghost``          the fast clipped sum ("auto", alias "ghost"): book-keeping
=================  ==========================================================
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dpmega import validation
from dpmega.clipping import ghost
from dpmega.clipping import rules as rules_lib
from dpmega.clipping import vmap as vmap_lib
# Public names, kept importable from dpmega.clipping.
from dpmega.clipping.floats import gamma
from dpmega.clipping.floats import scaled_norms
from dpmega.clipping.floats import scaled_norms_many
from dpmega.clipping.floats import sum_nonneg
from dpmega.clipping.floats import tree_gamma
from dpmega.clipping.rules import ClipRule
from dpmega.clipping.rules import parse_clip_groups
from dpmega.clipping.stats import ClipStats
from dpmega.clipping.stats import clip_factors
from dpmega.clipping.stats import combine
from dpmega.clipping.vmap import clipped_sum_vmap
from dpmega.clipping.vmap import global_norms
from dpmega.clipping.vmap import per_example_grads
from dpmega.clipping.vmap import weighted_sum

__all__ = [
    "ClipRule", "ClipStats", "check_batch", "clip_factors", "clipped_grad_sum", "clipped_sum_vmap", "clipping_modes",
    "combine", "gamma", "global_norms", "leading_size", "parse_clip_groups", "per_example_grads", "scaled_norms",
    "scaled_norms_many", "sum_nonneg", "tree_gamma", "validate_clip_norm", "validate_microbatch_size",
    "validate_params", "weighted_sum",
]

PyTree = Any

# The clipped sum of one micro-batch, by the name `clipping=` takes; each has the signature of `clipped_sum_vmap`.
_MODES: dict[str, Callable[..., Any]] = {
    "auto": ghost.clipped_sum_ghost,  # ghost norms + book-keeping, per-layer Gram vs materialized; vmap for the rest
    # The same, under the name Opacus users know. (The pure Gram bound, ghost.clipped_sum_gram, is not a mode: its
    # sums fall below vmap's by its excess on benign inputs, 1e-5 to 1e-3; only the tests of the bound run it.)
    "ghost": ghost.clipped_sum_ghost,
    "vmap": vmap_lib.clipped_sum_vmap,  # every per-example gradient materialized
}


def clipping_modes() -> tuple[str, ...]:
  """The names ``clipping=`` accepts."""
  return tuple(sorted(_MODES))


def validate_clip_norm(clip_norm: float) -> None:
  """Raises ``ValueError`` unless ``clip_norm`` is a non-negative number (inf allowed, so not ``check_real``)."""
  if isinstance(clip_norm, jax.core.Tracer):
    return
  try:
    value = float(clip_norm)
  except (TypeError, ValueError):
    raise ValueError(f"clip_norm must be a non-negative number, got {clip_norm=!r}.") from None
  if math.isnan(value) or value < 0:
    raise ValueError(f"clip_norm must be a non-negative number (inf disables clipping), got {clip_norm=}.")

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
  if microbatch_size is not None:
    validation.check_int("microbatch_size", microbatch_size, 1)

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
    clip_rule: ClipRule | None = None,
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
      :mod:`dpmega.clipping.jaxpr` recognises, per-layer choice of Gram vs materialized
      norms, ``vmap`` for the other parameters), ``"ghost"`` (the same as
      ``"auto"``, under Opacus's name), ``"vmap"`` (materialize every per-example
      gradient). All modes give the same result to float tolerance.
    clip_rule: how norms become weights (:class:`ClipRule`: normalized clipping, per-group clip budgets);
      None: ``min(1, C / ||g||)`` over all parameters. Every rule keeps the guarantee above.

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
  rule = rules_lib.PLAIN if clip_rule is None else clip_rule
  if not isinstance(rule, ClipRule):
    raise ValueError(f"clip_rule must be a dpmega.clipping.ClipRule or None, got {clip_rule!r}.")
  rule.validate_clip_norm(clip_norm)
  validation.check_choice("clipping", clipping, clipping_modes())
  validate_params(params)
  b = check_batch(batch, mask, microbatch_size)
  impl = _MODES[clipping]
  mask = jnp.ones((b,), jnp.float32) if mask is None else jnp.asarray(mask)
  m = b if microbatch_size is None else microbatch_size
  k = b // m
  if k == 1:
    return impl(loss_fn, params, batch, mask, clip_norm, has_aux, rule)

  reshape = lambda x: jnp.reshape(x, (k, m) + jnp.shape(x)[1:])
  micro_batches = jax.tree_util.tree_map(reshape, batch)
  micro_masks = reshape(mask)
  zero_sum = jax.tree_util.tree_map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

  def step(carry, xs):
    acc, stats = carry
    mb, mk = xs
    g, aux, s = impl(loss_fn, params, mb, mk, clip_norm, has_aux, rule)
    acc = jax.tree_util.tree_map(jnp.add, acc, g)
    return (acc, stats.merge(s)), aux

  (grad_sum, stats), aux = jax.lax.scan(step, (zero_sum, ClipStats.zeros()), (micro_batches, micro_masks))
  if has_aux:
    aux = jax.tree_util.tree_map(lambda x: jnp.reshape(x, (b,) + x.shape[2:]), aux)
  return grad_sum, aux, stats
