"""An average of the parameters (``optimizer.ema_decay``): post-processing that the trainer evaluates and returns."""

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpmega import train as train_lib
from dpmega.errors import UsageError
from dpmega.sparse import lazy
from dpmega.tasks import Task
from dpmega.tasks import register_task
from dpmega.train import averaging
from dpmega.train import config as config_lib
from tests import test_train
from tests.interrupts import Interrupt
from tests.interrupts import interrupt_at


def build_params_task(config) -> Task:
  """The tiny linear task of ``tests.test_train``, whose evaluation reports the parameters themselves."""
  task = test_train.build_tiny_task(config)
  return dataclasses.replace(task, name="test_params", evaluate=lambda p: {f"w{i}": float(v) for i, v in enumerate(p["w"])})


register_task("test_params", f"{__name__}:build_params_task")


def _config(tmp_path, *overrides, name="run"):
  return test_train._config(tmp_path, "task.name='test_params'", "optimizer.name='adam'",  # noqa: SLF001
                            "optimizer.learning_rate=0.05", "insecure_reproducible_seed=5", *overrides, name=name)


def _direct_average(iterates, decay):
  """The average by its definition: a_0 = p_0, a_t = d_t a_{t-1} + (1 - d_t) p_t, d_t = min(decay, (1+t)/(10+t))."""
  average = np.asarray(iterates[0], np.float64)
  for t, p in enumerate(iterates[1:], start=1):
    d = min(decay, (1 + t) / (10 + t))
    average = d * average + (1 - d) * np.asarray(p, np.float64)
  return average


def test_with_ema_is_the_exponential_average_of_the_iterates():
  tx = averaging.with_ema(optax.adam(0.1), decay=0.8)
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  state = tx.init(params)
  iterates = [np.asarray(params["w"])]
  rng = np.random.default_rng(0)
  for _ in range(25):
    updates, state = tx.update({"w": jnp.asarray(rng.normal(size=3), jnp.float32)}, state, params)
    params = optax.apply_updates(params, updates)
    iterates.append(np.asarray(params["w"]))
  np.testing.assert_allclose(averaging.averaged_params(state)["w"], _direct_average(iterates, 0.8), rtol=1e-5)
  assert int(state.count) == 25
  assert averaging.averaged_params(optax.adam(0.1).init(params)) is None


def test_the_average_does_not_change_what_the_inner_optimizer_does():
  inner = optax.adam(0.1)
  tx = averaging.with_ema(inner, decay=0.9)
  params = {"w": jnp.ones(4)}
  s_inner, s_tx = inner.init(params), tx.init(params)
  for g in (jnp.arange(4.0), -jnp.ones(4), jnp.array([0.0, 3.0, -1.0, 2.0])):
    u_inner, s_inner = inner.update({"w": g}, s_inner, params)
    u_tx, s_tx = tx.update({"w": g}, s_tx, params)
    np.testing.assert_array_equal(u_inner["w"], u_tx["w"])
    params = optax.apply_updates(params, u_tx)


@pytest.mark.parametrize("decay", [-0.1, 1.0, 1.5, float("nan")])
def test_a_decay_outside_zero_one_is_refused(decay):
  with pytest.raises(ValueError, match="decay must be in"):
    averaging.with_ema(optax.sgd(1.0), decay)


@pytest.mark.parametrize("value", ["1.0", "-0.5", "2"])
def test_config_refuses_an_ema_decay_outside_its_range_naming_the_field(tmp_path, value):
  config = _config(tmp_path, f"optimizer.ema_decay={value}")
  with pytest.raises(UsageError, match=r"optimizer\.ema_decay.*\[0\.0, 1\.0\)"):
    train_lib.train(config, out=lambda s: None)
  assert not os.path.exists(config.workdir)


def test_trainer_runs_the_same_steps_and_returns_and_evaluates_their_average(tmp_path):
  """Post-processing: the run's iterates, ledger and epsilon are those of the run without the average."""
  plain = train_lib.train(_config(tmp_path, "eval_every=1", name="plain"), out=lambda s: None)
  lines = []
  averaged = train_lib.train(_config(tmp_path, "optimizer.ema_decay=0.7", name="ema"), out=lines.append)
  iterates = [np.zeros(4)] + [[r[f"eval_w{i}"] for i in range(4)] for r in plain.history if "eval_w0" in r]
  iterates.append(np.asarray(plain.params["w"]))
  assert len(iterates) == 7  # the initialization and the 6 steps
  assert averaged.last_iterate_metrics == plain.eval_metrics  # the same iterates, bit for bit
  assert averaged.epsilon == plain.epsilon and averaged.ledger == plain.ledger
  expected = _direct_average(iterates, 0.7)
  np.testing.assert_allclose(averaged.params["w"], expected, rtol=1e-5, atol=1e-7)
  assert averaged.eval_metrics == {f"w{i}": pytest.approx(float(expected[i]), rel=1e-5, abs=1e-7) for i in range(4)}
  assert not np.allclose(averaged.params["w"], plain.params["w"], rtol=1e-3)
  assert any(line.startswith("eval (average of the parameters):") for line in lines)
  assert any(line.startswith("eval (last iterate):") for line in lines)
  with open(os.path.join(str(tmp_path / "ema"), "summary.json")) as f:
    summary = json.load(f)
  assert summary["ema_decay"] == 0.7 and summary["eval_last_iterate"] == plain.eval_metrics
  with open(os.path.join(str(tmp_path / "plain"), "summary.json")) as f:
    assert json.load(f)["eval_last_iterate"] is None


def test_a_resumed_run_continues_the_average_from_its_checkpoint(tmp_path):
  common = ("optimizer.ema_decay=0.8", "num_steps=8", "checkpoint_every=2", "log_every=1")
  full = train_lib.train(_config(tmp_path, *common, name="full"), out=lambda s: None)
  config = _config(tmp_path, *common, name="cut")
  with pytest.raises(Interrupt):
    train_lib.train(config, out=interrupt_at(5))  # last checkpoint at step 4
  resumed = train_lib.train(config, resume=True, out=lambda s: None)
  np.testing.assert_allclose(resumed.params["w"], full.params["w"], rtol=1e-6, atol=1e-7)
  assert resumed.last_iterate_metrics == pytest.approx(full.last_iterate_metrics, rel=1e-6, abs=1e-7)


@pytest.mark.parametrize("before, after", [(0.0, 0.9), (0.9, 0.0)])
def test_turning_the_average_on_or_off_at_a_resume_is_refused_before_anything_is_written(tmp_path, before, after):
  config = _config(tmp_path, "num_steps=2", "checkpoint_every=1", f"optimizer.ema_decay={before}")
  train_lib.train(config, out=lambda s: None)
  files = {p: os.path.getsize(os.path.join(config.workdir, p)) for p in os.listdir(config.workdir)}
  changed = config_lib.apply_overrides(config, [f"optimizer.ema_decay={after}", "num_steps=4"])
  with pytest.raises(UsageError, match=rf"optimizer.ema_decay={before}.*sets {after}.*cannot be turned on or off"):
    train_lib.train(changed, resume=True, out=lambda s: None)
  assert {p: os.path.getsize(os.path.join(config.workdir, p)) for p in os.listdir(config.workdir)} == files


def test_another_nonzero_decay_at_a_resume_is_an_optimizer_change(tmp_path):
  config = _config(tmp_path, "num_steps=2", "checkpoint_every=1", "optimizer.ema_decay=0.5")
  train_lib.train(config, out=lambda s: None)
  lines = []
  result = train_lib.train(config_lib.apply_overrides(config, ["optimizer.ema_decay=0.9", "num_steps=4"]),
                           resume=True, out=lines.append)
  assert result.steps == 4 and result.last_iterate_metrics is not None


def test_with_sparse_tables_a_row_the_step_does_not_update_keeps_its_average():
  """Lazy, like Adam's moments: the average of a table mirrors the table, so lazy_update gathers it too."""
  tx = averaging.with_ema(optax.adam(0.1), decay=0.5)
  params = {"t": jnp.arange(8.0).reshape(4, 2), "b": jnp.zeros(2)}
  state = tx.init(params)
  grads = {"t": jnp.ones((2, 2)), "b": jnp.ones(2)}
  rows = {("t",): (jnp.array([1, 4]), jnp.array([True, False]))}  # row 1 selected; slot 2 invalid
  new_params, new_state, _ = lazy.lazy_update(tx, params, state, grads, rows)
  average = averaging.averaged_params(new_state)
  untouched = np.array([0, 2, 3])
  np.testing.assert_array_equal(np.asarray(average["t"])[untouched], np.asarray(params["t"])[untouched])
  np.testing.assert_array_equal(np.asarray(new_params["t"])[untouched], np.asarray(params["t"])[untouched])
  d = 2 / 11  # the first update's decay
  np.testing.assert_allclose(average["t"][1], d * params["t"][1] + (1 - d) * new_params["t"][1], rtol=1e-6)
  np.testing.assert_allclose(average["b"], (1 - d) * new_params["b"], rtol=1e-6)
  assert int(new_state.count) == 1
  assert not np.allclose(new_params["t"][1], params["t"][1])
