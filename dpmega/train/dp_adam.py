"""DP-AdamBC: Adam whose second moment has the known noise variance subtracted (Tang et al. 2023).

Under DP-SGD the optimizer sees ``g_t + z_t`` with ``z_t ~ N(0, s_t^2 I)`` and
``s_t = sigma * C_t / B_t`` public. Adam's second-moment estimate then tracks
``E[g^2] + s^2``; on coordinates that only see noise (most embedding rows, in
CTR) it is about ``s^2``, so Adam divides the noise by its own scale and every
such coordinate random-walks at the learning rate. DP-AdamBC subtracts the
noise's contribution, estimated with the same exponential weights as the
second moment (so a schedule of batch sizes or clip norms is handled exactly),
and floors the result::

  nu_t  = b2 nu_{t-1}  + (1 - b2) (g_t + z_t)^2
  phi_t = b2 phi_{t-1} + (1 - b2) s_t^2              # E[noise part of nu_t]
  update = m_hat_t / sqrt(max(nu_hat_t - phi_hat_t, floor))

Privacy: post-processing of the privatized gradient and of public constants
(sigma, C_t, B_t): it costs nothing and changes no accounting.

The step passes ``s_t`` as the extra argument ``noise_std`` of ``update``
(:func:`dpmega.train.step.make_update_fn` does, for every optimizer; optax
transforms that do not use it ignore it).

.. warning::
   ``floor`` sets the update size of noise-only coordinates
   (``|m_hat| / sqrt(floor)``): choose it near ``s_t^2`` or above, not at Adam's
   usual ``eps**2``, or noise-only coordinates are amplified more than by Adam.

References:
  Tang, Panda, Wang, Liu, "DP-AdamBC: Your DP-Adam Is Actually DP-SGD (Unless
  You Apply Bias Correction)", AAAI 2024. https://arxiv.org/abs/2312.14334
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from dpmega import validation


class ScaleByAdamBCState(NamedTuple):
  """``count``: steps so far; ``mu``, ``nu``: Adam's moments; ``phi``: the EMA of the noise variance (scalar)."""

  count: jax.Array
  mu: Any
  nu: Any
  phi: jax.Array


def scale_by_adam_bc(b1: float = 0.9, b2: float = 0.999, floor: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """Adam's scaling with the noise variance subtracted from the second moment (the module docstring).

  Args:
    b1: first-moment decay, in ``[0, 1)``.
    b2: second-moment decay, in ``[0, 1)``.
    floor: lower bound of the corrected second moment (> 0).

  Returns:
    A transform whose ``update(updates, state, params=None, *, noise_std)``
    needs ``noise_std``, the per-coordinate std of the noise in ``updates``.

  Edge cases: ``noise_std = 0`` is Adam with ``eps`` replaced by the floor
  inside the square root; a coordinate whose corrected moment is below the
  floor moves by ``lr * |m_hat| / sqrt(floor)``.

  Example:
    >>> import jax.numpy as jnp
    >>> tx = scale_by_adam_bc(floor=0.01)
    >>> state = tx.init(jnp.zeros(2))
    >>> u, _ = tx.update(jnp.array([3.0, 0.5]), state, noise_std=0.5)  # second coordinate: noise-sized
    >>> [round(float(x), 3) for x in u]   # 3 / sqrt(9 - 0.25); 0.5 / sqrt(max(0.25 - 0.25, 0.01)); Adam: 1, 1
    [1.014, 5.0]
  """
  b1 = validation.check_real("b1", b1, 0.0, 1.0, hi_open=True)
  b2 = validation.check_real("b2", b2, 0.0, 1.0, hi_open=True)
  floor = validation.check_real("floor", floor, 0.0, lo_open=True)

  def init_fn(params):
    zeros = lambda p: jnp.zeros_like(p, jnp.float32)  # noqa: E731
    return ScaleByAdamBCState(jnp.zeros((), jnp.int32), jax.tree_util.tree_map(zeros, params),
                              jax.tree_util.tree_map(zeros, params), jnp.zeros((), jnp.float32))

  def update_fn(updates, state, params=None, *, noise_std=None, **extra):
    del params, extra
    if noise_std is None:
      raise ValueError("scale_by_adam_bc needs noise_std (sigma * C / B of the step) as an extra argument of update.")
    count = state.count + 1
    mu = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g), state.nu, updates)
    phi = b2 * state.phi + (1 - b2) * jnp.square(jnp.asarray(noise_std, jnp.float32))
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    phi_hat = phi / c2
    out = jax.tree_util.tree_map(
        lambda m, v: (m / c1) / jnp.sqrt(jnp.maximum(v / c2 - phi_hat, floor)), mu, nu)
    return out, ScaleByAdamBCState(count, mu, nu, phi)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adam_bc(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
            floor: float = 1e-8) -> optax.GradientTransformationExtraArgs:
  """DP-AdamBC with a learning rate: :func:`scale_by_adam_bc` then ``-learning_rate``."""
  return optax.chain(scale_by_adam_bc(b1, b2, floor), optax.scale_by_learning_rate(learning_rate))
