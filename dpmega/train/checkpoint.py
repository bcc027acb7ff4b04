"""Checkpoints of a private run: Orbax for arrays, JSON for the ledger and the sampler.

One checkpoint per saved step, in ``<workdir>/checkpoints/<step>/``, holding two
Orbax items written together:

* ``state``: a pytree of arrays -- params, optimizer state, step, PRNG key data;
* ``meta``: JSON -- the privacy ledger, the sampler state, the fingerprint of
  everything that decides what a step computes (task and data config, the
  dataset's content, clipping, micro-batching, sampling, schedule, noise), the
  generation of the keys that computed it, plus a SHA-256 digest of everything
  above. The trainer refuses to resume on another computation and re-keys any
  recomputation (:mod:`dpmega.train`, :mod:`dpmega.accounting.journal`).

Guarantees:

* Atomic: Orbax writes into a temporary directory and renames it when
  complete, so a process killed mid-save leaves no checkpoint that looks
  finished; the previous checkpoints are untouched.
* Verified: :meth:`Checkpointer.restore` recomputes the digest; a checkpoint
  that cannot be read, or reads back different bytes, raises
  :class:`CheckpointError` naming it and the earlier checkpoints that remain
  usable (``restore(step=...)``). Nothing is deleted on error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dpmega.errors import UsageError

PyTree = Any

FORMAT_VERSION = 1


class CheckpointError(UsageError):
  """A checkpoint is missing, corrupt, incomplete or from another run."""


def tree_digest(tree: PyTree, meta: dict[str, Any] | None = None) -> str:
  """SHA-256 of every leaf (path, dtype, shape, bytes) and of ``meta`` as canonical JSON."""
  h = hashlib.sha256()
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
  for path, leaf in leaves:
    arr = np.asarray(leaf)
    h.update(jax.tree_util.keystr(path).encode())
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(np.ascontiguousarray(arr).tobytes())
  if meta is not None:
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
  return h.hexdigest()


def _fallback_hint(steps: list[int], step: int) -> str:
  """What to resume from instead of a bad checkpoint ``step``."""
  others = [s for s in steps if s != step]
  return (f" The earlier checkpoint(s) {others} are kept; resume from one with --resume_step {max(others)}."
          if others else " No other checkpoint is available.")


def _quiet_orbax():
  # Orbax logs every save at INFO through absl; raise (never lower) the threshold.
  logger = logging.getLogger("absl")
  logger.setLevel(max(logger.level, logging.WARNING))


@contextlib.contextmanager
def _orbax_failures_unlogged():
  # Orbax logs a failed write from each of its threads, with a traceback, and then raises it: the caller
  # reports the raised error once. Scoped to one save; the filter is removed on the way out.
  logger = logging.getLogger("absl")
  drop = lambda record: record.levelno < logging.ERROR  # noqa: E731
  logger.addFilter(drop)
  try:
    yield
  finally:
    logger.removeFilter(drop)


class Checkpointer:
  """Saves and restores ``(state pytree, meta dict)`` by step under ``directory``.

  Args:
    directory: the checkpoints folder (created on first save).
    max_to_keep: how many of the newest checkpoints to keep (>= 2, so a good
      one survives when the newest turns out bad).
  """

  def __init__(self, directory: str, *, max_to_keep: int = 3):
    if max_to_keep < 2:
      raise ValueError(f"max_to_keep must be >= 2, got {max_to_keep=}.")
    _quiet_orbax()
    self.directory = os.path.abspath(directory)
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=False, create=True),
        item_names=("state", "meta"),
    )

  def steps(self) -> list[int]:
    """Steps of the finished checkpoints, oldest first (unfinished temporaries excluded)."""
    self._manager.reload()
    return sorted(int(s) for s in self._manager.all_steps())

  def unfinished(self) -> list[str]:
    """Folders of saves that never completed (a process killed mid-save); never restored from."""
    if not os.path.isdir(self.directory):
      return []
    return sorted(os.path.join(self.directory, n) for n in os.listdir(self.directory) if ".orbax-checkpoint-tmp" in n)

  def latest_step(self) -> int | None:
    steps = self.steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Writes checkpoint ``step`` (blocking until it is complete and renamed into place)."""
    state = jax.tree_util.tree_map(np.asarray, state)
    meta = dict(meta, format=FORMAT_VERSION, step=int(step))
    meta["digest"] = tree_digest(state, meta)
    with _orbax_failures_unlogged():
      try:
        self._manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()
      except BaseException:
        # A failed or interrupted (Ctrl-C) save: let Orbax's writer threads end before the error goes on, so
        # none of them outlives the interpreter ("cannot schedule new futures", "Event loop is closed").
        with contextlib.suppress(Exception):
          self._manager.wait_until_finished()
        raise

  def restore(self, template: PyTree, step: int | None = None) -> tuple[PyTree, dict[str, Any]]:
    """Restores checkpoint ``step`` (default: the newest) shaped like ``template``.

    Raises:
      CheckpointError: no checkpoint, or the chosen one cannot be read or fails
        its digest; the message lists the other checkpoints to fall back to.
    """
    steps = self.steps()
    if not steps:
      raise CheckpointError(f"no checkpoint to resume from in {self.directory}.")
    if step is None:
      step = steps[-1]
    if step not in steps:
      raise CheckpointError(f"resume step must be one of the checkpoints {steps} in {self.directory}, got {step}.")
    hint = _fallback_hint(steps, step)
    abstract = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype if not hasattr(x, "dtype") else x.dtype),
        template)
    try:
      restored = self._manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
      state = jax.tree_util.tree_map(np.asarray, restored["state"])
      meta = dict(restored["meta"])
    except Exception as e:  # noqa: BLE001 - any read failure means the same thing here
      msg = " ".join(str(e).split())
      what = ("does not match this run's parameter or optimizer-state structure" if "Structure mismatch" in msg
              else "is corrupt or incomplete")
      raise CheckpointError(
          f"checkpoint at step {step} in {self.directory} {what} ({type(e).__name__}: {msg}).{hint}") from e
    digest = meta.pop("digest", None)
    if digest != tree_digest(state, meta):
      raise CheckpointError(
          f"checkpoint at step {step} in {self.directory} is corrupt: its contents do not match "
          f"the digest written with it.{hint}")
    if meta.get("format") != FORMAT_VERSION or meta.get("step") != step:
      raise CheckpointError(
          f"checkpoint at step {step} in {self.directory} has format {meta.get('format')!r} and step "
          f"{meta.get('step')!r}; expected format {FORMAT_VERSION} and step {step}.{hint}")
    return state, meta

  def read_meta(self, step: int | None = None) -> dict[str, Any]:
    """The JSON ``meta`` of checkpoint ``step`` (default: the newest) alone, unverified: read before a restore,
    so that a resume on another computation is refused by its fingerprint before any array is read.

    Raises:
      CheckpointError: no such checkpoint, or its meta cannot be read.
    """
    steps = self.steps()
    step = steps[-1] if step is None and steps else step
    if step not in steps:
      raise CheckpointError(f"resume step must be one of the checkpoints {steps} in {self.directory}, got {step}.")
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(restored["meta"])
    except Exception as e:  # noqa: BLE001 - any read failure means the same thing here
      msg = " ".join(str(e).split())
      raise CheckpointError(f"checkpoint at step {step} in {self.directory} is corrupt or incomplete "
                            f"({type(e).__name__}: {msg}).{_fallback_hint(steps, step)}") from e

  def set_aside_after(self, step: int) -> list[str]:
    """Moves checkpoints newer than ``step`` to ``<directory>.set_aside/`` (kept, not deleted).

    Used when resuming from an older checkpoint, so the run's newer saves cannot
    mix with them.
    """
    moved = []
    aside = self.directory + ".set_aside"
    for s in self.steps():
      if s > step:
        os.makedirs(aside, exist_ok=True)
        dst = os.path.join(aside, str(s))
        if os.path.exists(dst):
          shutil.rmtree(dst)
        shutil.move(os.path.join(self.directory, str(s)), dst)
        moved.append(dst)
    self._manager.reload()
    return moved

  def close(self) -> None:
    with _orbax_failures_unlogged():  # a failed save was already raised
      self._manager.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
