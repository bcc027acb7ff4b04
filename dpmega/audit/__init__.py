"""Empirical privacy audits: statistically valid lower bounds on ε.

An accountant gives an *upper* bound on ε, proved on paper. An audit runs the
code that actually ships and turns what an attacker can observe into a *lower*
bound on ε that holds with a stated confidence. If the lower bound ever exceeds
the accountant's ε, the implementation leaks more than it claims (a bug in
clipping, noise, normalization or accounting). An audit that passes is evidence,
not proof: a lower bound below the claim is what a correct implementation gives,
but so could a weak attack; :func:`mechanism_audit` therefore has a test-only
knob (``noise_scale_for_testing``) that scales the noise down so that the tests
can show the audit *does* detect a mechanism weaker than claimed.

The package, one job per module:

==========================  ===================================================
``audit.stats``             Clopper–Pearson bounds, the holdout threshold test
``audit.claims``            the accountant's claimed ε, the exact Gaussian ε
``audit.mechanism``         the mechanism audit (many runs of one step)
``audit.one_run``           the one-run training audit (canaries, DP-SGD)
``audit.sparse``            the mechanism audit of the sparse step (selection + sparse noise)
``audit.results``           :class:`AuditResult`, the table, the JSON file
==========================  ===================================================

Every public name is re-exported here (``from dpmega import audit``). The
modules import numpy and scipy; JAX, optax and jax_privacy only when an audit
runs.

Two audits:

* :func:`mechanism_audit` (white-box, many runs of one step). The library's
  real private aggregation (:func:`dpmega.private_value_and_grad`, i.e.
  :func:`dpmega.clipping.clipped_grad_sum` then :func:`dpmega.noise.privatize`)
  runs ``trials`` times on a batch *without* and ``trials`` times on the same
  batch *with* one canary whose gradient is huge (clipped to exactly ``C``) and
  orthogonal to every other example's. The score of a run is the released
  gradient's coordinate along the canary. The ε lower bound is Clopper–Pearson
  on the best threshold (see :func:`holdout_epsilon_lower_bound`), compared with
  the ε the accountant claims for that one step (:func:`claimed_epsilon`) and,
  without sampling, with the exact ε of the Gaussian mechanism
  (:func:`gaussian_mechanism_epsilon`). With ``sampling="without_replacement"``
  the neighbours are replace-one: the canary *replaces* an example whose
  gradient points the other way (clipped to ``-C``), so the sum moves by ``2C``,
  and the claim is the replace-one accountant's (sensitivity 2C).
* :func:`one_run_training_audit` (one training run). ``m`` canaries, each
  included in the training set with probability 1/2, are trained on with DP-SGD
  (Poisson sampling, the library's private gradient, an optax optimizer); each
  canary is scored from the final parameters and the ε lower bound is the one of
  Steinke, Nasr & Jagielski (2023) computed by ``jax_privacy.auditing``
  (:func:`one_run_epsilon_lower_bound`; install ``dpmega[audit]``).

Guarantee (mechanism audit): if the released gradient is (ε, δ)-DP for add/remove
of one example (replace-one with ``sampling="without_replacement"``),
``P[epsilon_lower_bound > ε] <= 1 - confidence`` over the randomness of the audit.
Equivalently, a reported lower bound above the claimed ε is, at that confidence,
a real violation and not bad luck.

Edge cases:

==============================  ===============================================
input                           behaviour
==============================  ===============================================
no threshold separates scores   lower bound 0.0 (never negative)
``noise_multiplier == 0``       ``ValueError``: claimed ε is infinite, nothing to audit
``sampling_rate == None``       no subsampling: one Gaussian step, exact ε also reported
``noise_scale_for_testing < 1`` the mechanism is deliberately weaker than claimed
replace-one with sampling_rate  ``ValueError``: the replace-one audit runs on the whole batch
``jax_privacy`` not installed   the one-run audit raises ``ImportError`` naming the extra
==============================  ===============================================

References:
  Jagielski, Ullman, Oprea 2020, "Auditing Differentially Private Machine
  Learning: How Private is Private SGD?", https://arxiv.org/abs/2006.07709.
  Nasr et al. 2021, "Adversary Instantiation: Lower Bounds for Differentially
  Private Machine Learning", https://arxiv.org/abs/2101.04535.
  Balle & Wang 2018, "Improving the Gaussian Mechanism for Differential
  Privacy: Analytical Calibration and Optimal Denoising",
  https://arxiv.org/abs/1805.06530 (exact ε of the Gaussian mechanism).
  Steinke, Nasr, Jagielski 2023, "Privacy Auditing with One (1) Training Run",
  https://arxiv.org/abs/2305.08846.
"""

from dpmega.audit.claims import claimed_epsilon
from dpmega.audit.claims import gaussian_mechanism_epsilon
from dpmega.audit.mechanism import mechanism_audit
from dpmega.audit.one_run import check_one_run_size
from dpmega.audit.one_run import one_run_epsilon_lower_bound
from dpmega.audit.one_run import one_run_training_audit
from dpmega.audit.results import AuditResult
from dpmega.audit.results import format_table
from dpmega.audit.results import write_json
from dpmega.audit.sparse import sparse_mechanism_audit
from dpmega.audit.stats import clopper_pearson_lower
from dpmega.audit.stats import clopper_pearson_upper
from dpmega.audit.stats import epsilon_lower_bound_from_counts
from dpmega.audit.stats import holdout_epsilon_lower_bound

__all__ = [
    "AuditResult",
    "check_one_run_size",
    "claimed_epsilon",
    "clopper_pearson_lower",
    "clopper_pearson_upper",
    "epsilon_lower_bound_from_counts",
    "format_table",
    "gaussian_mechanism_epsilon",
    "holdout_epsilon_lower_bound",
    "mechanism_audit",
    "one_run_epsilon_lower_bound",
    "one_run_training_audit",
    "sparse_mechanism_audit",
    "write_json",
]
