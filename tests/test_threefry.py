"""dpmega.threefry.normal draws jax.random.normal's numbers, bit for bit, in every setting we use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpmega import threefry


def _same(a, b):
  a, b = np.asarray(a), np.asarray(b)
  assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
  np.testing.assert_array_equal(a.view(np.uint32), b.view(np.uint32))


@pytest.mark.parametrize("shape", [(), (0,), (1,), (7,), (3, 0, 2), (300, 100), (5, 13, 11), (2, 3, 4, 5),
                                   (1 << 20,)])
@pytest.mark.parametrize("seed", [0, 123456789])
def test_equals_jax_random_normal_bit_for_bit(shape, seed):
  key = jax.random.key(seed)
  _same(jax.jit(threefry.normal, static_argnums=1)(key, shape), jax.random.normal(key, shape))


def test_equals_jax_for_raw_split_and_folded_keys():
  raw = jax.random.PRNGKey(3)
  _same(threefry.normal(raw, (50,)), jax.random.normal(raw, (50,)))
  for k in jax.random.split(jax.random.key(9), 4):
    _same(threefry.normal(k, (64, 3)), jax.random.normal(k, (64, 3)))
  k = jax.random.fold_in(jax.random.key(1), 2**31 + 5)
  _same(threefry.normal(k, (10,)), jax.random.normal(k, (10,)))


def test_equals_jax_under_vmap_over_keys():
  keys = jax.random.split(jax.random.key(4), 6)
  got = jax.vmap(lambda k: threefry.normal(k, (33,)))(keys)
  _same(got, jax.vmap(lambda k: jax.random.normal(k, (33,)))(keys))


def test_other_generators_fall_back_to_jax():
  for key in (jax.random.key(2, impl="rbg"), jax.random.key(2, impl="unsafe_rbg")):
    _same(threefry.normal(key, (40,)), jax.random.normal(key, (40,)))
  with jax.threefry_partitionable(False):
    key = jax.random.key(2)
    _same(threefry.normal(key, (40,)), jax.random.normal(key, (40,)))


def test_a_batch_of_keys_is_rejected():
  with pytest.raises(ValueError, match="single key"):
    threefry.normal(jax.random.split(jax.random.key(0), 2), (3,))


def test_threefry_hash_matches_the_published_known_answer():
  # Known-answer vectors of Threefry-2x32-20 from the Random123 distribution (kat_vectors),
  # the same ones JAX's own tests use.
  cases = [((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
           ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
           ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
  for key, count, want in cases:
    u = lambda v: jnp.asarray(np.uint32(v))
    got = threefry.threefry2x32(u(key[0]), u(key[1]), u(count[0]), u(count[1]))
    assert [int(x) for x in got] == list(want)


def test_moments_of_a_large_draw():
  x = np.asarray(threefry.normal(jax.random.key(11), (2_000_000,)), np.float64)
  assert abs(x.mean()) < 6 / np.sqrt(x.size)
  assert abs(x.std() - 1) < 6 / np.sqrt(2 * x.size)
