"""Private training of a small CTR-style model on built-in generated data.

The README's first command: about a minute on 2 CPU cores.

  dpmega train --config configs/synthetic_ctr.py --target_epsilon 3 --delta 1e-6

The batch size grows geometrically over the run (small, cheap steps first, large
low-noise steps last), as in the increasing batch-size schedules of Anil et al.
2021, "Large-Scale Differentially Private BERT" (https://arxiv.org/abs/2108.01624).
"""

from dpmega.train import config as config_lib
from dpmega.tasks import builtin as tasks_builtin


def get_config():
  config = config_lib.base_config()
  config.task = tasks_builtin.default_task_config()
  config.workdir = "runs/synthetic_ctr"
  config.init_seed = 0  # public, parameter init only: noise and sampling use a fresh secret per run
  config.num_steps = 40
  # Ramps over the whole run; rounding to multiples of 2048 keeps 8 distinct sampling
  # probabilities, so calibrating sigma takes seconds rather than tens of seconds.
  config.batch_schedule = "geometric:2048->16384,round_to=2048"
  config.microbatch_size = 512
  config.max_microbatches = 4
  config.clipping = "auto"  # exact per-example clipping; ghost norms for Dense, sparse rows for Embed
  config.clip_norm = 5.0
  config.target_epsilon = 3.0
  config.delta = 1e-6
  config.accountant = "rdp"
  config.sampling = "poisson"
  config.optimizer.name = "adam"
  # b2 0.8: Adam's second moment forgets the small early batches' noise (their memory would shrink the late
  # steps: dpmega.train.optim.stale_noise_ratio); with lr 0.04 it is the best of lr {0.01..0.16} x b2 {0.999, 0.8}
  # (bench/RESULTS.md, issue 20: AUC 0.866 against 0.860 for the best lr at b2 0.999 and 0.843 at the old 0.02).
  config.optimizer.learning_rate = 0.04
  config.optimizer.b2 = 0.8
  config.optimizer.schedule = "constant"
  config.log_every = 5
  config.eval_every = 20
  config.checkpoint_every = 20
  return config
