"""Compact CTR embeddings (dpmega/models/ctr.py): mixed dimensions with projections (Ginart et al. 2019) and MLET
(Ghaemmaghami et al. 2020), on the fast clipping path: tables by rows, projections by ghost norms, never vmap."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import dpmega
from dpmega.clipping import ghost
from dpmega.models import ctr
from dpmega.tasks import ctr as ctr_task

BUCKETS = (50, 50, 5000, 5000)  # two small tables, two big ones


def _config(kind="dlrm", dims=16, **kwargs):
  return ctr.CtrModelConfig(kind=kind, buckets=BUCKETS, embed_dims=dims, num_dense=3, mlp_dims=(8,),
                            bottom_mlp_dims=(8,), **kwargs)


def _batch(n, seed=0):
  rng = np.random.default_rng(seed)
  return {"dense": rng.exponential(1.0, (n, 3)).astype(np.float32),
          "sparse": np.stack([rng.integers(0, b, n) for b in BUCKETS], axis=1).astype(np.int32),
          "label": (rng.random(n) < 0.3).astype(np.float32)}


def _init(cfg, seed=0):
  model = ctr.make_model(cfg)
  return model, jax.jit(model.init)(jax.random.key(seed), np.zeros(3, np.float32), np.zeros(4, np.int32))["params"]


def _loss(model):
  def loss_fn(params, ex):
    return optax.sigmoid_binary_cross_entropy(model.apply({"params": params}, ex["dense"], ex["sparse"]), ex["label"])
  return loss_fn


def _table_params(params):
  embed = params["embed"]
  return sum(v["embedding"].size for k, v in embed.items() if "table" in k)


MIXED = dict(dims=(16, 16, 2, 2), project_to=16)  # big tables 2 wide, projected to 16
MLET = dict(dims=4, mlet_inner=32)


@pytest.mark.parametrize("kind", ["dlrm", "deepfm", "wide_deep"])
def test_mixed_dimensions_shapes_and_four_times_fewer_table_parameters(kind):
  model, params = _init(_config(kind, **MIXED))
  embed = params["embed"]
  assert embed["table_d16"]["embedding"].shape == (100, 16) and embed["table_d2"]["embedding"].shape == (10000, 2)
  assert sorted(k for k in embed if k.startswith("proj_")) == ["proj_2", "proj_3"]  # only where widths differ
  assert embed["proj_2"]["kernel"].shape == (2, 16)
  batch = _batch(5)
  assert model.apply({"params": params}, batch["dense"], batch["sparse"]).shape == (5,)
  _, plain = _init(_config(kind, dims=16))
  assert _table_params(plain) >= 4 * _table_params(params)  # 161,600 vs 21,600
  projections = sum(embed[k]["kernel"].size for k in ("proj_2", "proj_3"))
  assert _table_params(plain) >= 4 * (_table_params(params) + projections)


@pytest.mark.parametrize("setting", [MIXED, MLET], ids=["mixed", "mlet"])
@pytest.mark.parametrize("kind", ["dlrm", "deepfm"])
def test_tables_go_by_rows_and_projections_by_ghost_never_vmap(kind, setting):
  model, params = _init(_config(kind, **setting))
  plan = ghost.plan_layers(_loss(model), params, jax.tree.map(lambda x: x[0], _batch(1)))
  how = {plan.names[i]: ("rows" if plan.methods[i].value == "rows" else "ghost") if i in plan.ghost else "vmap"
         for i in plan.names}
  embed = {name: path for name, path in how.items() if name.startswith("['embed']")}
  assert any("mlet_table" in n or "table_d2" in n for n in embed) and any("proj_" in n or "mlet_" in n
                                                                        for n in embed), embed
  for name, path in embed.items():  # (biases elsewhere go by vmap, as in every model)
    assert path == ("rows" if "table" in name else "ghost"), plan.describe()


@pytest.mark.parametrize("setting", [MIXED, MLET], ids=["mixed", "mlet"])
def test_each_example_contribution_at_most_clip_through_the_real_clipping_path(setting):
  model, params = _init(_config("dlrm", **setting), seed=1)
  batch = _batch(8, seed=2)
  batch["sparse"][:, 2] = batch["sparse"][0, 2]  # a shared row across examples
  clip = 1e-4  # below every example's gradient norm: each one is clipped
  one = jax.jit(lambda m: dpmega.clipped_grad_sum(_loss(model), params, batch, m, clip_norm=clip))
  for i in range(8):
    grads, _, stats = one(jnp.zeros(8).at[i].set(1.0))
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    assert norm <= clip * (1 + 1e-5)
    assert int(stats.num_clipped) == 1 and norm > 0.5 * clip  # the bound is the clip, not a small gradient
  auto = one(jnp.ones(8))[0]
  vmap = jax.jit(lambda: dpmega.clipped_grad_sum(_loss(model), params, batch, clip_norm=clip, clipping="vmap"))()[0]
  for a, b in zip(jax.tree.leaves(auto), jax.tree.leaves(vmap)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("kind", ["dlrm", "deepfm", "wide_deep"])
def test_mlet_collapse_gives_the_same_predictions_with_k_over_d_fewer_table_parameters(kind):
  cfg = _config(kind, **MLET)
  model, params = _init(cfg, seed=3)
  rng = np.random.default_rng(4)
  params = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(np.float32), params)  # "trained"
  plain_cfg, plain = ctr.collapse_mlet(cfg, params)
  assert plain_cfg.mlet_inner == 0
  assert plain["embed"]["table"]["embedding"].shape == (sum(BUCKETS), 4)
  assert not any(k.startswith("mlet") for k in plain["embed"])
  assert jax.tree.structure(plain) == jax.tree.structure(_init(plain_cfg)[1])
  batch = _batch(64, seed=5)
  before = model.apply({"params": params}, batch["dense"], batch["sparse"])
  after = ctr.make_model(plain_cfg).apply({"params": plain}, batch["dense"], batch["sparse"])
  np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
  assert params["embed"]["mlet_table"]["embedding"].size == 8 * _table_params(plain)  # k / d = 32 / 4


@pytest.mark.parametrize("kwargs, match", [
    (dict(dims=4, mlet_inner=4), "mlet_inner must exceed every embed dim"),
    (dict(dims=(16, 16, 2, 2)), "or set project_to"),
    (dict(dims=4, project_to=-1), "project_to must be an int in"),
    (dict(dims=4, mlet_inner=2.5), "mlet_inner must be an int"),
])
def test_bad_compact_settings_name_the_field(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _config("dlrm", **kwargs)


def test_collapse_refuses_a_model_without_mlet():
  cfg = _config("dlrm", dims=4)
  with pytest.raises(ValueError, match="mlet_inner > 0"):
    ctr.collapse_mlet(cfg, _init(cfg)[1])


def test_task_config_fields_reach_the_model():
  fields = ctr_task.default_task_config("ctr_dlrm").to_dict()
  fields["model"].update(embed_dim=(16,) * 10 + (4,) * 16, project_to=16)  # the big tables 4 wide
  assert ctr_task.model_config(ml_collections.ConfigDict(fields)).field_dims == (16,) * 26
  fields["model"].update(embed_dim=8, project_to=0, mlet_inner=32)
  assert ctr_task.model_config(ml_collections.ConfigDict(fields)).mlet_inner == 32
  fields["model"].update(mlet_inner=8)
  with pytest.raises(ValueError, match="task.model: mlet_inner must exceed"):
    ctr_task.model_config(ml_collections.ConfigDict(fields))
