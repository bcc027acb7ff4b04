"""Training configs: Python files returning a ``ConfigDict``, overrides, validation.

A run is described by a Python file under ``configs/`` whose ``get_config()``
returns an ``ml_collections.ConfigDict`` built on :func:`base_config` (every
trainer field, with its default) plus the task's own fields under ``task``.
:func:`apply_overrides` applies ``field.sub=value`` strings from the command
line; :func:`validate` checks every trainer field and returns a frozen
:class:`TrainConfig` (enums for choices), raising :class:`UsageError` that
names the field and its allowed range -- before any compute.

Budget fields (exactly what :mod:`dpmega.train` does with them):

====================================  ==========================================
``noise_multiplier`` / ``target_epsilon``  behaviour
====================================  ==========================================
unset / set                           calibrate sigma for the whole schedule so
                                      that epsilon <= target; never exceeded
set / unset                           fixed sigma; epsilon reported as it goes
set / set                             fixed sigma; training stops before the
                                      step that would exceed the target
unset / unset                         ``UsageError`` (no privacy specified)
====================================  ==========================================
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import importlib.util
import math
import numbers
import os
from typing import Any, Sequence

import ml_collections
from ml_collections import config_dict

from dpmega import schedules
from dpmega.accounting import AccountantType
from dpmega.accounting import SamplingScheme
from dpmega.errors import UsageError


class Optimizer(enum.Enum):
  SGD = "sgd"
  MOMENTUM = "momentum"
  ADAM = "adam"
  ADAMW = "adamw"
  LAMB = "lamb"


class MetricsMode(enum.Enum):
  """What the per-step logs may carry (docs/privacy.md, "What is released")."""

  RAW = "raw"  # raw statistics of the private batch: for the operator, never for release
  PRIVATE = "private"  # only privatized quantities: noisy gradient norm, update norm, noisy clip fraction, epsilon


class LrSchedule(enum.Enum):
  """Learning-rate decay after the (optional) linear warmup, from optax."""

  CONSTANT = "constant"
  COSINE = "cosine"
  LINEAR = "linear"
  EXPONENTIAL = "exponential"


def base_config() -> ml_collections.ConfigDict:
  """Every trainer field with its default; config files start from this."""
  c = ml_collections.ConfigDict()
  c.task = ml_collections.ConfigDict({"name": ""})
  # Public: parameter initialization only (data-independent, so it may be known). The noise and the
  # sampling come from a secret drawn from the OS CSPRNG per run and kept in the checkpoints.
  c.init_seed = 0
  # Debugging / tests only: derive that secret from this PUBLIC int, making the noise reproducible by
  # anyone who knows it -- the run is then NOT a private release (printed and recorded).
  c.insecure_reproducible_seed = config_dict.placeholder(int)
  c.workdir = "runs/default"
  c.num_steps = 100
  # dpmega.schedules syntax: "constant:4096", "steps:1024@0,8192@50",
  # "linear:1024->65536@100", "geometric:1024->65536" (ramp over the whole run).
  c.batch_schedule = "constant:4096"
  c.microbatch_size = 256
  c.max_microbatches = 8
  c.clipping = "auto"  # exact: ghost norms where a layer allows, sparse rows for lookups, vmap elsewhere
  c.clip_norm = 1.0
  c.noise_multiplier = config_dict.placeholder(float)
  c.target_epsilon = config_dict.placeholder(float)
  c.delta = 1e-6
  c.accountant = "rdp"
  c.sampling = "poisson"
  # The Gaussian sampler (dpmega.noise.NoiseSampler); its bounded support costs delta_tail, which is
  # added to the reported delta. "jax_bounded" (jax.random.normal bit for bit) has a delta floor.
  c.noise_sampler = "wide_tail"
  # "raw": metrics.jsonl / TensorBoard / progress lines carry raw statistics of the private batch (loss,
  # clipped fraction, realized batch size...): for the operator only, NOT releasable. "private": only
  # privatized quantities (docs/privacy.md). clipped_count_noise (private mode): std of the Gaussian added
  # to the count of clipped examples (sensitivity 1), accounted in the ledger; None logs no clip fraction.
  c.metrics = "raw"
  c.clipped_count_noise = config_dict.placeholder(float)
  c.optimizer = ml_collections.ConfigDict({
      "name": "adam",
      "learning_rate": 1e-3,
      "schedule": "constant",
      "warmup_steps": 0,
      "final_lr_fraction": 0.0,
      "momentum": 0.9,
      "nesterov": False,
      "b1": 0.9,
      "b2": 0.999,
      "eps": 1e-8,
      "weight_decay": 0.0,
  })
  # Device mesh (dpmega.sharding). Off: one device. data = 0: every device not used by fsdp;
  # microbatch_size is then per device.
  c.mesh = ml_collections.ConfigDict({"enabled": False, "data": 0, "fsdp": 1, "min_shard_size": 2**18})
  c.log_every = 1
  c.eval_every = 0
  c.checkpoint_every = 0
  c.keep_checkpoints = 3
  c.tensorboard = True
  return c


def load_config(path: str) -> ml_collections.ConfigDict:
  """Runs ``path`` (a Python file) and returns its ``get_config()``.

  ``path:ARG`` passes ``ARG`` to ``get_config(ARG)``, as ml_collections' config flags do.
  """
  arg = None
  if not os.path.exists(path) and ":" in path:
    path, arg = path.rsplit(":", 1)
  if not os.path.isfile(path):
    raise UsageError(f"--config must be an existing Python file, got {path!r}.")
  spec = importlib.util.spec_from_file_location("_dpmega_config", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise UsageError(f"--config file {path!r} must define get_config().")
    config = module.get_config() if arg is None else module.get_config(arg)
  except UsageError:
    raise
  except Exception as e:  # noqa: BLE001 - a broken config file is bad input: one line, exit 2
    raise UsageError(f"--config file {path!r} failed to load{_where(e, path)}: {type(e).__name__}: {e}") from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UsageError(f"get_config() in {path!r} must return an ml_collections.ConfigDict, "
                     f"got {type(config).__name__}.")
  return config


def _where(e: BaseException, path: str) -> str:
  """`` at line N`` of the config file where ``e`` was raised (or a SyntaxError points), if known."""
  if isinstance(e, SyntaxError) and e.lineno:
    return f" at line {e.lineno}"
  tb = e.__traceback__
  line = None
  while tb is not None:
    if os.path.abspath(tb.tb_frame.f_code.co_filename) == os.path.abspath(path):
      line = tb.tb_lineno
    tb = tb.tb_next
  return f" at line {line}" if line else ""


def _parse_value(text: str) -> Any:
  if text.strip().lower() in ("none", "null"):
    return None
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text
  return list(value) if isinstance(value, list) else value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Applies ``"a.b=value"`` strings in order (values parsed as Python literals, else strings).

  Raises:
    UsageError: an override without ``=``, an unknown field, or a value of the wrong type.
  """
  for item in overrides:
    key, eq, text = item.partition("=")
    key = key.strip()
    if not eq or not key:
      raise UsageError(f"--set must look like field=value (e.g. optimizer.learning_rate=0.01), got {item!r}.")
    *parents, leaf = key.split(".")
    node = config
    for i, part in enumerate(parents):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise UsageError(f"--set names an unknown config field {'.'.join(parents[:i + 1])!r}.")
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
      known = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
      raise UsageError(f"--set names an unknown config field {key!r}; fields there: {known}.")
    value = _parse_value(text)
    if isinstance(node[leaf], tuple) and isinstance(value, (list, tuple)):
      value = tuple(value)
    elif isinstance(node[leaf], str) and not isinstance(value, str) and value is not None:
      value = text.strip()
    try:
      node[leaf] = value
    except (TypeError, ValueError, OverflowError) as e:
      raise UsageError(f"--set {key}: {value!r} does not fit the field's type "
                       f"{type(node[leaf]).__name__} ({e}).") from None
  return config


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Which optax optimizer and learning-rate schedule (see :func:`dpmega.train.make_optimizer`)."""

  name: Optimizer
  learning_rate: float
  schedule: LrSchedule = LrSchedule.CONSTANT
  warmup_steps: int = 0
  final_lr_fraction: float = 0.0
  momentum: float = 0.9
  nesterov: bool = False
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The validated trainer fields (the task's own fields stay in the ConfigDict).

  Attributes:
    task_name: registered task name (:func:`dpmega.tasks.task_names`).
    init_seed: public seed of the parameter initialization only (data-independent).
    insecure_reproducible_seed: None (default): the noise and the sampling
      come from a fresh secret from the OS CSPRNG, kept in the checkpoints.
      An int: that secret is derived from this public seed, so anyone who knows
      it can regenerate and subtract the noise -- NOT a private release; for
      reproducible tests and debugging only.
    workdir: where checkpoints, ``metrics.jsonl`` and ``summary.json`` go.
    num_steps: logical steps to run (the whole schedule that is accounted).
    batch_schedule: expected logical batch size per step.
    microbatch_size: examples per vmapped micro-batch (bounds memory).
    max_microbatches: micro-batches per jitted call (scan length).
    clipping: clipping mode passed to :func:`dpmega.clipping.clipped_grad_sum`.
    clip_norm: L2 bound C per example.
    noise_multiplier: sigma, or None to calibrate it to ``target_epsilon``.
    target_epsilon: the privacy budget, or None for no cap.
    delta: the delta of (epsilon, delta)-DP.
    accountant: "rdp" or "pld".
    sampling: Poisson or sampling without replacement (fixed size).
    optimizer: optimizer and learning-rate schedule.
    noise_sampler: the Gaussian sampler (:class:`dpmega.noise.NoiseSampler` value); its support's
      truncation term ``delta_tail`` is part of the reported delta.
    metrics: :class:`MetricsMode`: "raw" (operator-only statistics of the private batch) or "private"
      (only privatized quantities are logged).
    clipped_count_noise: in private mode, the std ``sigma_b`` of the Gaussian added to the number of
      clipped examples (sensitivity 1); the step is then accounted at ``(sigma^-2 + sigma_b^-2)^(-1/2)``.
      None: no clip-fraction estimate.
    log_every, eval_every, checkpoint_every: intervals in steps (0: only at the end).
    keep_checkpoints: how many checkpoints to keep (>= 2 so a good one survives a bad one).
    tensorboard: also write TensorBoard summaries when a writer is installed.
    mesh: a :class:`dpmega.sharding.MeshConfig`, or None for one device.
  """

  task_name: str
  init_seed: int
  insecure_reproducible_seed: int | None
  workdir: str
  num_steps: int
  batch_schedule: schedules.Schedule
  microbatch_size: int
  max_microbatches: int
  clipping: str
  clip_norm: float
  noise_multiplier: float | None
  target_epsilon: float | None
  delta: float
  accountant: str
  sampling: SamplingScheme
  optimizer: OptimizerConfig
  log_every: int = 1
  eval_every: int = 0
  checkpoint_every: int = 0
  keep_checkpoints: int = 3
  tensorboard: bool = True
  mesh: Any = None
  noise_sampler: str = "wide_tail"
  metrics: MetricsMode = MetricsMode.RAW
  clipped_count_noise: float | None = None


def _int(c, name: str, lo: int, hi: float = math.inf) -> int:
  value = c[name.rsplit(".", 1)[-1]]
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
    raise UsageError(f"{name} must be an int in [{lo}, {hi}], got {value!r}.")
  return int(value)


def _float(c, name: str, lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False,
           optional: bool = False) -> float | None:
  value = c[name.rsplit(".", 1)[-1]]
  if value is None and optional:
    return None
  ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
  if ok:
    value = float(value)
    ok = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
  if not ok:
    rng = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    raise UsageError(f"{name} must be a number in {rng}{' or None' if optional else ''}, got {value!r}.")
  return value


def _choice(c, name: str, enum_cls=None, choices=None):
  value = c[name.rsplit(".", 1)[-1]]
  allowed = [e.value for e in enum_cls] if enum_cls else list(choices)
  if value not in allowed:
    raise UsageError(f"{name} must be one of {allowed}, got {value!r}.")
  return enum_cls(value) if enum_cls else value


def _bool(c, name: str) -> bool:
  value = c[name.rsplit(".", 1)[-1]]
  if not isinstance(value, bool):
    raise UsageError(f"{name} must be True or False, got {value!r}.")
  return value


def validate(config: ml_collections.ConfigDict) -> TrainConfig:
  """Checks every trainer field; returns the frozen :class:`TrainConfig`.

  Raises:
    UsageError: naming the first bad field, its allowed range and the value.
  """
  from dpmega import clipping as clipping_lib  # noqa: PLC0415 - keeps `import dpmega.train.config` light
  from dpmega import tasks as tasks_lib  # noqa: PLC0415

  base = base_config()
  missing = [k for k in base.keys() if k not in config]
  if missing:
    raise UsageError(f"config is missing field(s) {missing}; start config files from dpmega.train.config.base_config().")
  if "optimizer" in config:
    missing = [k for k in base.optimizer.keys() if k not in config.optimizer]
    if missing:
      raise UsageError(f"config.optimizer is missing field(s) {missing}.")
  task_name = config.task.get("name", "")
  if task_name not in tasks_lib.task_names():
    raise UsageError(f"task.name must be one of {list(tasks_lib.task_names())}, got {task_name!r}.")
  c = config
  if "seed" in c:
    raise UsageError("seed is no longer a field: the noise and the sampling come from a secret drawn per run from "
                     "the OS CSPRNG. Use init_seed for the (public) parameter initialization, and "
                     "insecure_reproducible_seed only for a reproducible, non-private run; "
                     f"got seed={c.seed!r}.")
  init_seed = _int(c, "init_seed", 0, 2**31 - 1)
  insecure_seed = c.insecure_reproducible_seed
  if insecure_seed is not None:
    insecure_seed = _int(c, "insecure_reproducible_seed", 0, 2**63 - 1)
  if not isinstance(c.workdir, str) or not c.workdir:
    raise UsageError(f"workdir must be a non-empty path, got {c.workdir!r}.")
  num_steps = _int(c, "num_steps", 1, 10**9)
  try:
    schedule = schedules.as_schedule(c.batch_schedule, num_steps=num_steps)
  except ValueError as e:
    raise UsageError(f"batch_schedule: {e}") from None
  microbatch_size = _int(c, "microbatch_size", 1, 2**20)
  max_microbatches = _int(c, "max_microbatches", 1, 2**16)
  clipping = _choice(c, "clipping", choices=clipping_lib.clipping_modes())
  clip_norm = _float(c, "clip_norm", 0.0, math.inf, lo_open=True, hi_open=True)
  noise_multiplier = _float(c, "noise_multiplier", 0.0, math.inf, lo_open=True, hi_open=True, optional=True)
  target_epsilon = _float(c, "target_epsilon", 0.0, math.inf, lo_open=True, hi_open=True, optional=True)
  if noise_multiplier is None and target_epsilon is None:
    raise UsageError("set noise_multiplier (fixed sigma) or target_epsilon (calibrate sigma to a budget), "
                     "or both (fixed sigma, stop at the budget); got neither.")
  delta = _float(c, "delta", 0.0, 1.0, lo_open=True, hi_open=True)
  accountant = _choice(c, "accountant", choices=[a.value for a in AccountantType])
  sampling = _choice(c, "sampling", SamplingScheme)
  if sampling == SamplingScheme.WITHOUT_REPLACEMENT and accountant == AccountantType.PLD.value:
    raise UsageError("accountant must be 'rdp' with sampling 'without_replacement' (dp-accounting's PLD "
                     "accountant cannot account for it), got 'pld'.")
  o = c.optimizer
  optimizer = OptimizerConfig(
      name=_choice(o, "optimizer.name", Optimizer),
      learning_rate=_float(o, "optimizer.learning_rate", 0.0, math.inf, lo_open=True, hi_open=True),
      schedule=_choice(o, "optimizer.schedule", LrSchedule),
      warmup_steps=_int(o, "optimizer.warmup_steps", 0, num_steps),
      final_lr_fraction=_float(o, "optimizer.final_lr_fraction", 0.0, 1.0),
      momentum=_float(o, "optimizer.momentum", 0.0, 1.0, hi_open=True),
      nesterov=_bool(o, "optimizer.nesterov"),
      b1=_float(o, "optimizer.b1", 0.0, 1.0, hi_open=True),
      b2=_float(o, "optimizer.b2", 0.0, 1.0, hi_open=True),
      eps=_float(o, "optimizer.eps", 0.0, math.inf, hi_open=True),
      weight_decay=_float(o, "optimizer.weight_decay", 0.0, math.inf, hi_open=True),
  )
  if optimizer.schedule == LrSchedule.EXPONENTIAL and optimizer.final_lr_fraction == 0:
    raise UsageError("optimizer.final_lr_fraction must be in (0, 1] for the exponential schedule, got 0.0.")
  if optimizer.weight_decay and optimizer.name == Optimizer.ADAM:
    raise UsageError("optimizer.weight_decay must be 0 for adam (use adamw for decoupled weight decay), "
                     f"got {optimizer.weight_decay}.")
  from dpmega import noise as noise_lib  # noqa: PLC0415 - keeps `import dpmega.train.config` light
  noise_sampler = _choice(c, "noise_sampler", noise_lib.NoiseSampler).value
  metrics = _choice(c, "metrics", MetricsMode)
  clipped_count_noise = _float(c, "clipped_count_noise", 0.0, math.inf, lo_open=True, hi_open=True, optional=True)
  if clipped_count_noise is not None and metrics is not MetricsMode.PRIVATE:
    raise UsageError("clipped_count_noise must be None unless metrics='private' (raw mode logs the exact "
                     f"clipped fraction), got {clipped_count_noise!r} with metrics={metrics.value!r}.")
  mesh = None
  if _bool(c.mesh, "mesh.enabled"):
    from dpmega import sharding  # noqa: PLC0415 - keeps `import dpmega.train.config` light
    mesh = sharding.MeshConfig(data=_int(c.mesh, "mesh.data", 0, 2**20) or None,
                               fsdp=_int(c.mesh, "mesh.fsdp", 1, 2**20),
                               min_shard_size=_int(c.mesh, "mesh.min_shard_size", 0, 2**62))
  return TrainConfig(
      task_name=task_name,
      init_seed=init_seed,
      insecure_reproducible_seed=insecure_seed,
      workdir=c.workdir,
      num_steps=num_steps,
      batch_schedule=schedule,
      microbatch_size=microbatch_size,
      max_microbatches=max_microbatches,
      clipping=clipping,
      clip_norm=clip_norm,
      noise_multiplier=noise_multiplier,
      target_epsilon=target_epsilon,
      delta=delta,
      accountant=accountant,
      sampling=sampling,
      optimizer=optimizer,
      log_every=_int(c, "log_every", 0, 10**9),
      eval_every=_int(c, "eval_every", 0, 10**9),
      checkpoint_every=_int(c, "checkpoint_every", 0, 10**9),
      keep_checkpoints=_int(c, "keep_checkpoints", 2, 10**6),
      tensorboard=_bool(c, "tensorboard"),
      mesh=mesh,
      noise_sampler=noise_sampler,
      metrics=metrics,
      clipped_count_noise=clipped_count_noise,
  )


def validate_against_dataset(cfg: TrainConfig, dataset_size: int) -> None:
  """Every scheduled batch size must be in ``[1, dataset_size]`` (q_t <= 1); checked before compute."""
  sizes = cfg.batch_schedule.batch_sizes(cfg.num_steps)
  bad = sizes[sizes > dataset_size]
  if bad.size:
    step = int((sizes > dataset_size).argmax())
    raise UsageError(
        f"batch_schedule must stay within the dataset size {dataset_size:,} (sampling probability <= 1), "
        f"got batch size {int(bad[0]):,} at step {step}.")
