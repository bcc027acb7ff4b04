"""Private recalibration (``recalibration.*``): a temperature and a bias fitted by accounted DP-SGD steps."""

import json
import math
import os

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from dpmega import accounting
from dpmega import metrics as metrics_lib
from dpmega import train as train_lib
from dpmega.accounting import journal as journal_lib
from dpmega.data.sources import ArraySource
from dpmega.errors import UsageError
from dpmega.tasks import Task
from dpmega.tasks import build_task
from dpmega.tasks import register_task
from dpmega.train import config as config_lib
from dpmega.train import recalibration
from dpmega.train.checkpoint import CheckpointError
from tests.interrupts import Interrupt

W_TRUE = np.array([1.5, -1.0, 0.5], np.float32)


def build_overconfident_task(config) -> Task:
  """Logistic data from ``W_TRUE``; the model starts at ``task.scale * W_TRUE`` (over-confident for scale > 1).

  With a learning rate of ~0 the model stays there, so the calibration that fits it is known:
  ``sigmoid(z / scale)``, i.e. temperature ``1 / scale`` and bias 0.
  """
  c = config.task
  rng = np.random.default_rng(1)
  x = rng.normal(size=(c.n, 3)).astype(np.float32)
  y = (rng.random(c.n) < 1 / (1 + np.exp(-x @ W_TRUE))).astype(np.float32)

  def logits(params, batch):
    return batch["x"] @ params["w"]

  def loss_fn(params, ex):
    return optax.sigmoid_binary_cross_entropy(jnp.dot(params["w"], ex["x"]), ex["label"])

  def evaluate(params, calibration=None):
    z = metrics_lib.recalibrated_logits(x @ np.asarray(params["w"]), calibration)
    p = 1 / (1 + np.exp(-z))
    return {"log_loss": float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p)))}

  def flip(batch, key):  # task.flip: a host-side preparation that swaps the labels
    del key
    return {**batch, "label": 1.0 - batch["label"]}

  task = Task("test_overconfident", lambda key: {"w": jnp.asarray(c.scale * W_TRUE)}, loss_fn,
              ArraySource({"x": x, "label": y}), evaluate, predict_logits=logits,
              prepare_batch=flip if c.flip else None)
  return task if c.binary else Task(task.name, task.init_params, loss_fn, task.train_source, evaluate)


register_task("test_overconfident", f"{__name__}:build_overconfident_task")


def _config(tmp_path, *overrides, name="run"):
  c = config_lib.base_config()
  c.task = ml_collections.ConfigDict({"name": "test_overconfident", "n": 20000, "scale": 2.0, "binary": True,
                                     "flip": False})
  c.workdir = str(tmp_path / name)
  c.num_steps = 3
  c.batch_schedule = "constant:4000"
  c.microbatch_size = 500
  c.max_microbatches = 4
  c.noise_multiplier = 2.0
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 1e-9
  c.log_every = 1
  c.tensorboard = False
  c.insecure_reproducible_seed = 3  # runs compared bit for bit
  c.recalibration.steps = 40
  c.recalibration.learning_rate = 0.1
  return config_lib.apply_overrides(c, list(overrides))


# ----------------------------------------------------------------------------- the per-example bound
FLOATS = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from([0.0, -0.0, 1e-45, -1e-45, 1.2e-38, 3.4e38, -3.4e38, 1e30, -1e30, 1e-30, 20.0, -20.0]))


@hypothesis.settings(max_examples=300, deadline=None)
@hypothesis.given(z=FLOATS, y=FLOATS, a=st.floats(-1e6, 1e6, width=32), b=st.floats(-1e6, 1e6, width=32),
                  clip=st.sampled_from([1e-6, 0.01, 1.0, 10.0, 1e6]))
def test_one_examples_contribution_is_bounded_by_the_clip_norm_for_every_input(z, y, a, b, clip):
  total, num_clipped, num_nonfinite = recalibration.clipped_gradient_sum(
      jnp.array([z], jnp.float32), jnp.array([y], jnp.float32), jnp.ones(1), jnp.array([a, b], jnp.float32), clip)
  total = np.asarray(total, np.float64)
  assert np.all(np.isfinite(total))
  assert np.linalg.norm(total) <= clip * (1 + 1e-5)
  if not (math.isfinite(z) and math.isfinite(y)):
    assert int(num_nonfinite) == 1 and np.all(total == 0)


def test_padding_rows_contribute_nothing_whatever_they_hold():
  z = jnp.array([1.0, jnp.inf, 1e30, jnp.nan])
  y = jnp.array([0.0, 1.0, 1e30, 1.0])
  with_padding = recalibration.clipped_gradient_sum(z, y, jnp.array([1.0, 0, 0, 0]), jnp.array([1.0, 0.0]), 10.0)
  alone = recalibration.clipped_gradient_sum(z[:1], y[:1], jnp.ones(1), jnp.array([1.0, 0.0]), 10.0)
  np.testing.assert_array_equal(with_padding[0], alone[0])
  assert int(with_padding[1]) == 0 and int(with_padding[2]) == 0


def test_the_sum_is_the_clipped_gradient_of_the_logistic_loss():
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(scale=4.0, size=64), jnp.float32)
  y = jnp.asarray(rng.random(64) < 0.3, jnp.float32)
  head, clip = jnp.array([0.8, -0.3], jnp.float32), 2.0
  grads = jax.vmap(jax.grad(lambda h, zi, yi: optax.sigmoid_binary_cross_entropy(h[0] * zi + h[1], yi)),
                   in_axes=(None, 0, 0))(head, z, y)
  norms = jnp.linalg.norm(grads, axis=1)
  expected = jnp.sum(grads * jnp.minimum(1.0, clip / norms)[:, None], axis=0)
  total, num_clipped, _ = recalibration.clipped_gradient_sum(z, y, jnp.ones(64), head, clip)
  np.testing.assert_allclose(total, expected, rtol=1e-5, atol=1e-5)
  assert int(num_clipped) == int(jnp.sum(norms > clip)) > 0


# ----------------------------------------------------------------------------- the run
def test_recalibration_fits_the_known_temperature_and_is_accounted_as_steps_of_the_run(tmp_path):
  lines = []
  config = _config(tmp_path)
  result = train_lib.train(config, out=lines.append)
  # The model is 2x over-confident: the fit undoes it (temperature 1/2, bias 0) up to the noise and Adam.
  assert result.calibration["temperature"] == pytest.approx(0.5, abs=0.06)
  assert result.calibration["bias"] == pytest.approx(0.0, abs=0.06)
  assert result.eval_metrics["log_loss"] < result.uncalibrated_metrics["log_loss"] - 0.02
  # 3 training + 40 recalibration steps, all at q = 4000 / 20000 and sigma 2, in the ledger and the journal.
  expected = accounting.Ledger()
  expected.record(batch_size=4000, dataset_size=20000, noise_multiplier=2.0, scheme="poisson", steps=43)
  assert result.ledger == expected and result.spent == expected
  assert journal_lib.Journal(config.workdir).ledger() == expected
  plan = accounting.Plan(dataset_size=20000, schedule="constant:4000", num_steps=43, delta=config.delta)
  assert result.epsilon == pytest.approx(plan.epsilon(2.0), rel=1e-9)
  assert any("then 40 recalibration steps" in line for line in lines)
  assert any(line.startswith("recalibration step 40/40 (step 43)") for line in lines)
  with open(os.path.join(config.workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["recalibration"]["temperature"] == result.calibration["temperature"]
  assert summary["recalibration"]["eval_before"] == result.uncalibrated_metrics
  with open(os.path.join(config.workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  assert [r["recalibration_step"] for r in records if "recalibration_step" in r] == list(range(1, 41))


def test_a_target_epsilon_calibrates_sigma_for_training_and_recalibration_together(tmp_path):
  plain = train_lib.train(_config(tmp_path, "noise_multiplier=None", "target_epsilon=2.0",
                                  "recalibration.steps=0", name="plain"), out=lambda s: None)
  recal = train_lib.train(_config(tmp_path, "noise_multiplier=None", "target_epsilon=2.0", name="recal"),
                          out=lambda s: None)
  assert recal.noise_multiplier > plain.noise_multiplier * 1.5  # 43 steps in the budget, not 3
  assert recal.epsilon <= 2.0 and recal.ledger.num_steps == 43
  plan = accounting.Plan(dataset_size=20000, schedule="constant:4000", num_steps=43, delta=1e-6)
  assert plan.epsilon(recal.noise_multiplier) == pytest.approx(recal.epsilon, rel=1e-9)


def test_the_noise_is_secret_keyed_per_step_and_the_fit_changes_with_it(tmp_path):
  a = train_lib.train(_config(tmp_path, name="a"), out=lambda s: None)
  b = train_lib.train(_config(tmp_path, "insecure_reproducible_seed=4", name="b"), out=lambda s: None)
  c = train_lib.train(_config(tmp_path, name="c"), out=lambda s: None)
  assert a.calibration == c.calibration  # the same (public, test-only) seed: the same releases
  assert a.calibration != b.calibration


def test_a_budget_that_ends_in_the_recalibration_stops_it_there(tmp_path):
  plan = accounting.Plan(dataset_size=20000, schedule="constant:4000", num_steps=43, delta=1e-6)
  budget = plan.epsilon(2.0, num_steps=20)  # room for 3 training and 17 recalibration steps
  lines = []
  result = train_lib.train(_config(tmp_path, f"target_epsilon={budget * 1.0000001}"), out=lines.append)
  assert result.ledger.num_steps == 20 and result.epsilon <= budget * 1.0000001
  assert "before step 21 of 43" in result.stop_reason
  assert any(line.endswith("(recalibration)") for line in lines)
  assert result.calibration is not None


def test_a_run_killed_in_the_recalibration_resumes_it_without_spending_twice(tmp_path):
  full = train_lib.train(_config(tmp_path, name="full"), out=lambda s: None)
  config = _config(tmp_path, name="cut")

  def die(line):
    if line.startswith("recalibration step 25/"):
      raise Interrupt()

  with pytest.raises(Interrupt):
    train_lib.train(config, out=die)
  assert journal_lib.Journal(config.workdir).ledger().num_steps == 28
  resumed = train_lib.train(config, resume=True, out=lambda s: None)
  assert resumed.calibration == full.calibration
  assert resumed.spent == full.spent and resumed.epsilon == full.epsilon  # the replayed steps count once


def test_a_resume_with_other_recalibration_settings_is_refused(tmp_path):
  config = _config(tmp_path, "recalibration.steps=2")
  train_lib.train(config, out=lambda s: None)
  changed = config_lib.apply_overrides(config, ["recalibration.learning_rate=0.5"])
  with pytest.raises(CheckpointError, match="recalibration"):
    train_lib.train(changed, resume=True, out=lambda s: None)


def test_a_task_without_logits_is_refused_before_the_workdir_is_touched(tmp_path):
  config = _config(tmp_path, "task.binary=False")
  with pytest.raises(UsageError, match=r"recalibration.steps must be 0 for task 'test_overconfident'"):
    train_lib.train(config, out=lambda s: None)
  assert not os.path.exists(os.path.join(config.workdir, "checkpoints"))
  assert not os.path.exists(os.path.join(config.workdir, journal_lib.FILENAME))


@pytest.mark.parametrize("field, value, allowed", [
    ("recalibration.steps", "-1", r"\[0, 1000000\]"), ("recalibration.clip_norm", "0.0", r"\(0.0, inf\)"),
    ("recalibration.learning_rate", "-0.1", r"\(0.0, inf\)")])
def test_bad_recalibration_fields_are_named_with_their_range(tmp_path, field, value, allowed):
  config = _config(tmp_path, f"{field}={value}")
  with pytest.raises(UsageError, match=rf"{field}.*{allowed}"):
    train_lib.train(config, out=lambda s: None)
  assert not os.path.exists(config.workdir)


def test_a_simulation_refuses_recalibration(tmp_path):
  config = _config(tmp_path, "simulate_k=2")
  with pytest.raises(UsageError, match="recalibration.steps must be 0 in an effective-noise simulation"):
    train_lib.train(config, out=lambda s: None)


def test_every_release_has_its_own_steps_noise_key(tmp_path):
  """Training steps 0-2 and recalibration steps 3-42 each draw the noise of their own step's key, once."""
  config = _config(tmp_path)
  requested = []

  class Recording(train_lib.Trainer):
    def noise_key(self, step):
      requested.append(step)
      return super().noise_key(step)

  trainer = Recording(config_lib.validate(config), build_task(config), out=lambda s: None, config_dict=config)
  trainer.run()
  assert requested == list(range(43))


def test_the_recalibration_noise_has_std_sigma_times_its_clip_norm_over_the_batch(tmp_path):
  """sigma = 400, C_r = 10, B = 4000: per coordinate std s = 1, so the noisy mean's norm averages s sqrt(pi/2)."""
  result = train_lib.train(_config(tmp_path, "noise_multiplier=400.0"), out=lambda s: None)
  norms = [r["noisy_grad_norm"] for r in result.history if "recalibration_step" in r]
  assert len(norms) == 40
  assert np.mean(norms) == pytest.approx(math.sqrt(math.pi / 2), rel=0.2)  # the signal adds < 1 % here


def test_the_builtin_ctr_task_recalibrates_too(tmp_path):
  config = config_lib.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic_ctr.py"))
  config_lib.apply_overrides(config, [f"workdir='{tmp_path / 'run'}'", "task.num_train=6000", "task.num_eval=2000",
                                      "num_steps=3", "batch_schedule='constant:2000'", "recalibration.steps=5",
                                      "log_every=0"])
  result = train_lib.train(config, out=lambda s: None)
  assert result.calibration is not None and result.ledger.num_steps == 8
  assert result.eval_metrics != result.uncalibrated_metrics
  task = build_task(config)
  identity = {"temperature": 1.0, "bias": 0.0}
  assert task.evaluate(result.params, calibration=identity) == result.uncalibrated_metrics
  assert task.evaluate(result.params, calibration=result.calibration) == result.eval_metrics


def test_the_recalibration_sees_the_tasks_prepared_batches(tmp_path):
  """A preparation that swaps the labels makes the fitted temperature negative (the model then predicts 1 - p)."""
  result = train_lib.train(_config(tmp_path, "task.flip=True", "recalibration.steps=60"), out=lambda s: None)
  assert result.calibration["temperature"] < -0.2


def test_extending_a_recalibrated_run_never_reuses_a_recalibration_steps_key(tmp_path):
  """Steps 3-7 were recalibration releases; the extension's training steps 3-4 must run with other keys."""
  config = _config(tmp_path, "recalibration.steps=5", "checkpoint_every=1")
  train_lib.train(config, out=lambda s: None)
  journal = journal_lib.Journal(config.workdir)
  assert sorted(journal.steps()) == [(0, t) for t in range(8)]
  extended = config_lib.apply_overrides(config, ["num_steps=5"])
  result = train_lib.train(extended, resume=True, out=lambda s: None)
  assert result.generation == 1  # an extension: a new generation, so new keys for steps 3-9
  steps = sorted(journal_lib.Journal(config.workdir).steps())
  assert steps == [(0, t) for t in range(8)] + [(1, t) for t in range(3, 10)]
  assert result.spent.num_steps == 15  # the 5 recalibration releases of generation 0 still count
