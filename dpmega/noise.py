"""The Gaussian mechanism on a summed, clipped gradient.

Noise is drawn once per logical step, from the caller's key, with one
independent stream per parameter leaf (``jax.random.split`` of the key by leaf
index), so that the draw depends only on the key and the pytree structure --
not on micro-batching or on how arrays are sharded over devices (each draw
is an elementwise function of the key and the coordinate's flat index).
The default sampler, :attr:`NoiseSampler.WIDE_TAIL`
(:func:`dpmega.threefry.wide_tail_normal`), reaches ±9.155 standard
deviations; ``jax.random.normal``'s numbers, which stop at 5.22, are kept
behind ``sampler="jax_bounded"`` only. Every float sampler has a bounded
support, and what it costs is a term ``δ_tail`` of the reported δ
(:mod:`dpmega.truncation`, :func:`sampler_support`).

Guarantee: if ``grad_sum`` has L2 sensitivity ``clip_norm`` (add/remove one
example), ``add_gaussian_noise`` is the Gaussian mechanism with noise
multiplier ``noise_multiplier``; ``privatize`` adds that noise and divides by
the *expected* batch size, a public constant, so the post-processing leaks
nothing about the realized batch size.

.. warning::
   Call these once per logical step on the sum over the WHOLE logical batch.
   Adding noise per micro-batch or per device and then summing multiplies the
   noise by sqrt(#parts) and breaks the accounting; dividing by the realized
   batch size instead of the expected one is data-dependent.
"""

from __future__ import annotations

import enum
import math
from typing import Any

import jax
import jax.numpy as jnp

from dpmega import threefry
from dpmega import truncation
from dpmega import validation

PyTree = Any


class NoiseSampler(enum.Enum):
  """Which Gaussian sampler draws the noise (its support decides ``δ_tail``: :mod:`dpmega.truncation`).

  * ``WIDE_TAIL`` (default): :func:`dpmega.threefry.wide_tail_normal`, support
    ``±9.155293`` standard deviations, symmetric: ``δ_tail`` is negligible for
    realistic runs (1.7e-13 for the README's MNIST example with 669,706
    coordinates; 1.5e-12 with 10^9).
  * ``JAX_BOUNDED``: :func:`dpmega.threefry.normal`, ``jax.random.normal`` bit
    for bit, support ``[-5.420, 5.220]``.

  .. warning::
     ``JAX_BOUNDED`` puts a floor under δ: an output beyond ``5.22 - 1/σ``
     standard deviations on the coordinate one example moves is possible with
     that example and impossible without it (δ >= 4.9e-4 for the README's
     MNIST example, against a claimed 1e-5). Use it only to reproduce runs of
     earlier versions or of other JAX libraries.
  """

  WIDE_TAIL = "wide_tail"
  JAX_BOUNDED = "jax_bounded"


# WIDE_TAIL's edge is the float32 nearest to the quantile of the smallest tail it can draw (2^-64, two-sided),
# attained and never exceeded by construction; JAX_BOUNDED's are erf_inv's values at the ends of its 2^23-point
# uniform grid (both checked exhaustively: tests/test_threefry.py).
_SUPPORTS = {
    NoiseSampler.WIDE_TAIL: truncation.Support(-float(threefry.WIDE_TAIL_EDGE), float(threefry.WIDE_TAIL_EDGE)),
    NoiseSampler.JAX_BOUNDED: truncation.Support(-5.41998291015625, 5.2201128005981445),
}
_DRAWS = {NoiseSampler.WIDE_TAIL: threefry.wide_tail_normal, NoiseSampler.JAX_BOUNDED: threefry.normal}


def as_sampler(sampler: NoiseSampler | str) -> NoiseSampler:
  """``sampler`` as a :class:`NoiseSampler` (its value, e.g. ``"wide_tail"``, is accepted), else ``ValueError``."""
  try:
    return NoiseSampler(sampler)
  except ValueError:
    raise ValueError(f"sampler must be one of {[s.value for s in NoiseSampler]}, got {sampler=!r}.") from None


def sampler_support(sampler: NoiseSampler | str = NoiseSampler.WIDE_TAIL) -> truncation.Support:
  """The exact range of values (standard deviations) that ``sampler`` can return.

  Guarantee: every draw of ``sampler`` lies in ``[lo, hi]`` and both ends can
  be drawn, on the CPU backend (checked exhaustively); the wide-tail sampler's
  ends hold on every backend (a clamp fixes them, not float rounding).

  Example:
    >>> sampler_support()
    Support(lo=-9.155293464660645, hi=9.155293464660645)
    >>> sampler_support("jax_bounded").symmetric
    False
  """
  return _SUPPORTS[as_sampler(sampler)]


def _concrete(value) -> float | None:
  if isinstance(value, jax.core.Tracer):
    return None
  try:
    return float(value)
  except (TypeError, ValueError):
    return math.nan


def validate_noise_multiplier(noise_multiplier) -> None:
  """``ValueError`` unless sigma is a finite number >= 0 (a traced value is not checked)."""
  v = _concrete(noise_multiplier)
  if v is not None:
    validation.check_real("noise_multiplier", v, 0.0)


def validate_expected_batch_size(expected_batch_size) -> None:
  """``ValueError`` unless the public denominator is a finite number > 0 (a traced value is not checked)."""
  v = _concrete(expected_batch_size)
  if v is not None:
    validation.check_real("expected_batch_size", v, 0.0, lo_open=True)


def gaussian_noise_like(tree: PyTree, key: jax.Array, stddev: float | jax.Array, *,
                        sampler: NoiseSampler | str = NoiseSampler.WIDE_TAIL) -> PyTree:
  """Independent ``N(0, stddev^2)`` float32 noise shaped like each leaf of ``tree``, drawn by ``sampler``."""
  draw = _DRAWS[as_sampler(sampler)]
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  keys = jax.random.split(key, max(len(leaves), 1))
  stddev = jnp.asarray(stddev, jnp.float32)
  noise = [stddev * draw(k, jnp.shape(x)) for k, x in zip(keys, leaves)]
  return jax.tree_util.tree_unflatten(treedef, noise)


def add_gaussian_noise(
    grad_sum: PyTree,
    key: jax.Array,
    *,
    noise_multiplier: float | jax.Array,
    clip_norm: float | jax.Array,
    sampler: NoiseSampler | str = NoiseSampler.WIDE_TAIL,
) -> PyTree:
  """``grad_sum + N(0, (noise_multiplier * clip_norm)^2)`` on every coordinate.

  Args:
    grad_sum: the clipped sum over a whole logical batch (float32 pytree).
    key: a PRNG key used for this step only.
    noise_multiplier: sigma, >= 0.
    clip_norm: C, the L2 sensitivity of ``grad_sum``.
    sampler: the Gaussian sampler (:class:`NoiseSampler`); its support
      (:func:`sampler_support`) decides the run's ``δ_tail``.

  Returns:
    The noisy sum, float32.
  """
  validate_noise_multiplier(noise_multiplier)
  sampler = as_sampler(sampler)
  if _concrete(clip_norm) is not None and not math.isfinite(_concrete(clip_norm)):
    if _concrete(noise_multiplier) != 0:
      raise ValueError(f"clip_norm must be finite when noise is added, got {clip_norm=}.")
    return grad_sum
  stddev = jnp.asarray(noise_multiplier, jnp.float32) * jnp.asarray(clip_norm, jnp.float32)
  noise = gaussian_noise_like(grad_sum, key, stddev, sampler=sampler)
  return jax.tree_util.tree_map(lambda g, n: g.astype(jnp.float32) + n, grad_sum, noise)


def privatize(
    grad_sum: PyTree,
    key: jax.Array,
    *,
    noise_multiplier: float | jax.Array,
    clip_norm: float | jax.Array,
    expected_batch_size: float | jax.Array,
    sampler: NoiseSampler | str = NoiseSampler.WIDE_TAIL,
) -> PyTree:
  """The noisy mean gradient: ``(grad_sum + N(0, (sigma C)^2)) / expected_batch_size``.

  ``sampler`` chooses the Gaussian sampler (:class:`NoiseSampler`; default
  wide-tail), as in :func:`add_gaussian_noise`.

  Example:
    >>> import jax, jax.numpy as jnp
    >>> from dpmega.noise import privatize
    >>> g = privatize({"w": jnp.zeros(3)}, jax.random.key(0), noise_multiplier=0.0,
    ...               clip_norm=1.0, expected_batch_size=4)
    >>> g["w"].tolist()
    [0.0, 0.0, 0.0]
  """
  validate_expected_batch_size(expected_batch_size)
  noisy = add_gaussian_noise(grad_sum, key, noise_multiplier=noise_multiplier, clip_norm=clip_norm,
                             sampler=sampler)
  denom = jnp.asarray(expected_batch_size, jnp.float32)
  return jax.tree_util.tree_map(lambda g: g / denom, noisy)


# ----------------------------------------------------------------------------- secret keys
# Invariant 7: the mechanism's randomness is secret. Noise and sampling are pure functions of
# (root secret, generation, step), so anyone holding the secret can regenerate them and subtract the
# noise: the secret is >= 128 bits from the OS CSPRNG, kept in the checkpoint and nowhere else, and each
# use gets its own HMAC-SHA256 stream (a threefry key holds only 64 bits, too few to be the root).
# Imported here so that this block stays one unit (the module's top belongs to the Gaussian sampler).
import hashlib as _hashlib  # noqa: E402
import hmac as _hmac  # noqa: E402
import secrets as _secrets  # noqa: E402

import numpy as _np  # noqa: E402

SECRET_BYTES = 32  # the root secret drawn by default: 256 bits
MIN_SECRET_BYTES = 16  # 128 bits: below this a secret is refused
_MAX_FIELD = 2**63 - 1
# Domain separation: a step's noise, its Poisson sample and its data preparation (e.g. BERT masking) are
# independent streams; knowing one reveals nothing about the others.
_NOISE_DOMAIN = b"dpmega/noise/v1"
_SAMPLER_DOMAIN = b"dpmega/sampler/v1"
_PREPARE_DOMAIN = b"dpmega/prepare/v1"
_INSECURE_SEED_DOMAIN = b"dpmega/insecure-reproducible-seed/v1"


def secret_bytes(num_bytes: int = SECRET_BYTES) -> bytes:
  """A fresh root secret from the operating system's CSPRNG (:func:`secrets.token_bytes`).

  Keep it as you keep the model's checkpoints (it is in them): whoever holds it
  can regenerate the noise of every step and remove it.

  Args:
    num_bytes: length, at least :data:`MIN_SECRET_BYTES` (16 = 128 bits).

  Example:
    >>> a, b = secret_bytes(), secret_bytes()
    >>> len(a), a != b
    (32, True)
  """
  return _secrets.token_bytes(validation.check_int("num_bytes", num_bytes, MIN_SECRET_BYTES))


def insecure_secret_from_seed(seed: int) -> bytes:
  """A root secret computed from a PUBLIC integer seed: for reproducible tests and debugging only.

  .. warning::
     The noise and the samples of a run keyed by this are reproducible by
     anyone who knows (or guesses) ``seed``: they can subtract the noise and
     read the exact clipped gradient sums. A model trained so is NOT a private
     release, whatever epsilon the accountant prints.

  Args:
    seed: an int in ``[0, 2**63 - 1]``.
  """
  validation.check_int("seed", seed, 0, _MAX_FIELD)
  return _hashlib.sha256(_INSECURE_SEED_DOMAIN + int(seed).to_bytes(8, "big")).digest()


def validate_secret(secret: bytes) -> bytes:
  """Returns ``secret`` as bytes if it is a root secret of at least 128 bits, else raises ``ValueError``."""
  if not isinstance(secret, (bytes, bytearray)) or len(secret) < MIN_SECRET_BYTES:
    got = f"{type(secret).__name__} of length {len(secret)}" if hasattr(secret, "__len__") else repr(type(secret))
    raise ValueError(f"secret must be bytes of length >= {MIN_SECRET_BYTES} (from secret_bytes()), got {got}.")
  return bytes(secret)


def derive_bytes(secret: bytes, domain: bytes, step: int, *, generation: int = 0) -> bytes:
  """``HMAC-SHA256(secret, domain | 0x00 | generation | step)``: 32 bytes, a PRF of the secret.

  Fixed-width big-endian fields make the message unambiguous, so distinct
  ``(domain, generation, step)`` never share an output.
  """
  secret = validate_secret(secret)
  msg = bytes(domain) + b"\x00" + validation.check_int("generation", generation, 0, _MAX_FIELD).to_bytes(8, "big") + \
      validation.check_int("step", step, 0, _MAX_FIELD).to_bytes(8, "big")
  return _hmac.new(secret, msg, _hashlib.sha256).digest()


def _threefry_key(digest: bytes) -> jax.Array:
  # The implementation is named so that a process-wide default (e.g. rbg) cannot change the numbers.
  return jax.random.wrap_key_data(jnp.asarray(_np.frombuffer(digest[:8], "<u4")), impl="threefry2x32")


def step_key(secret: bytes, step: int, *, generation: int = 0) -> jax.Array:
  """The noise key of logical step ``step``: a typed threefry key, a PRF of the secret.

  Guarantee: without ``secret``, the keys of distinct ``(generation, step)``
  are indistinguishable from independent uniform 64-bit keys (HMAC-SHA256 is a
  PRF); they do not reveal the secret or each other. The same arguments give
  the same key on every process and device count.

  Args:
    secret: the run's root secret (:func:`secret_bytes`), >= 16 bytes.
    step: the logical step, an int in ``[0, 2**63 - 1]``.
    generation: bumped when a step is recomputed differently (a rewind), so
      that no key serves two different computations.

  Example:
    >>> s = secret_bytes()
    >>> k = step_key(s, 3)
    >>> bool((jax.random.key_data(k) == jax.random.key_data(step_key(s, 3))).all())
    True
    >>> bool((jax.random.key_data(k) == jax.random.key_data(step_key(s, 3, generation=1))).all())
    False
  """
  return _threefry_key(derive_bytes(secret, _NOISE_DOMAIN, step, generation=generation))


def prepare_key(secret: bytes, step: int, *, generation: int = 0) -> jax.Array:
  """Step ``step``'s key for data preparation (e.g. BERT masking): independent of its noise key."""
  return _threefry_key(derive_bytes(secret, _PREPARE_DOMAIN, step, generation=generation))


def sampler_entropy(secret: bytes, step: int, *, generation: int = 0) -> int:
  """A 256-bit int seeding step ``step``'s sample (``numpy.random.SeedSequence``), independent of the noise."""
  return int.from_bytes(derive_bytes(secret, _SAMPLER_DOMAIN, step, generation=generation), "big")


def secret_key() -> jax.Array:
  """A fresh typed threefry key from the OS CSPRNG, for a loop that keys step ``t`` by ``fold_in(key, t)``.

  It holds 64 bits; for a long run prefer ``step_key(secret, t)`` with a
  256-bit ``secret = secret_bytes()`` (what the trainer does).
  """
  return _threefry_key(_secrets.token_bytes(8))


def secret_to_words(secret: bytes) -> _np.ndarray:
  """The secret as little-endian uint32 words (how a checkpoint and a broadcast carry it)."""
  secret = validate_secret(secret)
  if len(secret) % 4:
    raise ValueError(f"secret length must be a multiple of 4 to be stored as words, got {len(secret)}.")
  return _np.frombuffer(secret, "<u4").copy()


def secret_from_words(words) -> bytes:
  """Inverse of :func:`secret_to_words`."""
  words = _np.asarray(words)
  if words.ndim != 1 or words.dtype != _np.uint32:
    raise ValueError(f"words must be a 1-D uint32 array, got shape {words.shape} and dtype {words.dtype}.")
  return validate_secret(words.astype("<u4").tobytes())
