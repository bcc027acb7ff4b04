"""The Gaussian mechanism: right std, once per call, keyed, divided by the expected batch size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats as sstats

import dpmega
from dpmega import noise


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
