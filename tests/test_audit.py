"""Tests for dpmega/audit/: the statistics, the claims, and the audits' validity and power."""

import json
import math
import os

import numpy as np
import pytest
import scipy.stats

from dpmega import audit



@pytest.fixture()
def jax_privacy_auditing():
  """The maintained one-run and Clopper-Pearson code (the `audit` extra); its tests skip without it."""
  return pytest.importorskip("jax_privacy.auditing")


# ------------------------------------------------------------------ statistics
def test_clopper_pearson_matches_closed_forms():
  # All successes: the lower bound solves p^n = alpha; no success: (1-p)^n = alpha.
  for n in (1, 10, 1000):
    assert audit.clopper_pearson_lower(n, n, 0.05) == pytest.approx(0.05 ** (1 / n), rel=1e-9)
    assert audit.clopper_pearson_upper(0, n, 0.05) == pytest.approx(1 - 0.05 ** (1 / n), rel=1e-9)
  assert audit.clopper_pearson_lower(0, 10, 0.05) == 0.0
  assert audit.clopper_pearson_upper(10, 10, 0.05) == 1.0


def test_clopper_pearson_bounds_are_symmetric_and_contain_the_estimate():
  k = np.arange(0, 51)
  lo = audit.clopper_pearson_lower(k, 50, 0.025)
  hi = audit.clopper_pearson_upper(50 - k, 50, 0.025)
  np.testing.assert_allclose(lo, 1 - hi, atol=1e-12)
  assert np.all(lo <= k / 50) and np.all(audit.clopper_pearson_upper(k, 50, 0.025) >= k / 50)


def test_clopper_pearson_upper_has_its_coverage():
  # P[p > upper(K)] <= alpha for K ~ Binomial(n, p): check it exactly over all K.
  n, alpha = 40, 0.05
  k = np.arange(n + 1)
  upper = audit.clopper_pearson_upper(k, n, alpha)
  for p in np.linspace(0.01, 0.99, 25):
    miss = scipy.stats.binom.pmf(k, n, p)[upper < p].sum()
    assert miss <= alpha + 1e-12


def test_count_bound_matches_jax_privacy_clopper_pearson_at_a_fixed_threshold(jax_privacy_auditing):
  rng = np.random.default_rng(0)
  in_scores, out_scores = rng.normal(1.5, 1, 3000), rng.normal(0, 1, 3000)
  for t in (1.0, 2.0, 3.0):
    ours = audit.epsilon_lower_bound_from_counts(
        int(np.sum(in_scores >= t)), 3000, int(np.sum(out_scores >= t)), 3000,
        delta=1e-5, significance=0.05)
    theirs = jax_privacy_auditing.CanaryScoreAuditor(in_scores, out_scores).epsilon_clopper_pearson(
        0.05, 1e-5, threshold_strategy=jax_privacy_auditing.Explicit(t))
    assert float(ours) == pytest.approx(theirs, rel=1e-9, abs=1e-12)


def test_count_bound_is_zero_without_evidence():
  assert audit.epsilon_lower_bound_from_counts(0, 100, 0, 100, delta=1e-5, significance=0.05) == 0
  assert audit.epsilon_lower_bound_from_counts(50, 100, 50, 100, delta=1e-5, significance=0.05) == 0


def test_holdout_bound_is_zero_when_scores_do_not_depend_on_membership():
  rng = np.random.default_rng(1)
  eps, _ = audit.holdout_epsilon_lower_bound(rng.normal(size=4000), rng.normal(size=4000),
                                             delta=1e-5, confidence=0.95)
  assert eps == 0.0


def test_holdout_bound_stays_below_exact_epsilon_of_a_gaussian_shift():
  # Scores N(mu, 1) vs N(0, 1) are exactly the Gaussian mechanism with sigma = 1/mu.
  # The 95% bound may exceed the truth with probability <= 5% per seed; it is far below.
  exact = audit.gaussian_mechanism_epsilon(1.0, 1e-5)
  bounds = []
  for seed in range(10):
    rng = np.random.default_rng(seed)
    eps, details = audit.holdout_epsilon_lower_bound(
        rng.normal(1.0, 1, 5000), rng.normal(0, 1, 5000), delta=1e-5, seed=seed)
    bounds.append(eps)
    assert details["holdout_positives"] == 2500
  assert max(bounds) < exact
  assert min(bounds) > 0.5  # and the attack is not vacuous


def test_holdout_finds_leakage_in_either_direction():
  rng = np.random.default_rng(2)
  up, d_up = audit.holdout_epsilon_lower_bound(rng.normal(4, 1, 4000), rng.normal(0, 1, 4000), delta=1e-5)
  down, d_down = audit.holdout_epsilon_lower_bound(rng.normal(-4, 1, 4000), rng.normal(0, 1, 4000),
                                                   delta=1e-5)
  assert up > 3 and down > 3
  assert d_up["test"] in ("P_in(score >= t) vs P_out", "P_out(score <= t) vs P_in")
  assert d_down["test"] in ("P_in(score <= t) vs P_out", "P_out(score >= t) vs P_in")


@pytest.mark.parametrize("kwargs, name", [
    (dict(in_scores=[], out_scores=[0.0, 1.0]), "in_scores"),
    (dict(in_scores=[0.0, 1.0], out_scores=[[0.0, 1.0]]), "out_scores"),
    (dict(in_scores=[0.0, math.nan], out_scores=[0.0, 1.0]), "in_scores"),
    (dict(in_scores=[0.0, 1.0], out_scores=[0.0, 1.0], delta=0.0), "delta"),
    (dict(in_scores=[0.0, 1.0], out_scores=[0.0, 1.0], delta=1.0), "delta"),
    (dict(in_scores=[0.0, 1.0], out_scores=[0.0, 1.0], confidence=1.0), "confidence"),
    (dict(in_scores=[0.0, 1.0], out_scores=[0.0, 1.0], confidence=math.nan), "confidence"),
])
def test_holdout_bound_rejects_bad_input_by_name(kwargs, name):
  kwargs = {"delta": 1e-5, **kwargs}
  with pytest.raises(ValueError, match=name):
    audit.holdout_epsilon_lower_bound(**kwargs)


# ------------------------------------------------------------------ claims
@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 4.0])
def test_exact_gaussian_epsilon_agrees_with_the_accountant(sigma):
  exact = audit.gaussian_mechanism_epsilon(sigma, 1e-5)
  pld = audit.claimed_epsilon(noise_multiplier=sigma, delta=1e-5, accountant="pld")
  rdp = audit.claimed_epsilon(noise_multiplier=sigma, delta=1e-5, accountant="rdp")
  assert exact <= pld + 1e-6 and pld == pytest.approx(exact, abs=1e-2)  # PLD is pessimistic, tight
  assert rdp >= exact  # RDP is looser


def test_exact_gaussian_epsilon_solves_the_balle_wang_equation():
  sigma, delta = 1.3, 1e-6
  eps = audit.gaussian_mechanism_epsilon(sigma, delta)
  mu, phi = 1 / sigma, scipy.stats.norm.cdf
  assert phi(mu / 2 - eps / mu) - math.exp(eps) * phi(-mu / 2 - eps / mu) == pytest.approx(delta, rel=1e-6)
  assert audit.gaussian_mechanism_epsilon(1e3, 0.5) == 0.0  # tiny mu: (0, 0.5)-DP already


def test_exact_gaussian_epsilon_of_replace_one_is_the_one_of_twice_the_sensitivity():
  # Replacing one example moves a sum clipped to C by up to 2C: μ = 2/σ, not 1/σ.
  sigma, delta = 2.0, 1e-5
  eps = audit.gaussian_mechanism_epsilon(sigma, delta, sensitivity=2.0)
  mu, phi = 2 / sigma, scipy.stats.norm.cdf
  assert phi(mu / 2 - eps / mu) - math.exp(eps) * phi(-mu / 2 - eps / mu) == pytest.approx(delta, rel=1e-6)
  assert eps == pytest.approx(audit.gaussian_mechanism_epsilon(sigma / 2, delta), rel=1e-9)
  assert eps > 2 * audit.gaussian_mechanism_epsilon(sigma, delta)  # the issue: 4.38 vs 2.17 printed
  with pytest.raises(ValueError, match="sensitivity"):
    audit.gaussian_mechanism_epsilon(sigma, delta, sensitivity=0.0)


@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_claimed_replace_one_epsilon_covers_the_exact_mechanism(accountant):
  for sigma in (0.8, 2.0, 5.0):
    exact = audit.gaussian_mechanism_epsilon(sigma, 1e-5, sensitivity=2.0)
    claimed = audit.claimed_epsilon(noise_multiplier=sigma, delta=1e-5, accountant=accountant,
                                    sampling="without_replacement")
    assert claimed >= exact * (1 - 1e-6)
    if accountant == "pld":
      assert claimed == pytest.approx(exact, rel=1e-3)


def test_claimed_epsilon_of_poisson_sampling_is_smaller_and_grows_with_steps():
  full = audit.claimed_epsilon(noise_multiplier=1.0, delta=1e-5)
  sub = audit.claimed_epsilon(noise_multiplier=1.0, delta=1e-5, sampling_rate=0.01)
  more = audit.claimed_epsilon(noise_multiplier=1.0, delta=1e-5, sampling_rate=0.01, steps=10)
  assert sub < full and sub < more


# ------------------------------------------------------------------ mechanism audit
def test_mechanism_audit_stays_below_claim_and_is_not_vacuous():
  r = audit.mechanism_audit(noise_multiplier=1.0, trials=20_000, delta=1e-5, seed=0)
  assert r.exact_epsilon == pytest.approx(r.claimed_epsilon, abs=1e-2)
  assert not r.violation
  assert 1.0 < r.epsilon_lower_bound < r.claimed_epsilon
  # the canary moves the released gradient by C / expected batch size, i.e. 1 in score units
  assert r.details["mean_in_score"] - r.details["mean_out_score"] == pytest.approx(1.0, abs=0.05)


def test_mechanism_audit_detects_noise_scaled_down():
  # The library is handed sigma/4 but the accountant is told sigma: a 4x under-noised
  # mechanism (true eps ~ 10 at sigma 0.5) must be caught.
  r = audit.mechanism_audit(noise_multiplier=2.0, trials=20_000, noise_scale_for_testing=0.25, seed=1)
  assert r.violation
  assert r.epsilon_lower_bound > r.claimed_epsilon + 1.0


def test_mechanism_audit_with_poisson_sampling_valid_and_powerful():
  honest = audit.mechanism_audit(noise_multiplier=1.0, sampling_rate=0.5, trials=10_000, seed=2)
  assert honest.exact_epsilon is None and honest.sampling_rate == 0.5
  assert not honest.violation and honest.epsilon_lower_bound > 0.5
  weak = audit.mechanism_audit(noise_multiplier=1.0, sampling_rate=0.5, trials=10_000, seed=2,
                               noise_scale_for_testing=0.3)
  assert weak.violation


def test_replace_one_audit_proves_more_than_add_remove_accounting_and_stays_below_its_own_claim():
  """The replace-one canary moves the sum by 2C: an audit proves ε above what the add/remove curve gives at σ.

  That add/remove curve is what dpmega claimed for fixed-size batches before the
  sensitivity fix (RDP of GaussianDpEvent(σ) = 4.73 at σ = 1): the audit alone
  shows that claim was false, and the replace-one claim (sensitivity 2C) holds.
  """
  r = audit.mechanism_audit(noise_multiplier=1.0, trials=50_000, sampling="without_replacement",
                            accountant="rdp", seed=3)
  assert r.neighbours == "replace-one" and r.exact_epsilon == pytest.approx(9.997, abs=1e-3)
  assert r.details["mean_in_score"] - r.details["mean_out_score"] == pytest.approx(2.0, abs=0.05)
  assert not r.violation and r.claimed_epsilon >= r.exact_epsilon
  add_remove_claim = audit.claimed_epsilon(noise_multiplier=1.0, delta=1e-5, accountant="rdp")
  assert r.epsilon_lower_bound > add_remove_claim
  assert "replace-one" in audit.format_table([r])


@pytest.mark.parametrize("kwargs, name", [
    (dict(noise_multiplier=1.0, sampling="shuffle"), "sampling"),
    (dict(noise_multiplier=1.0, sampling="without_replacement", sampling_rate=0.5), "sampling_rate"),
    (dict(noise_multiplier=0.0), "noise_multiplier"),
    (dict(noise_multiplier=math.inf), "noise_multiplier"),
    (dict(noise_multiplier=1.0, clip_norm=0.0), "clip_norm"),
    (dict(noise_multiplier=1.0, clip_norm=math.nan), "clip_norm"),
    (dict(noise_multiplier=1.0, trials=10), "trials"),
    (dict(noise_multiplier=1.0, trials=100.0), "trials"),
    (dict(noise_multiplier=1.0, confidence=0.4), "confidence"),
    (dict(noise_multiplier=1.0, delta=0.0), "delta"),
    (dict(noise_multiplier=1.0, sampling_rate=0.0), "sampling_rate"),
    (dict(noise_multiplier=1.0, sampling_rate=1.5), "sampling_rate"),
    (dict(noise_multiplier=1.0, dim=1), "dim"),
    (dict(noise_multiplier=1.0, noise_scale_for_testing=2.0), "noise_scale_for_testing"),
    (dict(noise_multiplier=1.0, noise_scale_for_testing=-0.1), "noise_scale_for_testing"),
])
def test_mechanism_audit_rejects_bad_input_by_name(kwargs, name):
  with pytest.raises(ValueError, match=name):
    audit.mechanism_audit(**kwargs)


# ------------------------------------------------------------------ one-run audit
def _p_value_appendix_d(m, r, v, eps, delta):
  """Steinke, Nasr, Jagielski 2023, Appendix D, written out independently for the test."""
  q = 1 / (1 + math.exp(-eps))
  beta = scipy.stats.binom.sf(v - 1, r, q)
  alpha, total = 0.0, 0.0
  for i in range(1, v + 1):
    total += scipy.stats.binom.pmf(v - i, r, q)
    alpha = max(alpha, total / i)
  return min(beta + alpha * delta * 2 * m, 1.0)


def _eps_appendix_d(m, r, v, delta, p):
  lo, hi = 0.0, 1.0
  while _p_value_appendix_d(m, r, v, hi, delta) < p:
    hi += 1
  for _ in range(50):
    mid = (lo + hi) / 2
    if _p_value_appendix_d(m, r, v, mid, delta) < p:
      lo = mid
    else:
      hi = mid
  return lo


def _scores_with_counts(m, r, v):
  """m canary scores where the top r hold exactly v included canaries."""
  n_in = (m + (2 * v - r)) // 2  # about half included
  in_scores = np.concatenate([np.linspace(10, 11, v), np.linspace(0, 1, n_in - v)])
  out_scores = np.concatenate([np.linspace(10, 11, r - v) + 0.0005, np.linspace(0, 1, m - n_in - (r - v))])
  return in_scores, out_scores


@pytest.mark.parametrize("m, r, v, delta", [
    (1000, 100, 100, 1e-5), (1000, 100, 95, 1e-5), (1000, 500, 400, 1e-5),
    (200, 50, 45, 1e-6), (4000, 400, 360, 1e-5)])
def test_one_run_bound_matches_the_papers_appendix_d(m, r, v, delta, jax_privacy_auditing):
  in_scores, out_scores = _scores_with_counts(m, r, v)
  assert in_scores.size + out_scores.size == m
  ours = audit.one_run_epsilon_lower_bound(in_scores, out_scores, delta=delta, confidence=0.95,
                                           num_guesses=r)
  assert ours == pytest.approx(_eps_appendix_d(m, r, v, delta, 0.05), abs=1e-4)


def test_one_run_bound_with_all_guesses_correct_and_tiny_delta_is_randomized_response(jax_privacy_auditing):
  # delta -> 0: P[Binomial(r, e^eps/(1+e^eps)) >= r] = 0.05 gives eps = logit(0.05 ** (1/r)).
  r = 100
  in_scores, out_scores = _scores_with_counts(1000, r, r)
  q = 0.05 ** (1 / r)
  ours = audit.one_run_epsilon_lower_bound(in_scores, out_scores, delta=1e-12, num_guesses=r)
  assert ours == pytest.approx(math.log(q / (1 - q)), abs=1e-3)


def test_one_run_bound_all_thresholds_is_below_best_fixed_guess_count(jax_privacy_auditing):
  # Bonferroni over thresholds costs something, but never invents leakage.
  in_scores, out_scores = _scores_with_counts(1000, 100, 100)
  best_fixed = audit.one_run_epsilon_lower_bound(in_scores, out_scores, delta=1e-5, num_guesses=100)
  corrected = audit.one_run_epsilon_lower_bound(in_scores, out_scores, delta=1e-5)
  assert 0 < corrected <= best_fixed
  rng = np.random.default_rng(0)
  assert audit.one_run_epsilon_lower_bound(rng.normal(size=500), rng.normal(size=500), delta=1e-5) == 0.0


def test_one_run_training_audit_valid_and_powerful(jax_privacy_auditing):
  honest = audit.one_run_training_audit(noise_multiplier=10.0, steps=4, num_canaries=1000, seed=0)
  assert honest.method == "one_run" and honest.num_trials == 1000 and honest.steps == 4
  assert honest.exact_epsilon == pytest.approx(honest.claimed_epsilon, abs=1e-2)
  assert not honest.violation
  weak = audit.one_run_training_audit(noise_multiplier=10.0, steps=4, num_canaries=1000, seed=0,
                                      noise_scale_for_testing=0.05)
  assert weak.violation and weak.epsilon_lower_bound > 2 * weak.claimed_epsilon


def test_one_run_training_audit_with_poisson_sampling(jax_privacy_auditing):
  r = audit.one_run_training_audit(noise_multiplier=1.0, steps=6, batch_size=600, num_canaries=1000,
                                   seed=3)
  assert r.sampling_rate == pytest.approx(600 / 1256)
  assert r.exact_epsilon is None
  assert 0.5 < r.epsilon_lower_bound < r.claimed_epsilon


@pytest.mark.parametrize("kwargs, name", [
    (dict(noise_multiplier=-1.0), "noise_multiplier"),
    (dict(noise_multiplier=1.0, num_canaries=1), "num_canaries"),
    (dict(noise_multiplier=1.0, steps=0), "steps"),
    (dict(noise_multiplier=1.0, batch_size=10**7), "batch_size"),
    (dict(noise_multiplier=1.0, learning_rate=math.nan), "learning_rate"),
    (dict(noise_multiplier=1.0, num_guesses=0), "num_guesses"),
])
def test_one_run_training_audit_rejects_bad_input_by_name(kwargs, name, jax_privacy_auditing):
  with pytest.raises(ValueError, match=name):
    audit.one_run_training_audit(**kwargs)


# ------------------------------------------------------------------ reporting
def _result(**kw):
  base = dict(method="mechanism", claimed_epsilon=2.0, epsilon_lower_bound=1.0, confidence=0.95,
              delta=1e-5, num_trials=100, noise_multiplier=2.0, clip_norm=1.0, sampling_rate=None,
              steps=1)
  return audit.AuditResult(**{**base, **kw})


def test_table_and_json_report_claim_bound_confidence_and_trials(tmp_path):
  results = [_result(), _result(epsilon_lower_bound=3.0, noise_scale_for_testing=0.5)]
  table = audit.format_table(results)
  for column in ("claimed ε", "audited ε ≥", "confidence", "trials"):
    assert column in table
  assert "VIOLATION" in table.splitlines()[-1] and "ok" in table.splitlines()[-2]
  path = tmp_path / "audit.json"
  audit.write_json(results, path)
  data = json.loads(path.read_text())["audits"]
  assert [d["violation"] for d in data] == [False, True]
  for key in ("claimed_epsilon", "epsilon_lower_bound", "confidence", "num_trials", "delta"):
    assert key in data[0]
  assert os.listdir(tmp_path) == ["audit.json"]  # no temp file left behind


def test_write_json_leaves_nothing_on_failure(tmp_path):
  with pytest.raises(OSError):
    audit.write_json([_result()], tmp_path / "missing" / "audit.json")
  with pytest.raises(TypeError):
    audit.write_json([_result(details={"x": object()})], tmp_path / "audit.json")
  assert os.listdir(tmp_path) == []
