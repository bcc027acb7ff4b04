"""What clipping did, and the per-example weights every clipping mode shares.

:func:`combine` turns per-example norms and the mask into clip factors
(``min(1, C / norm)``, 0 for padding and non-finite examples) and a
:class:`ClipStats`; every mode (:mod:`dpmega.clipping.vmap`,
:mod:`dpmega.clipping.ghost`) calls it, so weights and counts mean the same
thing whichever way the norms were computed.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from dpmega.clipping import floats
from dpmega.clipping import rules

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


def clip_factors(norms: jax.Array, clip_norm: float | jax.Array) -> jax.Array:
  """``min(1, clip_norm / norm)``, safe for ``norm == 0`` and ``clip_norm in {0, inf}``."""
  return rules.PLAIN.weights(jnp.asarray(norms), clip_norm)


def combine(
    norms: jax.Array,
    mask: jax.Array,
    clip_norm: float | jax.Array,
    losses: jax.Array,
    rule: rules.ClipRule = rules.PLAIN,
) -> tuple[jax.Array, ClipStats]:
  """Per-example weights (clip factor, 0 for padding and non-finite) and stats.

  Shared by every clipping implementation so that the weights and counts mean
  exactly the same thing whichever way the norms were computed.

  Args:
    norms: ``[b]`` per-example global gradient norms, or ``[G, b]`` per clip group
      (:attr:`dpmega.clipping.rules.ClipRule.groups`).
    mask: ``[b]`` 1 for real examples, 0 for padding.
    clip_norm: the L2 bound C.
    losses: ``[b]`` per-example losses (for the stats only).
    rule: how norms become weights (:class:`dpmega.clipping.rules.ClipRule`).

  Returns:
    ``(weights, ClipStats)``: float32 weights shaped like ``norms``; an example with a non-finite norm in any
    group gets weight 0 in every group. The stats count an example as clipped when its norm exceeds its budget
    in some group (under normalized clipping too), and take its norm over all groups.
  """
  mask = mask.astype(bool)
  finite = jnp.isfinite(norms) if norms.ndim == 1 else jnp.all(jnp.isfinite(norms), axis=0)
  ok = mask & finite
  weights = jnp.where(ok, rule.weights(jnp.where(ok, norms, 0.0), clip_norm), 0.0)
  total = norms if norms.ndim == 1 else floats.hypot(list(norms))
  budgets = rule.budgets(clip_norm)
  over = norms > (budgets[0] if norms.ndim == 1 else budgets[:, None])
  clipped = over if norms.ndim == 1 else jnp.any(over, axis=0)
  clean_norms = jnp.where(ok, total, 0.0)
  stats = ClipStats(
      num_examples=jnp.sum(mask, dtype=jnp.int32),
      num_clipped=jnp.sum(ok & clipped, dtype=jnp.int32),
      num_nonfinite=jnp.sum(mask & ~finite, dtype=jnp.int32),
      norm_sum=jnp.sum(clean_norms),
      norm_max=jnp.max(clean_norms, initial=0.0),
      loss_sum=jnp.sum(jnp.where(mask, losses.astype(jnp.float32), 0.0)),
  )
  return weights, stats
