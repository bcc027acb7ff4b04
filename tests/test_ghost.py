"""Tests for dpmega.clipping.ghost: the fast clipping modes ("auto", "ghost") equal "vmap" exactly."""

import functools
import inspect

from flax import nnx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dpmega
from dpmega import clipping
from dpmega.clipping import ghost
from tests import clipping_models as cm

FAST_MODES = ("auto", "ghost")
ALL_MODES = ("auto", "ghost", "vmap")


def _model(name):
  """(loss_fn, params, batch) for each test model."""
  if name == "mlp":
    m = cm.MLP()
    x = jax.random.normal(jax.random.key(0), (8, 5))
    batch = {"x": x, "y": jnp.arange(8) % 3}
    def loss(p, ex):
      return -jax.nn.log_softmax(m.apply(p, ex["x"]))[ex["y"]]
    return loss, m.init(jax.random.key(1), x[0]), batch
  if name == "encoder":
    m = cm.EncoderMLM()
    batch = cm.encoder_batch(jax.random.key(0), 8, m)
    return cm.encoder_loss(m), m.init(jax.random.key(1), batch["ids"][0], batch["attn"][0]), batch
  if name == "nnx_encoder":
    graphdef, state = nnx.split(cm.NNXEncoder(23, 8, 2, rngs=nnx.Rngs(0)))
    return cm.nnx_loss(graphdef), state, cm.encoder_batch(jax.random.key(0), 8, cm.EncoderMLM())
  if name == "deepfm":
    m = cm.DeepFM()
    batch = cm.ctr_batch(jax.random.key(2), 8, m)
    return cm.ctr_loss(m), m.init(jax.random.key(1), batch["fields"][0], batch["bag"][0]), batch
  raise ValueError(name)


@functools.partial(jax.jit, static_argnames=("loss_fn", "clipping", "microbatch_size", "has_aux"))
def _sum(loss_fn, params, batch, mask, clip_norm, clipping="auto", microbatch_size=None, has_aux=False):
  return dpmega.clipped_grad_sum(loss_fn, params, batch, mask, clip_norm=clip_norm, clipping=clipping,
                                 microbatch_size=microbatch_size, has_aux=has_aux)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol), a, b)


def _median_norm(loss_fn, params, batch):
  _, _, grads = clipping.per_example_grads(loss_fn, params, batch)
  return float(jnp.median(clipping.global_norms(grads)))


_slow = pytest.mark.slow


@pytest.mark.parametrize("name, mode", [
    ("mlp", "auto"), ("encoder", "auto"), ("nnx_encoder", "auto"), ("deepfm", "auto"), ("encoder", "ghost"),
    pytest.param("mlp", "ghost", marks=_slow), pytest.param("nnx_encoder", "ghost", marks=_slow),
    pytest.param("deepfm", "ghost", marks=_slow)])
def test_matches_vmap_with_mask_and_microbatches(name, mode):
  loss_fn, params, batch = _model(name)
  mask = jnp.ones(8).at[3].set(0).at[6].set(0)
  clip = _median_norm(loss_fn, params, batch)  # about half the examples are clipped
  want, _, want_stats = _sum(loss_fn, params, batch, mask, clip, clipping="vmap")
  got, _, stats = _sum(loss_fn, params, batch, mask, clip, clipping=mode, microbatch_size=4)
  _assert_trees_close(got, want)
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(params)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(got))
  assert int(stats.num_examples) == int(want_stats.num_examples) == 6
  assert int(stats.num_clipped) == int(want_stats.num_clipped) > 0
  np.testing.assert_allclose(stats.norm_sum, want_stats.norm_sum, rtol=1e-5)
  np.testing.assert_allclose(stats.norm_max, want_stats.norm_max, rtol=1e-5)
  np.testing.assert_allclose(stats.loss_sum, want_stats.loss_sum, rtol=1e-6)


@pytest.mark.parametrize("name, mode", [
    # deepfm in "auto" and "vmap": tests/test_rows.py.
    ("deepfm", "ghost"), ("encoder", "auto"),
    pytest.param("encoder", "ghost", marks=_slow), pytest.param("encoder", "vmap", marks=_slow)])
def test_each_example_contribution_norm_at_most_clip(name, mode):
  """Invariant 1: over ALL params (embeddings included), every example's contribution is <= C."""
  loss_fn, params, batch = _model(name)
  clip = 0.5 * _median_norm(loss_fn, params, batch)
  one_hot = jnp.eye(8)
  contribs, _, stats = jax.vmap(lambda m: _sum(loss_fn, params, batch, m, clip, clipping=mode))(one_hot)
  norms = clipping.global_norms(contribs)
  assert np.all(np.asarray(norms) <= clip * (1 + 1e-5)), (norms, clip)
  assert int(jnp.sum(stats.num_clipped)) >= 4
  np.testing.assert_allclose(norms[stats.num_clipped > 0], clip, rtol=1e-5)
  # Contributions add up to the batch sum.
  total, _, _ = _sum(loss_fn, params, batch, jnp.ones(8), clip, clipping=mode)
  _assert_trees_close(jax.tree_util.tree_map(lambda x: jnp.sum(x, 0), contribs), total, atol=1e-5)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_padding_and_nonfinite_examples_contribute_zero(mode):
  """Invariant 4: masked rows (even NaN) give 0; a NaN example is zeroed and counted."""
  loss_fn, params, batch = _model("mlp")
  x = batch["x"].at[1].set(jnp.nan).at[5].set(jnp.inf)
  bad = dict(batch, x=x)
  mask = jnp.ones(8).at[5].set(0)
  got, _, stats = _sum(loss_fn, params, bad, mask, 1.0, clipping=mode)
  keep = jnp.ones(8).at[1].set(0).at[5].set(0)
  want, _, _ = _sum(loss_fn, params, batch, keep, 1.0, clipping="vmap")
  _assert_trees_close(got, want)
  assert int(stats.num_examples) == 7
  assert int(stats.num_nonfinite) == 1
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(got))


class _Reuse(nn.Module):
  """One Dense applied twice (at different depths) and a tied embedding table."""

  @nn.compact
  def __call__(self, ids, x):
    emb = nn.Embed(9, 4)
    dense = nn.Dense(4)
    h = dense(emb(ids) + x)
    h = dense(jnp.tanh(h))
    return emb.attend(h)


def _reuse_setup():
  m = _Reuse()
  ids = jnp.array([[1, 1, 2], [3, 4, 5], [0, 8, 8], [2, 2, 2]])
  x = jax.random.normal(jax.random.key(3), (4, 3, 4))
  batch = {"ids": ids, "x": x, "y": (ids + 1) % 9}
  def loss(p, ex):
    logp = jax.nn.log_softmax(m.apply(p, ex["ids"], ex["x"]))
    return -jnp.mean(jnp.take_along_axis(logp, ex["y"][:, None], 1))
  return loss, m.init(jax.random.key(0), ids[0], x[0]), batch


def test_reused_and_tied_weights_use_cross_terms():
  loss_fn, params, batch = _reuse_setup()
  plan = ghost.plan_layers(loss_fn, params, jax.tree_util.tree_map(lambda v: v[0], batch))
  names = {v: k for k, v in plan.names.items()}
  assert plan.ghost[names["['params']['Dense_0']['kernel']"]] == 2
  assert plan.ghost[names["['params']['Embed_0']['embedding']"]] == 2
  for mode in FAST_MODES:
    want, _, want_stats = _sum(loss_fn, params, batch, jnp.ones(4), jnp.inf, clipping="vmap")
    got, _, stats = _sum(loss_fn, params, batch, jnp.ones(4), jnp.inf, clipping=mode)
    _assert_trees_close(got, want)
    np.testing.assert_allclose(stats.norm_sum, want_stats.norm_sum, rtol=1e-5)
  # The cross terms matter here: summing each use's squared norm separately is wrong.
  _, _, grads = clipping.per_example_grads(loss_fn, params, batch)
  emb = grads["params"]["Embed_0"]["embedding"]
  assert float(jnp.max(jnp.abs(emb))) > 0


@pytest.mark.parametrize("mode", FAST_MODES)
def test_unrecognised_uses_fall_back_to_vmap_for_those_params_only(mode):
  @jax.custom_jvp
  def twice(w):
    return 2.0 * w
  twice.defjvp(lambda p, t: (twice(p[0]), 2.0 * t[0]))

  def loss(p, ex):
    h = ex["x"] @ p["w_dot"] + jnp.sum(jnp.sin(p["w_mixed"]))  # w_mixed also in a dot below
    h = h @ p["w_mixed"]
    h = h @ twice(p["w_custom"])
    h, _ = jax.lax.scan(lambda c, _: (jnp.tanh(c @ p["w_scan"]), None), h, None, length=2)
    return jnp.sum(h ** 2) + jnp.sum(ex["x"] * p["b"][:3])

  ks = jax.random.split(jax.random.key(0), 6)
  params = {"w_dot": jax.random.normal(ks[0], (3, 4)), "w_mixed": jax.random.normal(ks[1], (4, 4)),
            "w_custom": jax.random.normal(ks[2], (4, 4)), "w_scan": jax.random.normal(ks[3], (4, 4)),
            "b": jax.random.normal(ks[4], (5,)), "unused": jnp.ones((2,))}
  batch = {"x": jax.random.normal(ks[5], (6, 3))}
  plan = ghost.plan_layers(loss, params, {"x": batch["x"][0]})
  by_name = {plan.names[i]: i for i in plan.names}
  assert set(plan.ghost) == {by_name["['w_dot']"]}
  assert {plan.names[i] for i in plan.fallback} == {"['w_mixed']", "['w_custom']", "['w_scan']", "['b']"}
  assert plan.unused == (by_name["['unused']"],)
  want, _, ws = _sum(loss, params, batch, jnp.ones(6), 3.0, clipping="vmap")
  got, _, gs = _sum(loss, params, batch, jnp.ones(6), 3.0, clipping=mode)
  _assert_trees_close(got, want)
  assert int(gs.num_clipped) == int(ws.num_clipped)


def test_gram_and_materialized_norms_agree_and_auto_picks_cheaper():
  def loss(p, ex):  # a long sequence through a tiny layer: n^2 = 256 > K N = 6
    return jnp.sum(jnp.tanh(ex["x"] @ p["small"]) @ p["big"])
  ks = jax.random.split(jax.random.key(1), 3)
  params = {"small": jax.random.normal(ks[0], (2, 3)), "big": jax.random.normal(ks[1], (3, 300))}
  batch = {"x": jax.random.normal(ks[2], (5, 16, 2))}
  plan = ghost.plan_layers(loss, params, {"x": batch["x"][0]})
  assert plan.methods == {0: ghost.NormMethod.GRAM, 1: ghost.NormMethod.MATERIALIZE} or plan.methods == {
      1: ghost.NormMethod.GRAM, 0: ghost.NormMethod.MATERIALIZE}
  assert plan.methods[[i for i, n in plan.names.items() if n == "['small']"][0]] == ghost.NormMethod.MATERIALIZE
  want, _, ws = _sum(loss, params, batch, jnp.ones(5), 1.0, clipping="vmap")
  for method in (ghost.NormMethod.GRAM, ghost.NormMethod.MATERIALIZE, ghost.NormMethod.AUTO):
    got, _, gs = jax.jit(lambda p, b, m, method=method: ghost.clipped_sum_ghost(loss, p, b, m, 1.0, method=method))(
        params, batch, jnp.ones(5))
    _assert_trees_close(got, want)
    np.testing.assert_allclose(gs.norm_sum, ws.norm_sum, rtol=1e-5)


def test_plain_jax_einsum_and_transposed_weights():
  def loss(p, ex):
    h = jnp.einsum("tj,jk->tk", ex["x"], p["w1"])  # [T, 4]
    h = jnp.einsum("tk,mk->tm", jnp.tanh(h), p["w2"])  # contracts w2 on its last dim
    h = jnp.tanh(h)
    h = 0.5 * jax.lax.stop_gradient(h) + 0.5 * h  # no gradient through half of the activation
    h = h @ p["w3"].T
    return jnp.mean(h ** 2), {"first": h[0]}
  ks = jax.random.split(jax.random.key(2), 4)
  params = {"w1": jax.random.normal(ks[0], (3, 4)), "w2": jax.random.normal(ks[1], (5, 4)),
            "w3": jax.random.normal(ks[2], (2, 5))}
  batch = {"x": jax.random.normal(ks[3], (6, 7, 3))}
  plan = ghost.plan_layers(loss, params, {"x": batch["x"][0]})
  assert set(plan.ghost) == {0, 1, 2} and not plan.fallback
  want, want_aux, _ = _sum(loss, params, batch, jnp.ones(6), 0.3, clipping="vmap", has_aux=True)
  for mode in FAST_MODES:
    got, aux, _ = _sum(loss, params, batch, jnp.ones(6), 0.3, clipping=mode, microbatch_size=3, has_aux=True)
    _assert_trees_close(got, want)
    _assert_trees_close(aux, want_aux)
    assert aux["first"].shape == (6, 2)


def test_bf16_params_accumulate_in_float32():
  loss_fn, params, batch = _model("mlp")
  params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  want, _, _ = _sum(loss_fn, params16, batch, jnp.ones(8), 0.5, clipping="vmap")
  got, _, stats = _sum(loss_fn, params16, batch, jnp.ones(8), 0.5, clipping="auto")
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(got))
  _assert_trees_close(got, want, rtol=2e-2, atol=2e-2)
  assert int(stats.num_clipped) == 8


def test_flax_layers_take_the_fast_path_in_linen_and_nnx():
  for name in ("encoder", "nnx_encoder"):
    loss_fn, params, batch = _model(name)
    plan = ghost.plan_layers(loss_fn, params, jax.tree_util.tree_map(lambda v: v[0], batch))
    for i, n in plan.names.items():
      fast = ("kernel" in n) or ("embedding" in n)
      assert (i in plan.ghost) == fast, (n, plan.describe())
      assert (i in plan.fallback) == (not fast), (n, plan.describe())


def test_private_value_and_grad_defaults_to_auto_and_equals_vmap():
  assert inspect.signature(dpmega.private_value_and_grad).parameters["clipping"].default == "auto"
  assert inspect.signature(dpmega.clipped_grad_sum).parameters["clipping"].default == "auto"
  loss_fn, params, batch = _model("mlp")
  kw = dict(clip_norm=0.1, noise_multiplier=0.7, expected_batch_size=8.0, microbatch_size=4)
  key = jax.random.key(7)
  v1, g1, s1 = dpmega.private_value_and_grad(loss_fn, **kw)(params, batch, key)
  v2, g2, s2 = dpmega.private_value_and_grad(loss_fn, clipping="vmap", **kw)(params, batch, key)
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  _assert_trees_close(g1, g2, rtol=1e-5, atol=1e-6)
  assert int(s1.num_clipped) == int(s2.num_clipped)


def test_invalid_method_is_rejected():
  loss_fn, params, batch = _model("mlp")
  with pytest.raises(ValueError, match="method"):
    ghost.clipped_sum_ghost(loss_fn, params, batch, jnp.ones(8), 1.0, method="fast")
  with pytest.raises(ValueError, match="clipping"):
    dpmega.clipped_grad_sum(loss_fn, params, batch, clip_norm=1.0, clipping="gost")


def test_auto_equals_vmap_on_a_benign_bert_sized_leaf_beyond_the_fallback_budget():
  # One Dense 128 -> 128 shared over 128 positions (a BERT projection), 8 benign examples, every one clipped. The
  # fallback budget (2^16 floats) materializes 4 of them; before small leaves were materialized outright, the
  # other 4 took the Gram bound, ~1e-4 above the norm, and came out ~1e-4 relative below vmap. Tolerance as below.
  model = nn.Dense(128, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (8, 128, 128))
  params = model.init(jax.random.key(1), x[0])
  loss = lambda p, ex: jnp.mean(model.apply(p, ex) ** 2)
  assert 8 * 128 * 128 > ghost._MATERIALIZE_BUDGET  # the premise: the fallback alone would not cover them
  got = clipping.clipped_grad_sum(loss, params, x, clip_norm=1e-3, clipping="auto")[0]
  want = clipping.clipped_grad_sum(loss, params, x, clip_norm=1e-3, clipping="vmap")[0]
  np.testing.assert_allclose(np.asarray(got["params"]["kernel"]), np.asarray(want["params"]["kernel"]),
                             rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want["params"]["kernel"]))))


def _assert_dense_leaf_equals_vmap(model, x):
  """One Dense over positions, every example clipped: "auto" (scan or outright) gives vmap's sum and stats, and so does
  "ghost" (its alias); the pure Gram bound (``ghost.clipped_sum_gram``, not a mode) is below vmap by more than 1e-5."""
  params = model.init(jax.random.key(1), x[0])
  loss = lambda p, ex: jnp.mean(model.apply(p, ex) ** 2)
  got = clipping.clipped_grad_sum(loss, params, x, clip_norm=1e-3, clipping="auto")
  want = clipping.clipped_grad_sum(loss, params, x, clip_norm=1e-3, clipping="vmap")
  np.testing.assert_allclose(np.asarray(got[0]["params"]["kernel"]), np.asarray(want[0]["params"]["kernel"]),
                             rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(want[0]["params"]["kernel"]))))
  np.testing.assert_allclose([got[2].norm_sum, got[2].norm_max], [want[2].norm_sum, want[2].norm_max], rtol=1e-5)
  alias = clipping.clipped_grad_sum(loss, params, x, clip_norm=1e-3, clipping="ghost")[0]["params"]["kernel"]
  np.testing.assert_array_equal(np.asarray(alias), np.asarray(got[0]["params"]["kernel"]))
  bound_sum = ghost.clipped_sum_gram(loss, params, x, jnp.ones(x.shape[0]), 1e-3)[0]["params"]["kernel"]
  assert float(jnp.linalg.norm(bound_sum)) < float(jnp.linalg.norm(want[0]["params"]["kernel"])) * (1 - 1e-5)


@pytest.mark.parametrize("step_floats", [1, 2 * 128 * 128])
def test_auto_equals_vmap_on_a_benign_bert_sized_leaf_that_is_not_materialized_outright(step_floats, monkeypatch):
  # One Dense 128 -> 128 shared over 128 positions (a BERT projection), benign inputs, every example clipped: "auto"
  # materializes each example's gradient in a scan (unrolled 1 or 2) and takes the norm from it. The Gram bound it
  # replaced (for leaves beyond the small-leaf limit) was ~1.7e-4 above the norm here, so the sum came out ~1e-4
  # relative below vmap. Float tolerance: both sums are sums of the same clipped float32 gradients, computed in
  # different orders, so they agree to a few ulps of the norm times sqrt(n) roundings: 1e-5 relative.
  monkeypatch.setattr(ghost, "_MATERIALIZE_BUDGET", 0)
  monkeypatch.setattr(ghost, "_MATERIALIZE_SMALL_LEAF", 1)  # (the old rule: beyond it, the bound)
  monkeypatch.setattr(ghost, "_SCAN_STEP_FLOATS", step_floats)
  model = nn.Dense(128, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (5, 128, 128))
  plan = ghost._leaf_plan(ghost.NormMethod.GRAM, 5, x, x, None, auto=True)
  assert plan.scan and plan.unroll == max(1, step_floats // 128**2)
  _assert_dense_leaf_equals_vmap(model, x)


def test_auto_materializes_a_small_many_row_leaf_outright_where_its_gram_costs_more():
  # A 128 x 128 Dense over 128 positions (bench/step_overhead.py's "bert"): within the outright size, and its Gram
  # estimate (n^2 (K + M) = 2 n K M) costs more than materializing it, so "auto" takes it outright (norms and sum
  # from the same numbers, no Gram) instead of the scan (1.04x -> 0.90x of the non-private gradient there). Small
  # BERT's 512 x 512 leaves at 8 examples (Gram n^2 (K + M) = n K M / 2) stay in the scan.
  x = np.empty((5, 128, 128))
  plan = ghost._leaf_plan(ghost.NormMethod.GRAM, 5, x, x, None, auto=True)
  assert not plan.scan and plan.n_sel == 5
  wide = np.empty((8, 128, 512))
  assert ghost._leaf_plan(ghost.NormMethod.GRAM, 8, wide, wide, None, auto=True).scan
  model = nn.Dense(128, use_bias=False)
  _assert_dense_leaf_equals_vmap(model, jax.random.normal(jax.random.key(0), (5, 128, 128)))


def _auto_and_vmap_every_example_clipped(loss_fn, params, batch):
  """``(clip, auto's result, vmap's result, vmap's largest entry)`` at a quarter of the median norm (all clipped)."""
  clip = _median_norm(loss_fn, params, batch) / 4
  got = clipping.clipped_grad_sum(loss_fn, params, batch, clip_norm=clip, clipping="auto")
  want = clipping.clipped_grad_sum(loss_fn, params, batch, clip_norm=clip, clipping="vmap")
  assert int(want[2].num_clipped) == jax.tree_util.tree_leaves(batch)[0].shape[0]
  return clip, got, want, max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(want[0]))


@pytest.mark.parametrize("predictions", [5, 16, 20, 40])
def test_auto_equals_vmap_on_a_benign_tied_output_table_clipped_by_its_bound(predictions):
  # A tied 8,192 x 64 embedding: 16 lookups and the output projection at 5, 16, 20 (small BERT's) or 40 (BERT at
  # sequence length 256) predicted positions, 16 examples, every one clipped. Under "auto" it is clipped by its Gram
  # bound (not materialized: 2 to 16 rows, or beyond 2^22 floats per micro-batch: 8.4M here), which comes from blocked
  # dot products (up to 64 rows) and Gram matrices of absolute values. Before session 14, it took the bound from one
  # einsum, whose gamma_K term (K = 8,192: 4.9e-4) put it ~2e-4 above the norm and the sum that much below vmap (at
  # 40 predictions, until session 15, 1.2e-3).
  m = cm.TiedHead(vocab=8192, dim=64)
  batch = cm.tied_head_batch(jax.random.key(0), 16, m, seq=max(16, predictions), predictions=predictions)
  loss_fn, params = cm.tied_head_loss(m), m.init(jax.random.key(1), batch["ids"][0], batch["positions"][0])
  x, y, rows = np.empty((16, predictions, m.vocab)), np.empty((16, predictions, m.dim)), np.empty((16, 16, m.dim))
  plan = ghost._leaf_plan(ghost.NormMethod.GRAM, 16, x, y, rows, auto=True)
  assert not plan.scan and plan.n_sel < 16  # the premise: the bound
  clip, got, want, scale = _auto_and_vmap_every_example_clipped(loss_fn, params, batch)
  _assert_trees_close(got[0], want[0], rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose([got[2].norm_sum, got[2].norm_max], [want[2].norm_sum, want[2].norm_max], rtol=1e-5)


@pytest.mark.parametrize("loss_name", ["distill", "regression"])
def test_auto_equals_vmap_on_a_tied_table_whose_bound_exceeds_the_slack(loss_name):
  # A tied 8,192 x 64 table over 63 tokens, all predicted, with no LayerNorm (the table's gradient is the whole
  # norm), trained by distillation onto a teacher's distribution or by a squared error on the logits: its output
  # gradients are dense rows that overlap, unlike softmax minus one-hot, and its Gram bound exceeds the norm by
  # 1.1e-5 (distill) and 1.3e-5 (regression), beyond the slack (5e-6; a softmax's here: 6e-6). Until session 16
  # "auto" clipped by that bound, and the norms came out 5.7e-6 (distill) and 6.9e-6 (regression) above vmap's; the
  # bound's excess beyond _SCAN_LOOSENESS (1e-5) now sends the leaf to the scan (one batch-level cond), whose norms
  # and sum are vmap's.
  m, predictions = cm.TiedHead(vocab=8192, dim=64, layer_norm=False), 63
  batch = cm.tied_head_batch(jax.random.key(0), 16, m, seq=predictions, predictions=predictions)
  batch["teacher"] = jax.random.normal(jax.random.key(2), (16, predictions, m.vocab))
  if loss_name == "distill":
    loss_fn = cm.tied_head_distill_loss(m)
  else:
    loss_fn = lambda p, ex: jnp.mean((m.apply(p, ex["ids"], ex["positions"]) - ex["teacher"]) ** 2)
  params = m.init(jax.random.key(1), batch["ids"][0], batch["positions"][0])
  x, y, rows = np.empty((16, predictions, m.vocab)), np.empty((16, predictions, m.dim)), np.empty((16, 63, m.dim))
  plan = ghost._leaf_plan(ghost.NormMethod.GRAM, 16, x, y, rows, auto=True)
  assert not plan.scan and plan.n_sel < 16 and plan.scan_fallback  # the premise: the bound, with the fallback
  clip, got, want, scale = _auto_and_vmap_every_example_clipped(loss_fn, params, batch)
  _assert_trees_close(got[0], want[0], rtol=1e-5, atol=1e-6 * scale)
  np.testing.assert_allclose([got[2].norm_sum, got[2].norm_max], [want[2].norm_sum, want[2].norm_max], rtol=2e-6)
  # The bound alone (not a mode) is above: the case needs the fallback.
  bound = ghost.clipped_sum_gram(loss_fn, params, batch, jnp.ones(16), clip)
  assert float(bound[2].norm_sum) > float(want[2].norm_sum) * (1 + 4e-6)


def test_auto_equals_vmap_on_a_benign_leaf_of_32_rows_too_large_to_materialize_outright():
  # One Dense 512 -> 512 shared over 32 positions, 20 benign examples (5.2M floats of per-example gradients, beyond
  # the outright path's 2^22), every example clipped: "auto" scans it (17 to 63 rows beyond 2^22). The Gram bound
  # it took before exceeded the norm by ~1e-4 here (its gamma_K and gamma_{n+2} terms), and the sum came out that
  # much below vmap; "ghost" keeps it.
  model = nn.Dense(512, use_bias=False)
  x = jax.random.normal(jax.random.key(0), (20, 32, 512))
  assert 20 * 512 * 512 > ghost._MATERIALIZE_SMALL_LEAF
  assert ghost._leaf_plan(ghost.NormMethod.GRAM, 20, x, x, None, auto=True).scan
  _assert_dense_leaf_equals_vmap(model, x)


@pytest.mark.parametrize("step_floats", [1, 1 << 14])
def test_auto_equals_vmap_on_benign_encoder_leaves_through_the_scan(step_floats, monkeypatch):
  # An encoder MLM (attention projections, DenseGeneral with multi-dim in/out, the tied embedding's lookups and
  # output projection; 64 positions, width 64) with every multi-row leaf materialized in a scan (unrolled 1, or
  # 2-4 examples): clipped sum and stats as vmap's, every example clipped. The Gram bound these leaves took
  # before (beyond the small-leaf limit) was ~1.6e-5 relative below vmap here.
  monkeypatch.setattr(ghost, "_MATERIALIZE_SMALL_LEAF", 1)
  monkeypatch.setattr(ghost, "_SCAN_STEP_FLOATS", step_floats)
  monkeypatch.setattr(ghost, "_SCAN_MIN_ROWS", 2)  # every multi-row leaf, whatever its rows
  monkeypatch.setattr(ghost, "_MATERIALIZE_BUDGET", 0)  # no top-k fallback either
  m = cm.EncoderMLM(vocab=97, seq=64, dim=64)
  batch = cm.encoder_batch(jax.random.key(0), 8, m)
  loss_fn, params = cm.encoder_loss(m), m.init(jax.random.key(1), batch["ids"][0], batch["attn"][0])
  clip = _median_norm(loss_fn, params, batch) / 4
  got = clipping.clipped_grad_sum(loss_fn, params, batch, clip_norm=clip, clipping="auto")
  want = clipping.clipped_grad_sum(loss_fn, params, batch, clip_norm=clip, clipping="vmap")
  assert int(want[2].num_clipped) == 8  # every example clipped: the weights matter
  scale = max(float(jnp.max(jnp.abs(x))) for x in jax.tree_util.tree_leaves(want[0]))
  _assert_trees_close(got[0], want[0], rtol=1e-5, atol=1e-5 * scale)
  np.testing.assert_allclose([got[2].norm_sum, got[2].norm_max], [want[2].norm_sum, want[2].norm_max], rtol=1e-5)
