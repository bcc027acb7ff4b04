"""Invariants 1 and 4 of DESIGN.md for the clipped sum, in every clipping mode."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dpmega
from dpmega import clipping
from dpmega.clipping import vmap as vmap_lib

MODES = dpmega.clipping_modes()


def linear_loss(params, ex):
  """Per-example loss whose gradient scales with ex['scale'] (adversarial magnitudes)."""
  pred = jnp.tanh(ex["x"] @ params["w1"] + params["b1"]) @ params["w2"]
  return ex["scale"] * jnp.sum((pred - ex["y"]) ** 2)


def make_problem(seed, b, d_in=5, d_hidden=4, d_out=3, scale_exp=0.0):
  rng = np.random.default_rng(seed)
  params = {
      "w1": jnp.asarray(rng.normal(size=(d_in, d_hidden)), jnp.float32),
      "b1": jnp.asarray(rng.normal(size=(d_hidden,)), jnp.float32),
      "w2": jnp.asarray(rng.normal(size=(d_hidden, d_out)), jnp.float32),
  }
  batch = {
      "x": jnp.asarray(rng.normal(size=(b, d_in)), jnp.float32),
      "y": jnp.asarray(rng.normal(size=(b, d_out)), jnp.float32),
      "scale": jnp.asarray(10.0 ** rng.uniform(-3, scale_exp, size=(b,)), jnp.float32),
  }
  return params, batch


def tree_norm(tree):
  return float(jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree_util.tree_leaves(tree))))


def tree_sub(a, b):
  return jax.tree_util.tree_map(jnp.subtract, a, b)


def reference_clipped_sum(loss_fn, params, batch, mask, clip_norm):
  """Clipped sum written out example by example with NumPy (no dpmega code)."""
  total = jax.tree_util.tree_map(lambda p: np.zeros(p.shape, np.float64), params)
  b = len(mask)
  for i in range(b):
    if not mask[i]:
      continue
    ex = jax.tree_util.tree_map(lambda x: x[i], batch)
    g = jax.grad(loss_fn)(params, ex)
    norm = np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree_util.tree_leaves(g)))
    if not np.isfinite(norm):
      continue
    factor = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    total = jax.tree_util.tree_map(lambda t, x: t + factor * np.asarray(x, np.float64), total, g)
  return total


# One compiled clipped sum per mode: the batch is padded to B_MAX with masked rows (which contribute exactly 0,
# test_padding_rows_contribute_exactly_zero_even_if_garbage), so every drawn size runs the same executable.
B_MAX = 12


@functools.lru_cache(maxsize=None)
def jitted_clipped_sum(mode):
  return jax.jit(lambda params, batch, mask, clip_norm: dpmega.clipped_grad_sum(
      linear_loss, params, batch, mask, clip_norm=clip_norm, clipping=mode)[0])


@pytest.mark.parametrize("mode", MODES)
@given(
    seed=st.integers(0, 2**16),
    b=st.integers(1, B_MAX),
    clip_norm=st.floats(1e-3, 1e3),
    scale_exp=st.floats(-2.0, 8.0),
)
def test_each_example_contribution_norm_at_most_clip(mode, seed, b, clip_norm, scale_exp):
  params, batch = make_problem(seed, B_MAX, scale_exp=scale_exp)
  mask = (np.arange(B_MAX) < b).astype(np.float32)
  clipped_sum = jitted_clipped_sum(mode)
  full = clipped_sum(params, batch, mask, np.float32(clip_norm))
  i = seed % b
  mask_without = mask.copy()
  mask_without[i] = 0
  without = clipped_sum(params, batch, mask_without, np.float32(clip_norm))
  # The sensitivity of the sum to adding/removing example i, over ALL parameters.
  assert tree_norm(tree_sub(full, without)) <= clip_norm * (1 + 1e-5) + 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_clipped_sum_matches_example_by_example_reference(mode):
  params, batch = make_problem(0, 10, scale_exp=3.0)
  mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1, 1], np.float32)
  got, _, stats = dpmega.clipped_grad_sum(linear_loss, params, batch, mask, clip_norm=0.5, clipping=mode)
  want = reference_clipped_sum(linear_loss, params, batch, mask, 0.5)
  for g, w in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(np.asarray(g), w, rtol=2e-5, atol=1e-5)
  assert int(stats.num_examples) == 8
  assert got["w1"].dtype == jnp.float32


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("microbatch_size", [1, 2, 4, 8])
def test_microbatched_equals_single_pass(mode, microbatch_size):
  params, batch = make_problem(1, 16, scale_exp=2.0)
  mask = (np.arange(16) % 5 != 0).astype(np.float32)
  one, _, s1 = dpmega.clipped_grad_sum(linear_loss, params, batch, mask, clip_norm=1.0, clipping=mode)
  many, _, s2 = dpmega.clipped_grad_sum(linear_loss, params, batch, mask, clip_norm=1.0,
                                        microbatch_size=microbatch_size, clipping=mode)
  for a, b in zip(jax.tree_util.tree_leaves(one), jax.tree_util.tree_leaves(many)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert int(s1.num_examples) == int(s2.num_examples) == int(mask.sum())
  assert int(s1.num_clipped) == int(s2.num_clipped)
  np.testing.assert_allclose(float(s1.norm_max), float(s2.norm_max), rtol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_padding_rows_contribute_exactly_zero_even_if_garbage(mode):
  params, batch = make_problem(2, 6)
  real, _, real_stats = dpmega.clipped_grad_sum(linear_loss, params, batch, clip_norm=1.0, clipping=mode)
  garbage = {"x": jnp.full((2, 5), jnp.nan), "y": jnp.full((2, 3), jnp.inf),
             "scale": jnp.full((2,), 1e30)}
  padded = jax.tree_util.tree_map(lambda a, g: jnp.concatenate([a, g]), batch, garbage)
  mask = np.array([1] * 6 + [0] * 2, np.float32)
  got, _, stats = dpmega.clipped_grad_sum(linear_loss, params, padded, mask, clip_norm=1.0,
                                          microbatch_size=4, clipping=mode)
  for a, b in zip(jax.tree_util.tree_leaves(real), jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  assert int(stats.num_examples) == 6 and int(stats.num_nonfinite) == 0
  np.testing.assert_allclose(float(stats.loss_sum), float(real_stats.loss_sum), rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_nonfinite_examples_are_zeroed_and_counted(mode):
  params, batch = make_problem(3, 6)
  clean, _, _ = dpmega.clipped_grad_sum(linear_loss, params, batch, np.array([1, 0, 1, 0, 1, 1], np.float32),
                                        clip_norm=1.0, clipping=mode)
  bad = dict(batch)
  bad["x"] = batch["x"].at[1, 0].set(jnp.nan).at[3, 2].set(jnp.inf)
  got, _, stats = dpmega.clipped_grad_sum(linear_loss, params, bad, clip_norm=1.0, clipping=mode)
  for a, b in zip(jax.tree_util.tree_leaves(clean), jax.tree_util.tree_leaves(got)):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert np.all(np.isfinite(np.asarray(b)))
  assert int(stats.num_nonfinite) == 2
  assert int(stats.num_examples) == 6


@pytest.mark.parametrize("mode", MODES)
def test_clip_norm_zero_gives_zero_and_inf_gives_plain_sum(mode):
  params, batch = make_problem(4, 5, scale_exp=2.0)
  zero, _, _ = dpmega.clipped_grad_sum(linear_loss, params, batch, clip_norm=0.0, clipping=mode)
  assert tree_norm(zero) == 0.0
  unclipped, _, stats = dpmega.clipped_grad_sum(linear_loss, params, batch, clip_norm=float("inf"), clipping=mode)
  plain = jax.grad(lambda p: jnp.sum(jax.vmap(linear_loss, (None, 0))(p, batch)))(params)
  for a, b in zip(jax.tree_util.tree_leaves(unclipped), jax.tree_util.tree_leaves(plain)):
    np.testing.assert_allclose(a, b, rtol=1e-5)
  assert int(stats.num_clipped) == 0


def test_zero_gradient_example_is_not_divided_by_zero():
  loss = lambda w, ex: jnp.sum(w * 0.0 * ex)
  g, _, stats = dpmega.clipped_grad_sum(loss, jnp.ones(3), jnp.ones((4, 3)), clip_norm=1.0)
  assert np.all(np.asarray(g) == 0) and int(stats.num_nonfinite) == 0


def test_clip_factors_edge_cases():
  norms = jnp.array([0.0, 0.5, 1.0, 2.0, 1e30])
  np.testing.assert_allclose(clipping.clip_factors(norms, 1.0), [1, 1, 1, 0.5, 1e-30], rtol=1e-6)
  np.testing.assert_allclose(clipping.clip_factors(norms, 0.0), [1, 0, 0, 0, 0])
  np.testing.assert_allclose(clipping.clip_factors(norms, jnp.inf), [1, 1, 1, 1, 1])


def test_sum_is_float32_for_bfloat16_params():
  params = {"w": jnp.ones((4,), jnp.bfloat16)}
  loss = lambda p, ex: jnp.sum(p["w"] * ex).astype(jnp.float32)
  g, _, _ = dpmega.clipped_grad_sum(loss, params, jnp.full((64, 4), 0.01, jnp.bfloat16), clip_norm=10.0)
  assert g["w"].dtype == jnp.float32


def test_aux_is_returned_per_example_in_order():
  loss = lambda w, ex: (jnp.sum(w * ex), {"twice": 2 * ex[0]})
  batch = jnp.arange(12.0).reshape(6, 2)
  _, aux, _ = dpmega.clipped_grad_sum(loss, jnp.ones(2), batch, clip_norm=1.0, microbatch_size=2, has_aux=True)
  np.testing.assert_allclose(aux["twice"], 2 * batch[:, 0])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"clip_norm": float("nan")}, "clip_norm"),
        ({"clip_norm": 1.0, "microbatch_size": 3}, "microbatch_size"),
        ({"clip_norm": 1.0, "microbatch_size": 0}, "microbatch_size"),
        ({"clip_norm": 1.0, "clipping": "magic"}, "clipping"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
  params, batch = make_problem(0, 4)
  with pytest.raises(ValueError, match=field):
    dpmega.clipped_grad_sum(linear_loss, params, batch, **kwargs)


def test_mask_of_wrong_shape_is_rejected():
  params, batch = make_problem(0, 4)
  with pytest.raises(ValueError, match="mask"):
    dpmega.clipped_grad_sum(linear_loss, params, batch, np.ones(5), clip_norm=1.0)


@pytest.mark.parametrize("jit", [False, True])
def test_scaled_norms_fast_path_is_taken_only_when_exact(jit):
  """`scaled_norms` skips the per-example scaling only when the unscaled sum proves it safe, batch-wide."""
  norms = jax.jit(clipping.scaled_norms) if jit else clipping.scaled_norms
  rng = np.random.default_rng(0)
  benign = rng.normal(size=(4, 1000)).astype(np.float32)
  # Fast path: the squares of the 2**-64 entries flush to zero, but they weigh 2**-38 of the 2**-40 entry's.
  near = np.full((1000,), 2.0 ** -64, np.float32)
  near[0] = 2.0 ** -40
  odd_rows = {
      "near-threshold": near,
      "just below the threshold": np.full((1000,), 2.0 ** -49, np.float32),
      "tiny": np.full((1000,), 1e-20, np.float32),
      "huge": np.full((1000,), 1e20, np.float32),
      "overflowing square": np.concatenate([[3e19], np.ones(999)]).astype(np.float32),
      "zero": np.zeros(1000, np.float32),
  }
  for name, row in odd_rows.items():
    # One odd row in an otherwise benign batch: the whole batch must be right, the odd row included.
    x = np.concatenate([benign, row[None]])
    want = np.sqrt(np.sum(np.square(x.astype(np.float64)), axis=1))
    np.testing.assert_allclose(np.asarray(norms(jnp.asarray(x)), np.float64), want, rtol=1e-6, err_msg=name)
  x = benign.copy()
  x[1, 7] = np.nan
  got = np.asarray(norms(jnp.asarray(x)))
  assert np.isnan(got[1]) and np.all(np.isfinite(np.delete(got, 1)))
  np.testing.assert_allclose(np.delete(got, 1), np.delete(np.sqrt(np.sum(np.square(x.astype(np.float64)), 1)), 1),
                             rtol=1e-6)
  x[2, 3] = np.inf
  assert np.isinf(np.asarray(norms(jnp.asarray(x)))[2])


@pytest.mark.parametrize("b", [1, 2, 3, 5, 8, 13])
def test_weighted_sum_of_large_leaves_adds_each_example_once(b):
  """The pairwise sum over examples (leaves of >= 2^14 floats) on odd batch sizes: the float64 sum, weight-0 rows
  dropped even when NaN or Inf, and one example alone added exactly (fl(w g), nothing else)."""
  rng = np.random.default_rng(b)
  g = rng.normal(size=(b, 128, 130)).astype(np.float32) * 10.0 ** rng.uniform(-3, 3, size=(b, 1, 1)).astype(np.float32)
  w = rng.uniform(0.1, 2.0, size=b).astype(np.float32)
  w[::3] = 0.0
  g[::3, 0, 0] = np.nan
  g[::3, 1, 1] = np.inf
  assert vmap_lib._PAIRWISE_MIN_FLOATS <= g[0].size
  small = rng.normal(size=(b, 7)).astype(np.float32)  # below the pairwise size: jnp.sum
  got = clipping.weighted_sum({"big": jnp.asarray(g), "small": jnp.asarray(small)}, jnp.asarray(w))
  for name, x in (("big", g), ("small", small)):
    keep = w > 0
    want = np.einsum("i,i...->...", w[keep].astype(np.float64), x[keep].astype(np.float64))
    scale = np.einsum("i,i...->...", w[keep].astype(np.float64), np.abs(x[keep]).astype(np.float64))
    assert np.all(np.abs(np.asarray(got[name], np.float64) - want) <= 1e-6 * scale), name  # a few roundings
  for i in range(b):
    alone = np.zeros_like(w)
    alone[i] = w[i]
    one = np.asarray(clipping.weighted_sum(jnp.asarray(g), jnp.asarray(alone)))
    want = g[i] * w[i] if w[i] > 0 else np.zeros_like(g[i])
    np.testing.assert_array_equal(one, want)
