"""One SGD step per implementation, on JAX: plain, dpmega, jax_privacy.

Each builder returns ``step() -> None`` (one full step: gradients, clip,
noise, SGD update, state kept in a closure) and ``sync() -> None`` (blocks
until the device is done), so the worker times all libraries alike.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import config
import models_flax


def _sgd(params, grads):
  return jax.tree.map(lambda p, g: p - config.LEARNING_RATE * g.astype(p.dtype), params, grads)


def _state(w, batch_np):
  batch = jax.tree.map(jnp.asarray, batch_np)
  params = models_flax.init_params(w, batch)
  per_example_loss, batch_loss = models_flax.loss_fns(w)
  return batch, params, per_example_loss, batch_loss


def _runner(jitted, params, batch, key):
  state = {"params": params, "key": key}

  def step():
    state["key"], sub = jax.random.split(state["key"])
    state["params"] = jitted(state["params"], batch, sub)

  def sync():
    jax.block_until_ready(state["params"])

  return step, sync, params


def nonprivate(w, batch_np):
  """``jax.value_and_grad`` of the batch-mean loss: the non-private baseline."""
  batch, params, _, batch_loss = _state(w, batch_np)

  @jax.jit
  def step(params, batch, key):
    del key
    _, grads = jax.value_and_grad(batch_loss)(params, batch)
    return _sgd(params, grads)

  return _runner(step, params, batch, jax.random.key(0))


def dpmega_step(w, batch_np, clipping):
  """``dpmega.private_value_and_grad`` with the given ``clipping`` mode."""
  import dpmega  # pylint: disable=g-import-not-at-top
  batch, params, per_example_loss, _ = _state(w, batch_np)
  kwargs = {} if clipping == "default" else {"clipping": clipping}
  grad_fn = dpmega.private_value_and_grad(
      per_example_loss, clip_norm=config.CLIP_NORM, noise_multiplier=config.NOISE_MULTIPLIER,
      expected_batch_size=w.batch_size, microbatch_size=w.microbatch_size, **kwargs)

  @jax.jit
  def step(params, batch, key):
    _, grads, _ = grad_fn(params, batch, key)
    return _sgd(params, grads)

  return _runner(step, params, batch, jax.random.key(0))


def jax_privacy_step(w, batch_np):
  """``jax_privacy.clipped_grad`` + ``noise_addition.gaussian_privatizer``."""
  import jax_privacy  # pylint: disable=g-import-not-at-top
  from jax_privacy import noise_addition  # pylint: disable=g-import-not-at-top
  batch, params, _, batch_loss = _state(w, batch_np)
  grad_fn = jax_privacy.clipped_grad(
      batch_loss, l2_clip_norm=config.CLIP_NORM, batch_argnums=1, keep_batch_dim=True,
      microbatch_size=w.microbatch_size)
  privatizer = noise_addition.gaussian_privatizer(
      stddev=config.NOISE_MULTIPLIER * config.CLIP_NORM, prng_key=jax.random.key(1))
  state = {"params": params, "noise": privatizer.init(params)}

  @jax.jit
  def jstep(params, noise_state, batch):
    grad_sum = grad_fn(params, batch)
    noisy, noise_state = privatizer.update(grad_sum, noise_state)
    grads = jax.tree.map(lambda g: g / w.batch_size, noisy)
    return _sgd(params, grads), noise_state

  def step():
    state["params"], state["noise"] = jstep(state["params"], state["noise"], batch)

  def sync():
    jax.block_until_ready(state["params"])

  return step, sync, params


def build(impl: str, w, batch_np):
  """``impl``: "jax" | "dpmega:<clipping>" | "jax_privacy"."""
  if impl == "jax":
    return nonprivate(w, batch_np)
  if impl.startswith("dpmega:"):
    return dpmega_step(w, batch_np, impl.split(":", 1)[1])
  if impl == "jax_privacy":
    return jax_privacy_step(w, batch_np)
  raise ValueError(f"unknown JAX implementation {impl!r}")


def num_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
