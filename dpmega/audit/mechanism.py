"""The white-box mechanism audit: many runs of the library's private step, with and without a canary.

The library's real private aggregation (:func:`dpmega.private_value_and_grad`:
clipped sum, Gaussian noise, division by the expected batch size) runs
``trials`` times on a batch without and ``trials`` times on the same batch with
one canary whose gradient is huge (clipped to exactly ``C``) and orthogonal to
every other example's; each release is scored by its coordinate along the
canary and :func:`dpmega.audit.stats.holdout_epsilon_lower_bound` bounds ε.

Guarantee: if the released gradient is (ε, δ)-DP for add/remove of one example
(replace-one with ``sampling="without_replacement"``),
``P[epsilon_lower_bound > ε] <= 1 - confidence`` over the randomness of the
audit: a reported lower bound above the claimed ε is, at that confidence, a
real violation and not bad luck.
"""

from __future__ import annotations

import numpy as np

from dpmega import validation
from dpmega.audit.claims import claimed_epsilon
from dpmega.audit.claims import gaussian_mechanism_epsilon
from dpmega.audit.claims import ledger_sizes
from dpmega.audit.results import AuditResult
from dpmega.audit.stats import holdout_epsilon_lower_bound

# Trials per jitted call of the mechanism audit (bounds memory, one compile).
_CHUNK = 4096


def _mechanism_runs(*, clip_norm: float, sigma: float, sampling_rate: float | None, trials: int,
                    num_background: int, dim: int, seed: int,
                    replace_one: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Scores of ``trials`` runs without and with the canary (``replace_one``: instead of its opposite)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from dpmega.private_grad import private_value_and_grad  # pylint: disable=import-outside-toplevel

  q = 1.0 if sampling_rate is None else sampling_rate
  # A public constant, the same for both inputs (replace-one: both hold num_background + 1).
  expected_batch_size = q * (num_background + 1)

  # Background examples: random gradients (some above C, so clipping is
  # exercised) in coordinates 1..dim-1. The canary: a gradient 1e3 x C along
  # coordinate 0, clipped to exactly C: the largest, most distinguishable
  # contribution one example can make.
  rng = np.random.default_rng(seed)
  background = np.zeros((num_background, dim), np.float32)
  background[:, 1:] = rng.normal(size=(num_background, dim - 1)) * clip_norm
  canary = np.zeros((1, dim), np.float32)
  canary[0, 0] = 1e3 * clip_norm
  # Replace-one: the canary replaces its opposite, the largest move one replacement can make (2C).
  out = np.concatenate([background, -canary]) if replace_one else background
  batches = {"out": {"x": jnp.asarray(out)},
             "in": {"x": jnp.asarray(np.concatenate([background, canary]))}}

  def loss(w, example):  # the gradient of example e is e["x"]
    return jnp.dot(w, example["x"])

  grad_fn = private_value_and_grad(loss, clip_norm=clip_norm, noise_multiplier=sigma,
                                   expected_batch_size=expected_batch_size)
  params = jnp.zeros((dim,), jnp.float32)

  def one_run(batch, key):
    noise_key, sample_key = jax.random.split(key)
    b = batch["x"].shape[0]
    mask = (jnp.ones((b,), jnp.float32) if sampling_rate is None
            else jax.random.bernoulli(sample_key, q, (b,)).astype(jnp.float32))
    _, grads, _ = grad_fn(params, batch, noise_key, mask=mask)
    # What the attacker sees is the released mean; x the public denominator / C
    # gives the canary's count in units of C plus N(0, σ^2).
    return grads[0] * (expected_batch_size / clip_norm)

  @jax.jit
  def runs(batch, world, chunk):
    # Keys derived inside the compiled function: one compile per input shape.
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), world), chunk)
    return jax.vmap(one_run, in_axes=(None, 0))(batch, jax.random.split(key, _CHUNK))

  out = {}
  for w, world in enumerate(("out", "in")):
    chunks = [np.asarray(runs(batches[world], w, c)) for c in range(-(-trials // _CHUNK))]
    out[world] = np.concatenate(chunks)[:trials].astype(np.float64)
  return out["in"], out["out"]


def mechanism_audit(
    *,
    noise_multiplier: float,
    clip_norm: float = 1.0,
    delta: float = 1e-5,
    trials: int = 20_000,
    confidence: float = 0.95,
    sampling_rate: float | None = None,
    num_background: int = 7,
    dim: int = 4,
    seed: int = 0,
    accountant: str = "pld",
    noise_scale_for_testing: float = 1.0,
    sampling: str = "poisson",
) -> AuditResult:
  """White-box audit of one private aggregation step (see the module docstring).

  Runs :func:`dpmega.private_value_and_grad` (clipped sum + Gaussian noise +
  division by the expected batch size) ``trials`` times on ``num_background``
  examples and ``trials`` times on the same examples plus one canary, scores
  each release by its coordinate along the canary, and bounds ε with
  :func:`holdout_epsilon_lower_bound`. With ``sampling_rate`` every example
  (the canary too) enters each run's batch independently with that probability
  (Poisson sampling, through the step's mask).

  Args:
    noise_multiplier: σ the accountant is told, > 0.
    clip_norm: C, > 0 and finite.
    delta: δ in (0, 1).
    trials: runs per neighbouring input, in [20, 10^7]. Power grows with it:
      with 20 000 and confidence 0.95 the bound can reach about ``log(trials/8)``.
    confidence: in [0.5, 1).
    sampling_rate: Poisson rate q in (0, 1], or None for no subsampling.
    num_background: other examples in the batch, in [0, 10^4].
    dim: parameter dimension, in [2, 10^4].
    seed: seed of the audit's randomness.
    accountant: ``"pld"`` or ``"rdp"`` for the claimed ε.
    noise_scale_for_testing: TEST-ONLY. Multiplies the noise multiplier passed
      to the library (the claimed ε still uses ``noise_multiplier``), to check
      that the audit detects a mechanism noisier on paper than in fact. Leave
      it at 1.0 for a real audit.
    sampling: ``"poisson"`` (add/remove-one: the canary is added) or
      ``"without_replacement"`` (replace-one: the canary replaces an example
      whose gradient is its opposite; the whole batch, no ``sampling_rate``);
      the claim is the accountant's for that scheme.

  Returns:
    An :class:`AuditResult` (``violation`` is True if the bound exceeds the claim).
  """
  sigma = validation.check_real("noise_multiplier", noise_multiplier, 0.0, 1e6, lo_open=True)
  clip_norm = validation.check_real("clip_norm", clip_norm, 0.0, 1e12, lo_open=True)
  delta = validation.check_real("delta", delta, 0.0, 1.0, lo_open=True, hi_open=True)
  trials = validation.check_int("trials", trials, 20, 10**7)
  confidence = validation.check_real("confidence", confidence, 0.5, 1.0, hi_open=True)
  sampling_rate = validation.check_real("sampling_rate", sampling_rate, 0.0, 1.0, lo_open=True, optional=True)
  num_background = validation.check_int("num_background", num_background, 0, 10**4)
  dim = validation.check_int("dim", dim, 2, 10**4)
  if (num_background + 1) * dim > 10**7:
    raise ValueError(f"num_background and dim: (num_background + 1) x dim must be at most 1e7, "
                     f"got {num_background=}, {dim=}.")
  seed = validation.check_int("seed", seed, 0, 2**31 - 1)
  scale = validation.check_real("noise_scale_for_testing", noise_scale_for_testing, 0.0, 1.0)
  ledger_sizes(sampling_rate)
  if sampling not in ("poisson", "without_replacement"):
    raise ValueError(f"sampling must be 'poisson' or 'without_replacement', got {sampling=!r}.")
  replace_one = sampling == "without_replacement"
  if replace_one and sampling_rate not in (None, 1.0):
    raise ValueError(f"sampling_rate must be None (or 1) for the replace-one audit, which runs on the whole "
                     f"batch, got {sampling_rate=}.")

  claimed = claimed_epsilon(noise_multiplier=sigma, delta=delta, sampling_rate=sampling_rate,
                            accountant=accountant, sampling=sampling)
  sensitivity = 2.0 if replace_one else 1.0
  exact = gaussian_mechanism_epsilon(sigma, delta, sensitivity) if sampling_rate in (None, 1.0) else None
  in_scores, out_scores = _mechanism_runs(
      clip_norm=clip_norm, sigma=sigma * scale, sampling_rate=sampling_rate, trials=trials,
      num_background=num_background, dim=dim, seed=seed, replace_one=replace_one)
  bound, details = holdout_epsilon_lower_bound(in_scores, out_scores, delta=delta,
                                               confidence=confidence, seed=seed)
  details.update(score="released gradient along the canary x expected_batch_size / C",
                 mean_in_score=float(np.mean(in_scores)), mean_out_score=float(np.mean(out_scores)),
                 num_background=num_background, dim=dim, seed=seed)
  return AuditResult(
      method="mechanism", claimed_epsilon=claimed, epsilon_lower_bound=bound,
      confidence=confidence, delta=delta, num_trials=trials, noise_multiplier=sigma,
      clip_norm=clip_norm, sampling_rate=sampling_rate, steps=1,
      noise_scale_for_testing=scale, accountant=accountant, exact_epsilon=exact, details=details,
      neighbours="replace-one" if replace_one else "add/remove-one")
