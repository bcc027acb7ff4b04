"""What a checkpoint says it computed: the run's fingerprint, and the generation a resume continues in.

A checkpoint carries :func:`fingerprint` (no secret, nothing derived from one); a resume compares it with the
run's own (:func:`differences`) and :func:`resume_generation` decides whether the resume replays the latest
generation's keys (a crash resume) or starts a new one (invariant 6, ``docs/privacy.md``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax

from dpmega.train import checkpoint as checkpoint_lib


def differences(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
  """``(dotted field, old, new)`` for every leaf where two JSON-like trees differ."""
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += differences(old.get(k), new.get(k), f"{prefix}{k}.")
    return out
  return [] if old == new else [(prefix.rstrip("."), old, new)]


def _clip_rule(cfg: Any) -> dict[str, Any] | None:
  """The clip rule's fields, or None for the plain rule (as checkpoints written before the rules existed say)."""
  groups, normalized = getattr(cfg, "clip_groups", ()), getattr(cfg, "normalized_clipping", False)
  if not groups and not normalized:
    return None
  return {"groups": groups, "normalized": normalized, "stability": getattr(cfg, "clip_stability", 0.01)}


def fingerprint(cfg: Any, *, task_config: Any, data: dict[str, Any],
                noise_multiplier: float) -> dict[str, dict[str, Any]]:
  """Everything that decides what a step computes, in the three parts a resume treats differently.

  * ``computation``: the task and data config, the dataset's content
    (:func:`dpmega.data.sources.fingerprint`: size and SHA-256), the
    randomness seeds, sampling, batch schedule, clipping mode, micro-batching,
    clip norm, noise (σ, sampler, clipped-count noise) and the budget. A
    resume that changes any of it is refused: it would redo steps with the
    keys and samples of other data or another computation.
  * ``optimizer``: a change is allowed (e.g. a lower learning rate after a
    divergence); the steps redone then run in a new generation (new keys).
  * ``environment``: JAX version, backend, devices, mesh, the dataset's file
    identity. The same computation elsewhere is not bit-identical, so a change
    also starts a new generation.

  Holds no secret and nothing derived from one (it is written in checkpoints
  and printed in refusals).

  Args:
    cfg: the validated trainer config.
    task_config: the task's config as a dict.
    data: :func:`dpmega.data.sources.fingerprint` of the training source.
    noise_multiplier: the run's sigma (after calibration).
  """
  computation = {
      "task": task_config, "dataset": {k: data[k] for k in ("size", "content", "coverage")},
      "init_seed": getattr(cfg, "init_seed", None),
      "insecure_reproducible_seed": getattr(cfg, "insecure_reproducible_seed", None),
      "sampling": cfg.sampling.value, "batch_schedule": cfg.batch_schedule.to_dict(), "num_steps": cfg.num_steps,
      "clipping": cfg.clipping, "microbatch_size": cfg.microbatch_size, "max_microbatches": cfg.max_microbatches,
      "clip_norm": cfg.clip_norm, "noise_multiplier": noise_multiplier, "noise_sampler": cfg.noise_sampler,
      "clipped_count_noise": cfg.clipped_count_noise, "target_epsilon": cfg.target_epsilon, "delta": cfg.delta,
      "accountant": cfg.accountant,
      # None for the plain rule, so that checkpoints written before the clip rules existed still compare equal.
      "clip_rule": _clip_rule(cfg),
  }
  if getattr(getattr(cfg, "sparse", None), "enabled", False):  # only when on: earlier checkpoints compare equal
    computation["sparse"] = dataclasses.asdict(cfg.sparse)
  recalibration = getattr(cfg, "recalibration", None)
  if recalibration is not None and recalibration.steps:  # only when on: earlier checkpoints compare equal
    computation["recalibration"] = dataclasses.asdict(recalibration)
  optimizer = {k: (v.value if hasattr(v, "value") else v) for k, v in dataclasses.asdict(cfg.optimizer).items()}
  if not optimizer.get("ema_decay"):  # only when on: earlier checkpoints compare equal
    optimizer.pop("ema_decay", None)
  devices = jax.devices()
  environment = {
      "jax": jax.__version__, "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
      "device_count": len(devices), "process_count": jax.process_count(),
      "mesh": None if cfg.mesh is None else dataclasses.asdict(cfg.mesh), "dataset_files": data.get("files", []),
  }
  # Through JSON, so that a fingerprint compares equal to its own round trip (tuples become lists).
  return json.loads(json.dumps({"computation": computation, "optimizer": optimizer, "environment": environment},
                               sort_keys=True, default=str))


def digest(fp: dict[str, Any]) -> str:
  """SHA-256 of a fingerprint (what the journal records per generation)."""
  return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()


def resume_generation(resumed: dict[str, Any], latest: dict[str, Any] | None, *, newest: int, digest: str,
                      workdir: str, journal_path: str) -> tuple[int, str | None]:
  """The generation to continue in after a restore, and why it is new (None: a crash resume).

  A resume continues the latest generation -- same keys, redone steps
  bit-identical, nothing new spent -- only when it restores the newest
  checkpoint, that checkpoint lies on the latest generation (written by it,
  or the one it started from), and the fingerprint is that generation's.
  Anything else (a rewind, a changed optimizer or environment) recomputes
  steps differently, so it starts a new generation: new keys, new samples,
  and the redone steps are spent again.

  Args:
    resumed: what the restore found: the checkpoint's ``step``, ``generation`` and the ``changed`` fields.
    latest: the journal's latest generation record (None: no journal).
    newest: the newest checkpoint step in the workdir.
    digest: :func:`digest` of the run's fingerprint.
    workdir: the workdir (for the error message).
    journal_path: the journal's path (for the error message).
  """
  r = resumed
  if latest is None:
    raise checkpoint_lib.CheckpointError(
        f"{workdir!r} holds checkpoints but no journal of the privacy it spent ({journal_path}): "
        "its epsilon cannot be established. Restore the file, or start afresh with --overwrite.")
  on_latest = r["generation"] == latest["generation"] or (
      latest["from_step"] == r["step"] and latest["from_generation"] == r["generation"])
  if on_latest and r["step"] == newest and latest["fingerprint"] == digest:
    return int(latest["generation"]), None
  reasons = []
  if r["step"] != newest:
    reasons.append(f"a rewind from the newest checkpoint at step {newest} to step {r['step']}")
  if r["changed"]:
    reasons.append("changed " + ", ".join(r["changed"]))
  if not on_latest:
    reasons.append(f"a checkpoint of generation {r['generation']}, not of the latest {latest['generation']}")
  if not reasons:
    reasons.append(f"settings other than those generation {latest['generation']} ran with")
  return int(latest["generation"]) + 1, "; ".join(reasons)
