"""Tests for dpmega.clipping.rows and the sparse clipping of lookups it gives dpmega.clipping.ghost."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmega
from dpmega import clipping
from dpmega.clipping import rows as rows_lib
from dpmega.clipping import ghost
from tests import clipping_models as cm


def _dense_table_grads(ids, rows, valid, num_rows):
  """The naive per-example [b, V, d] table gradients (NumPy, float64)."""
  ids, rows, valid = np.asarray(ids), np.asarray(rows, np.float64), np.asarray(valid)
  b, n, d = rows.shape
  out = np.zeros((b, num_rows, d))
  for i in range(b):
    for j in range(n):
      if valid[i, j]:
        out[i, ids[i, j]] += rows[i, j]
  return out


def _random_lookups(seed, b=6, n=7, d=3, v=5):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, v, size=(b, n))
  ids[:, 1] = ids[:, 0]  # duplicates in every example
  ids[0, :] = 2  # one example looks up a single row n times
  rows = rng.normal(size=(b, n, d)).astype(np.float32)
  valid = rng.random((b, n)) > 0.2
  return jnp.asarray(ids), jnp.asarray(rows), jnp.asarray(valid), v


# n <= 64 finds duplicates by rank, n > 64 by sorting; few and many duplicates.
@pytest.mark.parametrize("seed, n, v", [(0, 7, 5), (1, 7, 5), (2, 7, 5), (3, 64, 40), (4, 65, 40), (5, 200, 90)])
def test_row_norms_sum_duplicates_before_the_norm(seed, n, v):
  ids, rows, valid, v = _random_lookups(seed, n=n, v=v)
  dense = _dense_table_grads(ids, rows, valid, v)
  want = np.sum(dense ** 2, axis=(1, 2))
  np.testing.assert_allclose(rows_lib.row_grad_sq_norms(ids, rows, valid), want, rtol=1e-5)
  # Without the duplicate sum the answer would differ: the test can tell.
  naive = np.sum(np.where(np.asarray(valid)[..., None], np.asarray(rows), 0) ** 2, axis=(1, 2))
  assert not np.allclose(naive, want, rtol=1e-3)


def test_scatter_add_rows_equals_weighted_dense_sum_and_drops_zero_weights():
  ids, rows, valid, v = _random_lookups(3)
  rows = rows.at[4].set(jnp.nan)  # an example whose weight is 0 must not poison the sum
  weights = jnp.array([0.5, 1.0, 0.0, 0.25, 0.0, 1.0])
  got = rows_lib.scatter_add_rows(ids, rows, v, valid=valid, weights=weights)
  dense = _dense_table_grads(ids, jnp.where(weights[:, None, None] > 0, rows, 0), valid, v)
  want = np.einsum("b,bvd->vd", np.asarray(weights, np.float64), dense)
  assert got.dtype == jnp.float32 and got.shape == (v, 3)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bad_shapes_name_the_argument():
  ids, rows, valid, v = _random_lookups(0)
  with pytest.raises(ValueError, match="rows"):
    rows_lib.row_grad_sq_norms(ids, rows[:, :2], valid)
  with pytest.raises(ValueError, match="valid"):
    rows_lib.row_grad_sq_norms(ids, rows, valid[:, :2])
  with pytest.raises(ValueError, match="num_rows"):
    rows_lib.scatter_add_rows(ids, rows, -1)
  with pytest.raises(ValueError, match="weights"):
    rows_lib.scatter_add_rows(ids, rows, v, weights=jnp.ones(2))


@functools.partial(jax.jit, static_argnames=("loss_fn", "mode"))
def _per_example_contribs(loss_fn, params, batch, clip, mode):
  b = jax.tree_util.tree_leaves(batch)[0].shape[0]
  f = lambda m: dpmega.clipped_grad_sum(loss_fn, params, batch, m, clip_norm=clip, clipping=mode)
  return jax.vmap(f)(jnp.eye(b))


def test_sparse_equals_naive_per_example_clipping_on_ctr_model():
  """Several tables, a shared table, duplicate ids, padding ids: sparse == naive, invariant 1."""
  model = cm.DeepFM()
  batch = cm.ctr_batch(jax.random.key(5), 8, model)
  params = model.init(jax.random.key(1), batch["fields"][0], batch["bag"][0])
  loss_fn = cm.ctr_loss(model)
  plan = ghost.plan_layers(loss_fn, params, jax.tree_util.tree_map(lambda x: x[0], batch))
  tables = {"['params']['table0']": 2, "['params']['table1']": 1, "['params']['table_bag']": 1,
            "['params']['wide']": 2}
  for i, name in plan.names.items():
    if name in tables:
      assert plan.ghost.get(i) == tables[name], plan.describe()
      assert plan.methods[i] == ghost.NormMethod.ROWS
  _, _, grads = clipping.per_example_grads(loss_fn, params, batch)
  clip = 0.5 * float(jnp.median(clipping.global_norms(grads)))
  sparse, _, s_stats = _per_example_contribs(loss_fn, params, batch, clip, "auto")
  naive, _, n_stats = _per_example_contribs(loss_fn, params, batch, clip, "vmap")
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), sparse, naive)
  norms = clipping.global_norms(sparse)
  assert np.all(np.asarray(norms) <= clip * (1 + 1e-5))
  np.testing.assert_array_equal(s_stats.num_clipped, n_stats.num_clipped)
  assert int(jnp.sum(s_stats.num_clipped)) >= 4
  # The padding id (-1 -> out of range, fill mode) gives no row a gradient.
  bag_rows = sparse["params"]["table_bag"]
  touched = np.zeros((8, model.vocab[2]), bool)
  for i, ex_bag in enumerate(np.asarray(batch["bag"])):
    touched[i, ex_bag[ex_bag >= 0]] = True
  assert np.all(np.asarray(jnp.abs(bag_rows).sum(-1))[~touched] == 0)


def test_sparse_path_never_materializes_batch_by_table():
  """Compiled temp memory stays far below b x V x d floats for a 10^5-row table."""
  b, v, d = 32, 100_000, 16

  def loss(p, ex):
    return jnp.sum(jnp.tanh(p["table"][ex["ids"]]) @ p["w"])

  params = {"table": jnp.zeros((v, d)), "w": jnp.ones((d,))}
  batch = {"ids": jnp.zeros((b, 4), jnp.int32)}
  fn = jax.jit(lambda p, x: dpmega.clipped_grad_sum(loss, p, x, clip_norm=1.0))
  mem = fn.lower(params, batch).compile().memory_analysis()
  if mem is None:
    pytest.skip("this backend reports no memory analysis")
  assert mem.temp_size_in_bytes < 0.05 * b * v * d * 4, mem.temp_size_in_bytes


def test_noise_reaches_every_row_of_every_table_once_per_step():
  model = cm.DeepFM()
  batch = cm.ctr_batch(jax.random.key(6), 8, model)
  params = model.init(jax.random.key(1), batch["fields"][0], batch["bag"][0])
  kw = dict(clip_norm=1.0, noise_multiplier=2.0, expected_batch_size=8.0)
  key = jax.random.key(3)
  _, g1, _ = dpmega.private_value_and_grad(cm.ctr_loss(model), microbatch_size=4, **kw)(params, batch, key)
  _, g2, _ = dpmega.private_value_and_grad(cm.ctr_loss(model), **kw)(params, batch, key)
  for name in ("table0", "table1", "table_bag", "wide"):
    rows = np.asarray(g1["params"][name])
    assert np.all(np.abs(rows).sum(-1) > 0), name  # rows no example touched are noised too
  # One draw per logical step: micro-batching does not change the noisy result.
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)
