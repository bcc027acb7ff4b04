"""What the trainer trains: a model, its per-example loss, its data, its evaluation.

A config names a task (``config.task.name``); :func:`build_task` imports the
module that knows how to build it (the literal table ``_BUILDERS``) and calls
its ``build_task(config)``. The trainer only sees :class:`Task`.

One shape for every task module (``builtin``: ``synthetic_ctr``; ``ctr``:
``ctr_wide_deep``, ``ctr_deepfm``, ``ctr_dlrm``; ``bert``: ``bert_mlm``):
``default_task_config()`` gives every field of ``config.task`` with its
default, and ``build_task(config) -> Task`` validates them and joins a Flax
module of :mod:`dpmega.models` to the data of :mod:`dpmega.data`. Imports go
one way: ``data``, ``models`` <- ``tasks`` <- ``train``; the run's values
(steps, batch sizes, table sizes, learning rates) live in ``configs/``.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import jax

from dpmega import validation
from dpmega.data.sources import RandomAccessSource

PyTree = Any

# task name -> "module:function" that builds it from the whole config.
_BUILDERS: dict[str, str] = {
    "synthetic_ctr": "dpmega.tasks.builtin:build_task",
    "ctr_wide_deep": "dpmega.tasks.ctr:build_task",
    "ctr_deepfm": "dpmega.tasks.ctr:build_task",
    "ctr_dlrm": "dpmega.tasks.ctr:build_task",
    "bert_mlm": "dpmega.tasks.bert:build_task",
}


@dataclasses.dataclass(frozen=True)
class Task:
  """Everything model-specific the trainer needs.

  Attributes:
    name: the task's name (as in the config).
    init_params: ``key -> params`` (trainable parameters only).
    loss_fn: per-example loss ``(params, example) -> scalar`` (or ``(scalar, aux)``).
    train_source: the private training data, read at random by the sampler.
    evaluate: ``params -> {metric: float}`` computed exactly on an evaluation split.
    has_aux: whether ``loss_fn`` returns ``(loss, aux)``.
    prepare_batch: optional host-side ``(batch, key) -> batch`` applied to each
      micro-batch after sampling (e.g. dynamic masking for masked LM).
    predict_logits: for a binary classifier, ``(params, batch) -> logits [n]`` of a batch of examples (the
      private recalibration, :mod:`dpmega.train.recalibration`, needs it); None: not a binary classifier.
    label_key: the batch's field of 0/1 labels (with ``predict_logits``).

  A task with ``predict_logits`` takes ``evaluate(params, calibration=None)``: with
  ``{"temperature": a, "bias": b}`` it evaluates the predictions ``sigmoid(a z + b)``.
  """

  name: str
  init_params: Callable[[jax.Array], PyTree]
  loss_fn: Callable[..., Any]
  train_source: RandomAccessSource
  evaluate: Callable[[PyTree], dict[str, float]]
  has_aux: bool = False
  prepare_batch: Callable[[dict, jax.Array], dict] | None = None
  predict_logits: Callable[[PyTree, dict], jax.Array] | None = None
  label_key: str = "label"


def register_task(name: str, builder: str) -> None:
  """Registers ``"module:function"`` as the builder of task ``name``."""
  _BUILDERS[name] = builder


def task_names() -> tuple[str, ...]:
  return tuple(sorted(_BUILDERS))


def build_task(config: Any) -> Task:
  """Builds the task ``config.task.name`` from the whole config."""
  name = validation.check_choice("task.name", config.task.name, task_names())
  module_name, fn_name = _BUILDERS[name].split(":")
  return getattr(importlib.import_module(module_name), fn_name)(config)


def default_task_config(name: str) -> Any | None:
  """``config.task`` of task ``name`` with every field at its default (None: unknown task, or none declared).

  What a config file's ``task`` fields are checked against (:func:`dpmega.train.config.load_config`).
  """
  if name not in _BUILDERS:
    return None
  module = importlib.import_module(_BUILDERS[name].split(":")[0])
  fn = getattr(module, "default_task_config", None)
  if fn is None:
    return None
  try:
    return fn(name)
  except TypeError:  # a module with one task takes no name
    return fn()
