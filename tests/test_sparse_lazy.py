"""Lazy optimizer updates (dpmega/sparse/lazy.py): rows not selected keep parameters and state bit for bit."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpmega.sparse import lazy

OPTIMIZERS = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(0.1),
    "adamw": lambda: optax.adamw(0.1, weight_decay=0.1),
    "adagrad": lambda: optax.adagrad(0.1),
}
ROWS, D = 12, 3


def _params():
  key = jax.random.key(0)
  return {"emb": {"table": jax.random.normal(key, (ROWS, D))}, "dense": jnp.ones((2,))}


def _step(opt, params, state, ids, valid, seed):
  g_rows = jax.random.normal(jax.random.key(seed), (len(ids), D))
  grads = {"emb": {"table": g_rows}, "dense": jnp.full((2,), 0.5)}
  rows = {("emb", "table"): (jnp.asarray(ids, jnp.int32), jnp.asarray(valid))}
  return lazy.lazy_update(opt, params, state, grads, rows), g_rows


def _table_leaves(state):
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(state) if np.shape(x) == (ROWS, D)]


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_rows_not_selected_keep_params_and_state_bit_for_bit(name):
  opt = OPTIMIZERS[name]()
  params = _params()
  state = opt.init(params)
  (params, state, _), _ = _step(opt, params, state, [1, 4, 7, ROWS], [True, True, True, False], 1)
  before_p, before_s = np.asarray(params["emb"]["table"]), _table_leaves(state)
  (params2, state2, _), _ = _step(opt, params, state, [2, 4, ROWS, ROWS], [True, True, False, False], 2)
  after_p, after_s = np.asarray(params2["emb"]["table"]), _table_leaves(state2)
  untouched = [r for r in range(ROWS) if r not in (2, 4)]
  np.testing.assert_array_equal(after_p[untouched], before_p[untouched])
  for b, a in zip(before_s, after_s):
    np.testing.assert_array_equal(a[untouched], b[untouched])
  assert not np.array_equal(after_p[[2, 4]], before_p[[2, 4]])
  assert not np.array_equal(np.asarray(params2["dense"]), np.asarray(params["dense"]))  # dense leaves update


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_selected_rows_move_as_the_dense_optimizer_moves_them(name):
  # A row selected at every step sees the same sequence of gradients as under the dense optimizer.
  opt = OPTIMIZERS[name]()
  params = _params()
  dense_params, dense_state = params, opt.init(params)
  lazy_params, lazy_state = params, opt.init(params)
  for seed in range(3):
    (lazy_params, lazy_state, _), g_rows = _step(opt, lazy_params, lazy_state, [5, 9], [True, True], seed)
    full = jnp.zeros((ROWS, D)).at[jnp.array([5, 9])].set(g_rows)
    grads = {"emb": {"table": full}, "dense": jnp.full((2,), 0.5)}
    upd, dense_state = opt.update(grads, dense_state, dense_params)
    dense_params = optax.apply_updates(dense_params, upd)
  np.testing.assert_allclose(np.asarray(lazy_params["emb"]["table"])[[5, 9]],
                             np.asarray(dense_params["emb"]["table"])[[5, 9]], rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(np.asarray(lazy_params["dense"]), np.asarray(dense_params["dense"]), rtol=1e-6)


def test_noise_only_row_does_not_random_walk_under_adam():
  # Dense Adam keeps moving a row after its one gradient (momentum); lazy Adam leaves it where it was.
  opt = optax.adam(0.1)
  params = _params()
  (p1, s1, _), _ = _step(opt, params, opt.init(params), [3], [True], 0)
  (p2, _, _), _ = _step(opt, p1, s1, [ROWS], [False], 1)
  np.testing.assert_array_equal(np.asarray(p2["emb"]["table"])[3], np.asarray(p1["emb"]["table"])[3])
  zero = {"emb": {"table": jnp.zeros((ROWS, D))}, "dense": jnp.zeros(2)}
  dense_state = opt.init(params)
  full = {"emb": {"table": jnp.zeros((ROWS, D)).at[3].set(1.0)}, "dense": jnp.zeros(2)}
  u, dense_state = opt.update(full, dense_state, params)
  u2, _ = opt.update(zero, dense_state, optax.apply_updates(params, u))
  assert np.abs(np.asarray(u2["emb"]["table"])[3]).min() > 0  # the dense optimizer would have moved it


def test_unknown_table_path_is_refused():
  opt = optax.sgd(0.1)
  params = _params()
  with pytest.raises(ValueError, match="not parameters"):
    lazy.lazy_update(opt, params, opt.init(params), params, {("nope",): (jnp.zeros(1, jnp.int32), jnp.ones(1, bool))})
