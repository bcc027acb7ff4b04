"""The run's root secret (invariant 7), and what the run's outputs say about it.

The noise, the sampling and the data preparation of step ``t`` are keyed by
HMAC-SHA256 of one root secret (:func:`dpmega.noise.step_key`,
``prepare_key``, ``sampler_entropy``). A new run draws it from the OS CSPRNG on
process 0 and broadcasts it to every process over ``jax.distributed``
(:func:`dpmega.sharding.broadcast_secret`); the checkpoints keep it, nothing
else does. ``insecure_reproducible_seed`` derives it from a public int instead:
the plan, ``config.json`` and ``summary.json`` then say :func:`insecure_randomness`.
"""

from __future__ import annotations

from dpmega import noise as noise_lib
from dpmega import sharding
from dpmega.train import config as config_lib

SECRET_RANDOMNESS = ("secret: noise and sampling keyed by a 256-bit secret from the OS CSPRNG, "
                     "kept in the checkpoints only")


def insecure_randomness(seed: int) -> str:
  """What the plan, ``config.json`` and ``summary.json`` say about a run keyed by a public seed."""
  return (f"INSECURE: insecure_reproducible_seed={seed}: noise reproducible by anyone who knows the seed: "
          "NOT a private release")


def describe(cfg: config_lib.TrainConfig) -> str:
  """:data:`SECRET_RANDOMNESS`, or :func:`insecure_randomness` of the config's public seed."""
  seed = cfg.insecure_reproducible_seed
  return SECRET_RANDOMNESS if seed is None else insecure_randomness(seed)


def run_secret(cfg: config_lib.TrainConfig) -> bytes:
  """The root secret of a new run: fresh from the OS CSPRNG on process 0, the same on every process.

  With ``cfg.insecure_reproducible_seed`` set, derived from that public seed
  instead (:func:`dpmega.noise.insecure_secret_from_seed`): NOT private.
  Collective: with several processes, call it on every one.
  """
  if cfg.insecure_reproducible_seed is not None:
    return noise_lib.insecure_secret_from_seed(cfg.insecure_reproducible_seed)
  return sharding.broadcast_secret(noise_lib.secret_bytes())
