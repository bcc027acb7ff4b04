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

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from fractions import Fraction
from typing import Any, Iterable, Sequence

import numpy as np
import scipy.optimize
import scipy.stats

# The public constant the one-run canaries' target is set to, relative to C:
# large enough that a canary's gradient points the same way however training
# moves its coordinate, so every canary gradient is clipped to exactly C.
_CANARY_TARGET = 1.0e4

# Trials per jitted call of the mechanism audit (bounds memory, one compile).
_CHUNK = 4096


# --------------------------------------------------------------- validation
def _check_real(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False,
                hi_open: bool = False) -> float:
  """A finite float in the range, else ``ValueError`` naming ``name`` and the range."""
  lb = "(" if lo_open else "["
  rb = ")" if hi_open else "]"
  allowed = f"{lb}{lo}, {hi}{rb}"
  if isinstance(value, bool):
    raise ValueError(f"{name} must be a number in {allowed}, got {name}={value!r}.")
  try:
    v = float(value)
  except (TypeError, ValueError, OverflowError):
    raise ValueError(f"{name} must be a number in {allowed}, got {name}={value!r}.") from None
  ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  if not ok:
    raise ValueError(f"{name} must be a number in {allowed}, got {name}={value!r}.")
  return v


def _check_int(name: str, value: Any, lo: int, hi: int) -> int:
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
    raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {name}={value!r}.")
  return int(value)


def _check_confidence(confidence: Any) -> float:
  return _check_real("confidence", confidence, 0.5, 1.0, hi_open=True)


def _check_delta(delta: Any) -> float:
  return _check_real("delta", delta, 0.0, 1.0, lo_open=True, hi_open=True)


def _check_sampling_rate(sampling_rate: Any) -> float | None:
  if sampling_rate is None:
    return None
  return _check_real("sampling_rate", sampling_rate, 0.0, 1.0, lo_open=True)


def _scores(name: str, scores: Any) -> np.ndarray:
  a = np.asarray(scores, dtype=np.float64)
  if a.ndim != 1 or a.size == 0:
    raise ValueError(f"{name} must be a non-empty 1-D array of scores, got shape {a.shape}.")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{name} must be finite, got {int(np.sum(~np.isfinite(a)))} non-finite score(s).")
  return a


# --------------------------------------------------------------- statistics
def clopper_pearson_lower(successes: Any, trials: int, significance: float) -> np.ndarray:
  """One-sided Clopper–Pearson lower bound: ``P[p < lower] <= significance``.

  Args:
    successes: number(s) of successes k (array-like of ints in ``[0, trials]``).
    trials: number of Bernoulli trials n > 0.
    significance: allowed failure probability, in (0, 1).

  Returns:
    ``Beta.ppf(significance, k, n - k + 1)`` (0 where k == 0), float64.

  Example:
    >>> round(float(clopper_pearson_lower(100, 100, 0.05)), 4)  # 0.05 ** (1/100)
    0.9705
  """
  k = np.asarray(successes, dtype=np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    lo = scipy.stats.beta.ppf(significance, k, trials - k + 1)
  return np.where(k > 0, lo, 0.0)


def clopper_pearson_upper(successes: Any, trials: int, significance: float) -> np.ndarray:
  """One-sided Clopper–Pearson upper bound: ``P[p > upper] <= significance``.

  Example:
    >>> round(float(clopper_pearson_upper(0, 100, 0.05)), 4)  # 1 - 0.05 ** (1/100)
    0.0295
  """
  k = np.asarray(successes, dtype=np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    hi = scipy.stats.beta.ppf(1.0 - significance, k + 1, trials - k)
  return np.where(k < trials, hi, 1.0)


def epsilon_lower_bound_from_counts(
    true_positives: Any, num_positives: int, false_positives: Any, num_negatives: int, *,
    delta: float, significance: float) -> np.ndarray:
  """``log((TPR_lo - δ) / FPR_hi)`` with one-sided Clopper–Pearson bounds, floored at 0.

  ``TPR_lo`` and ``FPR_hi`` are each taken at ``significance / 2`` so that both
  hold together with probability ``>= 1 - significance`` (union bound). Valid
  for ONE threshold fixed before the counts were drawn; choosing the best of
  many on the same data needs a correction (see
  :func:`holdout_epsilon_lower_bound`).

  Returns:
    float64 array (or scalar) of lower bounds on ε for (ε, δ)-DP, >= 0.
  """
  tpr_lo = clopper_pearson_lower(true_positives, num_positives, significance / 2)
  fpr_hi = clopper_pearson_upper(false_positives, num_negatives, significance / 2)
  with np.errstate(invalid="ignore", divide="ignore"):
    eps = np.log(np.maximum(tpr_lo - delta, 0.0)) - np.log(fpr_hi)
  return np.where(tpr_lo > delta, np.maximum(eps, 0.0), 0.0)


def _threshold_bounds(pos: np.ndarray, neg: np.ndarray, delta: float, significance: float):
  """Bounds of the rule "score >= t means positive" at every positive score t."""
  thresholds = np.unique(pos)
  tp = pos.size - np.searchsorted(np.sort(pos), thresholds, side="left")
  fp = neg.size - np.searchsorted(np.sort(neg), thresholds, side="left")
  eps = epsilon_lower_bound_from_counts(tp, pos.size, fp, neg.size, delta=delta,
                                        significance=significance)
  return thresholds, eps


def holdout_epsilon_lower_bound(
    in_scores: Any, out_scores: Any, *, delta: float, confidence: float = 0.95, seed: int = 0,
) -> tuple[float, dict[str, Any]]:
  """ε lower bound from scores of runs with (in) and without (out) the canary.

  Threshold selection by **holdout**: each score array is split at random into
  two halves. On the first half every threshold ``t``, both sets ``{score >=
  t}`` and ``{score <= t}`` and both directions of the DP inequality are tried
  -- ``log((P_in(S) - δ) / P_out(S))``, i.e. ``log((TPR - δ) / FPR)``, and the
  symmetric ``log((P_out(S) - δ) / P_in(S))``, i.e. ``log((TNR - δ) / FNR)`` --
  and the one with the largest Clopper–Pearson bound on that half is chosen
  (so the canary may move the score either way). Only that one test is
  then evaluated on the second half, with one-sided Clopper–Pearson bounds at
  ``(1 - confidence) / 2`` each. The second half is independent of the choice,
  so no multiple-comparison correction is needed and the bound holds with
  probability ``>= confidence``.

  Args:
    in_scores: 1-D scores of runs on the input with the canary (>= 2 of them).
    out_scores: 1-D scores of runs on the input without it (>= 2 of them).
    delta: δ of the (ε, δ) claim being tested, in (0, 1).
    confidence: in [0.5, 1).
    seed: seed of the random split.

  Returns:
    ``(epsilon_lower_bound, details)``; ``details`` has the chosen ``test``,
    ``threshold`` and the holdout counts.
  """
  in_s = _scores("in_scores", in_scores)
  out_s = _scores("out_scores", out_scores)
  if in_s.size < 2 or out_s.size < 2:
    raise ValueError("in_scores and out_scores must each hold at least 2 scores (one per half).")
  delta = _check_delta(delta)
  significance = 1.0 - _check_confidence(confidence)
  rng = np.random.default_rng(seed)
  in_perm, out_perm = rng.permutation(in_s), rng.permutation(out_s)
  in_sel, in_eval = in_perm[: in_s.size // 2], in_perm[in_s.size // 2:]
  out_sel, out_eval = out_perm[: out_s.size // 2], out_perm[out_s.size // 2:]

  # The DP inequality P[M(D) in S] <= e^eps P[M(D') in S] + delta holds both ways
  # (D, D' = in, out and out, in) and for any S: try S = {score >= t} and
  # S = {score <= t} (as {-score >= -t}) each way. A test is (sign, numerator world).
  tests = (("in", 1.0), ("out", 1.0), ("in", -1.0), ("out", -1.0))
  sel = {"in": in_sel, "out": out_sel}
  ev = {"in": in_eval, "out": out_eval}
  other = {"in": "out", "out": "in"}
  best = (-1.0, tests[0], math.inf)
  for world, sign in tests:
    thresholds, eps = _threshold_bounds(sign * sel[world], sign * sel[other[world]], delta, significance)
    i = int(np.argmax(eps))
    if eps[i] > best[0]:
      best = (float(eps[i]), (world, sign), float(thresholds[i]))
  _, (world, sign), t = best
  pos, neg = sign * ev[world], sign * ev[other[world]]
  tp, fp = int(np.sum(pos >= t)), int(np.sum(neg >= t))
  eps = float(epsilon_lower_bound_from_counts(tp, pos.size, fp, neg.size, delta=delta,
                                              significance=significance))
  details = {"test": f"P_{world}(score {'>=' if sign > 0 else '<='} t) vs P_{other[world]}",
             "threshold": sign * t,
             "holdout_true_positives": tp, "holdout_positives": int(pos.size),
             "holdout_false_positives": fp, "holdout_negatives": int(neg.size),
             "selection": "holdout (half the trials choose the test, half bound it)"}
  return eps, details


# --------------------------------------------------------------- what is claimed
def gaussian_mechanism_epsilon(noise_multiplier: float, delta: float, sensitivity: float = 1.0) -> float:
  """Exact ε(δ) of one Gaussian mechanism: noise std ``noise_multiplier·C``, L2 sensitivity ``sensitivity·C``.

  Balle & Wang (2018), Theorem 8: with ``μ = sensitivity/σ``, the mechanism is
  (ε, δ)-DP iff ``Φ(μ/2 - ε/μ) - e^ε Φ(-μ/2 - ε/μ) <= δ``; this returns the
  smallest such ε >= 0 (solved with Brent's method).

  The sensitivity depends on the neighbouring relation: a clipped sum moves by
  at most C when one example is added or removed (``sensitivity=1``) but by up
  to 2C when one is replaced (``sensitivity=2``: ``g`` may become ``-g``), so the
  two relations do NOT give the same curve at the same σ
  (:attr:`dpmega.accounting.SamplingScheme.sensitivity`).

  Example:
    >>> round(gaussian_mechanism_epsilon(1.0, 1e-5), 3)
    4.377
    >>> round(gaussian_mechanism_epsilon(2.0, 1e-5, sensitivity=2.0), 3)  # replace-one at σ = 2
    4.377
  """
  sigma = _check_real("noise_multiplier", noise_multiplier, 0.0, math.inf, lo_open=True, hi_open=True)
  delta = _check_delta(delta)
  sensitivity = _check_real("sensitivity", sensitivity, 0.0, math.inf, lo_open=True, hi_open=True)
  mu = sensitivity / sigma
  norm = scipy.stats.norm

  def delta_of(eps: float) -> float:
    # e^ε Φ(b) computed in logs so that large ε does not overflow.
    a = norm.cdf(mu / 2 - eps / mu)
    b = math.exp(eps + norm.logcdf(-mu / 2 - eps / mu))
    return a - b

  if delta_of(0.0) <= delta:
    return 0.0
  hi = 1.0
  while delta_of(hi) > delta:
    hi *= 2.0
  return float(scipy.optimize.brentq(lambda e: delta_of(e) - delta, 0.0, hi, xtol=1e-10))


def _ledger_sizes(sampling_rate: float | None) -> tuple[int, int]:
  """``(batch_size, dataset_size)`` whose ratio is the sampling rate (1 when None)."""
  if sampling_rate is None or sampling_rate == 1.0:
    return 1, 1
  frac = Fraction(sampling_rate).limit_denominator(10**9)
  if frac.numerator < 1:
    raise ValueError(f"sampling_rate must be >= 1e-9, got {sampling_rate=}.")
  return frac.numerator, frac.denominator


def claimed_epsilon(*, noise_multiplier: float, delta: float, sampling_rate: float | None = None,
                    steps: int = 1, accountant: str = "pld", sampling: str = "poisson") -> float:
  """The ε the library's accountant claims for ``steps`` sampled Gaussian steps.

  ``sampling_rate=None`` (or 1) is no subsampling: every example in every step.
  Computed by :func:`dpmega.accounting.compute_epsilon` on a
  :class:`dpmega.accounting.Ledger` with the scheme ``sampling``: ``"poisson"``
  (add/remove-one, sensitivity C) or ``"without_replacement"`` (replace-one,
  sensitivity 2C; PLD only without subsampling).
  """
  from dpmega import accounting  # pylint: disable=import-outside-toplevel

  batch_size, dataset_size = _ledger_sizes(_check_sampling_rate(sampling_rate))
  ledger = accounting.Ledger()
  ledger.record(batch_size=batch_size, dataset_size=dataset_size, noise_multiplier=noise_multiplier,
                scheme=sampling, steps=steps)
  return float(accounting.compute_epsilon(ledger, delta, accountant=accountant))


# --------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class AuditResult:
  """One audit: what the accountant claims against what the audit proves.

  Attributes:
    method: ``"mechanism"`` or ``"one_run"``.
    claimed_epsilon: the accountant's ε(δ) for what was audited.
    epsilon_lower_bound: the audit's ε lower bound, valid with ``confidence``.
    confidence: probability that the lower bound is valid.
    delta: the δ of both numbers.
    num_trials: mechanism: runs per neighbouring input; one-run: canaries m.
    noise_multiplier: σ the accountant was told (before the test-only scale).
    clip_norm: C.
    sampling_rate: Poisson rate q, or None for no subsampling.
    steps: DP-SGD steps audited (1 for the mechanism audit).
    noise_scale_for_testing: 1.0 for a real audit; < 1 weakens the noise on purpose.
    accountant: which accountant computed ``claimed_epsilon``.
    exact_epsilon: the exact ε of the Gaussian mechanism when known, else None.
    details: how the bound was obtained (threshold, counts, ...).
    neighbours: ``"add/remove-one"`` or ``"replace-one"``: what the audit's two
      inputs differ by, and the relation of ``claimed_epsilon``.
  """

  method: str
  claimed_epsilon: float
  epsilon_lower_bound: float
  confidence: float
  delta: float
  num_trials: int
  noise_multiplier: float
  clip_norm: float
  sampling_rate: float | None
  steps: int
  noise_scale_for_testing: float = 1.0
  accountant: str = "pld"
  exact_epsilon: float | None = None
  details: dict = dataclasses.field(default_factory=dict)
  neighbours: str = "add/remove-one"

  @property
  def violation(self) -> bool:
    """True when the audit proves more leakage than the accountant claims."""
    return self.epsilon_lower_bound > self.claimed_epsilon

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["violation"] = self.violation
    return d


_COLUMNS = ("audit", "claimed ε", "audited ε ≥", "exact ε", "confidence", "δ", "trials", "σ", "q",
            "steps", "verdict")


def format_table(results: Iterable[AuditResult]) -> str:
  """A plain-text table, one row per audit."""
  rows = [_COLUMNS]
  for r in results:
    method = r.method if r.neighbours == "add/remove-one" else f"{r.method} ({r.neighbours})"
    if r.noise_scale_for_testing != 1.0:
      method += f" (noise x{r.noise_scale_for_testing:g})"
    rows.append((
        method, f"{r.claimed_epsilon:.4g}", f"{r.epsilon_lower_bound:.4g}",
        "-" if r.exact_epsilon is None else f"{r.exact_epsilon:.4g}", f"{r.confidence:g}",
        f"{r.delta:g}", str(r.num_trials), f"{r.noise_multiplier:g}",
        "-" if r.sampling_rate is None else f"{r.sampling_rate:g}", str(r.steps),
        "VIOLATION" if r.violation else "ok"))
  widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS))]
  lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
  lines.insert(1, "  ".join("-" * w for w in widths))
  return "\n".join(lines)


def write_json(results: Sequence[AuditResult], path: str | os.PathLike) -> None:
  """Writes ``{"audits": [...]}`` to ``path`` atomically (a temp file, then rename).

  Either the whole file appears or, on any error, nothing does.
  """
  path = os.fspath(path)
  text = json.dumps({"audits": [r.to_dict() for r in results]}, indent=2, allow_nan=True) + "\n"
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(prefix=".audit-", suffix=".json.tmp", dir=directory)
  try:
    with os.fdopen(fd, "w", encoding="utf-8") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise


# --------------------------------------------------------------- mechanism audit
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
  sigma = _check_real("noise_multiplier", noise_multiplier, 0.0, 1e6, lo_open=True)
  clip_norm = _check_real("clip_norm", clip_norm, 0.0, 1e12, lo_open=True)
  delta = _check_delta(delta)
  trials = _check_int("trials", trials, 20, 10**7)
  confidence = _check_confidence(confidence)
  sampling_rate = _check_sampling_rate(sampling_rate)
  num_background = _check_int("num_background", num_background, 0, 10**4)
  dim = _check_int("dim", dim, 2, 10**4)
  if (num_background + 1) * dim > 10**7:
    raise ValueError(f"num_background and dim: (num_background + 1) x dim must be at most 1e7, "
                     f"got {num_background=}, {dim=}.")
  seed = _check_int("seed", seed, 0, 2**31 - 1)
  scale = _check_real("noise_scale_for_testing", noise_scale_for_testing, 0.0, 1.0)
  _ledger_sizes(sampling_rate)
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


# --------------------------------------------------------------- one-run audit
def _jax_privacy_auditing():
  try:
    from jax_privacy import auditing  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(
        "the one-run audit uses jax_privacy.auditing (Steinke, Nasr, Jagielski 2023): "
        "pip install 'dpmega[audit]' (jax-privacy==2.0.0, Python >= 3.11).") from e
  return auditing


def one_run_epsilon_lower_bound(in_scores: Any, out_scores: Any, *, delta: float,
                                confidence: float = 0.95, num_guesses: int | None = None) -> float:
  """ε lower bound of the one-run audit (Steinke, Nasr, Jagielski 2023, Theorem 3.1).

  The auditor guesses "included" for canaries whose score is at least a
  threshold (one-sided guesses, ``k_- = 0`` in the paper) and counts correct
  guesses; the bound is the largest ε whose p-value for that many correct
  guesses among ``r`` is below ``1 - confidence``. Computed by
  ``jax_privacy.auditing.CanaryScoreAuditor.epsilon_one_run``.

  Args:
    in_scores: scores of the canaries that were included (higher = more "in").
    out_scores: scores of the canaries that were not. ``m`` is the total count.
    delta: δ in (0, 1).
    confidence: in [0.5, 1).
    num_guesses: ``None``: every threshold is tried, with a Bonferroni
      correction over them (jax_privacy's default). An int ``k``: the paper's
      fixed ``k_+ = k`` -- guess "in" for the ``k`` highest scores (ties at the
      k-th score are all guessed); fix it before seeing the scores.

  Returns:
    The lower bound, >= 0.
  """
  in_s = _scores("in_scores", in_scores)
  out_s = _scores("out_scores", out_scores)
  delta = _check_delta(delta)
  significance = 1.0 - _check_confidence(confidence)
  auditing = _jax_privacy_auditing()
  auditor = auditing.CanaryScoreAuditor(in_s, out_s)
  if num_guesses is None:
    strategy = auditing.Bonferroni()
  else:
    k = _check_int("num_guesses", num_guesses, 1, in_s.size + out_s.size)
    threshold = np.sort(np.concatenate([in_s, out_s]))[::-1][k - 1]
    strategy = auditing.Explicit(float(threshold))
  return max(0.0, float(auditor.epsilon_one_run(significance, delta, threshold_strategy=strategy)))


# Dense floats the one-run model may hold per array ((m + background) x (m + 8)).
_MAX_ONE_RUN_FLOATS = 10**8


def check_one_run_size(num_canaries: Any, num_background: Any) -> tuple[int, int]:
  """Validates the one-run audit's sizes (the model is dense: memory grows as m^2)."""
  m = _check_int("num_canaries", num_canaries, 2, 10**4)
  n_bg = _check_int("num_background", num_background, 0, 10**4)
  if (m + n_bg) * (m + 8) > _MAX_ONE_RUN_FLOATS:
    raise ValueError(
        f"num_canaries and num_background: (num_canaries + num_background) x (num_canaries + 8) must be "
        f"at most {_MAX_ONE_RUN_FLOATS:.0e} floats, got {num_canaries=}, {num_background=}.")
  return m, n_bg


def one_run_training_audit(
    *,
    noise_multiplier: float,
    num_canaries: int = 1000,
    num_background: int = 256,
    steps: int = 8,
    batch_size: int | None = None,
    clip_norm: float = 1.0,
    learning_rate: float = 1.0,
    delta: float = 1e-5,
    confidence: float = 0.95,
    seed: int = 0,
    accountant: str = "pld",
    num_guesses: int | None = None,
    noise_scale_for_testing: float = 1.0,
) -> AuditResult:
  """Audits a whole (tiny) DP-SGD training run in one run (Steinke et al. 2023).

  The model is linear regression on ``num_background`` generated examples plus
  ``num_canaries`` canaries; canary ``j`` owns parameter coordinate ``j`` (its
  input is a one-hot there and its target is far away, so its gradient is
  always clipped to exactly ``C`` along that coordinate). Each canary is in the
  training set independently with probability 1/2. Training: ``steps`` DP-SGD
  steps, each on a Poisson sample with rate ``batch_size / (num_background +
  num_canaries)`` drawn by :class:`dpmega.sampling.PoissonSampler` (canaries
  not in the training set are masked out), private gradient by
  :func:`dpmega.private_value_and_grad`, update by ``optax.sgd``. After
  training, canary ``j`` is scored by how far its coordinate moved towards its
  target (white-box on the final parameters only), and the bound is
  :func:`one_run_epsilon_lower_bound`. The claim is the accountant's ε for
  ``steps`` Poisson steps at that rate and σ.

  Args:
    noise_multiplier: σ, > 0.
    num_canaries: m, in [2, 10^4].
    num_background: other training examples, in [0, 10^4] (the dense model
      holds ``(m + num_background) x (m + 8)`` floats, at most 10^8).
    steps: DP-SGD steps, in [1, 10^5].
    batch_size: expected batch size (int); None: every example every step (q = 1).
    clip_norm: C > 0.
    learning_rate: SGD learning rate > 0.
    delta: δ in (0, 1).
    confidence: in [0.5, 1).
    seed: seed of canary inclusion, sampling, data and noise.
    accountant: ``"pld"`` or ``"rdp"``.
    num_guesses: see :func:`one_run_epsilon_lower_bound`.
    noise_scale_for_testing: TEST-ONLY, as in :func:`mechanism_audit`.

  Returns:
    An :class:`AuditResult` with ``num_trials = num_canaries``.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel

  from dpmega.private_grad import private_value_and_grad  # pylint: disable=import-outside-toplevel
  from dpmega.sampling import PoissonSampler  # pylint: disable=import-outside-toplevel
  from dpmega.noise import insecure_secret_from_seed  # pylint: disable=import-outside-toplevel

  sigma = _check_real("noise_multiplier", noise_multiplier, 0.0, 1e6, lo_open=True)
  m, n_bg = check_one_run_size(num_canaries, num_background)
  steps = _check_int("steps", steps, 1, 10**5)
  n = n_bg + m
  batch_size = n if batch_size is None else _check_int("batch_size", batch_size, 1, n)
  clip_norm = _check_real("clip_norm", clip_norm, 0.0, 1e12, lo_open=True)
  lr = _check_real("learning_rate", learning_rate, 0.0, 1e6, lo_open=True)
  delta = _check_delta(delta)
  confidence = _check_confidence(confidence)
  seed = _check_int("seed", seed, 0, 2**31 - 1)
  scale = _check_real("noise_scale_for_testing", noise_scale_for_testing, 0.0, 1.0)
  if num_guesses is not None:
    _check_int("num_guesses", num_guesses, 1, m)
  _jax_privacy_auditing()  # fail before training if the extra is missing

  q = batch_size / n
  claimed = claimed_epsilon(noise_multiplier=sigma, delta=delta, sampling_rate=q, steps=steps,
                            accountant=accountant)
  # Without sampling, T Gaussian steps compose exactly to one with σ / sqrt(T).
  exact = gaussian_mechanism_epsilon(sigma / math.sqrt(steps), delta) if q == 1.0 else None

  rng = np.random.default_rng(seed)
  included = rng.random(m) < 0.5
  d_bg = 8
  dim = d_bg + m
  x = np.zeros((n, dim), np.float32)
  y = np.zeros((n,), np.float32)
  x[:n_bg, :d_bg] = rng.normal(size=(n_bg, d_bg))
  y[:n_bg] = x[:n_bg, :d_bg] @ rng.normal(size=d_bg) + 0.1 * rng.normal(size=n_bg)
  x[n_bg + np.arange(m), d_bg + np.arange(m)] = 1.0
  y[n_bg:] = -_CANARY_TARGET * clip_norm
  data = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
  in_training_set = np.concatenate([np.ones(n_bg, bool), included])

  def loss(w, example):
    return 0.5 * (jnp.dot(w, example["x"]) - example["y"]) ** 2

  grad_fn = private_value_and_grad(loss, clip_norm=clip_norm, noise_multiplier=sigma * scale,
                                   expected_batch_size=batch_size)
  optimizer = optax.sgd(lr)

  @jax.jit
  def train_step(w, opt_state, mask, key):
    _, grads, _ = grad_fn(w, data, key, mask=mask)
    updates, opt_state = optimizer.update(grads, opt_state, w)
    return optax.apply_updates(w, updates), opt_state

  w = jnp.zeros((dim,), jnp.float32)
  opt_state = optimizer.init(w)
  # An audit is an experiment, not a release: its sampling is reproducible from the public seed.
  sampler = PoissonSampler(n, secret=insecure_secret_from_seed(seed))
  key = jax.random.key(seed)
  for t in range(steps):
    mask = np.zeros((n,), np.float32)
    mask[sampler.sample(batch_size)] = 1.0
    mask *= in_training_set  # canaries left out of the training set are never seen
    w, opt_state = train_step(w, opt_state, jnp.asarray(mask), jax.random.fold_in(key, t))

  # Training pulls an included canary's coordinate towards its (negative) target.
  scores = -np.asarray(w, np.float64)[d_bg:]
  bound = one_run_epsilon_lower_bound(scores[included], scores[~included], delta=delta,
                                      confidence=confidence, num_guesses=num_guesses)
  details = {"num_included": int(included.sum()), "num_background": n_bg,
             "batch_size": batch_size, "learning_rate": lr, "seed": seed,
             "guesses": "all thresholds, Bonferroni" if num_guesses is None else f"top {num_guesses}",
             "score": "final parameter of the canary's coordinate, towards its target",
             "method": "Steinke, Nasr, Jagielski 2023 via jax_privacy.auditing"}
  return AuditResult(
      method="one_run", claimed_epsilon=claimed, epsilon_lower_bound=bound,
      confidence=confidence, delta=delta, num_trials=m, noise_multiplier=sigma,
      clip_norm=clip_norm, sampling_rate=None if q == 1.0 else q, steps=steps,
      noise_scale_for_testing=scale, accountant=accountant, exact_epsilon=exact, details=details)
