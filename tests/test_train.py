"""The mega-batch loop: noise once per logical step, expected-batch normalization, ledger, budget, resume."""

import glob
import json
import math
import os
import struct

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import stats as sstats

from dpmega import accounting
from dpmega.train import config as config_lib
from dpmega import noise as noise_lib
from dpmega import sampling
from dpmega import sharding
from dpmega import train as train_lib
from dpmega.clipping import ClipStats
from dpmega.train.checkpoint import CheckpointError
from dpmega.data.sources import ArraySource
from dpmega.errors import UsageError
from dpmega import truncation
from dpmega.noise import gaussian_noise_like
from dpmega.noise import sampler_support
from dpmega.tasks import Task
from dpmega.tasks import build_task
from dpmega.tasks import register_task
from dpmega.train import optim
from dpmega.train import step as step_lib
from tests.interrupts import Interrupt
from tests.interrupts import interrupt_at


def build_tiny_task(config) -> Task:
  """A tiny linear task; ``task.kind`` picks the loss.

  * ``linear``: squared error of ``w . x`` against ``y`` (learnable);
  * ``zero``: loss ``0 * sum(w)`` -- every gradient is exactly 0, so an update is pure noise;
  * ``constant``: loss ``w . x`` with ``x = 0.5 e_0`` -- every gradient is ``0.5 e_0`` (norm < C = 1).
  """
  c = config.task
  rng = np.random.default_rng(0)
  x = rng.normal(size=(c.n, c.d)).astype(np.float32)
  if c.kind == "constant":
    x = np.zeros((c.n, c.d), np.float32)
    x[:, 0] = 0.5
  y = (x @ np.linspace(-1, 1, c.d) + 0.1 * rng.normal(size=c.n)).astype(np.float32)

  def loss_fn(params, ex):
    if c.kind == "zero":
      return 0.0 * jnp.sum(params["w"])
    if c.kind == "constant":
      return jnp.dot(params["w"], ex["x"])
    return 0.5 * (jnp.dot(params["w"], ex["x"]) - ex["y"]) ** 2

  def evaluate(params):
    return {"mse": float(np.mean((x @ np.asarray(params["w"]) - y) ** 2))}

  return Task("test_tiny", lambda key: {"w": jnp.zeros((c.d,), jnp.float32)}, loss_fn,
              ArraySource({"x": x, "y": y}), evaluate)


register_task("test_tiny", f"{__name__}:build_tiny_task")


def _config(tmp_path, *overrides, name="run"):
  c = config_lib.base_config()
  c.task = ml_collections.ConfigDict({"name": "test_tiny", "n": 512, "d": 4, "kind": "linear"})
  c.workdir = str(tmp_path / name)
  c.num_steps = 6
  c.batch_schedule = "constant:64"
  c.microbatch_size = 16
  c.max_microbatches = 4
  c.noise_multiplier = 1.0
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.log_every = 0
  c.tensorboard = False
  return config_lib.apply_overrides(c, list(overrides))


def _trainer(config, lines=None):
  return train_lib.Trainer(config_lib.validate(config), build_task(config),
                           out=(lines.append if lines is not None else lambda s: None), config_dict=config)


def _history(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("m, k", [(4, 1), (16, 4), (64, 1), (8, 16)])
def test_one_noise_draw_per_logical_step_whatever_the_micro_batching(tmp_path, m, k):
  d, sigma, b = 4096, 2.0, 64
  config = _config(tmp_path, "task.kind='zero'", f"task.d={d}", f"microbatch_size={m}", f"max_microbatches={k}",
                   f"noise_multiplier={sigma}", "num_steps=1", "optimizer.learning_rate=1.0",
                   "insecure_reproducible_seed=5")  # the test recomputes the noise: a public seed
  result = train_lib.train(config, out=lambda s: None)
  delta = np.asarray(result.params["w"])
  # Exactly the one draw of the step's key, sized for the sum and divided by the expected batch size.
  key = noise_lib.step_key(noise_lib.insecure_secret_from_seed(5), 0)
  want = -np.asarray(gaussian_noise_like({"w": jnp.zeros(d)}, key, sigma * 1.0)["w"]) / b
  np.testing.assert_allclose(delta, want, rtol=1e-5, atol=1e-7)
  # And its std is sigma C / B, not sqrt(#micro-batches) times that.
  lo, hi = np.sqrt(sstats.chi2.ppf([1e-6, 1 - 1e-6], d) / d) * sigma / b
  assert lo <= np.sqrt(np.mean(delta.astype(np.float64) ** 2)) <= hi


@pytest.mark.parametrize("scheme", ["poisson", "without_replacement"])
def test_update_is_divided_by_the_expected_not_the_realized_batch_size(tmp_path, scheme):
  config = _config(tmp_path, "task.kind='constant'", "noise_multiplier=1e-9", "num_steps=1",
                   "optimizer.learning_rate=1.0", "batch_schedule='constant:100'", f"sampling='{scheme}'",
                   "insecure_reproducible_seed=3")
  result = train_lib.train(config, out=lambda s: None)
  realized = result.history[0]["sampled"]
  if scheme == "poisson":
    assert realized != 100  # the check below would not tell the two apart otherwise
  else:
    assert realized == 100
  np.testing.assert_allclose(float(result.params["w"][0]), -0.5 * realized / 100, rtol=1e-5)


@pytest.mark.parametrize("scheme, spec", [("poisson", "linear:32->128"), ("without_replacement", "steps:40@1,90@4"),
                                          ("poisson", "geometric:16->256")])
def test_ledger_is_exactly_the_steps_that_ran(tmp_path, scheme, spec):
  config = _config(tmp_path, f"sampling='{scheme}'", f"batch_schedule='{spec}'", "noise_multiplier=1.3")
  result = train_lib.train(config, out=lambda s: None)
  schedule = config_lib.validate(config).batch_schedule
  want = accounting.Ledger()
  for b in schedule.batch_sizes(6):
    want.record(batch_size=int(b), dataset_size=512, noise_multiplier=1.3, scheme=scheme)
  assert result.ledger == want
  assert [r["batch_size"] for r in result.history] == schedule.batch_sizes(6).tolist()
  # The reported delta covers the default sampler's bounded support over the 4 noised coordinates.
  tail = truncation.TailModel(sampler_support("wide_tail"), 4)
  # (the running RDP total sums in another order: equal to the last bits)
  assert result.epsilon == pytest.approx(accounting.compute_epsilon(want, 1e-6, "rdp", tail=tail), rel=1e-12)
  assert result.delta_tail == accounting.tail_delta_of(want, tail)
  summary = json.load(open(os.path.join(config.workdir, "summary.json")))
  assert accounting.Ledger.from_dict(summary["ledger"]) == want
  assert summary["neighbouring_relation"] == ("add/remove-one" if scheme == "poisson" else "replace-one")


def test_budget_stops_before_the_step_that_would_exceed_it(tmp_path):
  eps = [accounting.epsilon_for_schedule(noise_multiplier=1.0, delta=1e-6, dataset_size=512,
                                         batch_sizes=[64] * k) for k in (3, 4)]
  target = (eps[0] + eps[1]) / 2
  lines = []
  config = _config(tmp_path, "noise_multiplier=1.0", f"target_epsilon={target}", "log_every=1")
  result = _trainer(config, lines).run()
  assert result.steps == 3 and result.ledger.num_steps == 3
  assert result.epsilon <= target < eps[1]
  assert "stopped before step 4 of 6" in result.stop_reason
  assert any("allows only 3 of the 6 steps" in line for line in lines)  # said in the plan too
  assert any("stopped before step 4" in line for line in lines)
  summary = json.load(open(os.path.join(config.workdir, "summary.json")))
  assert summary["steps"] == 3 and summary["epsilon"] <= target


def test_target_epsilon_calibrates_sigma_for_the_whole_schedule(tmp_path):
  lines = []
  config = _config(tmp_path, "noise_multiplier=None", "target_epsilon=2.0", "batch_schedule='linear:32->128'",
                   "log_every=1")
  result = _trainer(config, lines).run()
  assert result.steps == 6 and result.stop_reason is None
  assert 1.95 <= result.epsilon <= 2.0
  assert any(f"sigma = {result.noise_multiplier:.6g} (calibrated" in line for line in lines)
  assert any(line.startswith("plan: expected epsilon after step") for line in lines)
  assert any("epsilon = " in line and "delta = 1e-06" in line and "add/remove-one" in line for line in lines)
  eps = [r["epsilon"] for r in result.history]
  assert all(a <= b for a, b in zip(eps, eps[1:])) and eps[-1] == result.epsilon


def test_the_plan_says_when_adams_memory_spans_an_increasing_batch(tmp_path):
  ramp = ("batch_schedule='linear:32->128'", "optimizer.name='adam'", "optimizer.learning_rate=0.01")
  for overrides, noted in ((ramp, True), (ramp + ("optimizer.b2=0.5",), False),
                           (("optimizer.name='adam'", "optimizer.learning_rate=0.01"), False)):
    lines = []
    _trainer(_config(tmp_path, *overrides, name=f"run{len(overrides)}{noted}"), lines).run()
    notes = [line for line in lines if line.startswith("plan: note: at the last step adam's second moment")]
    assert len(notes) == noted, lines


def test_steps_that_draw_no_example_still_add_noise_and_count(tmp_path):
  # A public seed whose Poisson draws include empty steps (steps 1, 2, 7, 8): with a fresh secret, all 8
  # steps drew an example in 2.5% of the runs and the test failed by chance.
  config = _config(tmp_path, "batch_schedule='constant:1'", "num_steps=8", "task.kind='zero'",
                   "optimizer.learning_rate=1.0", "insecure_reproducible_seed=0")
  result = train_lib.train(config, out=lambda s: None)
  assert 0 in [r["sampled"] for r in result.history]  # P(empty) = (1 - 1/512)^512 ~ 0.37 per step
  assert result.ledger.num_steps == 8
  assert np.all(np.asarray(result.params["w"]) != 0.0)  # pure noise moved every coordinate


def test_compile_count_stays_bounded_over_many_poisson_steps(tmp_path):
  config = _config(tmp_path, "num_steps=30", "batch_schedule='constant:300'", "microbatch_size=16",
                   "max_microbatches=8", "task.n=2000")
  trainer = _trainer(config)
  result = trainer.run()
  drawn = {r["sampled"] for r in result.history}
  assert len(drawn) > 10  # many different realized batch sizes ...
  # ... few compiled shapes: one program per chunk shape for a step's first chunk (accumulate.start, no zero
  # accumulator) and one per shape for the later chunks (accumulate.add_in_place), whatever the realized sizes.
  assert 1 <= trainer.num_traces <= 2 * len(sampling.chunk_shapes(16, 8))


def test_resume_continues_exactly_and_reuses_no_key(tmp_path):
  common = ("num_steps=8", "checkpoint_every=2", "log_every=1", "batch_schedule='linear:32->160'",
            "optimizer.name='adam'", "optimizer.learning_rate=0.05",
            "insecure_reproducible_seed=11")  # two workdirs compared bit for bit: a public seed
  full = train_lib.train(_config(tmp_path, *common, name="full"), out=lambda s: None)

  config = _config(tmp_path, *common, name="cut")
  with pytest.raises(Interrupt):
    train_lib.train(config, out=interrupt_at(5))  # dies after step 5; last checkpoint at step 4
  with open(os.path.join(config.workdir, "metrics.jsonl"), "a") as f:
    f.write('{"step": 6, "los')  # a line torn by the kill
  lines = []
  resumed = train_lib.train(config, resume=True, out=lines.append)
  assert any("resumed from the checkpoint at step 4" in line for line in lines)
  np.testing.assert_allclose(resumed.params["w"], full.params["w"], rtol=1e-6, atol=1e-7)
  assert resumed.epsilon == full.epsilon and resumed.ledger == full.ledger
  history = [r for r in _history(config.workdir) if not r.get("final")]
  assert [r["step"] for r in history] == list(range(1, 9))  # the interrupted step 5 is logged once
  eps = [r["epsilon"] for r in history]
  assert all(a <= b for a, b in zip(eps, eps[1:]))


def test_a_diverging_run_stops_before_saving_bad_params(tmp_path):
  from dpmega.train.checkpoint import Checkpointer

  # Adam moves each coordinate by about the learning rate per step: 3e38 is finite after step 1 and past the
  # float32 maximum (3.4e38) after step 2, whatever the (secret) noise.
  config = _config(tmp_path, "optimizer.name='adam'", "optimizer.learning_rate=3e38", "checkpoint_every=1",
                   "num_steps=4")
  with pytest.raises(train_lib.TrainingError, match="diverged at step 2.*last good checkpoint is at step 1"):
    train_lib.train(config, out=lambda s: None)
  with Checkpointer(os.path.join(config.workdir, "checkpoints")) as ckpt:
    assert ckpt.steps() == [1]


def test_resume_refuses_a_changed_run_configuration(tmp_path):
  config = _config(tmp_path, "num_steps=2")
  train_lib.train(config, out=lambda s: None)
  changed = config_lib.apply_overrides(config, ["clip_norm=2.0"])
  with pytest.raises(CheckpointError, match="clip_norm"):
    train_lib.train(changed, resume=True, out=lambda s: None)


def test_a_fresh_run_will_not_overwrite_checkpoints(tmp_path):
  config = _config(tmp_path, "num_steps=1")
  train_lib.train(config, out=lambda s: None)
  with pytest.raises(UsageError, match="--resume"):
    train_lib.train(config, out=lambda s: None)
  with pytest.raises(UsageError, match="exclude each other"):
    train_lib.train(config, resume=True, overwrite=True, out=lambda s: None)
  result = train_lib.train(config, overwrite=True, out=lambda s: None)
  assert result.steps == 1


def test_schedule_larger_than_the_dataset_is_refused_before_compute(tmp_path):
  config = _config(tmp_path, "batch_schedule='linear:64->1000'")
  with pytest.raises(UsageError, match="batch_schedule must stay within the dataset size 512"):
    train_lib.train(config, out=lambda s: None)
  assert not os.path.exists(config.workdir)


@pytest.mark.parametrize("name", [o.value for o in config_lib.Optimizer])
def test_every_optimizer_updates_params(name):
  cfg = config_lib.OptimizerConfig(name=config_lib.Optimizer(name), learning_rate=0.1,
                                   weight_decay=0.01 if name != "adam" else 0.0)
  opt = optim.make_optimizer(cfg, num_steps=10)
  params = {"w": jnp.ones(3)}
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  shardings = [sharding.param_shardings(jax.eval_shape(lambda: t), mesh) for t in (params, state.opt_state)]
  update = step_lib.make_update_fn(opt, mesh, *shardings, clip_norm=1.0)
  new, metrics = update(state, {"w": jnp.full((3,), 4.0)}, jax.random.key(0), 0.0, 4.0)
  assert int(new.step) == 1
  assert np.all(np.asarray(new.params["w"]) < 1.0)
  assert float(metrics["noisy_grad_norm"]) == pytest.approx(math.sqrt(3), rel=1e-6)


def test_learning_rate_warmup_then_cosine():
  cfg = config_lib.OptimizerConfig(name=config_lib.Optimizer.SGD, learning_rate=1.0,
                                   schedule=config_lib.LrSchedule.COSINE, warmup_steps=4, final_lr_fraction=0.1)
  lr = optim.make_learning_rate(cfg, num_steps=14)
  assert float(lr(0)) == 0.0 and float(lr(2)) == pytest.approx(0.5)
  assert float(lr(4)) == pytest.approx(1.0)
  assert float(lr(14)) == pytest.approx(0.1)


def test_builtin_synthetic_ctr_task_learns_privately(tmp_path):
  from dpmega.tasks import builtin as tasks_builtin

  config = config_lib.load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "synthetic_ctr.py"))
  config_lib.apply_overrides(config, [
      f"workdir='{tmp_path / 'ctr'}'", "task.num_train=20000", "task.num_eval=4000", "num_steps=12",
      "batch_schedule='geometric:1024->4096,round_to=1024'", "eval_every=0", "checkpoint_every=0", "log_every=0"])
  result = train_lib.train(config, out=lambda s: None)
  assert result.epsilon <= 3.0 and result.steps == 12
  assert set(result.eval_metrics) >= {"auc", "log_loss", "accuracy"}
  assert result.eval_metrics["auc"] > 0.6  # chance is 0.5
  assert tasks_builtin.NAME == "synthetic_ctr"


def test_trainer_defaults_to_exact_fast_clipping_that_never_expands_a_table():
  """The base config and the trainer's accumulate step default to "auto": no b x V x d temp."""
  assert config_lib.base_config().clipping == "auto"
  b, v, d = 32, 100_000, 16

  def loss(p, ex):
    return jnp.sum(jnp.tanh(p["table"][ex["ids"]]) @ p["w"])

  params = {"table": jnp.zeros((v, d)), "w": jnp.ones((d,))}
  acc = step_lib.Accumulator(jax.tree_util.tree_map(jnp.zeros_like, params), ClipStats.zeros())
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))  # the trainer's default: one device
  fn = step_lib.make_accumulate_fn(loss, mesh, sharding.param_shardings(params, mesh), clip_norm=1.0,
                                   microbatch_size=b)
  mem = fn.jitted.lower(params, acc, {"ids": jnp.zeros((b, 4), jnp.int32)}, jnp.ones((b,))).compile().memory_analysis()
  if mem is None:
    pytest.skip("this backend reports no memory analysis")
  assert mem.temp_size_in_bytes < 0.05 * b * v * d * 4, mem.temp_size_in_bytes


def _tensorboard_events(workdir):
  """({tag: {step: value}}, purge steps) from the run's event files, read as TFRecords of Event protos."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  scalars, purges = {}, []
  for path in sorted(glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))):
    with open(path, "rb") as f:
      data = f.read()
    pos = 0
    while pos + 12 <= len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
        purges.append(event.step)
      for v in event.summary.value:
        scalars.setdefault(v.tag, {})[event.step] = v.simple_value  # later files win, as in TensorBoard
  return scalars, purges


def test_tensorboard_gets_every_logged_step_and_a_resume_purges_the_redone_ones(tmp_path):
  config = _config(tmp_path, "num_steps=8", "checkpoint_every=2", "log_every=1", "tensorboard=True", name="tb")
  with pytest.raises(Interrupt):
    train_lib.train(config, out=interrupt_at(5))  # dies after step 5; last checkpoint at step 4
  train_lib.train(config, resume=True, out=lambda s: None)
  scalars, purges = _tensorboard_events(config.workdir)
  assert purges == [5]  # TensorBoard hides the first process's step 5, which the resumed run redid
  history = [r for r in _history(config.workdir) if not r.get("final")]
  assert [r["step"] for r in history] == list(range(1, 9))
  for tag in ("loss", "epsilon", "examples_per_s"):
    assert scalars[tag] == pytest.approx({r["step"]: r[tag] for r in history}, rel=1e-6), tag
