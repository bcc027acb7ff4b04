"""``private_value_and_grad``: the DP-SGD counterpart of ``jax.value_and_grad``."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from dpmega import clipping as clipping_lib
from dpmega import noise as noise_lib

PyTree = Any


def private_value_and_grad(
    loss_fn: Callable[..., Any],
    *,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch_size: float,
    microbatch_size: int | None = None,
    has_aux: bool = False,
    argnums: int | Sequence[int] = 0,
    clipping: str = "auto",
    noise_sampler: noise_lib.NoiseSampler | str = noise_lib.NoiseSampler.WIDE_TAIL,
) -> Callable[..., Any]:
  """Makes a function returning the loss and a DP-SGD noisy mean gradient.

  Swap ``jax.value_and_grad(loss)(params, batch)`` for
  ``private_value_and_grad(per_example_loss, ...)(params, batch, key)``.

  ``loss_fn`` takes ONE example (no batch axis) as its last argument:
  ``loss_fn(*args, example) -> loss`` (or ``(loss, aux)`` with ``has_aux``).
  The returned function is ``f(*args, batch, key, mask=None)``: the
  arguments of ``loss_fn`` before the example, then the batch (every leaf with
  a leading batch axis), then a PRNG key used once for this step's noise.
  The key must be secret: ``dpmega.step_key(secret, step)`` with ``secret =
  dpmega.secret_bytes()``, never ``jax.random.key(step)`` or a public seed,
  from which anyone could regenerate the noise and subtract it.
  Arguments not in ``argnums`` (frozen parameters, model state) are passed
  unchanged to every example.

  Per example: gradient with respect to ``args[argnums]``; clipped to global L2
  norm ``clip_norm`` over all of them; zeroed if masked or not finite. Then the
  sum over the batch (float32, micro-batch by micro-batch with ``lax.scan``),
  plus ``N(0, (noise_multiplier * clip_norm)^2)`` on each coordinate once,
  divided by ``expected_batch_size``.

  Guarantee: for one call, the returned gradient is the Gaussian mechanism with
  noise multiplier ``noise_multiplier`` applied to a sum with L2 sensitivity
  ``clip_norm`` (add/remove one example), then divided by a public constant.

  .. warning::
     ``expected_batch_size`` must be the *expected* logical batch size of your
     sampler (``q * N`` under Poisson sampling), not the number of examples you
     actually got. The loss and ``stats`` are computed from private data
     without noise: they are for monitoring, not for release.

  Args:
    loss_fn: per-example loss, example last.
    clip_norm: C > 0 (``inf`` only with ``noise_multiplier == 0``).
    noise_multiplier: sigma >= 0.
    expected_batch_size: the denominator of the mean, > 0.
    microbatch_size: examples per scan step; must divide the batch size.
    has_aux: ``loss_fn`` returns ``(loss, aux)``; aux is returned per example.
    argnums: which positional args (before the example) to differentiate.
    clipping: how per-example norms are computed: ``"auto"`` (default, fast
      ghost norms where possible), ``"ghost"`` or ``"vmap"``; all exact (see
      :func:`dpmega.clipping.clipped_grad_sum`).
    noise_sampler: the Gaussian sampler (:class:`dpmega.noise.NoiseSampler`):
      ``"wide_tail"`` (default, support ±9.155 std) or ``"jax_bounded"``
      (``jax.random.normal``'s numbers; its support puts a floor under δ). Pass
      the same one to the accountant's ``δ_tail`` (:mod:`dpmega.truncation`).

  Returns:
    ``f(*args, batch, key, mask=None) -> (loss, grads, stats)`` where ``loss``
    is the mean per-example loss over the real examples (``(loss, aux)`` with
    ``has_aux``), ``grads`` is shaped like ``args[argnums]`` (float32), and
    ``stats`` is a :class:`dpmega.ClipStats`.

  Example:
    >>> import jax, jax.numpy as jnp, dpmega
    >>> def loss(w, ex):
    ...   return (ex["x"] @ w - ex["y"]) ** 2
    >>> grad_fn = dpmega.private_value_and_grad(
    ...     loss, clip_norm=1.0, noise_multiplier=1.1, expected_batch_size=8)
    >>> batch = {"x": jnp.ones((8, 3)), "y": jnp.zeros(8)}
    >>> secret = dpmega.secret_bytes()  # once per run, from the OS CSPRNG; never logged
    >>> value, grads, stats = grad_fn(jnp.ones(3), batch, dpmega.step_key(secret, 0))
    >>> float(value), grads.shape, int(stats.num_clipped)
    (9.0, (3,), 8)
  """
  clipping_lib.validate_clip_norm(clip_norm)
  if not clip_norm > 0:
    raise ValueError(f"clip_norm must be > 0 for a useful gradient, got {clip_norm=}.")
  noise_lib.validate_noise_multiplier(noise_multiplier)
  if math.isinf(float(clip_norm)) and noise_multiplier != 0:
    raise ValueError(f"clip_norm must be finite when noise_multiplier > 0, got {clip_norm=}.")
  noise_lib.validate_expected_batch_size(expected_batch_size)
  clipping_lib.validate_microbatch_size(microbatch_size)
  noise_sampler = noise_lib.as_sampler(noise_sampler)
  if clipping not in clipping_lib.clipping_modes():
    raise ValueError(f"clipping must be one of {clipping_lib.clipping_modes()}, got {clipping=!r}.")
  single = isinstance(argnums, int)
  argnums_t = (argnums,) if single else tuple(argnums)
  if not argnums_t or any(not isinstance(a, int) or a < 0 for a in argnums_t):
    raise ValueError(f"argnums must be a non-negative int or a non-empty sequence of them, got {argnums=!r}.")

  @functools.partial(jax.jit, static_argnames=())
  def _compute(args, batch, key, mask):
    diff = tuple(args[i] for i in argnums_t)

    def per_example(diff_params, example):
      full = list(args)
      for i, p in zip(argnums_t, diff_params):
        full[i] = p
      return loss_fn(*full, example)

    grad_sum, aux, stats = clipping_lib.clipped_grad_sum(
        per_example, diff, batch, mask,
        clip_norm=clip_norm, microbatch_size=microbatch_size,
        has_aux=has_aux, clipping=clipping)
    grads = noise_lib.privatize(
        grad_sum, key, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
        expected_batch_size=expected_batch_size, sampler=noise_sampler)
    grads = grads[0] if single else grads
    loss = stats.mean_loss
    return ((loss, aux) if has_aux else loss), grads, stats

  def private_grad_fn(*args_batch_key, mask=None):
    if len(args_batch_key) < 3:
      raise ValueError(
          "the private gradient function takes (*loss_args, batch, key, mask=None); "
          f"got {len(args_batch_key)} positional arguments.")
    *args, batch, key = args_batch_key
    if max(argnums_t) >= len(args):
      raise ValueError(f"argnums={argnums!r} is out of range for {len(args)} argument(s) before the batch.")
    # Before tracing: integer leaves are refused alike in every clipping mode, named from args[argnums].
    clipping_lib.validate_params(args[argnums] if single else tuple(args[i] for i in argnums_t))
    b = clipping_lib.check_batch(batch, mask, microbatch_size)
    if mask is None:
      mask = jnp.ones((b,), jnp.float32)
    return _compute(tuple(args), batch, key, mask)

  return private_grad_fn
