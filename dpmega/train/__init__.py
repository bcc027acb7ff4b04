"""The mega-batch DP-SGD loop: sample, stream, clip, noise once, update, account.

One logical step ``t`` (expected batch size ``B_t`` from the schedule):

1. the sampler draws the step's indices (Poisson with ``q_t = B_t / N``, or
   ``B_t`` without replacement);
2. the examples are read chunk by chunk (fixed shapes, padded and masked) and
   each chunk goes through the jitted clipped-sum accumulation -- the logical
   batch is never materialized on the device, only one chunk at a time;
3. ONE Gaussian draw from ``step_key(secret, t)`` is added to the summed clipped
   gradients, which are divided by ``B_t`` (the expected batch size, never the
   realized one) and fed to the optax optimizer;
4. the ledger records ``(B_t, N, sigma, scheme)``.

Budget (``TrainConfig.noise_multiplier`` / ``target_epsilon``): with a target
only, sigma is calibrated for the whole configured schedule before step 1 and
the plan printed; with a fixed sigma, epsilon is reported as it goes; with
both, training stops before the step that would take epsilon past the target,
and says so. The ledger equals the ``(q_t, sigma_t)`` of the steps that ran,
also across ``resume``: the checkpoint holds it, and it is checked against the
schedule on restore. With ``recalibration.steps = k`` (binary tasks), k more steps
fit a temperature and a bias on the frozen model's logits
(:mod:`dpmega.train.recalibration`): each is sampled, clipped, noised and
recorded like a training step, and the plan and budget cover them.

The step runs on a device mesh, always (``1 x 1`` for one device): its jitted
pieces, ``accumulate(params, acc, batch, mask) -> acc`` and ``update(state,
grad_sum, key, sigma, B) -> (state, metrics)``, are :mod:`dpmega.train.step`'s,
the same functions the mesh tests and benchmarks run.

The package, one job per module (imports go one way, down this list):
:mod:`~dpmega.train.loop` (the run, top to bottom: :class:`Trainer`, :func:`train`),
:mod:`~dpmega.train.workdir` (one run per workdir: the lock, the usability check, ``--overwrite``),
:mod:`~dpmega.train.resume` (the checks a checkpoint passes before a resume continues it),
:mod:`~dpmega.train.identity` (the fingerprint of a computation, the generation a resume runs in),
:mod:`~dpmega.train.recalibration` (private temperature and bias after training, ``recalibration.*``: more
accounted steps, on the frozen model),
:mod:`~dpmega.train.report` (the progress line, ``summary.json``, why a run stopped),
:mod:`~dpmega.train.privacy` (the plan, sigma, epsilon of the ledgers, the budget stop),
:mod:`~dpmega.train.step` (the private step on a mesh),
:mod:`~dpmega.train.optim` (learning rates, optimizers),
:mod:`~dpmega.train.averaging` (an average of the parameters, ``optimizer.ema_decay``),
:mod:`~dpmega.train.writer` (``metrics.jsonl``, TensorBoard),
:mod:`~dpmega.train.randomness` (the run's root secret),
:mod:`~dpmega.train.checkpoint` and :mod:`~dpmega.train.config` (with :mod:`~dpmega.train.fields`).

Randomness (invariant 7): the noise, the sampling and the data preparation
(e.g. BERT masking) of step ``t`` are keyed by HMAC-SHA256 of the run's root
secret (:func:`dpmega.noise.step_key`, ``prepare_key``, ``sampler_entropy``;
one domain each). The secret is 256 bits from the OS CSPRNG, drawn afresh by
every new run (a new workdir, ``--overwrite``), broadcast from process 0 to
every process over ``jax.distributed``, kept in the checkpoints (as sensitive
as the model) and nowhere else: not in ``config.json``, ``metrics.jsonl``,
``summary.json``, TensorBoard or the output, not even as a hash. A resume
takes it from the checkpoint, so a replayed step is redone bit-for-bit and no
key serves another step. Only the parameter initialization is public
(``init_seed``: it does not depend on the data). ``insecure_reproducible_seed``
derives the secret from a public int instead, for tests and debugging: the
plan, ``config.json`` and ``summary.json`` then say that the run is NOT a
private release.

Resume (invariant 6, ``docs/privacy.md``): checkpoints carry a fingerprint of
the computation (:meth:`Trainer.fingerprint`); a resume that changes it is
refused, naming the fields, before anything in the workdir is written. One
change is allowed: more steps on the same schedule (extending a finished run);
the new steps run in a new generation and the budget still applies. A crash resume from the newest checkpoint replays
the same keys bit for bit; any other recomputation (``--resume_step``, a
changed optimizer or environment) runs in a new ``generation`` with new keys
and samples. Every step is written to ``<workdir>/spent.jsonl``
(:mod:`dpmega.accounting.journal`) before its noisy update exists, and the ε reported and
budget-checked is that of every distinct (generation, step) in it.

.. warning::
   With ``metrics="raw"`` (the default) the per-step log lines (training loss,
   realized batch size, clipped fraction, examples/s) are computed from the
   private batch WITHOUT noise: they are for the operator, not for release.
   ``metrics="private"`` logs only privatized quantities. The parameters (and
   what is computed from them, such as evaluation metrics on a separate split)
   carry the DP guarantee.
"""

from __future__ import annotations

import importlib
from typing import Any

# What `from dpmega import train` promises, and the module that holds each name. Loaded on first use, so that
# `import dpmega.train.config` (the CLI's validation) stays light: no optax, Orbax or dp-accounting.
_EXPORTS = {
    "Trainer": "loop", "train": "loop", "TrainResult": "report", "TrainingError": "report",
    "Accumulator": "step", "TrainState": "step", "effective_noise_multiplier": "step",
    "make_learning_rate": "optim", "make_optimizer": "optim",
    "SECRET_RANDOMNESS": "randomness", "insecure_randomness": "randomness", "run_secret": "randomness",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"dpmega.train.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'dpmega.train' has no attribute {name!r}")


def __dir__() -> list[str]:
  return sorted(set(globals()) | set(_EXPORTS))
