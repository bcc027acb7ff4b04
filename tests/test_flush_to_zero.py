"""Invariant 1 under flush-to-zero: underflow in the book-keeping product never lets an example exceed C.

XLA's CPU runtime flushes subnormal results to 0. In the book-keeping sum an example adds
``sum_s x_s fl(w y_s)^T``: with two equal feature rows ``x`` and ``w y_1 = f 2^-126``,
``w y_2 = -(0.9 or 0.97 / f) 2^-126``, the second product flushes and the example adds
``x fl(w y_1)`` instead of ``x w (y_1 + y_2)`` -- 1.8x to 13x its clipped gradient when
``|x| ~ C / (w |y_1 + y_2|)`` (huge features). :func:`dpmega.clipping.gram.flush_term` bounds that
absolute error; an example where it is not negligible is materialized (or dropped beyond the
budget). Each test adds ONE example (one-example mask, sigma = 0) through
``dpmega.private_value_and_grad`` and measures in float64 what was added.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmega
from dpmega.clipping import ghost
from tests import clipping_models as cm

ETA = 2.0 ** -126
BOUND = 1 + 1e-5


@pytest.fixture(autouse=True, scope="module")
def _gram_mode():
  with cm.gram_mode():  # "gram": the pure Gram bound ("ghost" is "auto")
    yield


def _contribution(loss, params, batch, clip_norm, mode, budget):
  f = dpmega.private_value_and_grad(loss, clip_norm=clip_norm, noise_multiplier=0.0, expected_batch_size=1.0,
                                    clipping=mode)
  b = jax.tree_util.tree_leaves(batch)[0].shape[0]
  mask = jnp.zeros((b,), jnp.float32).at[0].set(1.0)
  saved = ghost._MATERIALIZE_BUDGET
  ghost._MATERIALIZE_BUDGET = budget
  try:
    _, grads, _ = jax.jit(f)(params, batch, jax.random.key(0), mask=mask)  # sigma = 0: the key adds nothing
  finally:
    ghost._MATERIALIZE_BUDGET = saved
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(bool(np.all(np.isfinite(np.asarray(x)))) for x in leaves)
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in leaves)))


class _Dense(nn.Module):
  features: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(self.features, use_bias=False)(x)


def _dense_case(f, c2_over_c1, clip_norm, b, k=4, m=4):
  """Two equal feature rows; output gradients ``c1`` and ``c2`` per entry with ``w c1 = f 2^-126``."""
  c1 = 1.0
  c2 = c2_over_c1 * c1
  norm = clip_norm * c1 / (f * ETA)  # the example's gradient norm: its clip factor is w = f 2^-126 / c1
  feature = norm / abs(c1 + c2) / np.sqrt(k * m)  # ||G|| = |x| |c1 + c2| sqrt(m), x of k equal entries
  x = np.full((b, 2, k), feature, np.float32)
  c = np.tile(np.array([[c1] * m, [c2] * m], np.float32)[None], (b, 1, 1))
  model = _Dense(m)
  params = model.init(jax.random.key(0), jnp.ones((2, k)))
  loss = lambda p, ex: jnp.sum(model.apply(p, ex["x"]) * ex["c"])
  return loss, params, {"x": jnp.asarray(x), "c": jnp.asarray(c)}


# (f, c2 / c1, C): w y_1 = f 2^-126 is kept, w y_2 = c2/c1 f 2^-126 is subnormal and flushed.
_DENSE_CASES = {"13x_tiny_clip": (1.05, -0.97 / 1.05, 1e-20), "1.8x_unit_clip": (2.0, -0.45, 1.0)}


@pytest.mark.parametrize("case", sorted(_DENSE_CASES))
@pytest.mark.parametrize("mode", ["auto", "gram"])
@pytest.mark.parametrize("budget", [0, 16])  # nothing materialized; one example (the masked one) materializable
def test_dense_tiny_factor_huge_features_flushed_product_is_within_clip(case, mode, budget):
  f, ratio, clip_norm = _DENSE_CASES[case]
  # 3 examples, so that a budget of one example's gradient (16 floats) leaves the book-keeping path in use.
  loss, params, batch = _dense_case(f, ratio, clip_norm, b=3)
  got = _contribution(loss, params, batch, clip_norm, mode, budget)
  assert got <= clip_norm * BOUND, f"contribution {got / clip_norm} x C"
  if budget:  # materialized: exactly the clipped gradient, as vmap
    want = _contribution(loss, params, batch, clip_norm, "vmap", budget)
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-30, 1.0])
def test_dense_subnormal_output_gradients_are_within_clip(scale):
  # Output gradients that are subnormal themselves (below 2^-126) beside a normal one, features that bring the
  # products back to the normal range; clipped (scale 1e-30) or not (scale 1) by C = 1.
  k, m, b = 4, 4, 3
  x = np.full((b, 2, k), 2.0 ** 120 * scale, np.float32)
  c = np.tile(np.array([[3 * ETA] * m, [-0.9 * ETA] * m], np.float32)[None], (b, 1, 1))
  model = _Dense(m)
  params = model.init(jax.random.key(0), jnp.ones((2, k)))
  loss = lambda p, ex: jnp.sum(model.apply(p, ex["x"]) * ex["c"])
  batch = {"x": jnp.asarray(x), "c": jnp.asarray(c)}
  for mode in dpmega.clipping_modes():
    for budget in (0, 16):
      got = _contribution(loss, params, batch, 1.0, mode, budget)
      assert got <= BOUND, f"{mode}, budget {budget}: contribution {got} x C"


class _Tied(nn.Module):
  @nn.compact
  def __call__(self, ids, c):
    emb = nn.Embed(7, 4, embedding_init=nn.initializers.ones)
    return emb.attend(emb(ids) * c[:, None])  # [n, 7]


def _tied_case(f, ratio, clip_norm, b=3):
  """Same id at both positions, features ``c_s E[id]`` with ``w c_1 = f 2^-126``, output gradients ``T`` (huge).

  ``Embed.attend`` puts the features on the weighted side of the book-keeping (``fl(w c_s E[id])``), so the
  second position's product flushes.
  """
  model = _Tied()
  params = model.init(jax.random.key(0), jnp.zeros((2,), jnp.int32), jnp.ones((2,)))
  table = np.ones((7, 4))
  c1, c2 = 1.0, ratio
  # G = (c1 + c2) T [ones(7) (x) E_1 + onehot_1 (x) E^T ones(7)]: kappa is its norm per unit (c1 + c2) T.
  unit = np.outer(np.ones(7), table[1])
  unit[1] += table.T @ np.ones(7)
  kappa = np.linalg.norm(unit)
  big = clip_norm * c1 / (f * ETA) / (abs(c1 + c2) * kappa)
  batch = {"ids": jnp.ones((b, 2), jnp.int32), "c": jnp.asarray(np.tile(np.array([[c1, c2]], np.float32), (b, 1))),
           "t": jnp.full((b, 2, 7), big, jnp.float32)}
  loss = lambda p, ex: jnp.sum(model.apply(p, ex["ids"], ex["c"]) * ex["t"])
  return loss, params, batch


@pytest.mark.parametrize("case", sorted(_DENSE_CASES))
@pytest.mark.parametrize("budget", [0, 28])
def test_tied_embedding_tiny_factor_huge_features_is_within_clip(case, budget):
  f, ratio, clip_norm = _DENSE_CASES[case]
  loss, params, batch = _tied_case(f, ratio, clip_norm)
  for mode in ("auto", "gram"):
    got = _contribution(loss, params, batch, clip_norm, mode, budget)
    assert got <= clip_norm * BOUND, f"{mode}: contribution {got / clip_norm} x C"


@pytest.mark.parametrize("rows", ["huge", "subnormal"])
def test_row_lookup_tiny_factor_is_within_clip(rows):
  # Lookups alone: each example scatters fl(w r) per distinct id (duplicates summed first), entry by entry, so
  # flushing only shrinks what is added. Cancelling duplicate rows v, -v + d with w v near 2^-126.
  clip_norm = 1.0
  d, b = 3, 3
  v = np.float32(2.0 ** 120)
  r = np.array([[v, v, v], [-v * 0.999, -v * 0.999, -v * 0.999], [1.0, -1.0, 1.0]], np.float32)
  if rows == "subnormal":
    r = np.array([[3 * ETA] * d, [-0.9 * ETA] * d, [ETA] * d], np.float32) * np.float32(1e30)
  batch = {"ids": jnp.asarray(np.tile(np.array([[2, 2, 5]], np.int32), (b, 1))),
           "c": jnp.asarray(np.tile(r[None], (b, 1, 1)))}
  params = {"table": jnp.ones((7, d))}
  loss = lambda p, ex: jnp.sum(p["table"][ex["ids"]] * ex["c"])
  for mode in dpmega.clipping_modes():
    got = _contribution(loss, params, batch, clip_norm, mode, 0)
    assert got <= clip_norm * BOUND, f"{mode}: contribution {got} x C"
