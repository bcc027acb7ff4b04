"""Configs of tiny private runs for the trainer's tests (a few seconds each).

* :func:`small_train_config`: the text of a config file for the built-in synthetic CTR task;
* :func:`linear_task_config`: a ConfigDict for the ``"test_resume"`` linear task registered here.
"""

import jax.numpy as jnp
import ml_collections
import numpy as np

from dpmega.data.sources import ArraySource
from dpmega.tasks import Task
from dpmega.tasks import register_task
from dpmega.train import config as config_lib

_TEMPLATE = '''
from dpmega.train import config as config_lib
from dpmega.tasks import builtin as tasks_builtin


def get_config():
  c = config_lib.base_config()
  c.task = tasks_builtin.default_task_config()
  c.task.num_train = {num_train}
  c.task.num_eval = {num_eval}
  c.task.vocab_size = 32
  c.task.hidden = (8,)
  c.num_steps = {num_steps}
  c.batch_schedule = "constant:200"
  c.microbatch_size = 32
  c.max_microbatches = 8
  c.noise_multiplier = 1.0
  c.checkpoint_every = 4
  c.log_every = 1
  c.optimizer.learning_rate = 0.01
  c.tensorboard = False
  return c
'''


def small_train_config(*, num_train: int, num_eval: int, num_steps: int) -> str:
  """The text of a config file for a tiny run (batch 200, checkpoints every 4 steps)."""
  return _TEMPLATE.format(num_train=num_train, num_eval=num_eval, num_steps=num_steps)


def build_resume_task(config) -> Task:
  """A linear task; ``task.kind``: ``linear`` (squared error), ``zero`` (every gradient 0: an update is pure
  noise) or ``nan`` (every example's loss and gradient are NaN)."""
  c = config.task
  rng = np.random.default_rng(c.data_seed)
  x = rng.normal(size=(c.n, c.d)).astype(np.float32)
  y = (x @ np.linspace(-1, 1, c.d)).astype(np.float32)

  def loss_fn(params, ex):
    if c.kind == "zero":
      return 0.0 * jnp.sum(params["w"])
    if c.kind == "nan":
      return jnp.nan * jnp.dot(params["w"], ex["x"])
    return 0.5 * (jnp.dot(params["w"], ex["x"]) - ex["y"]) ** 2

  return Task("test_resume", lambda key: {"w": jnp.zeros((c.d,), jnp.float32)}, loss_fn,
              ArraySource({"x": x, "y": y}), lambda params: {"w0": float(params["w"][0])})


register_task("test_resume", f"{__name__}:build_resume_task")


def linear_task_config(workdir, *overrides: str) -> ml_collections.ConfigDict:
  """A run of the ``"test_resume"`` linear task: 256 examples, batch 32, micro-batch 16 x 2, sigma 1, sgd.

  Args:
    workdir: the run's workdir.
    *overrides: ``field=value`` strings applied in order (each test file passes its own settings first).
  """
  c = config_lib.base_config()
  c.task = ml_collections.ConfigDict({"name": "test_resume", "n": 256, "d": 4, "kind": "linear", "data_seed": 0})
  c.workdir = str(workdir)
  c.batch_schedule = "constant:32"
  c.microbatch_size = 16
  c.max_microbatches = 2
  c.noise_multiplier = 1.0
  c.optimizer.name = "sgd"
  return config_lib.apply_overrides(c, list(overrides))
