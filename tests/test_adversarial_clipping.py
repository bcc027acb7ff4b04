"""Invariant 1 in floating point: every example's contribution is <= C for crafted inputs (issue 15).

Each test adds ONE example (a one-example mask, sigma = 0) through the public
``dpmega.private_value_and_grad`` and measures, in float64, the norm of what
was added over all parameters. Inputs are built to break the arithmetic of
the fast paths: cancellation across positions (``v`` and ``-v + d``) and
across duplicate ids, tiny and huge magnitudes, subnormals, mixed signs, bf16.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import dpmega
from dpmega import clipping
from dpmega.clipping import floats
from dpmega.clipping import ghost
from dpmega.clipping import gram
from tests import clipping_models as cm

# "ghost" is "auto" under another name; "gram" is the pure Gram bound (cm.gram_mode, registered for this module).
MODES = ("auto", "gram", "vmap")
BOUND = 1 + 1e-5
C = 1.0


@pytest.fixture(autouse=True, scope="module")
def _gram_mode():
  with cm.gram_mode():
    yield


def _f64_norm(tree):
  return float(np.sqrt(sum(np.sum(np.asarray(x, np.float64) ** 2) for x in jax.tree_util.tree_leaves(tree))))


def _contribution_fn(loss, clip_norm, mode):
  f = dpmega.private_value_and_grad(loss, clip_norm=clip_norm, noise_multiplier=0.0, expected_batch_size=1.0,
                                    clipping=mode)
  key = jax.random.key(0)  # sigma = 0: the key draws nothing that matters

  def contribution(params, batch, i):
    b = jax.tree_util.tree_leaves(batch)[0].shape[0]
    mask = jnp.zeros((b,), jnp.float32).at[i].set(1.0)
    _, grads, _ = f(params, batch, key, mask=mask)
    return grads
  return contribution


def _assert_bounded(grads, clip_norm, what):
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in leaves), what
  norm = _f64_norm(grads)
  assert norm <= clip_norm * BOUND, f"{what}: contribution {norm} > C = {clip_norm}"
  return norm


# ---------------------------------------------------------------- models

class _PosDense(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return jnp.mean(nn.Dense(3, dtype=self.dtype)(x.astype(self.dtype)), axis=0).astype(jnp.float32)


class _PosDenseGeneral(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # x [n, 4] seen as [n, 2, 2]: a two-dim contraction
    h = nn.DenseGeneral((2, 3), axis=(-2, -1), dtype=self.dtype)(x.reshape(x.shape[0], 2, 2).astype(self.dtype))
    return jnp.mean(h.reshape(x.shape[0], -1), axis=0).astype(jnp.float32)[:3]


class _Attention(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, dtype=self.dtype)(
        x.astype(self.dtype), x.astype(self.dtype))
    return jnp.mean(h, axis=0).astype(jnp.float32)[:3]


_DENSE_MODELS = {"dense": _PosDense, "dense_general": _PosDenseGeneral, "attention": _Attention,
                 "dense_wide": _PosDense}
# Features per position (the rows' K); 64 is wide enough for blocked Gram products (gram.BLOCKED_MAX_ROWS).
_WIDTH = {"dense_wide": 64}


def _regression_loss(model):
  def loss(p, ex):
    return jnp.sum((model.apply(p, ex["x"]) - ex["y"]) ** 2)
  return loss


class _Tied(nn.Module):
  dtype: jnp.dtype = jnp.float32
  vocab: int = 7

  @nn.compact
  def __call__(self, ids, c):
    emb = nn.Embed(self.vocab, 4, dtype=self.dtype)
    h = emb(ids) * c.astype(self.dtype)[:, None]
    return emb.attend(h).astype(jnp.float32)  # [n, vocab]


# Vocabulary of the tied models; 70 is wide enough for blocked Gram products of the output gradients.
_VOCAB = {"tied": 7, "tied_wide": 70}


def _tied_loss(model):
  def loss(p, ex):
    return jnp.sum(model.apply(p, ex["ids"], ex["c"]) * ex["t"])
  return loss


def _rows_loss(dtype, gather):
  def loss(p, ex):
    table = p["table"].astype(dtype)
    rows = table[ex["ids"]] if gather == "plain" else jnp.take(table, ex["ids"], axis=0, mode=gather)
    # A vmap-path leaf too, fed by a row outside the cancelling pair (a huge bias gradient would mask the rows).
    return jnp.sum(rows.astype(jnp.float32) * ex["c"]) + jnp.sum(p["bias"] * ex["c"][2])
  return loss


@functools.lru_cache(maxsize=None)
def _setup(name, dtype_name, mode, budget, scan_all=False):
  """(jitted contribution fn, params) for one model, dtype, mode and materialization budget (traced lazily)."""
  dtype = jnp.dtype(dtype_name)
  if name in _DENSE_MODELS:
    model = _DENSE_MODELS[name](dtype=dtype)
    params = model.init(jax.random.key(1), jnp.ones((3, _WIDTH.get(name, 4))))
    loss = _regression_loss(model)
  elif name in _VOCAB:
    model = _Tied(dtype=dtype, vocab=_VOCAB[name])
    params = model.init(jax.random.key(1), jnp.zeros((4,), jnp.int32), jnp.ones((4,)))
    loss = _tied_loss(model)
  else:
    params = {"table": jax.random.normal(jax.random.key(1), (6, 3)), "bias": jnp.zeros((3,))}
    loss = _rows_loss(dtype, name.split("_", 1)[1])
  return _contribution_fn(loss, C, mode), params, budget


def _contribution(name, dtype_name, mode, batch, budget=None, i=0, scan_all=False):
  """The contribution of example ``i``; ``budget`` replaces ghost's fallback budget for the call, and with
  ``scan_all`` every multi-row dense leaf of "auto" takes the scanned materialization, whatever its rows."""
  fn, params, budget = _setup(name, dtype_name, mode, budget, scan_all)
  saved = ghost._MATERIALIZE_BUDGET, ghost._SCAN_MIN_ROWS, ghost._MATERIALIZE_SMALL_LEAF
  if budget is not None:
    ghost._MATERIALIZE_BUDGET = budget
  if scan_all:  # every leaf beyond the outright size, and every one of 2 rows or more scanned
    ghost._SCAN_MIN_ROWS, ghost._MATERIALIZE_SMALL_LEAF = 2, 0
  try:
    # A fresh trace under these limits: the cache above keys on them.
    return fn(params, batch, i)
  finally:
    ghost._MATERIALIZE_BUDGET, ghost._SCAN_MIN_ROWS, ghost._MATERIALIZE_SMALL_LEAF = saved


# ---------------------------------------------------------------- crafted inputs

def _crafted(rng, shape, exp, cancel, subnormal, big):
  """Rows with a cancelling pair (``v``, ``-v + d``, ``|v| = 10^big |d|``), scale ``10^exp``, maybe subnormals."""
  x = rng.normal(size=shape)
  if cancel and shape[0] >= 2:
    v = rng.normal(size=shape[1:]) * 10.0 ** big
    x[0], x[1] = v, -v + x[1]
  x = x * 10.0 ** exp
  if subnormal:
    x[..., ::2] *= 1e-40
  with np.errstate(over="ignore"):
    return np.clip(x, -3e38, 3e38).astype(np.float32)


_inputs = st.fixed_dictionaries({
    "seed": st.integers(0, 2**16),
    "exp_x": st.integers(-25, 25),
    "exp_y": st.integers(-20, 20),
    "cancel": st.booleans(),
    "big": st.integers(0, 9),
    "subnormal": st.booleans(),
})


def _batch(name, p):
  if name in _VOCAB:
    return _tied_batch(p, vocab=_VOCAB[name])
  return _rows_batch(p) if name.startswith("rows") else _dense_batch(p, width=_WIDTH.get(name, 4))


def _dense_batch(p, n=3, width=4):
  rng = np.random.default_rng(p["seed"])
  x = np.stack([_crafted(rng, (n, width), p["exp_x"], p["cancel"], p["subnormal"], p["big"]) for _ in range(2)])
  y = (rng.normal(size=(2, 3)) * 10.0 ** p["exp_y"]).astype(np.float32)
  return {"x": jnp.asarray(x), "y": jnp.asarray(y)}


def _tied_batch(p, n=4, vocab=7):
  rng = np.random.default_rng(p["seed"])
  ids = np.stack([rng.integers(0, vocab, size=n) for _ in range(2)])
  ids[:, 1] = ids[:, 0]  # duplicate ids
  c = np.stack([_crafted(rng, (n,), p["exp_x"], p["cancel"], p["subnormal"], p["big"]) for _ in range(2)])
  t = np.stack([_crafted(rng, (n, vocab), p["exp_y"], False, False, 0) for _ in range(2)])
  if p["cancel"]:
    t[:, 1] = t[:, 0]  # same output gradient at the cancelling pair: lookup rows and attend terms cancel
  return {"ids": jnp.asarray(ids, jnp.int32), "c": jnp.asarray(c), "t": jnp.asarray(t)}


def _rows_batch(p, n=5):
  rng = np.random.default_rng(p["seed"])
  ids = np.stack([rng.integers(0, 6, size=n) for _ in range(2)])
  ids[:, 1] = ids[:, 0]  # rows 0 and 1 of c cancel on one id
  c = np.stack([_crafted(rng, (n, 3), p["exp_x"], p["cancel"], p["subnormal"], p["big"]) for _ in range(2)])
  return {"ids": jnp.asarray(ids, jnp.int32), "c": jnp.asarray(c)}


# ---------------------------------------------------------------- property tests

@pytest.mark.parametrize("name", ["dense", "dense_general", "attention", "dense_wide"])
@given(p=_inputs)
def test_dense_layers_each_contribution_at_most_clip_in_every_mode(name, p):
  batch = _batch(name, p)
  for mode in MODES:
    _assert_bounded(_contribution(name, "float32", mode, batch), C, (name, mode, p))


@pytest.mark.parametrize("name", ["tied", "tied_wide", "rows_plain", "rows_fill", "rows_clip"])
@given(p=_inputs)
def test_tied_embeddings_and_row_lookups_each_contribution_at_most_clip(name, p):
  batch = _batch(name, p)
  for mode in MODES:
    _assert_bounded(_contribution(name, "float32", mode, batch), C, (name, mode, p))


@pytest.mark.slow  # 25 examples x 3 modes x 4 models: ~1 min of the file's ~3 on 2 idle cores
@pytest.mark.parametrize("name", ["dense", "attention", "tied", "rows_plain"])
@given(p=_inputs)
def test_bf16_compute_each_contribution_at_most_clip(name, p):
  batch = _batch(name, p)
  for mode in MODES:
    _assert_bounded(_contribution(name, "bfloat16", mode, batch), C, (name, mode, p))


@pytest.mark.slow  # 25 examples x 3 modes x 4 models: ~1 min of the file's ~3 on 2 idle cores
@pytest.mark.parametrize("name", ["dense", "attention", "tied", "dense_wide", "tied_wide"])
@given(p=_inputs)
def test_rounding_bound_alone_is_never_permissive(name, p):
  """With no example materialized, the Gram norm plus its error bound must still clip every crafted example
  (the wide models: from blocked Gram products)."""
  batch = _batch(name, p)
  for mode in ("auto", "gram"):
    _assert_bounded(_contribution(name, "float32", mode, batch, budget=0), C, (name, mode, p))


@pytest.mark.parametrize("name", ["tied", "tied_wide"])
@given(p=_inputs)
def test_scan_fallback_bounds_the_examples_beyond_the_budget(name, p):
  """Both crafted examples added, the fallback budget one example's gradient: the other one's bound is loose, so
  the tied table is summed in the scan (its estimate as the norm, each example capped by what it adds). The sum of
  the two contributions is at most 2 C; summing by the book-keeping with the estimate as the norm would not be."""
  batch = _batch(name, p)
  fn, params, _ = _setup(name, "float32", "auto", None)
  saved = ghost._MATERIALIZE_BUDGET
  ghost._MATERIALIZE_BUDGET = _VOCAB[name] * 4  # one example's table gradient: n_sel = 1
  try:
    f = dpmega.private_value_and_grad(_tied_loss(_Tied(vocab=_VOCAB[name])), clip_norm=C, noise_multiplier=0.0,
                                      expected_batch_size=1.0, clipping="auto")
    _, grads, _ = f(params, batch, jax.random.key(0), mask=jnp.ones((2,), jnp.float32))
  finally:
    ghost._MATERIALIZE_BUDGET = saved
  _assert_bounded(grads, 2 * C, (name, p))


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["dense", "dense_general", "attention", "tied"])
@given(p=_inputs)
def test_scanned_materialization_is_never_permissive(name, dtype_name, p):
  """Scanned leaves under "auto": each example's gradient materialized in a scan, its weight capped by the norm of
  what it adds against the (crafted-to-be-wrong) Gram estimate the norms were built from."""
  batch = _batch(name, p)
  _assert_bounded(_contribution(name, dtype_name, "auto", batch, scan_all=True), C, (name, dtype_name, p))


# ---------------------------------------------------------------- the reproductions

class _MeanPoolDense(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.mean(nn.Dense(3)(x), axis=0)


def _cancelling_repro():
  """Repro 1's loss, params, crafted features ``[v, -v + d]`` (``|v| = 1e6``) and the generator that made them."""
  model = _MeanPoolDense()
  loss = lambda p, ex: -jax.nn.log_softmax(model.apply(p, ex["x"]))[ex["y"]]
  params = model.init(jax.random.key(0), jnp.zeros((2, 4)))
  rng = np.random.default_rng(30)
  v = rng.normal(size=4)
  v = v / np.linalg.norm(v) * 1e6
  d = rng.normal(size=4) * 30
  return loss, params, np.stack([v, -v + d]), rng


@pytest.mark.parametrize("budget", [None, 0])
def test_dense_shared_over_positions_with_cancelling_features_is_clipped(budget):
  """Issue 15 repro 1: features v and -v + d, |v| = 1e6, softmax cross-entropy; was 61.7 with C = 1."""
  loss, params, crafted, _ = _cancelling_repro()
  batch = {"x": jnp.asarray(crafted, jnp.float32)[None], "y": jnp.array([0])}
  for mode in MODES:
    fn = _contribution_fn(loss, 1.0, mode)
    if budget is None or mode == "vmap":
      grads = fn(params, batch, 0)
    else:
      saved, ghost._MATERIALIZE_BUDGET = ghost._MATERIALIZE_BUDGET, budget
      try:
        grads = fn(params, batch, 0)
      finally:
        ghost._MATERIALIZE_BUDGET = saved
    _assert_bounded(grads, 1.0, mode)


def test_scanned_materialization_clips_a_cancelling_example_by_what_it_adds(monkeypatch):
  """The issue's repro 1 (features v and -v + d, |v| = 1e6) through the scanned path, with a benign example beside
  it: the crafted one's Gram estimate is off, its contribution still at most C; the benign one's is C, as vmap."""
  loss, params, crafted, rng = _cancelling_repro()
  x = np.stack([crafted, rng.normal(size=(2, 4)) * 30])
  batch = {"x": jnp.asarray(x, jnp.float32), "y": jnp.array([0, 1])}
  monkeypatch.setattr(ghost, "_SCAN_MIN_ROWS", 2)
  monkeypatch.setattr(ghost, "_MATERIALIZE_SMALL_LEAF", 0)
  assert ghost._leaf_plan(ghost.NormMethod.GRAM, 2, x, x[..., :3], None, auto=True).scan  # the premise: scanned
  crafted = _assert_bounded(_contribution_fn(loss, 1.0, "auto")(params, batch, 0), 1.0, "crafted")
  benign = _assert_bounded(_contribution_fn(loss, 1.0, "auto")(params, batch, 1), 1.0, "benign")
  monkeypatch.undo()
  want = _f64_norm(_contribution_fn(loss, 1.0, "vmap")(params, batch, 1))
  assert crafted > 0.0
  np.testing.assert_allclose(benign, want, rtol=1e-5)


def test_underflowing_features_are_clipped():
  """Issue 15 repro 2: linear regression, features 1e-19 (a.a underflows), label 8e18; was 3.2 with C = 0.01."""
  loss = lambda w, ex: (ex["x"] @ w - ex["y"]) ** 2
  batch = {"x": jnp.full((2, 4), 1e-19), "y": jnp.array([8e18, 1.0])}
  want = None
  for mode in MODES:
    grads = _contribution_fn(loss, 0.01, mode)(jnp.ones(4), batch, 0)
    norm = _assert_bounded(grads, 0.01, mode)
    np.testing.assert_allclose(norm, 0.01, rtol=1e-5)  # clipped to C exactly, as vmap does
    want = grads if want is None else want
    np.testing.assert_allclose(grads, want, rtol=1e-5)


def test_cancelling_duplicate_id_rows_are_clipped():
  """Issue 15 repro 3: rows v and -v + d on one id, scaled per row before the scatter; was 1.95 C."""
  loss = lambda p, ex: jnp.sum(p["E"][ex["ids"]] * ex["c"])
  params = {"E": jnp.zeros((5, 3))}
  rng = np.random.default_rng(119)
  v = rng.normal(size=3) * 1e7
  c = np.stack([v, -v + rng.normal(size=3)]).astype(np.float32)
  batch = {"ids": jnp.array([[2, 2]]), "c": jnp.asarray(c)[None]}
  for mode in MODES:
    _assert_bounded(_contribution_fn(loss, 1e-3, mode)(params, batch, 0), 1e-3, mode)


# ---------------------------------------------------------------- lookups follow JAX's gradient

_LOOKUPS = {
    "plain": lambda t, i: t[i],  # promise_in_bounds: the forward clamps, the gradient drops
    "fill": lambda t, i: jnp.take(t, i, axis=0),  # Flax Embed's mode: fill forward, drop gradient
    "clip": lambda t, i: jnp.take(t, i, axis=0, mode="clip"),  # clamped both ways
}


@pytest.mark.parametrize("lookup", sorted(_LOOKUPS))
@pytest.mark.parametrize("ids", [
    np.array([[1, 5, 1], [7, 0, 3], [-7, 2, 2]], np.int32),
    np.array([[1, 2**31 + 5, 3], [2**32 - 1, 0, 0], [4, 2, 2**31]], np.uint32),
], ids=["int32_out_of_range", "uint32_huge"])
def test_lookup_gradients_match_jax_grad_in_every_mode(lookup, ids):
  """Out-of-range and unsigned ids: every mode's per-example gradients and clipped sum equal vmap(grad)."""
  take = _LOOKUPS[lookup]

  def loss(p, ex):
    rows = take(p["table"], ex["ids"])
    return jnp.sum(jnp.where(jnp.isfinite(rows), rows, 0.0) * ex["c"])

  params = {"table": jnp.arange(12.0).reshape(4, 3)}
  batch = {"ids": jnp.asarray(ids), "c": jnp.asarray(np.random.default_rng(0).normal(size=(3, 3, 3)), jnp.float32)}
  want = jax.vmap(jax.grad(loss), in_axes=(None, 0))(params, batch)["table"]
  want_norms = np.linalg.norm(np.asarray(want).reshape(3, -1), axis=1)
  clip = float(np.median(want_norms))
  for mode in MODES:
    per_ex = jax.vmap(lambda m: dpmega.clipped_grad_sum(loss, params, batch, m, clip_norm=np.inf, clipping=mode)[0])(
        jnp.eye(3))["table"]
    np.testing.assert_allclose(per_ex, want, rtol=1e-6, atol=1e-6, err_msg=mode)
    got, _, stats = dpmega.clipped_grad_sum(loss, params, batch, clip_norm=clip, clipping=mode)
    factors = np.minimum(1.0, clip / np.maximum(want_norms, 1e-30))
    np.testing.assert_allclose(got["table"], np.einsum("b,bvd->vd", factors, want), rtol=1e-5, atol=1e-5,
                               err_msg=mode)
    np.testing.assert_allclose(stats.norm_sum, want_norms.sum(), rtol=1e-5, err_msg=mode)


def test_integer_params_leaf_is_refused_alike_in_every_mode():
  def loss(p, ex):
    return jnp.sum(ex["x"] @ p["w"]) * p["step"]

  params = {"w": jnp.ones((3, 2)), "step": jnp.array(3, jnp.int32)}
  batch = {"x": jnp.ones((4, 3))}
  for mode in MODES:
    with pytest.raises(ValueError, match=r"params leaf \"\['step'\]\" has dtype int32: only float leaves"):
      dpmega.clipped_grad_sum(loss, params, batch, clip_norm=1.0, clipping=mode)
    grad_fn = dpmega.private_value_and_grad(loss, clip_norm=1.0, noise_multiplier=0.0, expected_batch_size=4.0,
                                            clipping=mode)
    with pytest.raises(ValueError, match=r"nnx.split\(model, nnx.Param"):
      grad_fn(params, batch, jax.random.key(0))


@pytest.mark.parametrize("length", [1000, 1 << 16, (1 << 16) * 3 + 7, (1 << 20) + 5])
def test_tree_sums_count_every_term_once_and_meet_their_rounding_bound(length):
  """floats.sum_nonneg, whose long levels are summed by halvings: every term counted once (exact sums of ones and of
  one-hot rows, odd lengths padded), and within ``tree_gamma(n) sum x`` on a sum built to lose digits in sequence (a
  1 followed by terms below its half ulp) with magnitudes from 1e-30 to 1e30 beside it."""
  rng = np.random.default_rng(length)
  rows = [np.ones(length), np.zeros(length), np.zeros(length)]
  rows[1][rng.integers(length)] = 2.0**-30
  rows[2][[0, length - 1]] = 3.0
  lossy = np.full(length, 2.0**-25)
  lossy[0] = 1.0
  mixed = rng.uniform(0, 1, size=length) * 10.0 ** rng.uniform(-30, 30, size=length)
  x = np.stack(rows + [lossy, mixed]).astype(np.float32)
  got = np.asarray(floats.sum_nonneg(jnp.asarray(x)), np.float64)
  exact = np.sum(x.astype(np.float64), axis=1)
  np.testing.assert_array_equal(got[:3], [length, 2.0**-30, 6.0])
  assert np.all(np.abs(got[3:] - exact[3:]) <= floats.tree_gamma(length) * exact[3:]), (got[3:] / exact[3:] - 1)


def test_scaled_norms_neither_underflow_nor_overflow():
  x = jnp.stack([jnp.full((1000,), 1e-20), jnp.full((1000,), 1e20), jnp.zeros(1000)])
  np.testing.assert_allclose(clipping.scaled_norms(x), [1e-20 * np.sqrt(1000), 1e20 * np.sqrt(1000), 0.0], rtol=1e-6)
  assert clipping.tree_gamma(10**6) < 5e-6


# ---------------------------------------------------------------- the fast paths, forced each way

def _gram_cases():
  """Crafted ``(x [b, n, K], y [b, n, N])`` batches, the exact per-example norms (float64), and whether benign."""
  rng = np.random.default_rng(7)
  cases = []
  # (rows, K, N): narrow; wide enough for blocked Gram products on one side (K = 300) or both (64, 70).
  for n, kx, ny in [(5, 4, 3), (5, 300, 3), (3, 64, 70)]:
    for exp_x, exp_y, cancel, subnormal, big in [(0, 0, False, False, 0), (0, -3, True, False, 6),
                                                 (-25, 20, True, False, 3), (25, -20, False, True, 0),
                                                 (-19, -19, False, False, 0), (18, 18, True, False, 4)]:
      x = np.stack([_crafted(rng, (n, kx), exp_x, cancel, subnormal, big) for _ in range(3)])
      y = np.stack([_crafted(rng, (n, ny), exp_y, False, False, 0) for _ in range(3)])
      if cancel:
        y[:, 1] = y[:, 0]  # the same output gradient at the cancelling pair
      cases.append((x, y, not cancel and not subnormal and abs(exp_x) + abs(exp_y) <= 10))
  # One row at 2^-40 beside a row at 2^100 whose output gradient is 0: per-example scaling flushes the small row,
  # which carries the whole gradient (2^20 with these values: was bounded by 0 before the underflow term).
  x = np.zeros((2, 2, 4), np.float32)
  y = np.zeros((2, 2, 3), np.float32)
  x[:, 0, 0], x[:, 1, 1], y[:, 1, 0] = 2.0**100, 2.0**-40, 2.0**60
  x[1] = rng.normal(size=(2, 4))
  y[1] = rng.normal(size=(2, 3))
  cases.append((x, y, False))
  out = []
  for x, y, benign in cases:
    g = np.einsum("bnk,bnm->bkm", x.astype(np.float64), y.astype(np.float64))
    out.append((jnp.asarray(x), jnp.asarray(y), np.linalg.norm(g.reshape(g.shape[0], -1), axis=1), benign))
  return out


@pytest.mark.parametrize("path", ["fast", "scaled"])
def test_dense_norm_bound_is_rigorous_on_either_path(path, monkeypatch):
  """The Gram bound holds whichever branch the batch-level cond takes: forced here by its thresholds."""
  if path == "fast":  # any finite unscaled bound is taken
    monkeypatch.setattr(gram, "FAST_REL2", np.inf)
  else:  # never taken
    monkeypatch.setattr(gram, "FAST_REL2", -1.0)
  for x, y, want, benign in _gram_cases():
    est, upper = gram.dense_norm_bounds(x, y, None, None)
    est, upper = np.asarray(est, np.float64), np.asarray(upper, np.float64)
    assert np.all(~np.isfinite(upper) | (upper >= want)), (path, upper, want)
    if benign:  # the estimate is vmap's norm; the bound is tight
      np.testing.assert_allclose(est, want, rtol=1e-5, err_msg=path)
      np.testing.assert_allclose(upper, want, rtol=1e-4, err_msg=path)


def test_dense_norm_bound_takes_the_fast_path_only_when_it_is_as_tight():
  """Benign operands: the unscaled bound equals the scaled one to rounding; with tiny or zero operands in a real
  example the batch is scaled; a padding example (mask 0) is not asked."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(4, 6, 5)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
  for scale in (1.0, 1e-30, 0.0):
    ys = y.at[1].multiply(scale)
    got = gram.dense_norm_bounds(x, ys, None, None)
    want = gram.dense_norm_bounds_scaled(x, ys, None, None)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
  # Padding with a zero gradient: the fast path stays on for the real examples (equal to the scaled bound there).
  mask = jnp.array([1.0, 0.0, 1.0, 1.0])
  got = gram.dense_norm_bounds(x, y.at[1].set(0.0), None, None, mask)
  want = gram.dense_norm_bounds_scaled(x, y, None, None)
  np.testing.assert_allclose(np.asarray(got)[:, [0, 2, 3]], np.asarray(want)[:, [0, 2, 3]], rtol=1e-6)


def test_blocked_dot_products_meet_their_rounding_bound():
  """floats.dot_rows: each entry within ``g sum |a c|`` of the exact dot product, blocked or not, on sums built to
  lose digits when added in sequence (a 1 followed by thousands of terms below its half ulp)."""
  rng = np.random.default_rng(5)
  for k in (62, 512, 5000):
    a = rng.normal(size=(2, 3, k)) * 10.0 ** rng.integers(-8, 9, size=(2, 3, k))
    c = rng.normal(size=(2, 4, k)) * 10.0 ** rng.integers(-8, 9, size=(2, 4, k))
    a[0, 0], c[0, 0] = 2.0**-12, 2.0**-13  # products 2^-25 ...
    a[0, 0, 0], c[0, 0, 0] = 1.0, 1.0  # ... after a 1: in sequence, every one of them rounds away
    a, c = a.astype(np.float32), c.astype(np.float32)
    exact = np.einsum("bsk,btk->bst", a.astype(np.float64), c.astype(np.float64))
    scale = np.einsum("bsk,btk->bst", np.abs(a).astype(np.float64), np.abs(c).astype(np.float64))
    plain, g_plain = floats.dot_rows(jnp.asarray(a), jnp.asarray(c), blocked=False)
    blocked, g_blocked = floats.dot_rows(jnp.asarray(a), jnp.asarray(c), blocked=True)
    assert g_blocked <= g_plain / 2, k  # the point of blocking
    for got, g in ((plain, g_plain), (blocked, g_blocked)):
      assert np.all(np.abs(np.asarray(got, np.float64) - exact) <= g * scale + 4 * k * 2.0**-126), (k, g)


def _tied_table_operands(rng, b, n, k, d, r=32):
  """A tied table's operands: n softmax-minus-one-hot rows (over k) beside N(0, 1) hidden states, r lookup rows."""
  logits = rng.normal(size=(b, n, k))
  x = np.exp(logits) / np.sum(np.exp(logits), axis=2, keepdims=True)
  x[np.arange(b)[:, None], np.arange(n)[None], rng.integers(0, k, size=(b, n))] -= 1.0
  y = rng.normal(size=(b, n, d))
  ids = np.stack([rng.permutation(k)[:r] for _ in range(b)])  # distinct ids: rows already summed
  rows = rng.normal(size=(b, r, d)) * 0.3
  return x.astype(np.float32), y.astype(np.float32), ids, rows.astype(np.float32)


def _abs_frobenius64(x, y):
  """float64 ``||sum_s |x_s| |y_s|^T||_F`` per example."""
  a = np.einsum("bnk,bnm->bkm", np.abs(x).astype(np.float64), np.abs(y).astype(np.float64))
  return np.linalg.norm(a.reshape(a.shape[0], -1), axis=1)


def test_absolute_frobenius_term_bounds_the_bookkeeping_rounding_for_every_input():
  """gram's book-keeping term for a tied table (``u_dense``): never below ``||sum_s |x_s| |y_s|^T||_F`` (what the
  book-keeping's rounding is bounded by, entry by entry), on crafted operands: magnitudes from 1e-30 to 1e15,
  subnormals, rows that flush to 0, mixed signs, cancelling rows, one huge row beside tiny ones; and on a tied
  table's benign operands within 5% of it, where ``U = sum_s |x_s| |y_s|`` (the term before) is ~sqrt(n) times it."""
  rng = np.random.default_rng(7)
  b, n, k, d, r = 6, 12, 300, 40, 8
  cases = {"benign": (rng.normal(size=(b, n, k)), rng.normal(size=(b, n, d)))}
  for lo, hi in ((-30, -20), (-20, 15), (5, 15)):
    cases[f"1e{lo}..1e{hi}"] = tuple(rng.normal(size=(b, n, m)) * 10.0 ** rng.uniform(lo, hi, size=(b, n, m))
                                     for m in (k, d))
  x, y = rng.normal(size=(b, n, k)), rng.normal(size=(b, n, d))
  x[:, 1::2] = -x[:, ::2] + 1e-6 * rng.normal(size=x[:, ::2].shape)  # cancelling pairs of rows
  cases["cancelling"] = (x, y)
  x, y = rng.normal(size=(b, n, k)) * 1e-40, rng.normal(size=(b, n, d)) * 1e-5  # subnormal x, products flushed
  x[:, 0] = 1e10
  cases["one huge row beside subnormal ones"] = (x, y)
  rows, ids = rng.normal(size=(b, r, d)).astype(np.float32), np.tile(np.arange(r), (b, 1))
  for name, (x, y) in cases.items():
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    u_dense = np.asarray(gram.bounds_in_units(jnp.asarray(x), jnp.asarray(y), jnp.asarray(ids, jnp.int32),
                                              jnp.asarray(rows))[2], np.float64)
    want = _abs_frobenius64(x, y)
    assert np.all(u_dense >= want), (name, u_dense / want)
  x, y, ids, rows = _tied_table_operands(rng, 4, 32, 4096, 64)
  u_dense = np.asarray(gram.bounds_in_units(jnp.asarray(x), jnp.asarray(y), jnp.asarray(ids, jnp.int32),
                                            jnp.asarray(rows))[2], np.float64)
  frob = _abs_frobenius64(x, y)
  u = np.sum(np.linalg.norm(x.astype(np.float64), axis=2) * np.linalg.norm(y.astype(np.float64), axis=2), axis=1)
  assert np.all(u_dense >= frob) and np.all(u_dense <= 1.05 * frob), u_dense / frob
  assert np.all(u > 3 * frob)  # what it replaces


@pytest.mark.parametrize("b, n, k, d", [(64, 5, 512, 32), (16, 20, 8192, 64), (8, 40, 8192, 64),
                                        (4, 63, 8192, 64)])
def test_blocked_gram_bound_is_within_the_slack_on_a_benign_tied_table(b, n, k, d):
  """A tied table's operands: n softmax-minus-one-hot rows beside hidden states, and 32 lookup rows. The demo's
  512 x 32 table at 5 predictions, and small BERT's 20, BERT's ~40 (sequence length 256) and 63 predictions over a
  vocabulary of 8,192. From blocked products and Gram matrices of absolute values the bound exceeds the estimate by
  less than ghost's slack + 1e-5, so the clip factor it gives is vmap's to the 1e-5 of the equality tests (3.7e-6,
  5.4e-6, 6.6e-6, 8e-6 above it here; before session 15: 4.8e-6, 1.3e-5, 1.2e-3, 1.8e-3); and it still holds
  (>= the exact norm)."""
  x, y, ids, rows = _tied_table_operands(np.random.default_rng(0), b, n, k, d)
  g = np.einsum("bnk,bnm->bkm", x.astype(np.float64), y.astype(np.float64))
  np.add.at(g, (np.arange(b)[:, None], ids), rows.astype(np.float64))
  exact = np.linalg.norm(g.reshape(b, -1), axis=1)
  est, upper = (np.asarray(v, np.float64) for v in gram.dense_norm_bounds(
      jnp.asarray(x), jnp.asarray(y), jnp.asarray(ids, jnp.int32), jnp.asarray(rows)))
  np.testing.assert_allclose(est, exact, rtol=1e-6)
  assert np.all(upper >= exact)
  assert np.max(upper / est - 1.0) - ghost._BOUND_SLACK < 1e-5, np.max(upper / est - 1.0)


def test_row_underflow_under_per_example_scaling_is_clipped():
  """A row flushed by the example's scale carries the whole gradient: clipped by the bound, or materialized."""
  class _Dense(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3, use_bias=False)(x)

  model = _Dense()
  loss = lambda p, ex: jnp.sum(model.apply(p, ex["x"]) * ex["c"])
  params = jax.tree_util.tree_map(jnp.zeros_like, model.init(jax.random.key(0), jnp.zeros((2, 4))))
  x = np.zeros((1, 2, 4), np.float32)
  c = np.zeros((1, 2, 3), np.float32)
  x[0, 0, 0], x[0, 1, 1], c[0, 1, 0] = 2.0**100, 2.0**-40, 2.0**60  # gradient norm 2^20, C = 1
  batch = {"x": jnp.asarray(x), "c": jnp.asarray(c)}
  for budget in (None, 0):
    for mode in MODES:
      saved = ghost._MATERIALIZE_BUDGET
      if budget is not None:
        ghost._MATERIALIZE_BUDGET = budget
      try:
        grads = _contribution_fn(loss, 1.0, mode)(params, batch, 0)
      finally:
        ghost._MATERIALIZE_BUDGET = saved
      norm = _assert_bounded(grads, 1.0, (mode, budget))
      if budget is None:
        np.testing.assert_allclose(norm, 1.0, rtol=1e-5)  # materialized: clipped to C exactly, as vmap


def test_scaled_norms_many_takes_one_path_for_all_and_equals_each():
  rng = np.random.default_rng(0)
  benign = [jnp.asarray(rng.normal(size=(3, 7)), jnp.float32), jnp.asarray(rng.normal(size=(3, 2, 5)), jnp.float32)]
  tiny = jnp.asarray(rng.normal(size=(3, 4)) * 1e-25, jnp.float32)  # forces the scaled path for the whole call
  for xs in (benign, benign + [tiny], [jnp.zeros((3, 0))] + benign):
    got = clipping.scaled_norms_many(xs)
    for g, x in zip(got, xs):
      want = np.linalg.norm(np.asarray(x, np.float64).reshape(3, -1), axis=1)
      np.testing.assert_allclose(g, want, rtol=1e-6)
