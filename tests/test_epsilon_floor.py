"""ε = 0 only where it is proven (dpmega/accounting/events.py ``checked_epsilon``, dpmega/accounting/tiny_rdp.py).

At a huge σ, dp-accounting computes the RDP of a sampled Gaussian as ``log(A_α)`` with ``A_α - 1`` near or below
float64's resolution of 1: some orders come out 0 or negative, and its ε then reads 0 whatever the number of steps.
The reproduction: N = 1e7, B = 1000 (q = 1e-4), 1e6 steps, σ = 3e5, δ = 1e-8. dp-accounting's RDP says ε = 0;
the KL divergence (about T q² / σ² = 1.1e-13) is far above δ² = 1e-16 and the total variation bound
(T q / (σ sqrt(2 pi)) = 1.3e-4) far above δ: nothing proves (0, δ)-DP. At σ = 2e5 it says ε = 0.01025.
"""

import json
import math
import subprocess
import sys
import warnings

from dp_accounting.rdp import rdp_privacy_accountant
import numpy as np
import pytest

from dpmega import accounting
from dpmega.accounting import events
from dpmega.accounting import tiny_rdp
from dpmega.errors import UsageError
from dpmega.sampling import SamplingScheme

REPRO = dict(dataset_size=10_000_000, batch_sizes=1000, num_steps=1_000_000, delta=1e-8)


def _eps(sigma, accountant="rdp", **kw):
  kw = {**REPRO, **kw}
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", tiny_rdp.EpsilonRoundingWarning)
    return accounting.epsilon_for_schedule(noise_multiplier=sigma, accountant=accountant, **kw)


def _proven_zero(q, sigma, steps, delta):
  """Independent of the code under test: (0, δ)-DP from KL <= T χ² (Bretagnolle-Huber) or from TV <= T q TV_1."""
  kl = steps * q * q * math.expm1(1 / sigma**2)  # χ² of one Poisson step is q² (e^{1/σ²} - 1)
  tv = steps * q * math.erf(1 / (2 * math.sqrt(2) * sigma))
  return kl <= -math.log1p(-delta * delta) * (1 + 1e-5) or tv <= delta * (1 + 1e-5)


def test_epsilon_is_positive_where_dp_accounting_rounds_it_to_zero():
  counts = {events.event_key(SamplingScheme.POISSON, 1000, REPRO["dataset_size"], 3e5): REPRO["num_steps"]}
  raw = rdp_privacy_accountant.compute_epsilon(events.RDP_ORDERS, events.rdp_of_counts(counts), REPRO["delta"])[0]
  assert raw == 0  # the premise: dp-accounting's own answer
  assert not _proven_zero(1e-4, 3e5, REPRO["num_steps"], REPRO["delta"])
  with pytest.warns(tiny_rdp.EpsilonRoundingWarning):
    eps = accounting.epsilon_for_schedule(noise_multiplier=3e5, **REPRO)
  assert 0 < eps <= _eps(2e5) * (1 + 1e-6)  # positive, and not above the ε of less noise
  ledger = accounting.Ledger()
  ledger.record(batch_size=1000, dataset_size=REPRO["dataset_size"], noise_multiplier=3e5, scheme="poisson",
                steps=REPRO["num_steps"])
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", tiny_rdp.EpsilonRoundingWarning)
    assert accounting.compute_epsilon(ledger, REPRO["delta"]) == eps


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("batch,sigma,steps,delta", [
    (1000, 3e5, 10**6, 1e-8), (1000, 1e6, 1, 1e-12), (1000, 1e6, 1000, 1e-12), (1000, 1e4, 1, 1e-8),
    (100_000, 1e6, 1, 1e-8), (100_000, 1e5, 1000, 1e-5), (2_560, 1.8e5, 1000, 1e-5), (3_000_000, 1e6, 5, 1e-12)])
def test_epsilon_is_zero_only_where_kl_or_total_variation_proves_it(accountant, batch, sigma, steps, delta):
  eps = _eps(sigma, accountant, batch_sizes=batch, num_steps=steps, delta=delta)
  assert eps >= 0
  if eps == 0:
    assert _proven_zero(batch / REPRO["dataset_size"], sigma, steps, delta)


@pytest.mark.parametrize("q,sigma", [(0.01, 1.0), (0.3, 2.0), (256 / 60000, 1.1), (1e-3, 30.0), (1.0, 3.0)])
def test_positive_term_rdp_equals_dp_accounting_where_it_does_not_round(q, sigma):
  ours = tiny_rdp.step_rdp("poisson", q, sigma)
  at = [list(events.RDP_ORDERS).index(a) for a in tiny_rdp.ORDERS]
  theirs = events.rdp_of_event((SamplingScheme.POISSON, q, sigma))[at]
  ok = np.isfinite(theirs)
  assert np.all(ours[ok] >= theirs[ok])  # never below: an upper bound
  np.testing.assert_allclose(ours[ok], theirs[ok], rtol=2e-6)


def test_without_replacement_bound_is_the_gaussian_at_q_one_and_below_it_otherwise():
  alphas = np.asarray(tiny_rdp.ORDERS, float)
  gaussian = alphas / (2 * 0.55**2)  # σ = 1.1 with sensitivity 2: noise multiplier 0.55
  np.testing.assert_allclose(tiny_rdp.step_rdp("without_replacement", 1.0, 0.55), gaussian, rtol=2e-6)
  sampled = tiny_rdp.step_rdp("without_replacement", 256 / 60000, 0.55)
  assert np.all(sampled > 0) and np.all(sampled <= gaussian * (1 + 2e-6))  # quasi-convexity: never above


def test_without_replacement_epsilon_at_a_huge_sigma_is_zero_only_where_proven():
  eps = _eps(1e6, scheme="without_replacement", batch_sizes=1000, num_steps=1000, delta=1e-12)
  assert eps > 0  # the changed example moves the sum by 2C: TV about 2 q T / (σ sqrt(2 pi)) = 8e-8 > δ


def test_compute_delta_is_never_zero_where_rdp_rounds_to_zero():
  ledger = accounting.Ledger()
  ledger.record(batch_size=1000, dataset_size=REPRO["dataset_size"], noise_multiplier=3e5, scheme="poisson",
                steps=REPRO["num_steps"])
  counts = ledger.event_counts()
  raw = rdp_privacy_accountant.compute_delta(events.RDP_ORDERS, events.rdp_of_counts(counts), 0.001)[0]
  assert raw == 0  # the premise
  delta = accounting.compute_delta(ledger, 0.001)
  assert delta > 0
  assert delta >= 1e-8  # ε = 0.001 is below the sound ε at δ = 1e-8 (0.01), so its δ is above 1e-8


def test_calibration_never_takes_a_sigma_whose_epsilon_rounded_to_zero():
  with pytest.raises(UsageError, match="unreachable"):  # below RDP's floor (~0.0102): zeros are not answers
    accounting.calibrate_noise_multiplier(target_epsilon=0.005, **REPRO)
  sigma = accounting.calibrate_noise_multiplier(target_epsilon=0.05, **REPRO)
  counts = {events.event_key(SamplingScheme.POISSON, 1000, REPRO["dataset_size"], sigma): REPRO["num_steps"]}
  assert 0 < tiny_rdp.epsilon([("poisson", 1e-4, sigma, REPRO["num_steps"])], REPRO["delta"]) <= 0.05 * 1.01
  assert 0 < events.checked_epsilon(0.0, counts, REPRO["delta"]) <= 0.05 * 1.01


def test_cli_prints_a_positive_epsilon_and_one_warning_where_rdp_rounds_to_zero():
  argv = ["epsilon", "--dataset_size", "1e7", "--batch_size", "1000", "--steps", "1000000",
          "--noise_multiplier", "3e5", "--delta", "1e-8", "--points", "2"]
  proc = subprocess.run([sys.executable, "-m", "dpmega", *argv, "--json"], capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  out = json.loads(proc.stdout)
  finals = [v for k, v in _flat(out) if "epsilon" in k and isinstance(v, (int, float))]
  assert finals and all(v > 0 for v in finals), out
  assert proc.stderr.count("rounded to 0") == 1, proc.stderr
  assert "Negative Renyi divergence" not in proc.stderr
  table = subprocess.run([sys.executable, "-m", "dpmega", *argv], capture_output=True, text=True, timeout=300,
                         check=False)
  assert "final: epsilon = 0.01" in table.stdout, table.stdout


def _flat(obj, prefix=""):
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield from _flat(v, f"{prefix}.{k}")
  elif isinstance(obj, list):
    for i, v in enumerate(obj):
      yield from _flat(v, f"{prefix}[{i}]")
  else:
    yield prefix, obj
