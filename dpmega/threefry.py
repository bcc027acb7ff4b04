"""``jax.random.normal`` for threefry keys, bit for bit, in one fused XLA loop.

JAX lowers its threefry hash on CPU as a rolled ``fori_loop`` over five
blocks of rounds, so every round reads and writes whole arrays: a float32
normal costs ~9 ns per coordinate on our 2-core CPU for a 10^6-row table, and
DP-SGD draws one on every parameter each step. Written unrolled (as JAX itself
lowers it on GPU and TPU), XLA fuses the counter, the 20 rounds, the uniform
and ``erf_inv`` into one elementwise loop: ~3 ns per coordinate (1.7-3.1x
faster, ``bench/noise_draw.py``), with the same numbers.

Guarantee: for a key whose implementation is ``threefry2x32``, under
``jax_threefry_partitionable`` (the default), ``normal(key, shape)`` equals
``jax.random.normal(key, shape, jnp.float32)`` bit for bit (tested). It is an
elementwise function of the flat index, so it is sharding-independent exactly
as JAX's is. Any other key implementation, the non-partitionable mode, or an
array of 2^32 or more elements falls back to ``jax.random.normal``.

References:
  Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3" (SC'11).
  https://doi.org/10.1145/2063384.2063405
"""

from __future__ import annotations

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
  if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.wrap_key_data(key)
  if key.shape != ():
    raise ValueError(f"normal() takes a single key, got key.shape={key.shape}.")
  if not _fast_path_applies(key, shape):
    return jax.random.normal(key, shape, jnp.float32)
  if math.prod(shape) == 0:
    return jnp.zeros(shape, jnp.float32)
  k = jax.random.key_data(key)
  counts = _flat_index(shape) if shape else jnp.zeros((), jnp.uint32)
  # The 64-bit counter is (0, flat index): the high word is 0 below 2^32 elements.
  b0, b1 = threefry2x32(k[0], k[1], jnp.zeros_like(counts), counts)
  mantissa = ((b0 ^ b1) >> np.uint32(9)) | np.uint32(0x3F800000)  # [1, 2)
  unit = lax.bitcast_convert_type(mantissa, jnp.float32) - np.float32(1.0)  # [0, 1)
  u = lax.max(_LO, unit * _SPAN + _LO)  # (-1, 1)
  return np.float32(math.sqrt(2.0)) * lax.erf_inv(u)
