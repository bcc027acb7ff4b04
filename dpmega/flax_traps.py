"""The DP traps of Flax state, refused with a DP-specific error before any compute.

One job: look at what a private gradient is asked to differentiate (Linen params, a ``TrainState``, an NNX
model or ``nnx.State``) and at what a loss returns beside the loss, and say what would break privacy:

==================================================  ===========================================================
what                                                behaviour
==================================================  ===========================================================
a Linen ``TrainState`` as the differentiated arg    its ``params`` are differentiated; ``step``, ``opt_state``
                                                    stay as they are (never noised); grads shaped like params
``batch_stats`` (a Linen collection, or NNX         ``BatchStatisticsError``: statistics of a batch mix
``BatchStat`` leaves) in the differentiated tree    examples, are not clipped per example and get no noise
an NNX ``BatchNorm`` in train mode                  ``BatchStatisticsError`` (use GroupNorm / LayerNorm, or
                                                    ``use_running_average=True``: frozen statistics)
``batch_stats`` in ``aux`` (``mutable=[...]``)      ``BatchStatisticsError``: aux is per example and un-noised
NNX ``RngState`` or any int / bool leaf             ``ValueError`` naming the leaf (same rule in every mode)
==================================================  ===========================================================

Flax is imported only when a Flax object is met (``dpmega`` itself does not need it).
"""

from __future__ import annotations

from typing import Any, Callable

import jax

PyTree = Any

_FIX = ("replace BatchNorm by GroupNorm or LayerNorm, or freeze the statistics (Linen: pass batch_stats as a "
        "constant and apply with use_running_average=True; NNX: nnx.BatchNorm(..., use_running_average=True) or "
        "model.eval() on the norm layers)")


class BatchStatisticsError(ValueError):
  """Batch statistics would reach a private gradient or its outputs: they are neither clipped nor noised."""


def _path_names(path) -> list[str]:
  names = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        names.append(str(getattr(k, attr)))
        break
  return names


def is_train_state(x: Any) -> bool:
  """Whether ``x`` is a Flax ``TrainState`` (duck-typed: ``params``, ``step``, ``apply_gradients``)."""
  return all(hasattr(x, a) for a in ("params", "step", "apply_gradients", "replace"))


def differentiated_part(x: Any) -> tuple[PyTree, Callable[[PyTree], Any]]:
  """What to differentiate in ``x`` and how to put a value of it back.

  A ``TrainState`` gives ``(state.params, lambda p: state.replace(params=p))``: its int ``step`` and its
  optimizer state are never differentiated (nor noised). Anything else is differentiated whole.
  """
  if is_train_state(x):
    return x.params, lambda p: x.replace(params=p)
  return x, lambda p: p


def check_differentiated(tree: PyTree, name: str = "params") -> None:
  """Refuses batch statistics and RNG state in a tree about to be differentiated privately.

  Raises:
    BatchStatisticsError: a ``batch_stats`` collection or NNX ``BatchStat`` leaf.
    ValueError: an NNX ``RngState`` leaf (a key counter, not a parameter).
  """
  for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if "batch_stats" in _path_names(path):
      raise BatchStatisticsError(
          f"{name} leaf {jax.tree_util.keystr(path)!r} is a batch statistic: differentiating it privately adds "
          f"noise-only 'gradients', and training it leaks data; differentiate {name}['params'] only, and {_FIX}.")
  try:
    from flax import nnx  # pylint: disable=import-outside-toplevel
  except ImportError:  # pragma: no cover
    return
  flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda v: isinstance(v, nnx.Variable))[0]
  for path, leaf in flat:
    where = jax.tree_util.keystr(path)
    if isinstance(leaf, nnx.BatchStat):
      raise BatchStatisticsError(
          f"{name} leaf {where!r} is an nnx.BatchStat: split the model with nnx.split(model, nnx.Param, ...) "
          f"(dpmega.nnx_value_and_grad does), and {_FIX}.")
    if isinstance(leaf, nnx.RngState):
      raise ValueError(f"{name} leaf {where!r} is an nnx.RngState (a PRNG key or counter), not a parameter: "
                       "differentiate nnx.Param only (nnx.split(model, nnx.Param, ...)).")


def check_aux(aux: PyTree) -> None:
  """Refuses batch statistics in a loss's ``aux`` (Linen ``apply(..., mutable=['batch_stats'])``).

  ``aux`` is returned per example and without noise: statistics averaged from it and kept in the model are
  a release of training data with no privacy guarantee.
  """
  for path, _ in jax.tree_util.tree_flatten_with_path(aux)[0]:
    if "batch_stats" in _path_names(path):
      raise BatchStatisticsError(
          f"aux{jax.tree_util.keystr(path)} holds updated batch statistics (apply(..., mutable=['batch_stats'])): "
          f"aux is per example and un-noised, so keeping these statistics leaks training data; {_FIX}.")


def check_nnx_model(model: Any) -> None:
  """Refuses an NNX model whose ``BatchNorm`` layers would compute batch statistics (train mode).

  Raises:
    BatchStatisticsError: naming the first such layer.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel

  for path, module in nnx.iter_modules(model) if hasattr(nnx, "iter_modules") else model.iter_modules():
    if isinstance(module, nnx.BatchNorm) and not module.use_running_average:
      where = ".".join(map(str, path)) or "model"
      raise BatchStatisticsError(
          f"{where} is an nnx.BatchNorm in train mode (use_running_average=False): its batch statistics mix "
          f"examples, so no per-example gradient is clipped, and its running averages are released un-noised; "
          f"{_FIX}.")
