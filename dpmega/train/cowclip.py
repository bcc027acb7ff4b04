"""CowClip under DP: clip each embedding row's update relative to the row's own norm (Zheng et al. 2022).

CowClip ("column-wise" clipping, one column per id) bounds the gradient of
the embedding row ``w_i`` of each id ``i`` by ``max(r * ||w_i||, zeta)``, so a
row moves by at most a fixed fraction of its own size per step; with it,
Zheng et al. train DeepFM on Criteo from batch 1K to 128K without losing AUC,
keeping the embedding learning rate and scaling the L2 term with the batch
(:func:`dpmega.train.optim.scale_for_batch` has the rules).

Here it is applied to the *privatized* mean gradient, inside the optimizer:
post-processing, so privacy and accounting are unchanged. Rows that only see
noise have a noisy gradient of norm about ``s * sqrt(d)`` (``s = sigma C / B``)
and are clipped to ``zeta``: with SGD-type table optimizers (sgd, momentum)
CowClip also damps the noise on rare ids; Adam-type optimizers rescale each
coordinate by its own history and undo most of that damping.

.. warning::
   The paper's threshold is ``cnt_i * max(r ||w_i||, zeta)`` with ``cnt_i`` the
   number of times id ``i`` occurs in the batch. That count is private data; it
   is not used here (it would need its own noisy, accounted release). So the
   threshold is per row of the mean gradient, and ``ratio`` plays the role of
   ``r * cnt_i / B``: tune it, do not copy the paper's ``r``.

References:
  Zheng, Sheng, Zhang, Liu, Feng, Guo, Shi, Zhou, Wang, Cui, You, "CowClip:
  Reducing CTR Prediction Model Training Time from 12 hours to 10 minutes on 1
  GPU", AAAI 2023. https://arxiv.org/abs/2204.06240
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dpmega import validation


def cowclip(ratio: float, min_norm: float) -> optax.GradientTransformation:
  """Clips row ``i`` of every table's update to L2 norm ``max(ratio * ||w_i||, min_norm)``.

  Rows are the first axis of each leaf (a table ``[V, d]``: one row per id); a
  1-D leaf is one row per element. Apply it to the embedding tables only
  (:func:`dpmega.train.optim.make_optimizer` routes it with ``optax.multi_transform``).

  Args:
    ratio: ``r >= 0``, the bound relative to the row's norm.
    min_norm: ``zeta > 0``, the bound for rows of small norm (fresh or zero rows).

  Guarantee: for every row, ``||out_i|| <= max(ratio * ||w_i||, min_norm) * (1 + 2^-22)``,
  and ``out_i`` is ``g_i`` scaled by a factor in ``(0, 1]`` (same direction).

  Edge cases: a zero row of the update stays zero; a non-finite row stays
  non-finite (the trainer stops on it); ``params`` is required.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = cowclip(ratio=0.1, min_norm=0.01)
    >>> w = jnp.array([[3.0, 4.0], [0.0, 0.0]])          # norms 5 and 0
    >>> g = jnp.array([[3.0, 4.0], [0.0, 1.0]])          # norms 5 and 1
    >>> out, _ = tx.update(g, tx.init(w), w)
    >>> [[round(float(x), 4) for x in row] for row in out]   # bounds 0.5 and 0.01
    [[0.3, 0.4], [0.0, 0.01]]
  """
  ratio = validation.check_real("ratio", ratio, 0.0)
  min_norm = validation.check_real("min_norm", min_norm, 0.0, lo_open=True)

  def clip_rows(g, w):
    rows = g.reshape(g.shape[0], -1) if g.ndim else g.reshape(1, 1)
    wrows = w.reshape(rows.shape).astype(jnp.float32)
    gn = jnp.sqrt(jnp.sum(jnp.square(rows.astype(jnp.float32)), axis=1, keepdims=True))
    bound = jnp.maximum(ratio * jnp.sqrt(jnp.sum(jnp.square(wrows), axis=1, keepdims=True)), min_norm)
    factor = jnp.minimum(1.0, bound / jnp.where(gn > 0, gn, 1.0))
    return (rows * factor.astype(rows.dtype)).reshape(g.shape)

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("cowclip needs params (the embedding rows the bound is relative to).")
    return jax.tree_util.tree_map(clip_rows, updates, params), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
