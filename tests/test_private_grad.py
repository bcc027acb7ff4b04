"""private_value_and_grad: the 3-line swap for jax.value_and_grad, in every clipping mode."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from scipy import stats as sstats

import dpmega

MODES = dpmega.clipping_modes()


def sq_loss(w, ex):
  return jnp.sum((ex["x"] @ w - ex["y"]) ** 2)


def data(b=8, d=3, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": jnp.asarray(rng.normal(size=(b, d)), jnp.float32), "y": jnp.asarray(rng.normal(size=(b,)), jnp.float32)}


@pytest.mark.parametrize("mode", MODES)
def test_without_noise_equals_hand_computed_clipped_mean_over_expected_batch(mode):
  batch, w = data(), jnp.array([1.0, -2.0, 0.5])
  mask = np.array([1, 1, 1, 0, 1, 1, 0, 1], np.float32)
  fn = dpmega.private_value_and_grad(sq_loss, clip_norm=0.7, noise_multiplier=0.0, expected_batch_size=10,
                                     microbatch_size=4, clipping=mode)
  loss, grads, stats = fn(w, batch, jax.random.key(0), mask=mask)
  x, y = np.asarray(batch["x"], np.float64), np.asarray(batch["y"], np.float64)
  want = np.zeros(3)
  losses = []
  for i in np.flatnonzero(mask):
    r = x[i] @ np.asarray(w, np.float64) - y[i]
    g = 2 * r * x[i]
    want += g * min(1.0, 0.7 / np.linalg.norm(g))
    losses.append(r**2)
  np.testing.assert_allclose(grads, want / 10, rtol=1e-5)  # expected size 10, realized 6
  np.testing.assert_allclose(loss, np.mean(losses), rtol=1e-5)
  assert int(stats.num_examples) == 6


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_one_noise_draw_per_call_whatever_the_microbatching(mode, microbatch_size):
  # The loss has zero gradient, so the output is pure noise: its std must be sigma*C/B,
  # not sqrt(#micro-batches) times that (noise per micro-batch).
  zero_loss = lambda p, ex: jnp.sum(p * 0.0) + 0.0 * jnp.sum(ex)
  fn = dpmega.private_value_and_grad(zero_loss, clip_norm=2.0, noise_multiplier=1.5, expected_batch_size=8,
                                     microbatch_size=microbatch_size, clipping=mode)
  _, g, _ = fn(jnp.zeros(200_000), jnp.ones((8, 2)), jax.random.key(11))
  got = float(np.std(np.asarray(g, np.float64)))
  want = 1.5 * 2.0 / 8
  n = g.size
  lo, hi = sstats.chi2.ppf([5e-7, 1 - 5e-7], n)
  assert want * np.sqrt(lo / n) <= got <= want * np.sqrt(hi / n)


def test_same_key_same_gradient_different_key_different():
  fn = dpmega.private_value_and_grad(sq_loss, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=8)
  w = jnp.ones(3)
  _, a, _ = fn(w, data(), jax.random.key(1))
  _, b, _ = fn(w, data(), jax.random.key(1))
  _, c, _ = fn(w, data(), jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)


def test_argnums_differentiates_only_the_chosen_args():
  def loss(w, frozen, ex):
    return jnp.sum((ex["x"] @ (w + frozen) - ex["y"]) ** 2)

  fn = dpmega.private_value_and_grad(loss, clip_norm=1e6, noise_multiplier=0.0, expected_batch_size=8)
  _, g, _ = fn(jnp.ones(3), jnp.ones(3), data(), jax.random.key(0))
  both = dpmega.private_value_and_grad(loss, clip_norm=1e6, noise_multiplier=0.0, expected_batch_size=8,
                                       argnums=(0, 1))
  _, (g0, g1), _ = both(jnp.ones(3), jnp.ones(3), data(), jax.random.key(0))
  np.testing.assert_allclose(g, g0, rtol=1e-6)
  np.testing.assert_allclose(g0, g1, rtol=1e-6)
  clipped = dpmega.private_value_and_grad(loss, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=1,
                                          argnums=(0, 1))
  _, (c0, c1), _ = clipped(jnp.ones(3), jnp.ones(3), data(b=1), jax.random.key(0))
  # One global norm over BOTH differentiated args.
  np.testing.assert_allclose(np.sqrt(np.sum(c0**2) + np.sum(c1**2)), 1.0, rtol=1e-5)


def test_has_aux_returns_loss_and_per_example_aux():
  loss = lambda w, ex: (sq_loss(w, ex), {"pred": ex["x"] @ w})
  fn = dpmega.private_value_and_grad(loss, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=8,
                                     has_aux=True, microbatch_size=4)
  (value, aux), grads, _ = fn(jnp.ones(3), data(), jax.random.key(0))
  np.testing.assert_allclose(aux["pred"], data()["x"] @ jnp.ones(3), rtol=1e-6)
  assert value.shape == () and grads.shape == (3,)


def test_works_under_an_outer_jit():
  fn = dpmega.private_value_and_grad(sq_loss, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=8)
  eager = fn(jnp.ones(3), data(), jax.random.key(3))[1]
  jitted = jax.jit(fn)(jnp.ones(3), data(), jax.random.key(3))[1]
  np.testing.assert_allclose(eager, jitted, rtol=1e-5)


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(nn.relu(nn.Dense(8)(x)))


@pytest.mark.parametrize("mode", MODES)
def test_flax_linen_params(mode):
  model = LinenMLP()
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]

  def loss(p, ex):
    logits = model.apply({"params": p}, ex["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ex["label"])

  batch = {"x": data()["x"], "label": jnp.arange(8) % 2}
  fn = dpmega.private_value_and_grad(loss, clip_norm=0.1, noise_multiplier=0.0, expected_batch_size=8,
                                     clipping=mode)
  _, grads, stats = fn(params, batch, jax.random.key(0))
  assert jax.tree_util.tree_structure(grads) == jax.tree_util.tree_structure(params)
  assert int(stats.num_clipped) == 8
  norm = float(jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree_util.tree_leaves(grads))))
  assert norm <= 0.1 + 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_flax_nnx_state(mode):
  model = nnx.Sequential(nnx.Linear(3, 8, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(8, 2, rngs=nnx.Rngs(1)))
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(p, ex):
    logits = nnx.merge(graphdef, p)(ex["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, ex["label"])

  batch = {"x": data()["x"], "label": jnp.arange(8) % 2}
  fn = dpmega.private_value_and_grad(loss, clip_norm=1e6, noise_multiplier=0.0, expected_batch_size=8,
                                     clipping=mode)
  _, grads, _ = fn(params, batch, jax.random.key(0))
  plain = jax.grad(lambda p: jnp.sum(jax.vmap(loss, (None, 0))(p, batch)))(params)
  for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(plain)):
    np.testing.assert_allclose(a, np.asarray(b) / 8, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"clip_norm": -1.0}, "clip_norm"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"clip_norm": float("nan")}, "clip_norm"),
        ({"clip_norm": float("inf")}, "clip_norm"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": float("inf")}, "noise_multiplier"),
        ({"expected_batch_size": 0}, "expected_batch_size"),
        ({"expected_batch_size": -5}, "expected_batch_size"),
        ({"microbatch_size": 0}, "microbatch_size"),
        ({"microbatch_size": 2.5}, "microbatch_size"),
        ({"clipping": "nope"}, "clipping"),
        ({"argnums": -1}, "argnums"),
    ],
)
def test_bad_arguments_raise_before_any_tracing(kwargs, field):
  calls = []
  loss = lambda w, ex: calls.append(1) or sq_loss(w, ex)
  args = dict(clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=8)
  args.update(kwargs)
  with pytest.raises(ValueError, match=field):
    fn = dpmega.private_value_and_grad(loss, **args)
    fn(jnp.ones(3), data(), jax.random.key(0))
  assert not calls


@pytest.mark.parametrize(
    "call_kwargs, field",
    [({"microbatch_size": 3}, "microbatch_size"), ({}, "mask")],
)
def test_bad_batch_shapes_raise_before_any_tracing(call_kwargs, field):
  calls = []
  loss = lambda w, ex: calls.append(1) or sq_loss(w, ex)
  fn = dpmega.private_value_and_grad(loss, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=8,
                                     **call_kwargs)
  with pytest.raises(ValueError, match=field):
    fn(jnp.ones(3), data(), jax.random.key(0), mask=None if call_kwargs else np.ones(7))
  assert not calls


def test_private_training_learns_a_learnable_task():
  rng = np.random.default_rng(0)
  true_w = rng.normal(size=5)
  x = rng.normal(size=(2048, 5)).astype(np.float32)
  y = (x @ true_w > 0).astype(np.int32)

  def loss(w, ex):
    return optax.sigmoid_binary_cross_entropy(ex["x"] @ w, ex["y"])

  fn = dpmega.private_value_and_grad(loss, clip_norm=1.0, noise_multiplier=1.0, expected_batch_size=256,
                                     microbatch_size=64)
  opt = optax.sgd(1.0)
  w = jnp.zeros(5)
  state = opt.init(w)
  key = jax.random.key(0)
  first = None
  for step in range(40):
    idx = rng.choice(2048, 256, replace=False)
    value, g, _ = fn(w, {"x": x[idx], "y": y[idx]}, jax.random.fold_in(key, step))
    first = float(value) if first is None else first
    updates, state = opt.update(g, state)
    w = optax.apply_updates(w, updates)
  final = float(np.mean(optax.sigmoid_binary_cross_entropy(x @ np.asarray(w), y)))
  assert final < 0.6 * first
