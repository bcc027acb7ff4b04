"""The resume path: is this checkpoint the same computation, and what does it hold.

A resume reads a checkpoint (:mod:`dpmega.train.checkpoint`) and checks, before anything in the workdir is
written, that it may continue it (invariant 6, ``docs/privacy.md``):

* :func:`check_fingerprint` -- the computation is the run's own (:func:`dpmega.train.identity.fingerprint`);
  a change is refused, naming the fields. One change is allowed: more steps (``num_steps`` grows) on the same
  schedule -- extending a finished run; its new steps run in a new generation and count.
* :func:`checkpoint_secret` -- the checkpoint holds a secret of at least 128 bits (the run's: a resume redoes,
  never re-keys), and under ``insecure_reproducible_seed`` the seed's own;
* :func:`check_ledger` -- its ledger is exactly the schedule's first ``step`` steps at this noise.

Each raises :class:`dpmega.train.checkpoint.CheckpointError` (exit code 2 at the command line).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dpmega import accounting
from dpmega import noise as noise_lib
from dpmega.train import identity
from dpmega.train.checkpoint import CheckpointError

# Computation fields an extension may change (more steps, the same schedule; the ledger check proves it).
_EXTENSIBLE = ("num_steps",)


def check_fingerprint(theirs: Any, mine: dict[str, Any], *, where: str) -> dict[str, Any]:
  """Compares the checkpoint's fingerprint with the run's; returns what a resume changes.

  Args:
    theirs: the fingerprint written with the checkpoint (anything: older versions wrote none).
    mine: the run's :func:`dpmega.train.identity.fingerprint`.
    where: names the checkpoint in messages.

  Returns:
    ``{"changed": [dotted fields of the optimizer and environment that differ, and num_steps when it grew]}``.

  Raises:
    CheckpointError: no fingerprint, or a different computation (the fields and both values named).
  """
  if not isinstance(theirs, dict) or set(theirs) != set(mine):
    raise CheckpointError(f"{where} has no fingerprint of its computation (written by an older dpmega): it "
                          "cannot be resumed safely; start afresh with --overwrite.")
  refused = identity.differences(theirs["computation"], mine["computation"])
  extended = [k for k, old, new in refused if k in _EXTENSIBLE and isinstance(old, int) and new > old]
  refused = [d for d in refused if d[0] not in extended]
  if refused:
    detail = "; ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, a, b in refused)
    raise CheckpointError(
        f"{where} was computed differently, so resuming would redo steps with its noise keys and samples on "
        f"another computation ({detail}). Resume with the checkpoint's settings, or start a new run in another "
        "workdir.")
  diffs = {k: (a, b) for part in ("optimizer", "environment")
           for k, a, b in identity.differences(theirs[part], mine[part], prefix=part + ".")}
  old, new = diffs.get("optimizer.ema_decay", (1, 1))
  if old is None or new is None:  # the average is optimizer state: turning it on or off changes the state's shape
    raise CheckpointError(
        f"{where} was written with optimizer.ema_decay={old or 0.0!r} and this run sets {new or 0.0!r}: the average "
        "of the parameters is part of the optimizer state, so it cannot be turned on or off at a resume (another "
        "nonzero decay is fine). Resume with optimizer.ema_decay="
        f"{old or 0.0!r}, or start a new run in another workdir.")
  changed = list(diffs)
  return {"changed": [f"{k} (extended)" for k in extended] + changed}


def checkpoint_secret(words: Any, *, where: str, insecure_seed: int | None, run_secret: bytes) -> bytes:
  """The run's secret from the checkpoint's ``rng`` words.

  Raises:
    CheckpointError: fewer than 128 bits (a public seed's key of an older version), or, under
      ``insecure_reproducible_seed``, the secret of another seed.
  """
  try:
    secret = noise_lib.secret_from_words(np.asarray(words, np.uint32))
  except ValueError:
    # Earlier versions stored the key of a public seed here: that run's noise was never secret.
    raise CheckpointError(
        f"{where} holds no secret of at least 128 bits (got {np.size(words)} uint32 words; checkpoints written "
        "before the noise key became secret hold a public seed's key): start afresh with --overwrite or a new "
        "workdir.") from None
  if insecure_seed is not None and secret != run_secret:
    raise CheckpointError(f"{where} holds the secret of another insecure_reproducible_seed.")
  return secret


def check_ledger(ledger: accounting.Ledger, expected: accounting.Ledger, *, step: int, where: str) -> None:
  """Invariant: the checkpoint's ledger is exactly the steps that ran, and they are the schedule's.

  Raises:
    CheckpointError: a ledger of another length, or other (q, sigma) than the schedule's first ``step`` steps.
  """
  if ledger.num_steps != step or ledger != expected:
    raise CheckpointError(
        f"{where} has a ledger of {ledger.num_steps} steps that does not match the schedule's first {step} "
        "steps at this noise multiplier.")
