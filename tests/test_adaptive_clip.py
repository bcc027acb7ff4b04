"""Adaptive clip norm (dpmega/train/adaptive_clip.py, make_accumulate_fn(adaptive=True), the trainer's C_t):
it tracks the target quantile, each contribution stays within C_t, the ledger counts the noisy count, and a
resume continues with the same C."""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dpmega import sharding
from dpmega import train as train_lib
from dpmega.clipping import ClipStats
from dpmega.data.sources import ArraySource
from dpmega.errors import UsageError
from dpmega.tasks import Task
from dpmega.tasks import register_task
from dpmega.train import adaptive_clip
from dpmega.train import config as config_lib
from dpmega.train import step as step_lib
from tests.interrupts import Interrupt
from tests.interrupts import interrupt_at


def build_norms_task(config) -> Task:
  """``loss = w . x``: each example's gradient is its ``x``, whose norms are uniform on ``[0, task.max_norm]``."""
  c = config.task
  rng = np.random.default_rng(0)
  direction = rng.normal(size=(c.n, c.d))
  direction /= np.linalg.norm(direction, axis=1, keepdims=True)
  x = (direction * rng.uniform(0, c.max_norm, size=(c.n, 1))).astype(np.float32)
  return Task("test_norms", lambda key: {"w": jnp.zeros((c.d,), jnp.float32)},
              lambda params, ex: jnp.dot(params["w"], ex["x"]), ArraySource({"x": x}),
              lambda params: {"w_norm": float(np.linalg.norm(np.asarray(params["w"])))})


register_task("test_norms", f"{__name__}:build_norms_task")


def _config(tmp_path, *overrides, name="run"):
  c = config_lib.base_config()
  c.task = ml_collections.ConfigDict({"name": "test_norms", "n": 4000, "d": 4, "max_norm": 10.0})
  c.workdir = str(tmp_path / name)
  c.num_steps = 60
  c.batch_schedule = "constant:400"
  c.microbatch_size = 100
  c.max_microbatches = 8
  c.noise_multiplier = 1.0
  c.clip_norm = 1.0
  c.metrics = "private"
  c.clipped_count_noise = 10.0
  c.adaptive_clip = True
  c.adaptive_clip_quantile = 0.5
  c.adaptive_clip_lr = 0.2
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 1e-3
  c.log_every = 1
  c.tensorboard = False
  c.insecure_reproducible_seed = 5  # compared across two workdirs: a public seed
  return config_lib.apply_overrides(c, list(overrides))


def test_next_clip_norm_moves_toward_the_target_quantile():
  kw = dict(target_quantile=0.5, learning_rate=0.2)
  assert adaptive_clip.next_clip_norm(2.0, 10.0, 100.0, **kw) < 2.0  # 90% unclipped: C too large
  assert adaptive_clip.next_clip_norm(2.0, 90.0, 100.0, **kw) > 2.0  # 10% unclipped: C too small
  assert adaptive_clip.next_clip_norm(2.0, 50.0, 100.0, **kw) == 2.0  # at the quantile: fixed point
  assert adaptive_clip.next_clip_norm(2.0, 0.0, 100.0, **kw) == pytest.approx(2.0 * math.exp(-0.1))
  with pytest.raises(ValueError, match="expected_batch_size"):
    adaptive_clip.next_clip_norm(2.0, 0.0, 0.0, **kw)
  with pytest.raises(ValueError, match="adaptive_clip_quantile"):
    adaptive_clip.check_settings(1.0, 0.2, 1.0)


def test_clip_norm_converges_to_the_median_of_known_norms_and_the_ledger_counts_the_count(tmp_path):
  result = train_lib.train(_config(tmp_path), out=lambda s: None)
  c = [r["clip_norm"] for r in result.history]
  assert c[0] == 1.0
  assert 4.2 < float(np.mean(c[-20:])) < 5.8  # the median of uniform [0, 10] norms is 5
  # The ledger records the effective noise multiplier of the (sum, count) pair, below the gradient's sigma.
  recorded = result.ledger.to_dict()["runs"][0]["noise_multiplier"]
  assert recorded == pytest.approx(step_lib.effective_noise_multiplier(1.0, 10.0))
  assert recorded < 1.0


def test_clip_norm_tracks_a_higher_quantile(tmp_path):
  result = train_lib.train(_config(tmp_path, "adaptive_clip_quantile=0.9", "clip_norm=20.0"), out=lambda s: None)
  c = [r["clip_norm"] for r in result.history]
  assert c[0] == 20.0
  assert 7.8 < float(np.mean(c[-20:])) < 10.5  # the 0.9 quantile is 9


def test_resume_continues_with_the_checkpointed_clip_norm(tmp_path):
  common = ("num_steps=12", "checkpoint_every=4")
  full = train_lib.train(_config(tmp_path, *common, name="full"), out=lambda s: None)
  config = _config(tmp_path, *common, name="cut")
  with pytest.raises(Interrupt):
    train_lib.train(config, out=interrupt_at(6))  # dies after step 6; last checkpoint at step 4
  resumed = train_lib.train(config, resume=True, out=lambda s: None)
  want = [r["clip_norm"] for r in full.history]
  got = [r["clip_norm"] for r in resumed.history]
  assert got == want[4:]  # steps 5..12 start from the C saved at step 4, not from clip_norm
  assert got[0] != 1.0
  np.testing.assert_allclose(resumed.params["w"], full.params["w"], rtol=1e-6, atol=1e-7)
  assert resumed.ledger == full.ledger


def test_adaptive_clip_needs_the_noisy_count():
  c = _config(pytest.importorskip("pathlib").Path("/nonexistent"), "clipped_count_noise=None", "metrics='raw'")
  with pytest.raises(UsageError, match="adaptive_clip needs clipped_count_noise"):
    config_lib.validate(c)
  c = _config(pytest.importorskip("pathlib").Path("/nonexistent"), "adaptive_clip_quantile=1.0")
  with pytest.raises(UsageError, match="adaptive_clip_quantile"):
    config_lib.validate(c)


@pytest.mark.parametrize("clip_t", [1e-3, 3.7, 1e6])
def test_each_contribution_is_at_most_the_traced_clip_norm(clip_t):
  # Crafted gradients: huge, tiny, exactly at C_t, zero, and a cancellation inside one example.
  def loss(params, ex):
    return jnp.dot(params["w"], ex["x"]) + jnp.dot(params["v"], ex["y"])

  big = np.float32(1e30)
  xs = np.array([[big, big], [1e-30, 0.0], [clip_t, 0.0], [0.0, 0.0], [3.0, 4.0]], np.float32)
  ys = np.array([[big], [0.0], [0.0], [0.0], [-1e-8]], np.float32)
  params = {"w": jnp.zeros(2), "v": jnp.zeros(1)}
  mesh = sharding.make_mesh(sharding.MeshConfig(data=1))
  shardings = sharding.param_shardings(params, mesh)
  acc0 = step_lib.Accumulator(jax.tree_util.tree_map(jnp.zeros_like, params), ClipStats.zeros())
  bound = clip_t * (1 + 1e-5) * (1 + 2 ** -23)
  for mode in ("vmap", "auto"):
    fn = step_lib.make_accumulate_fn(loss, mesh, shardings, clip_norm=1.0, microbatch_size=8, clipping=mode,
                                     adaptive=True)
    for i in range(xs.shape[0]):
      mask = np.zeros(8, np.float32)
      mask[0] = 1.0
      batch = {"x": np.repeat(xs[i:i + 1], 8, 0), "y": np.repeat(ys[i:i + 1], 8, 0)}
      acc = fn(params, acc0, batch, mask, clip_t)
      norm = math.sqrt(sum(float(jnp.sum(jnp.square(g.astype(jnp.float64) if jax.config.jax_enable_x64 else g)))
                           for g in jax.tree_util.tree_leaves(acc.grad_sum)))
      assert norm <= bound, (mode, i, norm, bound)
      if i == 0:  # clipped: at the bound, not far below
        assert norm >= clip_t * (1 - 1e-5)
  with pytest.raises(ValueError, match="clip_norm_t must be given"):
    fn(params, acc0, batch, mask)
  with pytest.raises(ValueError, match="clip_norm must be 1.0 with adaptive"):
    step_lib.make_accumulate_fn(loss, mesh, shardings, clip_norm=2.0, microbatch_size=8, adaptive=True)


def test_non_adaptive_runs_do_not_checkpoint_a_clip_norm(tmp_path):
  config = _config(tmp_path, "adaptive_clip=False", "clipped_count_noise=None", "metrics='raw'", "num_steps=2")
  result = train_lib.train(config, out=lambda s: None)
  assert "clip_norm" not in result.history[0]
  assert os.path.isdir(os.path.join(config.workdir, "checkpoints"))
