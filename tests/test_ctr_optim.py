"""Optimizers for noisy sparse tables: DP-AdamBC (dpmega/train/dp_adam.py), CowClip (dpmega/train/cowclip.py),
per-group optimizers and the batch-scaling rules (dpmega/train/optim.py), and the noise std the step hands them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpmega import noise as noise_lib
from dpmega import sharding
from dpmega.errors import UsageError
from dpmega.train import config as config_lib
from dpmega.train import cowclip as cowclip_lib
from dpmega.train import dp_adam
from dpmega.train import optim
from dpmega.train import step as step_lib


def _run(tx, grads, noise_stds, params=None):
  params = jnp.zeros_like(grads[0]) if params is None else params
  state = tx.init(params)
  outs = []
  for g, s in zip(grads, noise_stds):
    u, state = tx.update(g, state, params, noise_std=s)
    outs.append(np.asarray(u))
  return outs


# ------------------------------------------------------------------------------------------------ DP-AdamBC
def test_adam_bc_without_noise_is_adam_without_eps():
  rng = np.random.default_rng(0)
  grads = [jnp.asarray(rng.normal(size=5) + 3.0, jnp.float32) for _ in range(20)]
  ours = _run(dp_adam.scale_by_adam_bc(floor=1e-30), grads, [0.0] * 20)
  ref = _run(optax.with_extra_args_support(optax.scale_by_adam(eps=0.0)), grads, [0.0] * 20)
  np.testing.assert_allclose(ours, ref, rtol=2e-5)


def test_adam_bc_subtracts_exactly_the_ema_of_a_changing_noise_variance():
  # g_t^2 == s_t^2 every step: the corrected second moment is exactly 0, so the floor sets the scale.
  s = [0.5, 2.0, 1.0, 3.0, 0.25]
  grads = [jnp.full((2,), x, jnp.float32) for x in s]
  floor = 1e-2
  out = _run(dp_adam.scale_by_adam_bc(b1=0.0, b2=0.9, floor=floor), grads, s)
  for g, u in zip(s, out):  # b1 = 0: m_hat = g
    np.testing.assert_allclose(u, g / math.sqrt(floor), rtol=1e-3)


def test_adam_bc_does_not_amplify_noise_only_coordinates():
  # Coordinate 0 carries signal 1.0 under noise std 0.5; coordinates 1.. carry noise only.
  rng = np.random.default_rng(1)
  s, steps = 0.5, 300
  signal = np.zeros(64, np.float32)
  signal[0] = 1.0
  grads = [jnp.asarray(signal + s * rng.normal(size=64), jnp.float32) for _ in range(steps)]
  adam = _run(optax.with_extra_args_support(optax.scale_by_adam(eps=1e-8)), grads, [s] * steps)[-1]
  bc = _run(dp_adam.scale_by_adam_bc(floor=s ** 2), grads, [s] * steps)[-1]
  # Adam moves noise-only coordinates by |m| / sqrt(s^2) ~ 0.23 each; BC divides them by sqrt(floor) = s too,
  # but its signal coordinate keeps |m| / sqrt(E g^2) ~ 1 instead of Adam's 1 / sqrt(1 + s^2).
  assert bc[0] == pytest.approx(1.0, abs=0.15)
  assert adam[0] == pytest.approx(1 / math.sqrt(1 + s ** 2), abs=0.1)
  ratio_bc = abs(bc[0]) / np.sqrt(np.mean(bc[1:] ** 2))
  ratio_adam = abs(adam[0]) / np.sqrt(np.mean(adam[1:] ** 2))
  assert ratio_bc > 1.1 * ratio_adam  # more signal per unit of noise movement


def test_adam_bc_refuses_a_missing_noise_std_and_bad_hyperparameters():
  tx = dp_adam.scale_by_adam_bc()
  with pytest.raises(ValueError, match="noise_std"):
    tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
  with pytest.raises(ValueError, match="b1"):
    dp_adam.scale_by_adam_bc(b1=1.0)
  with pytest.raises(ValueError, match="floor"):
    dp_adam.scale_by_adam_bc(floor=0.0)


# ------------------------------------------------------------------------------------------------ CowClip
def test_cowclip_bounds_every_row_relative_to_its_norm_and_keeps_direction():
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(50, 4)) * rng.uniform(0, 3, size=(50, 1)), jnp.float32)
  w = w.at[:5].set(0.0)  # zero rows: bound min_norm
  g = jnp.asarray(rng.normal(size=(50, 4)) * rng.uniform(0, 5, size=(50, 1)), jnp.float32)
  g = g.at[7].set(0.0)
  ratio, zeta = 0.3, 0.05
  tx = cowclip_lib.cowclip(ratio, zeta)
  out, _ = tx.update(g, tx.init(w), w)
  out, g, w = np.asarray(out, np.float64), np.asarray(g, np.float64), np.asarray(w, np.float64)
  bound = np.maximum(ratio * np.linalg.norm(w, axis=1), zeta)
  assert np.all(np.linalg.norm(out, axis=1) <= bound * (1 + 2 ** -22) + 1e-30)
  # Same direction, scaled by a factor in (0, 1]; rows within the bound untouched.
  factor = np.linalg.norm(out, axis=1) / np.where(np.linalg.norm(g, axis=1) > 0, np.linalg.norm(g, axis=1), 1)
  assert np.all(factor <= 1 + 1e-6)
  np.testing.assert_allclose(out, g * factor[:, None], rtol=1e-5, atol=1e-7)
  inside = np.linalg.norm(g, axis=1) <= bound
  assert inside.any() and (~inside).any()
  np.testing.assert_array_equal(out[inside], g[inside].astype(np.float32))
  assert np.all(out[7] == 0)


def test_cowclip_refuses_bad_input():
  with pytest.raises(ValueError, match="ratio"):
    cowclip_lib.cowclip(-1.0, 0.1)
  with pytest.raises(ValueError, match="min_norm"):
    cowclip_lib.cowclip(1.0, 0.0)
  tx = cowclip_lib.cowclip(1.0, 0.1)
  with pytest.raises(ValueError, match="params"):
    tx.update(jnp.ones((2, 2)), tx.init(jnp.ones((2, 2))))


# ------------------------------------------------------------------------------------------------ groups
PARAMS = {"embed": {"table": {"embedding": jnp.full((4, 2), 0.1)}}, "mlp": {"kernel": jnp.ones((2, 2))}}


def test_param_labels_split_tables_from_dense_layers():
  labels = optim.param_labels(PARAMS)
  assert labels == {"embed": {"table": {"embedding": "tables"}}, "mlp": {"kernel": "dense"}}


def test_tables_get_their_own_optimizer_cowclip_and_l2_and_dense_layers_do_not():
  cfg = config_lib.OptimizerConfig(name=config_lib.Optimizer.SGD, learning_rate=1.0, table_name="sgd",
                                   table_learning_rate=0.5, table_weight_decay=0.1, cowclip=True,
                                   cowclip_ratio=1.0, cowclip_min_norm=1e-3)
  tx = optim.make_optimizer(cfg, num_steps=4)
  grads = jax.tree_util.tree_map(lambda p: jnp.full(p.shape, 10.0), PARAMS)
  u, _ = tx.update(grads, tx.init(PARAMS), PARAMS, noise_std=0.0)
  row = np.full(2, 0.1)
  clipped = np.full(2, 10.0) * (np.linalg.norm(row) / np.linalg.norm(np.full(2, 10.0)))  # cowclip to ||row||
  np.testing.assert_allclose(np.asarray(u["embed"]["table"]["embedding"])[0], -0.5 * (clipped + 0.1 * row),
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(u["mlp"]["kernel"]), -10.0, rtol=1e-6)


def test_ungrouped_optimizer_is_one_transform_that_accepts_noise_std():
  cfg = config_lib.OptimizerConfig(name=config_lib.Optimizer.ADAGRAD, learning_rate=0.1)
  assert not optim.is_grouped(cfg)
  tx = optim.make_optimizer(cfg, num_steps=4)
  u, _ = tx.update(PARAMS, tx.init(PARAMS), PARAMS, noise_std=1.0)
  assert np.all(np.asarray(u["mlp"]["kernel"]) < 0)


def test_scale_for_batch_follows_cowclip_rules():
  cfg = config_lib.OptimizerConfig(learning_rate=1e-3, table_learning_rate=0.02, table_weight_decay=1e-4)
  s = optim.scale_for_batch(cfg, 16.0)
  assert s.table_learning_rate == 0.02  # tables: unchanged
  assert s.table_weight_decay == pytest.approx(1.6e-3)  # L2: linear
  assert s.learning_rate == pytest.approx(4e-3)  # dense: square root
  with pytest.raises(ValueError, match="factor"):
    optim.scale_for_batch(cfg, 0.0)


def test_config_fields_of_the_table_optimizer_are_checked():
  c = config_lib.base_config()
  c.noise_multiplier = 1.0
  c.task.name = "synthetic_ctr"
  c.optimizer.table_name = "rmsprop"
  with pytest.raises(UsageError, match="optimizer.table_name"):
    config_lib.validate(c)
  c.optimizer.table_name = "adagrad"
  c.optimizer.cowclip_min_norm = 0.0
  with pytest.raises(UsageError, match="optimizer.cowclip_min_norm"):
    config_lib.validate(c)
  c.optimizer.cowclip_min_norm = 1e-5
  c.optimizer.table_name = "adam"
  c.optimizer.weight_decay = 0.1
  with pytest.raises(UsageError, match="weight_decay must be 0 for adam"):
    config_lib.validate(c)


# ------------------------------------------------------------------------------------------------ the step
def test_the_update_hands_the_optimizer_sigma_c_over_b():
  def record_noise_std():
    def update(updates, state, params=None, *, noise_std=None, **extra):
      return jax.tree_util.tree_map(lambda u: jnp.full_like(u, noise_std), updates), state
    return optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)

  opt = record_noise_std()
  params = {"w": jnp.zeros(3)}
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  state = step_lib.TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))
  shardings = [sharding.param_shardings(jax.eval_shape(lambda: t), mesh) for t in (params, state.opt_state)]
  update = step_lib.make_update_fn(opt, mesh, *shardings, clip_norm=2.5)
  new, _ = update(state, {"w": jnp.zeros(3)}, noise_lib.step_key(noise_lib.secret_bytes(), 0), 1.5, 300.0)
  np.testing.assert_allclose(np.asarray(new.params["w"]), 1.5 * 2.5 / 300.0, rtol=1e-6)


# ------------------------------------------------------------------- Adam's memory under an increasing batch
def test_stale_noise_ratio_is_the_noise_adams_second_moment_holds_at_the_last_step():
  sizes = np.array([64, 64, 128, 128, 256, 256, 512, 512, 1024, 1024])
  d, b2 = 400_000, 0.9
  tx = optax.scale_by_adam(b1=0.9, b2=b2, eps=0.0)
  state = tx.init(jnp.zeros(d))
  for t, b in enumerate(sizes):  # pure noise of std 1 / B_t on the mean gradient (sigma C = 1)
    _, state = tx.update(jax.random.normal(jax.random.key(t), (d,)) / b, state)
  nu_hat = np.asarray(state.nu) / (1 - b2 ** len(sizes))
  measured = float(np.mean(nu_hat)) * sizes[-1] ** 2
  assert measured == pytest.approx(optim.stale_noise_ratio(b2, sizes), rel=0.01)
  assert measured > 3  # the early batches' noise is still most of it
  assert optim.stale_noise_ratio(b2, np.full(10, 1024)) == pytest.approx(1.0)


def test_schedule_note_names_a_b2_that_forgets_the_ramp_and_stays_quiet_otherwise():
  ramp = np.geomspace(1024, 8192, 64).round()
  ramp = np.concatenate([ramp, np.full(37, 8192)])
  adam = config_lib.OptimizerConfig()
  note = optim.schedule_note(adam, ramp)
  assert note is not None and "b2 = 0.999" in note and "optimizer.b2 = 0.95" in note and "adam_bc" not in note
  assert optim.stale_noise_ratio(0.999, ramp) > 9 and optim.stale_noise_ratio(0.95, ramp) <= optim.STALE_NOISE_NOTE
  assert optim.schedule_note(config_lib.OptimizerConfig(b2=0.95), ramp) is None
  assert optim.schedule_note(adam, np.full(100, 8192)) is None  # a constant batch
  for name in ("adam_bc", "sgd", "momentum"):  # adam_bc subtracts each step's noise; the others keep no moment
    assert optim.schedule_note(config_lib.OptimizerConfig(name=config_lib.Optimizer(name)), ramp) is None
  steep = np.concatenate([np.full(50, 16), np.full(5, 16384)])  # no common b2 forgets this one: adam_bc
  assert "optimizer.b2 =" not in optim.schedule_note(adam, steep)
  assert "adam_bc_floor near (sigma C / B)^2" in optim.schedule_note(adam, steep)
