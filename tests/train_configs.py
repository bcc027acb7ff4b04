"""Config files for tiny private runs of the built-in synthetic CTR task (a few seconds each)."""

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
