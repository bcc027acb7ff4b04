"""The Gaussian mechanism: right std, once per call, keyed, divided by the expected batch size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sstats

import dpmega
from dpmega import noise
from dpmega import threefry


def _zeros_tree():
  return {"a": jnp.zeros((300, 100)), "b": {"c": jnp.zeros((40_000,))}}


def _flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def _std_bounds(n, sigma, conf=1e-6):
  """Two-sided chi-square interval for the sample std of n zero-mean normals."""
  lo, hi = sstats.chi2.ppf([conf / 2, 1 - conf / 2], n)
  return sigma * np.sqrt(lo / n), sigma * np.sqrt(hi / n)


@pytest.mark.parametrize("sigma, clip, b", [(1.1, 1.0, 256), (0.5, 3.0, 10.0), (4.0, 0.1, 1)])
def test_noise_std_is_sigma_times_clip_over_expected_batch(sigma, clip, b):
  out = _flat(noise.privatize(_zeros_tree(), jax.random.key(7), noise_multiplier=sigma, clip_norm=clip,
                              expected_batch_size=b))
  want = sigma * clip / b
  lo, hi = _std_bounds(out.size, want)
  got = float(np.sqrt(np.mean(out.astype(np.float64) ** 2)))
  assert lo <= got <= hi, (got, want)
  assert abs(out.mean()) < 6 * want / np.sqrt(out.size)


def test_noise_is_normal_shaped():
  out = _flat(noise.add_gaussian_noise(_zeros_tree(), jax.random.key(1), noise_multiplier=1.0, clip_norm=1.0))
  assert sstats.kstest(out[:20_000], "norm").pvalue > 1e-4


def test_same_key_same_noise_and_different_keys_independent():
  f = lambda k: _flat(noise.add_gaussian_noise(_zeros_tree(), k, noise_multiplier=1.0, clip_norm=1.0))
  a, a2, b = f(jax.random.key(3)), f(jax.random.key(3)), f(jax.random.key(4))
  np.testing.assert_array_equal(a, a2)
  r = np.corrcoef(a, b)[0, 1]
  assert abs(r) < 6 / np.sqrt(a.size)


def test_leaves_get_independent_streams():
  tree = {"x": jnp.zeros(50_000), "y": jnp.zeros(50_000)}
  out = noise.add_gaussian_noise(tree, jax.random.key(0), noise_multiplier=1.0, clip_norm=1.0)
  assert abs(np.corrcoef(out["x"], out["y"])[0, 1]) < 6 / np.sqrt(50_000)


def test_noise_added_to_the_sum_not_replacing_it():
  g = {"w": jnp.full((10,), 5.0)}
  out = noise.privatize(g, jax.random.key(0), noise_multiplier=0.0, clip_norm=1.0, expected_batch_size=4)
  np.testing.assert_allclose(out["w"], 1.25)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "x"])
def test_bad_noise_multiplier_is_rejected(bad):
  with pytest.raises(ValueError, match="noise_multiplier"):
    noise.add_gaussian_noise({"w": jnp.zeros(2)}, jax.random.key(0), noise_multiplier=bad, clip_norm=1.0)


@pytest.mark.parametrize("bad", [0, -3, float("nan"), float("inf")])
def test_bad_expected_batch_size_is_rejected(bad):
  with pytest.raises(ValueError, match="expected_batch_size"):
    noise.privatize({"w": jnp.zeros(2)}, jax.random.key(0), noise_multiplier=1.0, clip_norm=1.0,
                    expected_batch_size=bad)


def test_infinite_clip_norm_with_noise_is_rejected():
  with pytest.raises(ValueError, match="clip_norm"):
    noise.add_gaussian_noise({"w": jnp.zeros(2)}, jax.random.key(0), noise_multiplier=1.0, clip_norm=jnp.inf)


def test_noise_under_jit_with_traced_sigma_matches_eager():
  f = jax.jit(lambda s, k: noise.add_gaussian_noise({"w": jnp.zeros(8)}, k, noise_multiplier=s, clip_norm=2.0))
  eager = noise.add_gaussian_noise({"w": jnp.zeros(8)}, jax.random.key(5), noise_multiplier=0.7, clip_norm=2.0)
  np.testing.assert_allclose(f(0.7, jax.random.key(5))["w"], eager["w"], rtol=1e-6)


def test_public_api_exports_the_mechanism():
  assert dpmega.privatize is noise.privatize and dpmega.add_gaussian_noise is noise.add_gaussian_noise


# ----------------------------------------------------------------------------- the sampler option


def _split_draws(tree, key, draw):
  leaves = jax.tree_util.tree_leaves(tree)
  return [draw(k, x.shape) for k, x in zip(jax.random.split(key, len(leaves)), leaves)]


def test_default_noise_is_the_wide_tail_sampler():
  key, tree = jax.random.key(8), _zeros_tree()
  jitted = jax.jit(lambda k: noise.add_gaussian_noise(tree, k, noise_multiplier=2.0, clip_norm=0.5))
  want = jax.jit(lambda k: _split_draws(tree, k, threefry.wide_tail_normal))(key)
  np.testing.assert_array_equal(_flat(jitted(key)), np.concatenate([np.ravel(w) for w in want]))
  explicit = noise.privatize(tree, key, noise_multiplier=2.0, clip_norm=0.5, expected_batch_size=1,
                             sampler="wide_tail")
  np.testing.assert_allclose(_flat(explicit), _flat(jitted(key)), rtol=1e-6, atol=1e-7)


def test_jax_bounded_sampler_draws_jax_random_normal():
  key, tree = jax.random.key(9), {"a": jnp.zeros((7, 5)), "b": jnp.zeros(11)}
  got = noise.gaussian_noise_like(tree, key, 1.0, sampler=noise.NoiseSampler.JAX_BOUNDED)
  want = _split_draws(tree, key, lambda k, s: jax.random.normal(k, s, jnp.float32))
  np.testing.assert_array_equal(_flat(got), np.concatenate([np.ravel(w) for w in want]))
  via_privatize = noise.privatize(tree, key, noise_multiplier=1.0, clip_norm=1.0, expected_batch_size=1,
                                  sampler="jax_bounded")
  np.testing.assert_array_equal(_flat(via_privatize), _flat(got))


@pytest.mark.parametrize("sampler", list(noise.NoiseSampler))
def test_every_sampler_gives_the_right_std_and_stays_in_its_support(sampler):
  sigma, clip = 1.3, 0.7
  out = _flat(noise.add_gaussian_noise(_zeros_tree(), jax.random.key(2), noise_multiplier=sigma, clip_norm=clip,
                                       sampler=sampler))
  lo, hi = _std_bounds(out.size, sigma * clip)
  assert lo <= float(np.sqrt(np.mean(out.astype(np.float64) ** 2))) <= hi
  support = noise.sampler_support(sampler)
  assert np.float32(support.lo * sigma * clip) <= out.min() and out.max() <= np.float32(support.hi * sigma * clip)


@pytest.mark.parametrize("bad", ["gaussian", None, 3])
def test_unknown_sampler_is_rejected_naming_the_field(bad):
  for call in (lambda: noise.add_gaussian_noise({"w": jnp.zeros(2)}, jax.random.key(0), noise_multiplier=1.0,
                                                clip_norm=1.0, sampler=bad),
               lambda: noise.sampler_support(bad),
               lambda: dpmega.private_value_and_grad(lambda w, ex: w, clip_norm=1.0, noise_multiplier=1.0,
                                                     expected_batch_size=1, noise_sampler=bad)):
    with pytest.raises(ValueError, match="sampler must be one of"):
      call()


def test_sampler_supports_wide_tail_symmetric_and_jax_bounded_as_issued():
  wide, bounded = noise.sampler_support(), noise.sampler_support("jax_bounded")
  assert wide.symmetric and wide.hi == float(threefry.WIDE_TAIL_EDGE) > 9.15
  assert not bounded.symmetric and (bounded.lo, bounded.hi) == (-5.41998291015625, 5.2201128005981445)


def test_private_value_and_grad_passes_the_noise_sampler():
  loss = lambda w, ex: jnp.sum(w * ex["x"])
  batch, w, key = {"x": jnp.ones((4, 3))}, jnp.zeros(3), jax.random.key(1)
  run = lambda **kw: dpmega.private_value_and_grad(loss, clip_norm=1.0, noise_multiplier=1.0,
                                                   expected_batch_size=4, **kw)(w, batch, key)[1]
  default, wide, bounded = run(), run(noise_sampler="wide_tail"), run(noise_sampler=noise.NoiseSampler.JAX_BOUNDED)
  np.testing.assert_array_equal(default, wide)
  clipped_mean = np.full(3, 1 / np.sqrt(3))  # 4 examples of norm sqrt(3) clipped to 1, summed, / 4
  draw = lambda sampler: noise.gaussian_noise_like({"g": jnp.zeros(3)}, key, 1.0, sampler=sampler)["g"]
  np.testing.assert_allclose(wide, clipped_mean + np.asarray(draw("wide_tail")) / 4, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(bounded, clipped_mean + np.asarray(draw("jax_bounded")) / 4, rtol=1e-5, atol=1e-6)
