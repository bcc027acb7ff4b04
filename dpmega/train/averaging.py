"""An exponential moving average of the parameters, kept in the optimizer state (``optimizer.ema_decay``).

DP-SGD's last iterate carries the last steps' noise; an average of the iterates
averages it away (Polyak averaging; De et al. 2022, "Unlocking high-accuracy
differentially private image classification through scale", evaluate an EMA of
the parameters; jax_privacy's ``ema_coefficient``). The average is a function
of the released noisy updates only, so it is post-processing: it costs no
privacy, and the run's ledger and epsilon are unchanged.

:func:`with_ema` wraps any optax transformation: its state is
``EmaState(inner, count, ema)``, ``ema`` shaped like the parameters, so a
checkpoint saves it, a resume restores it, and a mesh shards it like the
parameters (all three treat it as optimizer state). After the update at step
``t`` (counting from 1) the average moves toward the new parameters with the
decay ``min(decay, (1 + t) / (10 + t))``: a warm-up, as in TF's
``ExponentialMovingAverage(num_updates=...)``, so the first steps' random
initialization does not linger in it.

With sparse tables (:func:`dpmega.sparse.lazy_update`) the average of a table is
state that mirrors the table, so it is lazy like Adam's moments there: a row's
average moves at the steps that update the row (an average over the row's own
updates), and a row no step selects keeps its initial value in both.

Example:
  >>> import jax.numpy as jnp, optax
  >>> tx = with_ema(optax.sgd(1.0), decay=0.5)
  >>> p = {"w": jnp.zeros(1)}
  >>> s = tx.init(p)
  >>> for _ in range(3):
  ...   u, s = tx.update({"w": -jnp.ones(1)}, s, p)
  ...   p = optax.apply_updates(p, u)
  >>> # iterates 1, 2, 3; the warm-up's decays 2/11, 3/12, 4/13: average 0.818 -> 1.705 -> 2.601
  >>> float(p["w"][0]), round(float(averaged_params(s)["w"][0]), 3)
  (3.0, 2.601)
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class EmaState(NamedTuple):
  """``inner``: the wrapped optimizer's state; ``count``: updates so far; ``ema``: the average, like the params."""

  inner: Any
  count: jax.Array
  ema: PyTree


def ema_decay_at(decay: float, count) -> jax.Array:
  """The decay of the ``count``-th update (from 1): ``min(decay, (1 + count) / (10 + count))``."""
  count = jnp.asarray(count, jnp.float32)
  return jnp.minimum(jnp.float32(decay), (1.0 + count) / (10.0 + count))


def with_ema(inner: optax.GradientTransformation, decay: float) -> optax.GradientTransformationExtraArgs:
  """``inner``, plus an exponential moving average of the parameters it produces (the module docstring).

  Args:
    inner: any optax transformation (extra arguments such as ``noise_std`` are passed on to it).
    decay: in [0, 1); 0 keeps the last iterate (the average is the parameters).

  Raises:
    ValueError: if ``decay`` is not in [0, 1).
  """
  if not 0.0 <= float(decay) < 1.0:
    raise ValueError(f"decay must be in [0, 1), got {decay=}.")
  inner = optax.with_extra_args_support(inner)

  def init(params):
    # A copy, not the params' own buffers: a donated update must not see the average alias the parameters.
    return EmaState(inner.init(params), jnp.zeros((), jnp.int32), jax.tree_util.tree_map(jnp.array, params))

  def update(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("with_ema needs the parameters: call update(updates, state, params).")
    updates, inner_state = inner.update(updates, state.inner, params, **extra_args)
    count = state.count + 1
    d = ema_decay_at(decay, count)
    new_params = optax.apply_updates(params, updates)
    ema = jax.tree_util.tree_map(
        lambda e, p: (d * e.astype(jnp.float32) + (1.0 - d) * p.astype(jnp.float32)).astype(e.dtype),
        state.ema, new_params)
    return updates, EmaState(inner_state, count, ema)

  return optax.GradientTransformationExtraArgs(init, update)


def averaged_params(opt_state: Any) -> PyTree | None:
  """The average kept in ``opt_state`` (:func:`with_ema`'s state), or None when the optimizer keeps none."""
  return opt_state.ema if isinstance(opt_state, EmaState) else None
