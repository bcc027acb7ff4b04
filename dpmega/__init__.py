"""dpmega: differentially private (DP-SGD) training at mega-batch sizes on JAX.

Public API (nothing else is promised):
"""

from dpmega.clipping import ClipStats
from dpmega.clipping import clip_factors
from dpmega.clipping import clipped_grad_sum
from dpmega.clipping import clipping_modes
from dpmega.clipping import global_norms
from dpmega.clipping import per_example_grads
from dpmega.noise import add_gaussian_noise
from dpmega.noise import privatize
from dpmega.private_grad import private_value_and_grad

__version__ = "0.1.0"
