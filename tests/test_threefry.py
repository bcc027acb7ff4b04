"""dpmega.threefry: the wide-tail sampler's support, law and keying; ``normal`` is jax.random.normal bit for bit."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special
from scipy import stats

from dpmega import noise
from dpmega import threefry

EDGE = threefry.WIDE_TAIL_EDGE
U32 = np.uint32


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


# ----------------------------------------------------------------------------- jax_bounded's support


def test_jax_bounded_support_is_exact_over_all_2_23_uniforms():
  # normal() uses the top 23 of 32 bits: every value it can return is one of these 2^23.
  z = np.asarray(jax.jit(threefry.jax_normal_from_bits)(jnp.arange(2**23, dtype=jnp.uint32) << U32(9)))
  support = noise.sampler_support("jax_bounded")
  assert (float(z.min()), float(z.max())) == (support.lo, support.hi)


# ----------------------------------------------------------------------------- wide tail: support


def _words(b0, b1):
  return jnp.asarray(np.asarray(b0, np.uint64).astype(U32)), jnp.asarray(np.asarray(b1, np.uint64).astype(U32))


_from_bits = jax.jit(threefry.normal_from_bits)
_raw_magnitude = jax.jit(threefry.quantile_magnitude)


def _float32_range(lo, hi):
  """Every float32 in [lo, hi) (positive, finite)."""
  a, b = np.array([lo, hi], np.float32).view(U32)
  return np.arange(a, b, dtype=U32).view(np.float32)


def test_wide_tail_edge_is_the_float32_quantile_of_the_smallest_tail():
  # The smallest tail probability is (0 + 1/2) * 2^-63 = 2^-64 (two-sided), so the edge is Phi^-1(1 - 2^-65).
  assert EDGE == np.float32(-special.ndtri(2.0**-65)) == np.float32(9.155293464660645)
  support = noise.sampler_support()
  assert support == noise.sampler_support("wide_tail") and support.symmetric
  assert support.hi == float(EDGE) and support.hi >= 8.5  # the floor


def test_wide_tail_extreme_words_give_exactly_plus_minus_edge_and_zero():
  b0, b1 = _words([0, 0x80000000, 0x7FFFFFFF, 0xFFFFFFFF, 0, 1], [0, 0, 0xFFFFFFFF, 0xFFFFFFFF, 1, 0])
  z = np.asarray(_from_bits(b0, b1))
  assert z[0] == EDGE and z[1] == -EDGE  # the ends are attained (the clamp pins them on every backend)
  assert z[2] == 0 and z[3] == 0  # the largest 63-bit integer rounds to tail 1: +-0, never inf or nan
  # k = 1 and k = 2^32: tails (1 + 1/2) 2^-63 and (2^32 + 1/2) 2^-63, well inside the edge.
  np.testing.assert_allclose(z[4:], -special.ndtri(np.array([1.5, 2.0**32 + 0.5]) * 2.0**-64), rtol=1e-6)
  assert z[4] < EDGE - 0.1


def test_wide_tail_is_symmetric_word_by_word():
  rng = np.random.default_rng(0)
  b0 = rng.integers(0, 2**32, 100_000, dtype=np.uint64)
  b1 = rng.integers(0, 2**32, 100_000, dtype=np.uint64)
  z = np.asarray(_from_bits(*_words(b0, b1)))
  flipped = np.asarray(_from_bits(*_words(b0 ^ 0x80000000, b1)))
  np.testing.assert_array_equal(flipped, -z)
  assert np.isfinite(z).all() and np.abs(z).max() <= EDGE


# The words form tail 2^-64 only from k = 0; any other k gives (k + 1/2) 2^-63 >= 3 * 2^-64 (float32 rounding is
# monotone and these are exact). The raw quantile reaches the edge only for float32 tails below 1.001 * 2^-64:
# the clamp in tail_magnitude changes the edge itself (by 1 ulp on CPU) and nothing the sampler can draw.
_CLAMP_BELOW = np.float32(1.001 * 2.0**-64)


def test_wide_tail_raw_quantile_stays_below_edge_near_it_exhaustive():
  # Every float32 tail in [2^-64, 2^-56): 2^26 values, all the tails within 8 binades of the edge.
  tails = _float32_range(2.0**-64, 2.0**-56)
  raw = np.concatenate([np.asarray(_raw_magnitude(jnp.asarray(c))) for c in np.array_split(tails, 8)])
  assert np.isfinite(raw).all()
  assert raw[0] <= np.nextafter(EDGE, np.float32(10))  # at most 1 ulp over at the edge
  assert (raw[tails >= _CLAMP_BELOW] < EDGE).all()
  # Non-increasing up to float32 rounding (1-ulp wiggles, no jumps) from the next drawable tail on.
  assert np.diff(raw[tails >= np.float32(3 * 2.0**-64)]).max() <= np.spacing(EDGE)


@pytest.mark.slow
def test_wide_tail_raw_quantile_below_edge_for_every_float32_tail():
  # Exhaustive: every float32 in [2^-64, 1] (2^29 values), a superset of the tails the words can form.
  clamped_elsewhere = 0
  for lo in range(-64, 0):
    tails = _float32_range(2.0**lo, 2.0**(lo + 1))
    raw = np.asarray(_raw_magnitude(jnp.asarray(tails)))
    assert np.isfinite(raw).all() and (raw >= 0).all()
    clamped_elsewhere += int((raw[tails >= _CLAMP_BELOW] >= EDGE).sum())
  assert clamped_elsewhere == 0
  assert float(_raw_magnitude(jnp.float32(1.0))) == 0.0


# Under high word 0, normal_from_bits reads the low word b1 as float32(b1): the 2^32 low words fall into runs of
# consecutive words with one float32 value (every word below 2^24 its own run; above, runs of up to 2^(e-23) words
# in [2^e, 2^(e+1)), centred on the multiples of that spacing, ties to even). Every word has the output of its
# run; both ends of every run are evaluated (3 words per run straddle each boundary between two runs), so a
# library that read b1 other than as one float32 would still be checked at every run's ends (the output falls with
# the tail integer: tested near the edge below). 2.2e8 words instead of 4.3e9: 20x less time.
_EXACT = 2**24
_RUN_ENDS = (-1, 0, 1)  # around each boundary between runs: spacing / 2 past a multiple of the spacing


@functools.partial(jax.jit, static_argnames=("spacing", "count", "offsets"))
def _sweep_high_word_zero(start, spacing, count, offsets):
  """Over the low words ``start + spacing * i + o`` (``i < count``, ``o`` in ``offsets``) under high word 0:
  (#outputs not finite or not in (0, EDGE], #EDGE)."""
  base = start + jnp.uint32(spacing) * jax.lax.iota(jnp.uint32, count)
  b1 = (base[:, None] + jnp.asarray(offsets, jnp.uint32)[None, :]).reshape(-1)
  z = threefry.normal_from_bits(jnp.zeros_like(b1), b1)
  return jnp.sum(~(jnp.isfinite(z) & (z > 0) & (z <= EDGE))), jnp.sum(z == EDGE)


def _low_word_run_ends():
  """(start, spacing, count, offsets) sweeps covering every word below 2^24 and both ends of every run above."""
  sweeps = [(0, 1, _EXACT, (0,)), (2**32 - 1, 1, 1, (0,))]  # the last word: the top end of the run rounding to 2^32
  for e in range(24, 32):
    spacing = 2 ** (e - 23)
    sweeps.append((2**e, spacing, 2**23, tuple(spacing // 2 + o for o in _RUN_ENDS)))
  return sweeps


def test_low_word_run_ends_are_the_ends_of_every_float32_run():
  # The sweep below is exhaustive only if its words include both ends of every run of low words with one float32
  # value: checked on every binade, on the runs around its first, a middle and its last multiple of the spacing.
  for start, spacing, count, offsets in _low_word_run_ends()[2:]:
    words = {start + spacing * i + o for i in (0, 1, count // 2 - 1, count // 2, count - 2, count - 1) for o in offsets}
    for i in (1, count // 2, count - 1):
      v = start + spacing * i
      run = [w for w in range(v - spacing, v + spacing + 1) if np.float32(w) == np.float32(v)]
      assert run == list(range(run[0], run[-1] + 1)) and run[0] in words and run[-1] in words, (start, i)
  assert np.float32(2**32 - 1) == np.float32(2**32) and np.float32(2**24 - 1) != np.float32(2**24)


@pytest.mark.slow
def test_wide_tail_every_low_word_under_the_smallest_high_word():
  # Over the 2^32 low words under high word 0, the only one whose tails come near the edge (high word 1 starts at
  # tail 2^-31, covered by the float32 sweep above): the only +-EDGE is at (0, 0), everything else is strictly
  # inside and finite, and the sign bit only negates. Every float32 value of the low word, at both ends of its run
  # of words (see _low_word_run_ends), counted on the device (~10 s on 2 busy cores).
  bad = seen_edge = 0
  for start, spacing, count, offsets in _low_word_run_ends():
    b, e = _sweep_high_word_zero(jnp.uint32(start), spacing=spacing, count=count, offsets=offsets)
    bad, seen_edge = bad + int(b), seen_edge + int(e)
  assert bad == 0 and seen_edge == 1
  b1 = jnp.arange(1024, dtype=jnp.uint32)
  neg = np.asarray(_from_bits(jnp.full((1024,), 0x80000000, jnp.uint32), b1))
  np.testing.assert_array_equal(neg, -np.asarray(_from_bits(jnp.zeros((1024,), jnp.uint32), b1)))


def test_wide_tail_output_falls_with_the_tail_integer_near_the_edge():
  # k = (b0 & 0x7fffffff) * 2^32 + b1: a larger k is a larger tail, hence a |z| no larger, up to 1-ulp
  # float32 wiggles (first 2^20 k); k = 0 is the only edge.
  z = np.asarray(_from_bits(*_words(np.zeros(2**20), np.arange(2**20))))
  assert z[0] == EDGE and (z[1:] < EDGE - 0.1).all()
  assert np.diff(z).max() <= np.spacing(EDGE)


# ----------------------------------------------------------------------------- wide tail: the law


def _ulp_errors(got, want):
  want32 = np.abs(want).astype(np.float32)
  return np.abs(got.astype(np.float64) - want) / np.spacing(want32).astype(np.float64)


def test_wide_tail_quantile_matches_scipy_to_float32_precision():
  # At 10^6 tails log-uniform over [2^-64, 1] and 10^6 uniform on (0, 1): within 6 ulp of the exact
  # quantile (jax.random.normal's erf_inv is off by up to ~90 ulp, checked below for comparison).
  rng = np.random.default_rng(1)
  tails = np.concatenate([np.exp2(rng.uniform(-64, 0, 10**6)), rng.uniform(0, 1, 10**6)]).astype(np.float32)
  tails = np.maximum(tails, np.float32(2.0**-64))
  want = -special.ndtri(tails.astype(np.float64) / 2)
  err = _ulp_errors(np.asarray(jax.jit(threefry.tail_magnitude)(jnp.asarray(tails))), want)
  assert err.max() <= 6 and err.mean() < 1.0, (err.max(), err.mean())
  u = (np.arange(1, 2**23, 3, dtype=np.float64) * 2.0**-23 * 2 - 1).astype(np.float32)
  legacy = np.asarray(jax.jit(lambda x: np.float32(math.sqrt(2)) * jax.lax.erf_inv(x))(jnp.asarray(u)))
  assert _ulp_errors(legacy, math.sqrt(2) * special.erfinv(u.astype(np.float64))).max() > err.max()


def _magnitude_of_k(ks):
  ks = np.asarray(ks, np.uint64)
  return np.asarray(_from_bits(*_words(ks >> np.uint64(32), ks & np.uint64(0xFFFFFFFF))))


@pytest.mark.parametrize("x", [1.0, 3.0, 5.5, 6.0, 7.0, 8.0, 8.5, 9.0])
def test_wide_tail_probability_beyond_x_is_the_normal_tail(x):
  # The exact law of |z| in the far tail, where no sample can reach: |z| falls with the 63-bit integer k, so
  # P(|z| > x) = k_x / 2^63 with k_x the first k whose |z| is <= x (found by bisection). It must match
  # P(|Z| > x) up to float32 resolution (a few ulp of x, times the hazard rate ~ x) and the 2^-63 grid.
  lo, hi = 0, 2**63 - 1
  while hi - lo > 1:
    mid = (lo + hi) // 2
    lo, hi = (mid, hi) if _magnitude_of_k([mid])[0] > x else (lo, mid)
  want = 2 * stats.norm.sf(x)
  tol = (x + 1 / x) * 8 * float(np.spacing(np.float32(x))) + 1 / (want * 2.0**63)
  assert abs(hi * 2.0**-63 / want - 1) <= tol, (hi, want * 2.0**63)


def test_wide_tail_moments_and_ks_of_a_large_draw():
  x = np.asarray(threefry.wide_tail_normal(jax.random.key(11), (2_000_000,)), np.float64)
  n = x.size
  assert abs(x.mean()) < 6 / np.sqrt(n)
  assert abs(x.std() - 1) < 6 / np.sqrt(2 * n)
  assert abs(stats.skew(x)) < 6 * np.sqrt(6 / n) and abs(stats.kurtosis(x)) < 6 * np.sqrt(24 / n)
  assert stats.kstest(x[:200_000], "norm").pvalue > 1e-4
  for t in (2.0, 3.0, 4.0):  # tail counts: binomial, 6 sd
    p = 2 * stats.norm.sf(t)
    assert abs((np.abs(x) > t).sum() - n * p) < 6 * np.sqrt(n * p * (1 - p)) + 1, t
  assert abs((x > 0).mean() - 0.5) < 6 * 0.5 / np.sqrt(n)


# ----------------------------------------------------------------------------- wide tail: keying


_wide_jit = jax.jit(threefry.wide_tail_normal, static_argnums=1)


def test_wide_tail_is_a_function_of_the_key_and_the_flat_index():
  # Compiled, the draw is one fused elementwise loop: the same bits whatever the shape (or the sharding:
  # tests/test_sharding.py). Op-by-op (eager) dispatch rounds a few products differently (no FMA contraction
  # across ops): equal to 1 ulp, not bit for bit.
  key = jax.random.key(5)
  flat = np.asarray(_wide_jit(key, (30_000,)))
  for shape in ((300, 100), (3, 100, 100), (30_000, 1)):
    np.testing.assert_array_equal(np.asarray(_wide_jit(key, shape)), flat.reshape(shape))
  np.testing.assert_array_equal(np.asarray(_wide_jit(key, (1000,))), flat[:1000])
  np.testing.assert_allclose(np.asarray(threefry.wide_tail_normal(key, (30_000,))), flat, rtol=3e-7, atol=1e-7)
  # The definition: coordinate i is normal_from_bits(threefry2x32(key, (0, i))).
  k = jax.random.key_data(key)
  i = jnp.asarray([0, 1, 12_345, 29_999], jnp.uint32)
  words = jax.jit(lambda i: threefry.normal_from_bits(*threefry.threefry2x32(k[0], k[1], jnp.zeros_like(i), i)))
  np.testing.assert_array_equal(np.asarray(words(i)), flat[np.asarray(i)])


def test_wide_tail_ignores_the_partitionable_flag_and_accepts_raw_keys():
  key = jax.random.key(2)
  want = np.asarray(_wide_jit(key, (64, 3)))
  with jax.threefry_partitionable(False):
    np.testing.assert_array_equal(np.asarray(jax.jit(threefry.wide_tail_normal, static_argnums=1)(key, (64, 3))),
                                  want)
  np.testing.assert_array_equal(np.asarray(_wide_jit(jax.random.key_data(key), (64, 3))), want)
  keys = jax.random.split(jax.random.key(4), 6)
  got = jax.jit(jax.vmap(lambda k: threefry.wide_tail_normal(k, (33,))))(keys)
  np.testing.assert_array_equal(np.asarray(got), np.stack([_wide_jit(k, (33,)) for k in keys]))


def test_wide_tail_other_generators_keep_the_law_and_support():
  key = jax.random.key(3, impl="rbg")
  x = np.asarray(threefry.wide_tail_normal(key, (200_000,)), np.float64)
  assert np.abs(x).max() <= EDGE and abs(x.std() - 1) < 6 / np.sqrt(2 * x.size)
  assert stats.kstest(x, "norm").pvalue > 1e-4
  np.testing.assert_array_equal(np.asarray(_wide_jit(key, (200_000,))), np.asarray(_wide_jit(key, (200_000,))))


@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 2), (1,)])
def test_wide_tail_empty_and_scalar_shapes(shape):
  x = threefry.wide_tail_normal(jax.random.key(0), shape)
  assert x.shape == shape and x.dtype == jnp.float32


def test_wide_tail_rejects_a_batch_of_keys():
  with pytest.raises(ValueError, match="single key"):
    threefry.wide_tail_normal(jax.random.split(jax.random.key(0), 2), (3,))
