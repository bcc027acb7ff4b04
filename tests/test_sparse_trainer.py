"""The trainer with sparse tables (``sparse.*``, dpmega.train.sparse_tables): refusals, a real step, resume, δ_tail."""

import json
import math
import os

import jax
import numpy as np
import pytest

from dpmega import accounting
from dpmega import noise as noise_lib
from dpmega import sharding
from dpmega import sparse
from dpmega import train as train_lib
from dpmega import truncation
from dpmega.errors import UsageError
from dpmega.tasks import build_task
from dpmega.tasks import ctr as ctr_task
from dpmega.train import config as config_lib
from dpmega.train.loop import Trainer
from tests.interrupts import Interrupt
from tests.interrupts import interrupt_at

BUCKETS = 64  # per feature: 26 x 64 = 1,664 rows in each of DeepFM's two tables


def _config(tmp_path, *overrides, name="run", data_dir=None):
  c = config_lib.base_config()
  c.task = ctr_task.default_task_config("ctr_deepfm")
  d = c.task.data
  d.synthetic_rows, d.synthetic_eval_rows, d.synthetic_vocab = 600, 200, 8
  d.synthetic_dir = str(data_dir or tmp_path / "data")
  c.task.model.buckets = BUCKETS
  c.task.model.mlp_dims = (8,)
  c.workdir = str(tmp_path / name)
  c.num_steps = 2
  c.batch_schedule = "constant:64"
  c.microbatch_size = 32
  c.max_microbatches = 2
  c.noise_multiplier = 1.0
  c.delta = 1e-5
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 0.01
  c.tensorboard = False
  c.sparse.enabled = True
  c.sparse.threshold = 2.0
  c.sparse.selection_fraction = 0.5  # the tests below check the split at f = 0.5, whatever the default
  c.sparse.max_rows = 512
  c.sparse.max_touched = 2048
  return config_lib.apply_overrides(c, list(overrides))


# ------------------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize("overrides, message", [
    (("adaptive_clip=True", "clipped_count_noise=5.0", "metrics='private'"), "adaptive_clip"),
    (("optimizer.name='lamb'",), "optimizer.name must be an elementwise optimizer"),
    (("optimizer.table_name='lamb'",), "optimizer.table_name must be an elementwise optimizer"),
    (("simulate_k=2",), "simulate_k must be 0"),
    (("sparse.tables='no_such_leaf'",), "sparse.tables='no_such_leaf' matches no parameter"),
    (("sparse.tables='kernel'",), "not tables whose rows the batches give"),
    (("sparse.tables='('",), "sparse.tables"),
    (("sparse.selection_fraction=1.0",), r"sparse.selection_fraction must be a number in \(0.0, 1.0\)"),
    (("sparse.count_clip=0.0",), "sparse.count_clip"),
    (("sparse.max_rows=0",), "sparse.max_rows"),
    (("sparse.threshold=50.0",), "sparse.threshold"),
])
def test_a_config_sparse_tables_cannot_serve_is_refused_before_the_workdir_exists(tmp_path, overrides, message):
  config = _config(tmp_path, *overrides)
  with pytest.raises(UsageError, match=message):
    train_lib.train(config, out=lambda s: None)
  assert not os.path.exists(config.workdir)
  assert not os.path.exists(config.task.data.synthetic_dir)  # refused before the dataset is built, too


def test_a_task_without_row_ids_is_refused(tmp_path):
  c = config_lib.base_config()
  c.task.name = "bert_mlm"
  c.noise_multiplier = 1.0
  c.sparse.enabled = True
  with pytest.raises(UsageError, match="sparse.enabled=True needs a task whose batches give the rows"):
    config_lib.validate(c)


# ------------------------------------------------------------------------------------------------ one real step
@pytest.mark.slow  # ~100 s of compilation (the sparse update) on a 2-core machine
# max_touched: 2,048 >= R = 1,664 rows: dense counts; 512: compact counts (a step touches <= 26 x 8 rows);
# 100: compact counts, which turn dense in a step that touches more than 100 rows.
@pytest.mark.parametrize("max_touched, compact", [(2048, False), (512, True), (100, True)])
def test_a_trainer_step_leaves_unselected_rows_and_their_state_bit_for_bit(tmp_path, max_touched, compact):
  config = _config(tmp_path, f"sparse.max_touched={max_touched}")
  cfg = config_lib.validate(config)
  lines = []
  trainer = Trainer(cfg, build_task(config), config_dict=config, out=lines.append)
  state = trainer.initial_state()
  assert all(isinstance(c, sparse.TouchedRowCounts) == compact for c in trainer.sparse.zero_counts().values())
  tables = [("embed", "table", "embedding"), ("linear", "table", "embedding")]
  assert tuple(trainer.sparse.spec.tables) == tuple(tables)
  # Step 2 too: a row selected at step 1 and not at step 2 would still move under a dense Adam (momentum).
  for _ in range(2):
    before = sharding.to_host(state)  # the sparse update donates the state
    state, metrics = trainer.train_step(state, 1.0)
    _check_only_selected_rows_moved(before, sharding.to_host(state), metrics, tables)
    # The two tables share one selection (share_selection, the default): the same rows moved in both.
    moved = [np.any(np.asarray(_leaf(before.params, t)) != np.asarray(_leaf(sharding.to_host(state).params, t)),
                    axis=1) for t in tables]
    np.testing.assert_array_equal(moved[0], moved[1])


def _check_only_selected_rows_moved(before, after, metrics, tables):
  moved = 0
  for path in tables:
    p0 = np.asarray(_leaf(before.params, path))
    p1 = np.asarray(_leaf(after.params, path))
    changed = np.any(p0 != p1, axis=1)
    moved += int(changed.sum())
    # Adam's moments of each table: every leaf of the state shaped like the table.
    for s0, s1 in _state_leaves(before.opt_state, after.opt_state, p0.shape):
      np.testing.assert_array_equal(s1[~changed], s0[~changed])  # not selected: state bit for bit
      assert np.all(np.any(s1[changed] != s0[changed], axis=1))  # selected: the moments moved
  assert moved == metrics["selected_rows"] > 0  # exactly the released rows moved
  assert moved < 0.5 * 2 * 26 * BUCKETS
  assert metrics["update_sparsity"] == pytest.approx(moved / (2 * 26 * BUCKETS))
  s1, s2 = sparse.split_noise_multiplier(1.0, 0.5)
  assert metrics["selection_sigma"] == pytest.approx(s1) and metrics["gradient_sigma"] == pytest.approx(s2)
  # Dense leaves get noise everywhere.
  k0, k1 = np.asarray(before.params["mlp"]["layer_0"]["kernel"]), np.asarray(after.params["mlp"]["layer_0"]["kernel"])
  assert np.all(k0 != k1)


def _leaf(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _state_leaves(s0, s1, shape):
  a = [x for x in jax.tree_util.tree_leaves(s0) if np.shape(x) == shape]
  b = [x for x in jax.tree_util.tree_leaves(s1) if np.shape(x) == shape]
  assert len(a) == len(b) == 2  # mu and nu
  return [(np.asarray(x), np.asarray(y)) for x, y in zip(a, b)]


# ------------------------------------------------------------------------------------------------ shared selection
def _example_counts(run, batch):
  """Each example's count vector over all of ``run``'s selections, concatenated: ``[b, rows]``."""
  ids = run.row_ids(batch)
  out = []
  for i in range(batch["sparse"].shape[0]):
    one = sparse.clipped_row_counts([x[i:i + 1] for x in ids], np.ones(1, np.float32),
                                    list(run.selection_rows.values()), run.spec.selection.count_clip)
    out.append(np.concatenate([np.asarray(c) for c in one]))
  return np.stack(out)


def test_deepfm_tables_share_one_selection_with_sqrt2_more_count_at_the_same_count_clip(tmp_path):
  from dpmega.models import ctr  # pylint: disable=import-outside-toplevel
  from dpmega.train import sparse_tables  # pylint: disable=import-outside-toplevel

  runs = {}
  for share in (True, False):
    config = _config(tmp_path, f"sparse.share_selection={share}", "sparse.count_clip=2.0")
    cfg = config_lib.validate(config)
    model = ctr.make_model(ctr_task.model_config(config.task))
    shapes = jax.eval_shape(ctr_task.make_init_params(model), jax.random.key(0))
    runs[share] = sparse_tables.build(cfg.sparse, config.task, shapes)
  embed, linear = ("embed", "table", "embedding"), ("linear", "table", "embedding")
  assert runs[True].spec.shared == ((embed, linear),) and runs[False].spec.shared == ()
  assert runs[True].selection_rows == {embed: 26 * BUCKETS}
  assert runs[False].selection_rows == {embed: 26 * BUCKETS, linear: 26 * BUCKETS}
  assert runs[True].total_rows == runs[False].total_rows == 2 * 26 * BUCKETS
  assert "share one selection" in runs[True].describe(1.0)
  rng = np.random.default_rng(0)
  batch = {"sparse": rng.integers(0, BUCKETS, (6, 26)).astype(np.int32)}
  batch["sparse"][0] = 3  # every feature the same value: 26 distinct rows all the same (offsets differ)
  shared, separate = _example_counts(runs[True], batch), _example_counts(runs[False], batch)
  # Invariant (selection sensitivity): each example's counts over ALL selections have L2 norm <= C1, both ways.
  for c in (shared, separate):
    assert np.all(np.linalg.norm(c, axis=1) <= 2.0)
    np.testing.assert_allclose(np.linalg.norm(c, axis=1), 2.0, rtol=1e-5)  # 26 or 52 rows > C1^2: clipped to C1
  # Sharing puts each example's C1 on its 26 rows once: sqrt(2) more count per row than over 2 x 26.
  np.testing.assert_allclose(shared, np.sqrt(2) * separate[:, :26 * BUCKETS], rtol=1e-5)


# ------------------------------------------------------------------------------------------------ δ_tail
@pytest.mark.parametrize("share, selections", [(True, 1), (False, 2)])
def test_delta_tail_counts_the_selection_coordinates(tmp_path, share, selections):
  # jax_bounded: a sampler whose delta_tail is large enough to see the coordinate count in it.
  config = _config(tmp_path, "noise_sampler='jax_bounded'", "noise_multiplier=2.0", "num_steps=50", "delta=0.5",
                   f"sparse.share_selection={share}")
  cfg = config_lib.validate(config)
  trainer = Trainer(cfg, build_task(config), config_dict=config, out=lambda s: None)
  shapes = jax.eval_shape(trainer.task.init_params, trainer.init_key)
  params = sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes))
  rows = selections * 26 * BUCKETS  # one count per row of each selection: DeepFM's two tables share ids
  assert trainer.privacy.tail.num_coordinates == params + rows
  # Directly: eta(1/sigma, d) per step, times q, over the steps (dpmega.truncation's bound).
  support = noise_lib.sampler_support(noise_lib.NoiseSampler.JAX_BOUNDED)
  q = 64 / 600
  eta = truncation.bad_mass(shift=1 / 2.0, num_coordinates=params + rows, support=support)
  expected = 50 * q * eta
  got = trainer.privacy.plan.tail_delta(2.0, floor=True)
  assert got == pytest.approx(expected, rel=1e-9)
  dense_only = 50 * q * truncation.bad_mass(shift=1 / 2.0, num_coordinates=params, support=support)
  assert got > dense_only * (1 + 1e-6)  # the count coordinates are in it


# ------------------------------------------------------------------------------------------------ whole runs
@pytest.mark.slow
def test_sparse_run_reports_its_selection_and_resumes_exactly(tmp_path, capsys):
  common = ("num_steps=4", "checkpoint_every=2", "log_every=1", "insecure_reproducible_seed=7",
            "target_epsilon=8.0", "noise_multiplier=None")
  data = tmp_path / "data"
  lines = []
  full = train_lib.train(_config(tmp_path, *common, name="full", data_dir=data), out=lines.append)
  plan = [line for line in lines if line.startswith("plan: sparse tables")]
  assert len(plan) == 1 and "sigma1 = " in plan[0] and "sigma2 = " in plan[0] and "f = 0.5" in plan[0]
  assert any(line.startswith("step 4/4") and "update sparsity" in line and "epsilon" in line for line in lines)
  assert any(line.startswith("done: 4 steps, epsilon = ") for line in lines)
  with open(tmp_path / "full" / "summary.json") as f:
    summary = json.load(f)
  s = summary["sparse"]
  s1, s2 = sparse.split_noise_multiplier(full.noise_multiplier, 0.5)
  assert s["selection_sigma"] == pytest.approx(s1) and s["gradient_sigma"] == pytest.approx(s2)
  assert s["threshold"] == pytest.approx(2.0 * s1) and 0 < s["mean_update_sparsity"] < 0.5
  assert s["cap_hit_steps"] == 0 and not any("sparse.max_rows" in line for line in lines)
  # The ledger holds sigma_eff, the calibrated sigma: epsilon within the target.
  assert summary["accounted_noise_multiplier"] == full.noise_multiplier and full.epsilon <= 8.0
  assert summary["num_noised_coordinates"] > 2 * 26 * BUCKETS
  with open(tmp_path / "full" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f if '"final"' not in line]
  assert all(0 < r["update_sparsity"] < 1 and r["selected_rows"] > 0 for r in records)
  _check_workdir_epsilon(str(tmp_path / "full"), summary, capsys)
  _check_planned_sparse_run(summary, capsys)

  config = _config(tmp_path, *common, name="cut", data_dir=data)
  with pytest.raises(Interrupt):
    train_lib.train(config, out=interrupt_at(3))  # dies after step 3; last checkpoint at step 2
  resumed = train_lib.train(config, resume=True, out=lambda s: None)
  for a, b in zip(jax.tree_util.tree_leaves(resumed.params), jax.tree_util.tree_leaves(full.params)):
    np.testing.assert_array_equal(a, b)
  assert resumed.epsilon == full.epsilon and resumed.ledger == full.ledger
  # A resume with other sparse settings is another computation: refused.
  changed = config_lib.apply_overrides(config, ["sparse.threshold=1.0"])
  with pytest.raises(UsageError, match="sparse"):
    train_lib.train(changed, resume=True, out=lambda s: None)
  assert accounting.Ledger.from_dict(summary["ledger"]) == full.ledger


@pytest.mark.slow
def test_a_cap_that_binds_is_said_once_and_counted(tmp_path):
  """tau = -10 sigma1 C1 selects every row: the cap of 3 rows binds at every step."""
  lines = []
  train_lib.train(_config(tmp_path, "num_steps=3", "log_every=1", "sparse.max_rows=3", "sparse.threshold=-10.0",
                          "insecure_reproducible_seed=7"), out=lines.append)
  warnings = [line for line in lines if line.startswith("warning: at step")]
  assert len(warnings) == 1 and "sparse.max_rows=3" in warnings[0] and "at step 1 " in warnings[0]
  assert sum("cap hit" in line for line in lines if line.startswith("step ")) == 3
  with open(tmp_path / "run" / "summary.json") as f:
    s = json.load(f)["sparse"]
  assert s["cap_hit_steps"] == 3 and s["mean_update_sparsity"] == pytest.approx(2 * 3 / (2 * 26 * BUCKETS))


def _check_workdir_epsilon(workdir, summary, capsys):
  """`dpmega epsilon --workdir` counts the run's own noised coordinates (table rows included) when larger."""
  from dpmega import cli  # pylint: disable=import-outside-toplevel

  capsys.readouterr()
  assert cli.main(["epsilon", "--workdir", workdir, "--delta", "1e-5", "--num_noised_coordinates", "10",
                   "--json"]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["num_noised_coordinates"] == summary["num_noised_coordinates"]
  assert report["epsilon"]["rdp"] == pytest.approx(summary["epsilon"], rel=1e-9)


def _check_planned_sparse_run(summary, capsys):
  """`dpmega calibrate`/`epsilon` with the sparse flags plan the run that ran: same sigma_eff, split and epsilon."""
  from dpmega import cli  # pylint: disable=import-outside-toplevel

  rows = summary["sparse"]["selection_rows"]
  assert rows == 26 * BUCKETS  # the two tables share one selection: one count per row of one table
  run = ["--dataset_size", "600", "--batch_size", "64", "--steps", "4", "--delta", "1e-5", "--json",
         "--num_noised_coordinates", str(summary["num_noised_coordinates"] - rows), "--sparse_table_rows", str(rows)]
  s = summary["sparse"]
  capsys.readouterr()
  assert cli.main(["calibrate", *run, "--target_epsilon", "8", "--sparse_selection_fraction", "0.5"]) == 0
  planned = json.loads(capsys.readouterr().out)
  assert planned["num_noised_coordinates"] == summary["num_noised_coordinates"]
  assert planned["noise_multiplier"] == pytest.approx(summary["accounted_noise_multiplier"], rel=1e-6)
  assert planned["sparse"]["selection_noise_multiplier"] == pytest.approx(s["selection_sigma"], rel=1e-6)
  assert planned["sparse"]["gradient_noise_multiplier"] == pytest.approx(s["gradient_sigma"], rel=1e-6)
  assert cli.main(["epsilon", *run, "--sigma1", repr(s["selection_sigma"]), "--sigma2", repr(s["gradient_sigma"])]) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["sparse"]["selection_fraction"] == pytest.approx(0.5, rel=1e-9)
  assert report["epsilon"]["rdp"] == pytest.approx(summary["epsilon"], rel=1e-6)
  assert report["delta_tail"] == pytest.approx(summary["delta_tail"], rel=1e-6, abs=1e-30)
