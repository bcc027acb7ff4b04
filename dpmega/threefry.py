"""The float32 Gaussian draws of the noise: a wide-tail sampler, and ``jax.random.normal`` bit for bit.

Two samplers, both elementwise functions of (key, flat index) and so
sharding-independent, both one fused XLA loop:

* :func:`wide_tail_normal` (the default of :mod:`dpmega.noise`): a sign bit and
  a 63-bit tail probability from the two 32-bit words of one threefry block,
  through the normal quantile (Wichura's AS 241) in float32. Its support is
  ``[-WIDE_TAIL_EDGE, WIDE_TAIL_EDGE]`` = ``±9.1553`` standard deviations,
  symmetric and attained, which is what :mod:`dpmega.truncation` needs.
* :func:`normal`: ``jax.random.normal``'s numbers (one 23-bit uniform through
  ``erf_inv``), whose support is ``[-5.420, 5.220]``: a floor under δ
  (``dpmega.noise.NoiseSampler.JAX_BOUNDED``).

JAX lowers its threefry hash on CPU as a rolled ``fori_loop`` over five
blocks of rounds, so every round reads and writes whole arrays. Written
unrolled (as JAX itself lowers it on GPU and TPU), XLA fuses the counter, the
20 rounds and the transform into one elementwise loop: 1.8-3.7x faster than
``jax.random.normal`` on our 2-core CPU; the wide-tail transform (one log, one
sqrt, three rational functions of degree 3) costs no more than ``erf_inv``:
0.89-0.93x the jax-bounded draw (``bench/noise_draw.py``).

Guarantee: ``wide_tail_normal`` returns values in ``±WIDE_TAIL_EDGE``, both
ends attained, on every backend; its law is the normal's to float32
precision (within 6 ulp of the exact quantile; its probabilities beyond 1 to
9 std match the normal's to float32 resolution or the 2^-63 grid: tested,
down to the last drawable values). For a key whose implementation is
``threefry2x32``, under ``jax_threefry_partitionable`` (the default),
``normal(key, shape)`` equals ``jax.random.normal(key, shape, jnp.float32)``
bit for bit (tested); any other key implementation, the non-partitionable
mode, or an array of 2^32 or more elements falls back to
``jax.random.normal``. Both are elementwise functions of the flat index, so
sharding-independent. Compiled (as in every step) the numbers are the same on
1 or 8 devices; op-by-op eager calls may round a few draws 1 ulp differently.

References:
  Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3" (SC'11).
  https://doi.org/10.1145/2063384.2063405
  Wichura 1988, "Algorithm AS 241: the percentage points of the normal
  distribution", Applied Statistics 37(3). https://doi.org/10.2307/2347330
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)
# jax.random.uniform's open interval for normal(): (nextafter(-1, 0), 1).
_LO = np.nextafter(np.float32(-1.0), np.float32(0.0))
_SPAN = np.float32(1.0) - _LO


def _rotate_left(x: jax.Array, r: int) -> jax.Array:
  return (x << np.uint32(r)) | (x >> np.uint32(32 - r))


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Threefry-2x32 with 20 rounds (Salmon et al. 2011), unrolled; JAX's ``threefry2x32_p``."""
  ks = (k0, k1, k0 ^ k1 ^ _PARITY)
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for block in range(5):
    for r in _ROTATIONS[block % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, r) ^ x0
    x0 = x0 + ks[(block + 1) % 3]
    x1 = x1 + ks[(block + 2) % 3] + np.uint32(block + 1)
  return x0, x1


def _flat_index(shape: tuple[int, ...]) -> jax.Array:
  """uint32 row-major flat index, built from broadcast iotas so XLA's SPMD partitioner can split it."""
  strides = np.cumprod((shape[1:] + (1,))[::-1])[::-1]
  return sum(lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(s) for d, s in enumerate(strides))


def _fast_path_applies(key: jax.Array, shape: tuple[int, ...]) -> bool:
  return (str(jax.random.key_impl(key)) == "threefry2x32"
          and bool(jax.config.jax_threefry_partitionable)
          and math.prod(shape) < 2 ** 32)


def _typed_single_key(key: jax.Array) -> jax.Array:
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.shape != ():
    raise ValueError(f"a sampler takes a single key, got key.shape={key.shape}.")
  return key


def normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal float32 array of ``shape``, equal to ``jax.random.normal(key, shape)``.

  Args:
    key: a single PRNG key, typed (``jax.random.key``) or raw uint32[2] (``jax.random.PRNGKey``).
    shape: the output shape.

  Returns:
    float32 array of ``shape``.

  Example:
    >>> import jax
    >>> k = jax.random.key(0)
    >>> bool((normal(k, (3, 5)) == jax.random.normal(k, (3, 5))).all())
    True
  """
  shape = tuple(int(d) for d in shape)
  key = _typed_single_key(key)
  if not _fast_path_applies(key, shape):
    return jax.random.normal(key, shape, jnp.float32)
  if math.prod(shape) == 0:
    return jnp.zeros(shape, jnp.float32)
  k = jax.random.key_data(key)
  counts = _flat_index(shape) if shape else jnp.zeros((), jnp.uint32)
  # The 64-bit counter is (0, flat index): the high word is 0 below 2^32 elements.
  b0, b1 = threefry2x32(k[0], k[1], jnp.zeros_like(counts), counts)
  return jax_normal_from_bits(b0 ^ b1)


def jax_normal_from_bits(bits: jax.Array) -> jax.Array:
  """``jax.random.normal``'s float32 normal of 32 random bits (only the top 23 are used): ``√2·erf_inv(u)``."""
  mantissa = (bits >> np.uint32(9)) | np.uint32(0x3F800000)  # [1, 2)
  unit = lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)  # [0, 1)
  u = lax.max(_LO, unit * _SPAN + _LO)  # (-1, 1)
  return np.float32(math.sqrt(2.0)) * lax.erf_inv(u)


# ----------------------------------------------------------------------------- the wide-tail sampler
# Wichura's AS 241 (PPND7): the normal quantile to about 1 part in 10^7, valid down to tails far below 2^-65,
# coefficients lowest degree first. Float32 evaluation keeps it within 6 ulp of the exact quantile (tested);
# jax.random.normal's erf_inv is off by up to ~90 ulp near 3.8.
_AS241_CENTRAL = ((3.3871327179, 50.434271938, 159.29113202, 59.109374720),
                  (1.0, 17.895169469, 78.757757664, 67.187563600))
_AS241_NEAR = ((1.4234372777, 2.7568153900, 1.3067284816, 0.17023821103), (1.0, 0.73700164250, 0.12021132975))
_AS241_FAR = ((6.6579051150, 3.0812263860, 0.42868294337, 0.017337203997), (1.0, 0.24197894225, 0.012258202635))
# The smallest tail probability, (0 + 1/2) * 2^-63, and the float32 nearest to its quantile
# Phi^-1(1 - 2^-65) = 9.1552937727 (checked against scipy): the edge of the support, by construction.
_TAIL_MIN = np.float32(2.0**-64)
WIDE_TAIL_EDGE = np.float32(9.155293464660645)


def _rational(coeffs: tuple[tuple[float, ...], tuple[float, ...]], x: jax.Array) -> jax.Array:
  num, den = ([np.float32(c) for c in cs] for cs in coeffs)
  horner = lambda cs: functools.reduce(lambda acc, c: acc * x + c, cs[-2::-1], cs[-1])
  return horner(num) / horner(den)


def quantile_magnitude(tail: jax.Array) -> jax.Array:
  """``Φ^-1(1 - tail/2)`` in float32 (AS 241), the ``|z|`` with ``P(|Z| > |z|) = tail``, for ``tail`` in ``(0, 1]``."""
  half = tail * np.float32(0.5)  # the one-sided tail, exact
  q = np.float32(0.5) - half
  central = q * _rational(_AS241_CENTRAL, np.float32(0.180625) - q * q)
  r = lax.sqrt(-lax.log(half))
  near = _rational(_AS241_NEAR, r - np.float32(1.6))
  far = _rational(_AS241_FAR, r - np.float32(5.0))
  return jnp.where(q <= np.float32(0.425), central, jnp.where(r <= np.float32(5.0), near, far))


def tail_magnitude(tail: jax.Array) -> jax.Array:
  """:func:`quantile_magnitude` with its range pinned to ``[0, WIDE_TAIL_EDGE]``, for ``tail`` in ``[2^-64, 1]``.

  Guarantee: the result lies in ``[0, WIDE_TAIL_EDGE]`` and equals
  ``WIDE_TAIL_EDGE`` at ``tail = 2^-64``, on every backend: a clamp, not how
  a backend rounds ``log`` and division, fixes the support. On CPU the clamp
  changes only tails below ``1.001 * 2^-64`` (tested exhaustively over every
  float32 tail), of which the sampler draws only ``2^-64`` itself (1 ulp
  lower), so it does not bend the law.
  """
  z = quantile_magnitude(tail)
  return jnp.where(tail <= _TAIL_MIN, WIDE_TAIL_EDGE, lax.min(z, WIDE_TAIL_EDGE))


def normal_from_bits(b0: jax.Array, b1: jax.Array) -> jax.Array:
  """The wide-tail standard normal of one threefry block ``(b0, b1)`` (uint32 arrays of one shape).

  The top bit of ``b0`` is the sign; its other 31 bits and ``b1`` are a 63-bit
  integer ``k``, and ``tail = (k + 1/2) * 2^-63`` (in float32: relative, not
  absolute, precision, so small tails keep theirs) is the two-sided tail
  probability of the magnitude: ``|z| = Phi^-1(1 - tail / 2)``.

  Guarantee: the output lies in ``[-WIDE_TAIL_EDGE, WIDE_TAIL_EDGE]``, both
  ends attained (at ``b0 & 0x7fffffff == b1 == 0``), and is symmetric: ``-z``
  is the output of the words with the sign bit flipped.

  Edge cases: ``tail`` is never 0 (``k + 1/2 > 0``), so there is no infinity;
  the largest ``k`` rounds to ``tail = 1``, ``z = ±0``.
  """
  k_high = (b0 & np.uint32(0x7FFFFFFF)).astype(jnp.float32)
  k_low = b1.astype(jnp.float32)
  tail = k_high * np.float32(2.0**-31) + (k_low * np.float32(2.0**-63) + _TAIL_MIN)
  magnitude = lax.bitcast_convert_type(tail_magnitude(tail), jnp.uint32)
  return lax.bitcast_convert_type(magnitude | (b0 & np.uint32(0x80000000)), jnp.float32)


def wide_tail_normal(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Standard normal float32 array of ``shape`` whose support reaches ±9.155 standard deviations.

  Coordinate ``i`` (row-major flat index) is ``normal_from_bits`` of the
  threefry2x32 block of counter ``(0, i)`` under ``key``: an elementwise
  function of (key, i), so the same numbers whatever the sharding, on 1 device
  or 8, and whatever ``jax_threefry_partitionable`` says.

  Args:
    key: a single PRNG key, typed (``jax.random.key``) or raw uint32[2] (``jax.random.PRNGKey``).
    shape: the output shape.

  Returns:
    float32 array of ``shape``, in ``[-WIDE_TAIL_EDGE, WIDE_TAIL_EDGE]``.

  Edge cases: a key of another implementation (``rbg``), or an array of 2^32
  or more elements, takes its two words from ``jax.random.bits`` instead:
  other numbers, the same law and support (sharding-independent only under
  ``jax_threefry_partitionable``).

  Example:
    >>> import jax
    >>> x = wide_tail_normal(jax.random.key(0), (2, 3))
    >>> x.shape, x.dtype, bool((abs(x) <= WIDE_TAIL_EDGE).all())
    ((2, 3), dtype('float32'), True)
  """
  shape = tuple(int(d) for d in shape)
  key = _typed_single_key(key)
  if math.prod(shape) == 0:
    return jnp.zeros(shape, jnp.float32)
  if str(jax.random.key_impl(key)) != "threefry2x32" or math.prod(shape) >= 2**32:
    bits = jax.random.bits(key, (2, *shape), jnp.uint32)
    return normal_from_bits(bits[0], bits[1])
  k = jax.random.key_data(key)
  counts = _flat_index(shape) if shape else jnp.zeros((), jnp.uint32)
  b0, b1 = threefry2x32(k[0], k[1], jnp.zeros_like(counts), counts)
  return normal_from_bits(b0, b1)
