"""Learning rates and optimizers of a run, built from its :class:`~dpmega.train.config.OptimizerConfig`.

Everything here is optax: the private step hands its noisy mean gradient to the
optimizer made here (post-processing, so the choice costs no privacy).

Example:
  >>> from dpmega.train import config as config_lib
  >>> cfg = config_lib.OptimizerConfig(name=config_lib.Optimizer.SGD, learning_rate=0.5)
  >>> float(make_learning_rate(cfg, num_steps=10)(3))
  0.5
"""

from __future__ import annotations

import optax

from dpmega.train import config as config_lib


def make_learning_rate(cfg: config_lib.OptimizerConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup over ``warmup_steps``, then the optax decay named by ``cfg.schedule``."""
  lr = cfg.learning_rate
  decay_steps = max(num_steps - cfg.warmup_steps, 1)
  end = lr * cfg.final_lr_fraction
  kind = cfg.schedule
  if kind == config_lib.LrSchedule.CONSTANT:
    decay = optax.constant_schedule(lr)
  elif kind == config_lib.LrSchedule.COSINE:
    decay = optax.cosine_decay_schedule(lr, decay_steps, alpha=cfg.final_lr_fraction)
  elif kind == config_lib.LrSchedule.LINEAR:
    decay = optax.linear_schedule(lr, end, decay_steps)
  else:
    decay = optax.exponential_decay(lr, decay_steps, cfg.final_lr_fraction)
  if cfg.warmup_steps == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, cfg.warmup_steps), decay], [cfg.warmup_steps])


def make_optimizer(cfg: config_lib.OptimizerConfig, num_steps: int) -> optax.GradientTransformation:
  """The optax optimizer of ``cfg`` (sgd, momentum, adam, adamw, lamb)."""
  lr = make_learning_rate(cfg, num_steps)
  name = cfg.name
  if name == config_lib.Optimizer.SGD:
    opt = optax.sgd(lr)
  elif name == config_lib.Optimizer.MOMENTUM:
    opt = optax.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
  elif name == config_lib.Optimizer.ADAM:
    return optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  elif name == config_lib.Optimizer.ADAMW:
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  else:
    return optax.lamb(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  if cfg.weight_decay:
    opt = optax.chain(optax.add_decayed_weights(cfg.weight_decay), opt)
  return opt
