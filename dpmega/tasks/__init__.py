"""What the trainer trains: a model, its per-example loss, its data, its evaluation.

A config names a task (``config.task.name``); :func:`build_task` imports the
module that knows how to build it and calls its ``build_task(config)``. Model
modules stay independent of the trainer; the trainer only sees :class:`Task`.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

import jax

from dpmega.data.sources import RandomAccessSource

PyTree = Any

# task name -> "module:function" that builds it from the whole config.
_BUILDERS: dict[str, str] = {
    "synthetic_ctr": "dpmega.tasks.builtin:build_task",
    "ctr_wide_deep": "dpmega.tasks.ctr:build_task",
    "ctr_deepfm": "dpmega.tasks.ctr:build_task",
    "ctr_dlrm": "dpmega.tasks.ctr:build_task",
    "bert_mlm": "dpmega.models.bert:build_task",
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
  """

  name: str
  init_params: Callable[[jax.Array], PyTree]
  loss_fn: Callable[..., Any]
  train_source: RandomAccessSource
  evaluate: Callable[[PyTree], dict[str, float]]
  has_aux: bool = False
  prepare_batch: Callable[[dict, jax.Array], dict] | None = None


def register_task(name: str, builder: str) -> None:
  """Registers ``"module:function"`` as the builder of task ``name``."""
  _BUILDERS[name] = builder


def task_names() -> tuple[str, ...]:
  return tuple(sorted(_BUILDERS))


def build_task(config: Any) -> Task:
  """Builds the task ``config.task.name`` from the whole config."""
  name = config.task.name
  if name not in _BUILDERS:
    raise ValueError(f"task.name must be one of {task_names()}, got {name!r}.")
  module_name, fn_name = _BUILDERS[name].split(":")
  return getattr(importlib.import_module(module_name), fn_name)(config)
