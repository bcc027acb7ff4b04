"""CTR models (dpmega/models/ctr.py) and their task (dpmega/tasks/ctr.py): shapes, tables, private training."""

import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpmega.train import config as config_lib
from dpmega.tasks import ctr as ctr_task
from dpmega import tasks
from dpmega.models import ctr

KINDS = ["wide_deep", "deepfm", "dlrm"]
CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def small_config(kind, **kwargs):
  kwargs.setdefault("crosses", ctr.default_crosses(26) if kind == "wide_deep" else ())
  return ctr.CtrModelConfig(kind=kind, buckets=(5,) * 13 + (9,) * 13, embed_dims=4, mlp_dims=(8,),
                            bottom_mlp_dims=(8,), cross_buckets=64, **kwargs)


def random_batch(n, seed=0, buckets=(5,) * 13 + (9,) * 13):
  rng = np.random.default_rng(seed)
  return {
      "dense": rng.exponential(2.0, (n, 13)).astype(np.float32),
      "sparse": np.stack([rng.integers(0, b, n) for b in buckets], axis=1).astype(np.int32),
      "label": (rng.random(n) < 0.3).astype(np.float32),
  }


@pytest.mark.parametrize("kind", KINDS)
def test_one_example_and_batch_agree(kind):
  model = ctr.make_model(small_config(kind))
  batch = random_batch(6)
  params = jax.jit(model.init)(jax.random.key(0), batch["dense"][0], batch["sparse"][0])["params"]
  apply = jax.jit(lambda d, s: model.apply({"params": params}, d, s))
  batched = apply(batch["dense"], batch["sparse"])
  single = jax.jit(jax.vmap(apply))(batch["dense"], batch["sparse"])
  assert batched.shape == (6,) and single.shape == (6,)
  np.testing.assert_allclose(batched, single, rtol=1e-5, atol=1e-6)
  assert apply(batch["dense"][0], batch["sparse"][0]).shape == ()


@pytest.mark.parametrize("kind", KINDS)
def test_tables_are_flax_embed_params_with_one_row_range_per_feature(kind):
  cfg = small_config(kind)
  model = ctr.make_model(cfg)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros(13, np.float32), np.zeros(26, np.int32))["params"]
  table = params["embed"]["table"]["embedding"]
  assert table.shape == (sum(cfg.buckets), 4)
  # Feature f's id k reads row offset_f + k: the lookups see exactly those rows.
  offsets = np.cumsum((0,) + cfg.buckets[:-1])
  sparse = random_batch(1)["sparse"][0]

  def emb_sum(table_value):
    p = jax.tree.map(lambda x: x, params)
    p["embed"]["table"]["embedding"] = table_value
    return model.apply({"params": p}, jnp.ones(13), sparse)

  g = jax.jit(jax.grad(emb_sum))(table)
  touched = set(np.flatnonzero(np.any(np.asarray(g) != 0, axis=1)).tolist())
  assert touched <= set((offsets + sparse).tolist())
  if kind != "wide_deep":
    first = "linear" if kind == "deepfm" else None
    if first:
      assert params[first]["table"]["embedding"].shape == (sum(cfg.buckets), 1)
  else:
    assert params["wide"]["table"]["embedding"].shape == (sum(cfg.buckets), 1)
    assert params["wide_cross"]["embedding"].shape == (64, 1)


def test_per_feature_widths_group_into_one_table_per_width():
  cfg = ctr.CtrModelConfig(kind="wide_deep", buckets=(5,) * 26, embed_dims=(4,) * 13 + (2,) * 13, mlp_dims=(8,))
  params = jax.eval_shape(ctr.make_model(cfg).init, jax.random.key(0), np.zeros(13, np.float32),
                          np.zeros(26, np.int32))["params"]
  assert params["embed"]["table_d4"]["embedding"].shape == (65, 4)
  assert params["embed"]["table_d2"]["embedding"].shape == (65, 2)
  assert params["mlp"]["layer_0"]["kernel"].shape == (13 * 4 + 13 * 2 + 13, 8)


def test_cross_ids_in_range_deterministic_and_pair_specific():
  sparse = jnp.asarray(random_batch(500)["sparse"])
  ids = ctr.cross_ids(sparse, [(0, 1), (2, 3), (0, 1)], 97)
  assert ids.shape == (500, 3) and int(ids.min()) >= 0 and int(ids.max()) < 97
  np.testing.assert_array_equal(ids, ctr.cross_ids(sparse, [(0, 1), (2, 3), (0, 1)], 97))
  assert float(jnp.mean(ids[:, 0] == ids[:, 2])) < 0.1  # same pair, other slot: another salt


@pytest.mark.parametrize("bad, match", [
    (dict(kind="dlrm", embed_dims=(4,) * 25 + (2,)), "all be equal"),
    (dict(kind="wide_deep", crosses=((0, 26),)), "crosses"),
    (dict(kind="wide_deep", crosses=((3, 3),)), "crosses"),
    (dict(kind="dlrm", buckets=(0,) * 26), "buckets"),
    (dict(kind="dlrm", buckets=(2**30,) * 26), "2\\*\\*31"),
    (dict(kind="dlrm", embed_dims=(4,) * 3), "embed_dims"),
    (dict(kind="deepfm", mlp_dims=(0,)), "mlp_dims"),
    (dict(kind="transformer"), "transformer"),
])
def test_model_config_rejects_bad_values(bad, match):
  kwargs = dict(kind="dlrm", buckets=(5,) * 26, embed_dims=4)
  kwargs.update(bad)
  with pytest.raises(ValueError, match=match):
    ctr.CtrModelConfig(**kwargs)


def test_task_names_are_registered():
  for name in ("ctr_wide_deep", "ctr_deepfm", "ctr_dlrm"):
    assert name in tasks.task_names()


def test_shipped_configs_validate_both_variants():
  for name in ("ctr_wide_deep", "ctr_deepfm", "ctr_dlrm"):
    for variant in (None, "kaggle"):
      config = config_lib.load_config(f"{CONFIGS / name}.py" + (f":{variant}" if variant else ""))
      cfg = config_lib.validate(config)
      assert cfg.task_name == name
      mcfg = ctr_task.model_config(config.task)
      assert mcfg.kind.value == name[4:]
      if variant == "kaggle":
        assert cfg.clipping == "auto" and config.task.data.train_dir
      assert cfg.recalibration.steps > 0  # private temperature + bias by default (issue 18)
  with pytest.raises(ValueError, match="config variant must be 'small' or 'kaggle', got 'huge'"):
    config_lib.load_config(f"{CONFIGS / 'ctr_dlrm'}.py:huge")


def test_task_splits_are_disjoint_and_eval_is_exact(tmp_path):
  config = ml_collections.ConfigDict({"task": ctr_task.default_task_config("ctr_dlrm")})
  d = config.task.data
  d.synthetic_rows, d.synthetic_eval_rows, d.synthetic_vocab, d.synthetic_dir = 600, 300, 8, str(tmp_path)
  config.task.model.buckets = 16
  config.task.data.eval_batch_size = 128  # 300 = 2 full batches + a padded one
  task = tasks.build_task(config)
  assert len(task.train_source) == 600
  params = task.init_params(jax.random.key(0))
  metrics = task.evaluate(params)
  assert set(metrics) >= {"auc", "log_loss", "normalized_entropy"}
  # Same directory reused on a second build (no regeneration).
  before = sorted(p.name for p in tmp_path.rglob("meta.json"))
  tasks.build_task(config)
  assert sorted(p.name for p in tmp_path.rglob("meta.json")) == before
  # A converted directory split by eval_fraction: tail rows held out, never in training.
  train_dir = next(p.parent for p in tmp_path.rglob("meta.json") if p.parent.name == "train")
  config.task.data.train_dir = str(train_dir)
  config.task.data.eval_fraction = 0.25
  train, evaluation = ctr_task.sources(config.task)
  assert (train.start, train.stop, evaluation.start, evaluation.stop) == (0, 450, 450, 600)
  config.task.data.eval_fraction = 1.5
  with pytest.raises(ValueError, match="eval_fraction"):
    ctr_task.sources(config.task)
  config.task.name = "ctr_nope"
  with pytest.raises(ValueError, match="task.name"):
    ctr_task.model_config(config.task)


def tiny_train_config(name, tmp_path):
  """A few thousand generated rows, small tables: trains in seconds with the real trainer."""
  config = config_lib.load_config(f"{CONFIGS / name}.py")
  config.workdir = str(tmp_path / "run")
  d = config.task.data
  d.synthetic_rows, d.synthetic_eval_rows, d.synthetic_vocab = 4000, 2000, 8
  d.synthetic_dir = str(tmp_path / "data")
  m = config.task.model
  m.buckets, m.embed_dim, m.mlp_dims, m.bottom_mlp_dims, m.cross_buckets = 64, 4, (16,), (8,), 256
  config.num_steps = 40
  config.batch_schedule = "constant:512"
  config.microbatch_size = 128
  config.max_microbatches = 8
  config.target_epsilon, config.noise_multiplier, config.delta = 3.0, None, 1e-5
  # At this tiny scale (6,700 table parameters) Adam is fine and converges in
  # 40 steps; the shipped configs use momentum for large tables.
  config.optimizer.name, config.optimizer.learning_rate = "adam", 0.01
  config.log_every = 0
  config.checkpoint_every = 0
  return config


@pytest.mark.parametrize("name", ["ctr_wide_deep", "ctr_deepfm", "ctr_dlrm"])
def test_model_trains_privately_and_beats_constant_predictor(name, tmp_path):
  from dpmega import train as train_lib  # noqa: PLC0415

  result = train_lib.train(tiny_train_config(name, tmp_path), out=lambda line: None)
  assert result.steps == 40 and result.epsilon <= 3.0 + 1e-9 and result.noise_multiplier > 0.5
  # A constant predictor has AUC 0.5 exactly; the hidden model's ceiling is ~0.86.
  assert result.eval_metrics["auc"] > 0.65, result.eval_metrics


@pytest.mark.slow
def test_example_ctr_criteo_runs_end_to_end(tmp_path):
  import importlib.util  # noqa: PLC0415

  path = CONFIGS.parent / "examples" / "ctr_criteo.py"
  spec = importlib.util.spec_from_file_location("ctr_criteo", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  # The AUC of this 30-step run varies with the noise draw (0.51-0.67 over fresh secrets: the CTR recipe,
  # issue 18), so the end-to-end check runs with the labelled reproducible seed.
  out = module.main(["--rows", "8000", "--eval_rows", "2000", "--steps", "30", "--batch_size", "1024",
                     "--data_dir", str(tmp_path / "data"), "--workdir", str(tmp_path / "run"), "--quiet",
                     "--insecure_reproducible_seed", "0"])
  # No AUC floor here: with secret noise this 30-step DLRM run lands anywhere in 0.51-0.67 (issue 18 fixes
  # the recipe); the trained-model floors are in test_model_trains_privately_and_beats_constant_predictor.
  assert out["epsilon"] <= 3.0 + 1e-9 and 0.0 <= out["auc"] <= 1.0 and out["oracle_auc"] > out["auc"]


def test_ctr_task_gives_its_logits_and_evaluates_a_recalibration(tmp_path):
  from dpmega import metrics as metrics_lib  # noqa: PLC0415

  config = ml_collections.ConfigDict({"task": ctr_task.default_task_config("ctr_deepfm")})
  d = config.task.data
  d.synthetic_rows, d.synthetic_eval_rows, d.synthetic_vocab, d.synthetic_dir = 400, 300, 8, str(tmp_path)
  config.task.model.buckets = 16
  task = tasks.build_task(config)
  params = task.init_params(jax.random.key(1))
  _, evaluation = ctr_task.sources(config.task)
  labels, logits = ctr_task.make_predict(ctr.make_model(ctr_task.model_config(config.task)), evaluation)(params)
  batch = evaluation.take(np.arange(300))
  np.testing.assert_allclose(task.predict_logits(params, batch), logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(batch[task.label_key], labels)
  assert task.evaluate(params, calibration={"temperature": 1.0, "bias": 0.0}) == task.evaluate(params)
  recalibrated = task.evaluate(params, calibration={"temperature": 0.5, "bias": -1.0})
  assert recalibrated == metrics_lib.binary_metrics(labels, 0.5 * logits - 1.0)
  assert recalibrated["log_loss"] != task.evaluate(params)["log_loss"]
