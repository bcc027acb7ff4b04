"""Learning rates and optimizers of a run, built from its :class:`~dpmega.train.config.OptimizerConfig`.

Everything here is optax: the private step hands its noisy mean gradient to the
optimizer made here (post-processing, so the choice costs no privacy). The
optimizer may treat the embedding tables and the dense layers differently
(``optax.multi_transform``): its own optimizer and learning rate for the
tables (``table_name``, ``table_learning_rate``), their L2 term
(``table_weight_decay``) and CowClip (:mod:`dpmega.train.cowclip`). Every
optimizer made here takes the step's noise std as the extra argument
``noise_std`` of ``update`` (DP-AdamBC, :mod:`dpmega.train.dp_adam`, uses it;
the others ignore it).

Example:
  >>> from dpmega.train import config as config_lib
  >>> cfg = config_lib.OptimizerConfig(name=config_lib.Optimizer.SGD, learning_rate=0.5)
  >>> float(make_learning_rate(cfg, num_steps=10)(3))
  0.5
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import numpy as np
import optax

from dpmega.train import averaging
from dpmega.train import config as config_lib
from dpmega.train import cowclip as cowclip_lib
from dpmega.train import dp_adam

TABLES, DENSE = "tables", "dense"


def make_learning_rate(cfg: config_lib.OptimizerConfig, num_steps: int, peak: float | None = None) -> optax.Schedule:
  """Linear warmup over ``warmup_steps`` to ``peak`` (default ``cfg.learning_rate``), then ``cfg.schedule``."""
  lr = cfg.learning_rate if peak is None else peak
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


def param_labels(params: Any) -> Any:
  """``"tables"`` for every embedding table (a leaf named ``embedding``, as ``flax.linen.Embed`` names it),
  ``"dense"`` for every other leaf.

  Example:
    >>> param_labels({"embed": {"embedding": 0}, "mlp": {"kernel": 0}})
    {'embed': {'embedding': 'tables'}, 'mlp': {'kernel': 'dense'}}
  """
  def label(path, _):
    last = path[-1] if path else None
    name = getattr(last, "key", getattr(last, "name", None))
    return TABLES if name == "embedding" else DENSE

  return jax.tree_util.tree_map_with_path(label, params)


def _one(name: config_lib.Optimizer, lr: optax.Schedule, cfg: config_lib.OptimizerConfig,
         weight_decay: float) -> optax.GradientTransformation:
  """The optimizer ``name`` at ``lr``; ``weight_decay`` added to the gradient (decoupled for adamw, lamb)."""
  o = config_lib.Optimizer
  if name == o.ADAMW:
    return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=weight_decay)
  if name == o.LAMB:
    return optax.lamb(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=weight_decay)
  if name == o.ADAM:
    opt = optax.adam(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
  elif name == o.SGD:
    opt = optax.sgd(lr)
  elif name == o.MOMENTUM:
    opt = optax.sgd(lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
  elif name == o.ADAGRAD:
    opt = optax.adagrad(lr, eps=cfg.eps)
  else:
    opt = dp_adam.adam_bc(lr, b1=cfg.b1, b2=cfg.b2, floor=cfg.adam_bc_floor)
  if weight_decay:
    opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
  return opt


def is_grouped(cfg: config_lib.OptimizerConfig) -> bool:
  """Whether the tables get their own transform (any table_* field or CowClip set)."""
  return (cfg.table_name != "same" or cfg.table_learning_rate is not None or cfg.table_weight_decay > 0
          or cfg.cowclip)


def make_optimizer(cfg: config_lib.OptimizerConfig, num_steps: int) -> optax.GradientTransformationExtraArgs:
  """The optax optimizer of ``cfg`` (:func:`make_update_rule`), with an average of the parameters in its state
  when ``ema_decay`` > 0 (:func:`dpmega.train.averaging.with_ema`)."""
  rule = make_update_rule(cfg, num_steps)
  return averaging.with_ema(rule, cfg.ema_decay) if cfg.ema_decay > 0 else rule


def make_update_rule(cfg: config_lib.OptimizerConfig, num_steps: int) -> optax.GradientTransformationExtraArgs:
  """The optax optimizer of ``cfg`` without the average: one for every parameter, or tables and dense layers apart.

  Tables (:func:`param_labels`): CowClip on the update if ``cowclip``, then
  ``table_weight_decay`` times the row added, then ``table_name`` (or ``name``)
  at ``table_learning_rate`` (or ``learning_rate``), with the same schedule.
  Dense layers: ``name`` at ``learning_rate`` with ``weight_decay``.

  Example:
    >>> import jax.numpy as jnp
    >>> from dpmega.train import config as config_lib
    >>> cfg = config_lib.OptimizerConfig(name=config_lib.Optimizer.SGD, learning_rate=1.0, table_name="sgd",
    ...                                  table_learning_rate=0.1)
    >>> params = {"embed": {"embedding": jnp.ones(1)}, "mlp": {"kernel": jnp.ones(1)}}
    >>> tx = make_update_rule(cfg, num_steps=10)
    >>> u, _ = tx.update(params, tx.init(params), params, noise_std=0.0)
    >>> round(float(u["embed"]["embedding"][0]), 6), float(u["mlp"]["kernel"][0])
    (-0.1, -1.0)
  """
  dense = _one(cfg.name, make_learning_rate(cfg, num_steps), cfg, cfg.weight_decay)
  if not is_grouped(cfg):
    return optax.with_extra_args_support(dense)
  name = cfg.name if cfg.table_name == "same" else config_lib.Optimizer(cfg.table_name)
  table_lr = make_learning_rate(cfg, num_steps, cfg.table_learning_rate)
  decoupled = name in (config_lib.Optimizer.ADAMW, config_lib.Optimizer.LAMB)
  tables = _one(name, table_lr, cfg, cfg.table_weight_decay if decoupled else 0.0)
  if cfg.table_weight_decay and not decoupled:
    tables = optax.chain(optax.add_decayed_weights(cfg.table_weight_decay), tables)
  if cfg.cowclip:
    tables = optax.chain(cowclip_lib.cowclip(cfg.cowclip_ratio, cfg.cowclip_min_norm), tables)
  return optax.multi_transform({TABLES: tables, DENSE: dense}, param_labels)


def scale_for_batch(cfg: config_lib.OptimizerConfig, factor: float) -> config_lib.OptimizerConfig:
  """CowClip's rules for a batch ``factor`` times larger (Zheng et al. 2022, Section 4.2): the tables keep
  their learning rate, their L2 term grows ``factor`` times; the dense layers' learning rate grows
  ``sqrt(factor)`` times (square-root scaling, for adaptive optimizers; with plain SGD use linear scaling).

  Example:
    >>> from dpmega.train import config as config_lib
    >>> cfg = config_lib.OptimizerConfig(learning_rate=1e-3, table_weight_decay=1e-5)
    >>> s = scale_for_batch(cfg, 4.0)
    >>> s.learning_rate, s.table_learning_rate, s.table_weight_decay
    (0.002, 0.001, 4e-05)
  """
  if not factor > 0:
    raise ValueError(f"factor must be > 0, got {factor=}.")
  table_lr = cfg.learning_rate if cfg.table_learning_rate is None else cfg.table_learning_rate
  return dataclasses.replace(cfg, learning_rate=cfg.learning_rate * math.sqrt(factor), table_learning_rate=table_lr,
                             table_weight_decay=cfg.table_weight_decay * factor)


# Adam-type optimizers whose second moment is an EMA of the squared noisy gradient (adam_bc subtracts the noise).
_SECOND_MOMENT = (config_lib.Optimizer.ADAM, config_lib.Optimizer.ADAMW, config_lib.Optimizer.LAMB)
# Above this stale-noise ratio the plan prints a note (the late steps' noise-only coordinates move >= 1.4x less).
STALE_NOISE_NOTE = 2.0


def stale_noise_ratio(b2: float, batch_sizes: Any) -> float:
  """How much noise Adam's second moment still holds at the last step of a batch schedule, over the last batch's.

  The noise on the mean gradient has std ``sigma C / B_t``; Adam's bias-corrected second moment averages its
  variance with weights ``w_s = (1 - b2) b2^(T - s) / (1 - b2^T)``. The ratio is ``sum_s w_s B_T^2 / B_s^2``:
  1 for a constant batch, and for an increasing one the factor by which the small early batches' noise inflates
  the denominator squared, so that coordinates the noise dominates move ``sqrt(ratio)`` times less than at a
  constant batch (tiny BERT, ``bench/RESULTS.md``, issue 20: a ramp 1,024 -> 8,192 is at 9.8 with b2 = 0.999 and
  1.65 with b2 = 0.95, which trains it to +0.01 MLM accuracy).

  Example:
    >>> round(stale_noise_ratio(0.999, [1024] * 100), 6)
    1.0
    >>> round(stale_noise_ratio(0.999, [1024, 2048]), 2)  # the first step's noise is 4x the variance, half the weight
    2.5
  """
  sizes = np.asarray(batch_sizes, np.float64)
  t = len(sizes)
  if not t:
    return 1.0
  weights = (1.0 - b2) * b2 ** np.arange(t - 1, -1, -1) / (1.0 - b2 ** t)
  return float(np.sum(weights * (sizes[-1] / sizes) ** 2))


def schedule_note(cfg: config_lib.OptimizerConfig, batch_sizes: Any) -> str | None:
  """A line for the plan when an increasing batch schedule meets Adam's long memory (:func:`stale_noise_ratio`
  above :data:`STALE_NOISE_NOTE`), with the largest common b2 that brings it under (or, if none does, DP-AdamBC
  and its floor); None otherwise.

  DP-AdamBC is not the first advice: on the CTR demo (``bench/RESULTS.md``) it reached AUC 0.853 at its best floor
  and rate against 0.866 for Adam at b2 = 0.8, and 0.57 at the default floor.
  """
  if cfg.name not in _SECOND_MOMENT:
    return None
  ratio = stale_noise_ratio(cfg.b2, batch_sizes)
  if ratio <= STALE_NOISE_NOTE:
    return None
  shorter = ((b, stale_noise_ratio(b, batch_sizes)) for b in (0.99, 0.98, 0.95, 0.9, 0.8) if b < cfg.b2)
  better = next(((b, r) for b, r in shorter if r <= STALE_NOISE_NOTE), None)
  fix = (f"optimizer.b2 = {better[0]:g} (ratio {better[1]:.3g})" if better else
         "a smaller optimizer.b2, or optimizer.name = adam_bc (it subtracts each step's noise) with "
         "optimizer.adam_bc_floor near (sigma C / B)^2 (dpmega.train.dp_adam)")
  return (f"note: at the last step {cfg.name.value}'s second moment (b2 = {cfg.b2:g}) still holds {ratio:.3g}x the "
          "noise variance of the last batch, from the schedule's smaller early batches, so the late steps are up "
          f"to {ratio ** 0.5:.2g}x smaller than at a constant batch; for an increasing schedule use {fix}")
