"""dpmega: differentially private (DP-SGD) training at mega-batch sizes on JAX.

Public API (nothing else is promised):
"""

from dpmega.clipping import ClipRule
from dpmega.clipping import ClipStats
from dpmega.clipping import clip_factors
from dpmega.clipping import clipped_grad_sum
from dpmega.clipping import clipping_modes
from dpmega.clipping import global_norms
from dpmega.clipping import per_example_grads
from dpmega.clipping.ghost import plan_layers
from dpmega.noise import add_gaussian_noise
from dpmega.noise import privatize
from dpmega.noise import secret_bytes
from dpmega.noise import secret_key
from dpmega.noise import step_key
from dpmega.private_grad import StepKey
from dpmega.private_grad import private_value_and_grad

__version__ = "0.1.0"

# The trainer and samplers load lazily (they pull in Orbax, dp-accounting):
# `dpmega.Trainer`, `dpmega.PoissonSampler`, ... (and `dpmega.train.train(config)`).
_LAZY = {
    "Trainer": "dpmega.train:Trainer",
    "TrainResult": "dpmega.train:TrainResult",
    "PoissonSampler": "dpmega.sampling:PoissonSampler",
    "WithoutReplacementSampler": "dpmega.sampling:WithoutReplacementSampler",
    "SamplerState": "dpmega.sampling:SamplerState",
    "make_sampler": "dpmega.sampling:make_sampler",
    "iterate_chunks": "dpmega.sampling:iterate_chunks",
    "MeshConfig": "dpmega.sharding:MeshConfig",
    "AuditResult": "dpmega.audit:AuditResult",
    "mechanism_audit": "dpmega.audit:mechanism_audit",
    "one_run_training_audit": "dpmega.audit:one_run_training_audit",
    "make_mesh": "dpmega.sharding:make_mesh",
    "SamplingScheme": "dpmega.accounting:SamplingScheme",
    "Ledger": "dpmega.accounting:Ledger",
    "compute_epsilon": "dpmega.accounting:compute_epsilon",
    "compute_delta": "dpmega.accounting:compute_delta",
    "epsilon_for_schedule": "dpmega.accounting:epsilon_for_schedule",
    "calibrate_noise_multiplier": "dpmega.accounting:calibrate_noise_multiplier",
    "max_steps": "dpmega.accounting:max_steps",
    "fits_budget": "dpmega.accounting:fits_budget",
    "parse_schedule": "dpmega.schedules:parse_schedule",
    "nnx_value_and_grad": "dpmega.flax_loop:nnx_value_and_grad",
    "BatchStatisticsError": "dpmega.flax_traps:BatchStatisticsError",
    "PoissonData": "dpmega.poisson_data:PoissonData",
    "eval_batches": "dpmega.poisson_data:eval_batches",
}


def __getattr__(name):
  if name in _LAZY:
    import importlib  # pylint: disable=import-outside-toplevel

    module, attr = _LAZY[name].split(":")
    return getattr(importlib.import_module(module), attr)
  raise AttributeError(f"module 'dpmega' has no attribute {name!r}")
