"""Training configs: the trainer's fields, each declared once; config files, overrides, validation.

Each trainer field is declared once, as a field of :class:`TrainConfig` (or of
its groups :class:`OptimizerConfig` and :class:`MeshSettings`) that carries
what a config file writes by default, the allowed range or choices and the help
text (:mod:`dpmega.train.fields`). From those declarations :func:`base_config`
builds the ``ml_collections.ConfigDict`` that config files start from,
:func:`validate` checks a ConfigDict and returns the frozen, typed
:class:`TrainConfig` (enums for choices, a schedule object), and
:func:`describe_fields` prints the table of fields. Every error is a
:class:`UsageError` naming the field's dotted path and its allowed range,
raised before any compute.

A run is described by a Python file under ``configs/`` whose ``get_config()``
returns :func:`base_config` plus the task's own fields under ``task``;
:func:`load_config` runs it and :func:`apply_overrides` applies
``field.sub=value`` strings from the command line.

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
import difflib
import enum
import importlib.util
import math
import os
from typing import Any, Mapping, Sequence

import ml_collections

from dpmega import schedules
from dpmega import validation
from dpmega.accounting import accountants
from dpmega.accounting.accountants import AccountantType
from dpmega.errors import UsageError
from dpmega.sampling import SamplingScheme
from dpmega.train import fields
from dpmega.train.sparse_tables import SparseSettings


class Optimizer(enum.Enum):
  SGD = "sgd"
  MOMENTUM = "momentum"
  ADAM = "adam"
  ADAMW = "adamw"
  LAMB = "lamb"
  ADAGRAD = "adagrad"
  ADAM_BC = "adam_bc"  # DP-AdamBC: the noise variance subtracted from Adam's second moment (dpmega.train.dp_adam)


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


# Choices read from the modules that define them, imported only when a config is validated.
def _task_names() -> list[str]:
  from dpmega import tasks  # noqa: PLC0415 - keeps `import dpmega.train.config` light
  return list(tasks.task_names())


def _clip_groups(spec: str) -> tuple:
  from dpmega.clipping import rules  # noqa: PLC0415 - keeps `import dpmega.train.config` light
  return rules.parse_clip_groups(spec)


def _clipping_modes() -> list[str]:
  from dpmega import clipping  # noqa: PLC0415 - keeps `import dpmega.train.config` light
  return list(clipping.clipping_modes())


def _noise_samplers() -> list[str]:
  from dpmega import noise  # noqa: PLC0415 - keeps `import dpmega.train.config` light
  return [s.value for s in noise.NoiseSampler]


def _table_optimizers() -> list[str]:
  return ["same"] + [o.value for o in Optimizer]


def _accountants() -> list[str]:
  return [a.value for a in AccountantType]


# ---------------------------------------------------------------------------------------------- the fields
@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Which optax optimizer and learning-rate schedule (:func:`dpmega.train.optim.make_optimizer`); ``optimizer.*``."""

  name: Optimizer = fields.choice("adam", Optimizer, doc="the optax optimizer")
  learning_rate: float = fields.positive(1e-3, doc="peak learning rate (after the warmup)")
  schedule: LrSchedule = fields.choice("constant", LrSchedule, doc="decay after the warmup (optax)")
  warmup_steps: int = fields.integer(0, 0, "num_steps", doc="steps of linear warmup from 0")
  final_lr_fraction: float = fields.real(0.0, 0.0, 1.0, doc="final / peak learning rate (cosine, linear, exponential)")
  momentum: float = fields.real(0.9, 0.0, 1.0, hi_open=True, doc="momentum of 'momentum'")
  nesterov: bool = fields.flag(False, doc="Nesterov momentum for 'momentum'")
  b1: float = fields.real(0.9, 0.0, 1.0, hi_open=True, doc="first-moment decay (adam, adamw, lamb)")
  b2: float = fields.real(0.999, 0.0, 1.0, hi_open=True, doc="second-moment decay (adam, adamw, lamb)")
  eps: float = fields.real(1e-8, 0.0, math.inf, hi_open=True, doc="epsilon of adam, adamw, lamb")
  weight_decay: float = fields.real(0.0, 0.0, math.inf, hi_open=True, doc="weight decay (sgd, momentum: added to "
                                    "the gradient; adamw, lamb: decoupled); must be 0 for adam")
  adam_bc_floor: float = fields.positive(1e-8, doc="adam_bc: floor of the noise-corrected second moment (choose "
                                         "near (sigma C / B)^2 or above: dpmega.train.dp_adam)")
  table_name: str = fields.choice("same", _table_optimizers, doc="optimizer of the embedding tables (leaves named "
                                  "'embedding'); same: the one of name, for every parameter")
  table_learning_rate: float | None = fields.positive(None, optional=True, doc="peak learning rate of the tables; "
                                                      "None: learning_rate")
  table_weight_decay: float = fields.real(0.0, 0.0, math.inf, hi_open=True, doc="L2 term of the tables, added to "
                                          "their gradient (CowClip scales it with the batch)")
  cowclip: bool = fields.flag(False, doc="clip each table row's update to max(cowclip_ratio ||row||, "
                              "cowclip_min_norm), after the noise (dpmega.train.cowclip)")
  cowclip_ratio: float = fields.real(1.0, 0.0, math.inf, hi_open=True, doc="CowClip's r (relative to the row norm)")
  cowclip_min_norm: float = fields.positive(1e-5, doc="CowClip's zeta (bound of rows of small norm)")
  ema_decay: float = fields.real(0.0, 0.0, 1.0, hi_open=True, doc="decay of an exponential moving average of the "
                                 "parameters, evaluated and returned instead of the last iterate (post-processing: "
                                 "no privacy cost; dpmega.train.averaging); 0: off")


@dataclasses.dataclass(frozen=True)
class RecalibrationSettings:
  """Private Platt scaling after training (:mod:`dpmega.train.recalibration`); ``recalibration.*``."""

  steps: int = fields.integer(0, 0, 10**6, doc="DP-SGD steps on (temperature, bias) after the last training step, "
                              "accounted like training steps at the final batch size (binary tasks); 0: off")
  clip_norm: float = fields.positive(10.0, doc="L2 bound of each example's gradient in (temperature, bias)")
  learning_rate: float = fields.positive(0.05, doc="Adam's rate on (temperature, bias), cosine-decayed to 0")


@dataclasses.dataclass(frozen=True)
class MeshSettings:
  """The device-mesh fields ``mesh.*`` (:mod:`dpmega.sharding`); :attr:`TrainConfig.mesh` is built from them."""

  enabled: bool = fields.flag(False, doc="run on a device mesh (off: one device)")
  data: int = fields.integer(0, 0, 2**20, doc="data-parallel axis size; 0: every device not used by fsdp "
                             "(microbatch_size is then per device)")
  fsdp: int = fields.integer(1, 1, 2**20, doc="parameter-sharding axis size")
  min_shard_size: int = fields.integer(2**18, 0, 2**62, doc="leaves with fewer elements stay replicated")


def _mesh(settings: MeshSettings) -> Any:
  """A :class:`dpmega.sharding.MeshConfig` from the checked ``mesh.*`` fields, or None (one device)."""
  if not settings.enabled:
    return None
  from dpmega import sharding  # noqa: PLC0415 - keeps `import dpmega.train.config` light
  return sharding.MeshConfig(data=settings.data or None, fsdp=settings.fsdp, min_shard_size=settings.min_shard_size)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """The validated trainer fields (the task's own fields stay in the ConfigDict).

  Each field is declared once below: its default in a config file, its allowed values and its help
  (:func:`describe_fields` prints them). Build one with :func:`validate`. ``mesh`` is a
  :class:`dpmega.sharding.MeshConfig`, or None for one device.
  """

  task_name: str = fields.choice("", _task_names, key="task.name", doc="registered task "
                                 "(dpmega.tasks.task_names()); the task's own fields sit beside it under task")
  # Public: parameter initialization only (data-independent, so it may be known). The noise and the sampling
  # come from a secret drawn from the OS CSPRNG per run and kept in the checkpoints.
  init_seed: int = fields.integer(0, 0, 2**31 - 1, doc="public seed of the parameter initialization only")
  insecure_reproducible_seed: int | None = fields.integer(
      None, 0, 2**63 - 1, optional=True,
      doc="None: the noise and the sampling come from a fresh OS CSPRNG secret kept in the checkpoints. An int: "
      "that secret is derived from this PUBLIC seed, so anyone who knows it can subtract the noise: NOT a "
      "private release (printed and recorded); for tests and debugging only")
  workdir: str = fields.path("runs/default", doc="checkpoints, metrics.jsonl and summary.json go here")
  num_steps: int = fields.integer(100, 1, 10**9, doc="logical steps to run (the whole schedule is accounted)")
  epochs: float | None = fields.positive(None, optional=True, doc="passes over the data: when set, the run is "
                                        "the fewest steps whose expected batches add up to epochs * N "
                                        "(replaces num_steps; constant or step schedules)")
  batch_schedule: schedules.Schedule = fields.schedule(
      "constant:4096", doc="expected logical batch size per step: 'constant:4096', 'steps:1024@1,8192@51' "
      "(steps count from 1), "
      "'linear:1024->65536@100', 'geometric:1024->65536' (ramp over the whole run)")
  microbatch_size: int = fields.integer(256, 1, 2**20, doc="examples per vmapped micro-batch (bounds memory)")
  max_microbatches: int = fields.integer(8, 1, 2**16, doc="micro-batches per jitted call (scan length)")
  clipping: str = fields.choice("auto", _clipping_modes, doc="clipping mode (dpmega.clipping.clipped_grad_sum); "
                                "auto: ghost norms where a layer allows, sparse rows for lookups, vmap elsewhere")
  clip_norm: float = fields.positive(1.0, doc="L2 bound C of each example's gradient")
  clip_groups: tuple = fields.text(
      "", _clip_groups, syntax="'' or 'regex=share;regex=share'",
      doc="per-group clip budgets (Opacus' per-layer clipping): a parameter goes to the first group whose regex "
      "matches its path and is clipped to C*sqrt(share) on its own; shares sum to <= 1, so the sensitivity "
      "stays C; '': one budget C over all parameters")
  normalized_clipping: bool = fields.flag(False, doc="normalized ('automatic') clipping, Bu et al. 2022: every "
                                          "example's gradient g becomes C*g/(||g|| + clip_stability*C) instead "
                                          "of min(1, C/||g||)*g (sensitivity still C)")
  clip_stability: float = fields.positive(0.01, doc="gamma of normalized clipping, relative to C")
  noise_multiplier: float | None = fields.positive(None, optional=True, doc="sigma; None: calibrate to "
                                                   "target_epsilon")
  target_epsilon: float | None = fields.positive(None, optional=True, doc="the privacy budget; None: no cap")
  delta: float = fields.real(1e-6, 0.0, 1.0, lo_open=True, hi_open=True, doc="delta of (epsilon, delta)-DP")
  accountant: str = fields.choice("rdp", _accountants, doc="accountant of epsilon")
  sampling: SamplingScheme = fields.choice("poisson", SamplingScheme, doc="Poisson (add/remove-one neighbours) "
                                           "or fixed-size without replacement (replace-one)")
  noise_sampler: str = fields.choice("wide_tail", _noise_samplers, doc="Gaussian sampler (dpmega.noise."
                                     "NoiseSampler); its support's truncation term delta_tail is added to the "
                                     "reported delta; jax_bounded (jax.random.normal bit for bit) has a delta floor")
  metrics: MetricsMode = fields.choice("raw", MetricsMode, doc="raw: logs carry raw statistics of the private "
                                       "batch (operator only, NOT releasable); private: only privatized "
                                       "quantities (docs/privacy.md)")
  clipped_count_noise: float | None = fields.positive(
      None, optional=True, doc="private metrics: std of the Gaussian added to the count of clipped examples "
      "(sensitivity 1, accounted in the ledger); None: no clip fraction logged")
  adaptive_clip: bool = fields.flag(False, doc="adaptive clip norm (Andrew et al. 2021, dpmega.train.adaptive_clip): "
                                    "clip_norm is the initial C, moved each step toward adaptive_clip_quantile of "
                                    "the norms from the noisy clipped count (needs clipped_count_noise)")
  adaptive_clip_quantile: float = fields.real(0.5, 0.0, 1.0, lo_open=True, hi_open=True,
                                              doc="adaptive clipping: target fraction of unclipped examples")
  adaptive_clip_lr: float = fields.positive(0.2, doc="adaptive clipping: eta_C of C <- C exp(-eta_C (b - gamma))")
  optimizer: OptimizerConfig = fields.group(OptimizerConfig, doc="optimizer and learning-rate schedule")
  mesh: Any = fields.group(MeshSettings, build=_mesh, doc="device mesh")
  sparse: SparseSettings = fields.group(SparseSettings, doc="sparsity-preserving updates of embedding tables "
                                        "(dpmega.train.sparse_tables)")
  recalibration: RecalibrationSettings = fields.group(RecalibrationSettings, doc="private recalibration of a "
                                                     "binary classifier's probabilities")
  log_every: int = fields.integer(1, 0, 10**9, doc="steps between progress lines (0: only at the end)")
  eval_every: int = fields.integer(0, 0, 10**9, doc="steps between evaluations (0: only at the end)")
  checkpoint_every: int = fields.integer(0, 0, 10**9, doc="steps between checkpoints (0: only at the end)")
  keep_checkpoints: int = fields.integer(3, 2, 10**6, doc="checkpoints kept (>= 2, so a good one survives a "
                                         "bad one)")
  tensorboard: bool = fields.flag(True, doc="also write TensorBoard summaries when a writer is installed")
  simulate_k: int = fields.integer(0, 0, 2**20, doc="0: a private run. k > 0: the effective-noise SIMULATION "
                                   "(dpmega.train.simulation), NOT private: batch B/k and noise sigma/k predict "
                                   "the utility of batch B, sigma; no ledger, no epsilon; needs noise_multiplier, "
                                   "refuses target_epsilon")


def base_config() -> ml_collections.ConfigDict:
  """Every trainer field with its default; config files start from this."""
  return fields.config_dict(TrainConfig)


def describe_fields() -> str:
  """One line per trainer field: ``key = default  allowed  help``.

  >>> print(describe_fields().splitlines()[4])
  num_steps = 100  [1, 1000000000]  logical steps to run (the whole schedule is accounted)
  """
  return fields.describe(TrainConfig)


# ---------------------------------------------------------------------------------------------- validation
def _check_together(v: Mapping[str, Any]) -> None:
  """The rules that tie fields together."""
  from dpmega.train import simulation  # noqa: PLC0415 - simulation imports this module
  from dpmega.train import sparse_tables  # noqa: PLC0415
  simulation.check_config(v)
  sparse_tables.check_config(v)
  if v["noise_multiplier"] is None and v["target_epsilon"] is None:
    raise UsageError("set noise_multiplier (fixed sigma) or target_epsilon (calibrate sigma to a budget), "
                     "or both (fixed sigma, stop at the budget); got neither.")
  # The batches are not known before the dataset is: refuses PLD with without-replacement sampling at any size.
  accountants.check_supported(v["sampling"], v["accountant"])
  o = v["optimizer"]
  if o.schedule == LrSchedule.EXPONENTIAL and o.final_lr_fraction == 0:
    raise UsageError("optimizer.final_lr_fraction must be in (0, 1] for the exponential schedule, got 0.0.")
  if o.weight_decay and (o.name == Optimizer.ADAM or o.table_name == Optimizer.ADAM.value):
    raise UsageError("optimizer.weight_decay must be 0 for adam (use adamw for decoupled weight decay), "
                     f"got {o.weight_decay}.")
  if v["recalibration"].steps and v["simulate_k"]:
    raise UsageError(f"recalibration.steps must be 0 in an effective-noise simulation (simulate_k = "
                     f"{v['simulate_k']}: no ledger to account them in), got {v['recalibration'].steps}.")
  if v["adaptive_clip"] and v["clipped_count_noise"] is None:
    raise UsageError("adaptive_clip needs clipped_count_noise (the noisy clipped count it adapts from, accounted "
                     "in the ledger), got clipped_count_noise=None.")
  if v["clipped_count_noise"] is not None and v["metrics"] is not MetricsMode.PRIVATE:
    raise UsageError("clipped_count_noise must be None unless metrics='private' (raw mode logs the exact "
                     f"clipped fraction), got {v['clipped_count_noise']!r} with metrics={v['metrics'].value!r}.")


def validate(config: ml_collections.ConfigDict) -> TrainConfig:
  """Checks every trainer field; returns the frozen :class:`TrainConfig`.

  Raises:
    UsageError: naming the first bad field (its dotted path), its allowed range and the value.
  """
  base = base_config()
  missing = [k for k in base.keys() if k not in config]
  if missing:
    raise UsageError(f"config is missing field(s) {missing}; start config files from "
                     "dpmega.train.config.base_config().")
  for group in ("optimizer", "mesh", "sparse", "recalibration"):
    missing = [k for k in base[group].keys() if not isinstance(config[group], ml_collections.ConfigDict)
               or k not in config[group]]
    if missing:
      raise UsageError(f"config.{group} is missing field(s) {missing}.")
  if "seed" in config:
    raise UsageError("seed is no longer a field: the noise and the sampling come from a secret drawn per run from "
                     "the OS CSPRNG. Use init_seed for the (public) parameter initialization, and "
                     "insecure_reproducible_seed only for a reproducible, non-private run; "
                     f"got seed={config.seed!r}.")
  warmup = config.optimizer.get("warmup_steps")
  if config.get("epochs") is not None and warmup is not None:
    # With epochs the run's length is known only with the dataset: the warmup is checked against it then
    # (validate_against_dataset), not against num_steps, which epochs replaces.
    config = config.copy_and_resolve_references()
    config.optimizer.warmup_steps = 0
  values = fields.checked(TrainConfig, config)
  _check_together(values)
  if config.get("epochs") is not None and warmup is not None:
    values["optimizer"] = dataclasses.replace(
        values["optimizer"], warmup_steps=validation.check_int("optimizer.warmup_steps", warmup, 0, error=UsageError))
  return TrainConfig(**values)


def validate_against_dataset(cfg: TrainConfig, dataset_size: int) -> None:
  """Every scheduled batch size must be in ``[1, dataset_size]`` (q_t <= 1), and the warmup no longer than the
  steps that will run (``num_steps``, or what ``epochs`` works out); checked before compute."""
  if cfg.optimizer.warmup_steps > cfg.num_steps:
    how = f" (the steps epochs = {cfg.epochs:g} works out)" if cfg.epochs is not None else ""
    raise UsageError(f"optimizer.warmup_steps must be in [0, {cfg.num_steps}]{how}, got {cfg.optimizer.warmup_steps}.")
  sizes = cfg.batch_schedule.batch_sizes(cfg.num_steps)
  bad = sizes[sizes > dataset_size]
  if bad.size:
    step = int((sizes > dataset_size).argmax())
    raise UsageError(
        f"batch_schedule must stay within the dataset size {dataset_size:,} (sampling probability <= 1), "
        f"got batch size {int(bad[0]):,} at step {step}.")


# ---------------------------------------------------------------------------------------------- config files
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
  check_known_fields(config, where=f"--config file {path!r}")
  return config


def _unknown(node: ml_collections.ConfigDict, reference: ml_collections.ConfigDict, prefix: str) -> list[tuple]:
  """``(dotted field, known fields there)`` for every key of ``node`` that ``reference`` lacks (recursively)."""
  out = []
  for key in node.keys():
    if key not in reference:
      out.append((prefix + key, sorted(reference.keys())))
    elif isinstance(node[key], ml_collections.ConfigDict) and isinstance(reference[key], ml_collections.ConfigDict):
      out += _unknown(node[key], reference[key], f"{prefix}{key}.")
  return out


def check_known_fields(config: ml_collections.ConfigDict, *, where: str = "config") -> None:
  """Refuses a field that neither the trainer nor the config's task declares (a typo would fall back to a default).

  The task's fields are those of its ``default_task_config()`` (:func:`dpmega.tasks.default_task_config`); a task
  that declares none is not checked.

  Raises:
    UsageError: naming the first unknown field, with the closest known name (difflib) when there is one.
  """
  reference = base_config()
  task = config.get("task")
  if isinstance(task, ml_collections.ConfigDict) and isinstance(task.get("name"), str):
    from dpmega import tasks  # noqa: PLC0415 - the task modules (JAX, Flax) load only when a file is checked

    task_reference = tasks.default_task_config(task.name)
    reference.task = task_reference if task_reference is not None else task
  for field, known in _unknown(config, reference, ""):
    leaf = field.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f"; did you mean {field[:len(field) - len(leaf)] + close[0]!r}?" if close else f"; fields there: {known}."
    raise UsageError(f"{where} sets an unknown config field {field!r}{hint}")


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
      close = difflib.get_close_matches(leaf, known, n=1)
      hint = (f"did you mean {'.'.join(parents + close)!r}?" if close else f"fields there: {known}.")
      raise UsageError(f"--set names an unknown config field {key!r}; {hint}")
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

