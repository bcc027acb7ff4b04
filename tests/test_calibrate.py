"""Tests for the σ search of dpmega/accounting/calibrate.py: both ends of its range, RDP's floor, progress.

The issue's case: ε = 0.005 at δ = 1e-6 over 3 steps of a q = 0.02..0.16 ramp is reachable (PLD: σ ≈ 100),
but RDP's conversion to (ε, δ) cannot go below ~0.00575 here (largest order 1024), and every RDP order
rounds to 0 beyond σ ≈ 1.76e5, where dp-accounting then says ε = 0.
"""

import pytest

from dpmega import accounting
from dpmega.accounting import calibrate as calibrate_lib
from dpmega.errors import UsageError

ISSUE = dict(target_epsilon=0.005, delta=1e-6, dataset_size=100_000,
             batch_sizes="geometric:2048->16384,round_to=2048", num_steps=3)


def _eps(sigma, accountant, **kw):
  return accounting.epsilon_for_schedule(noise_multiplier=sigma, delta=kw["delta"], dataset_size=kw["dataset_size"],
                                         batch_sizes=kw["batch_sizes"], num_steps=kw["num_steps"],
                                         accountant=accountant)


def test_rdp_below_its_floor_is_unreachable_with_the_true_best_and_not_epsilon_zero():
  with pytest.raises(UsageError) as info:
    accounting.calibrate_noise_multiplier(accountant="rdp", **ISSUE)
  message = str(info.value)
  assert "epsilon=0 " not in message and "epsilon=0;" not in message
  best = float(message.split("best achievable here is about epsilon=")[1].split(" ")[0])
  assert ISSUE["target_epsilon"] < best < 0.0058
  assert "'pld'" in message  # says what does reach it


def test_pld_reaches_a_target_below_rdps_floor():
  sigma = accounting.calibrate_noise_multiplier(accountant="pld", **ISSUE)
  kw = {k: v for k, v in ISSUE.items() if k != "target_epsilon"}
  assert 0 < _eps(sigma, "pld", **kw) <= ISSUE["target_epsilon"]
  assert _eps(sigma * 0.99, "pld", **kw) > ISSUE["target_epsilon"]  # and not far above the smallest σ


def test_sigma_where_rdp_rounds_to_zero_is_never_taken_as_meeting_the_target():
  """RDP's ε is 0 at σ = 1e6 here (dp-accounting's rounds to 0; the KL bound proves it there, see
  tests/test_epsilon_floor.py), far above what PLD needs: the search reports RDP's floor instead."""
  kw = {k: v for k, v in ISSUE.items() if k != "target_epsilon"}
  assert _eps(1e6, "rdp", **kw) == 0.0  # the premise: the value the old search would have trusted
  with pytest.raises(UsageError, match="unreachable"):
    accounting.calibrate_noise_multiplier(accountant="rdp", **{**ISSUE, "target_epsilon": 1e-4})


def test_tiny_target_is_unreachable_and_names_the_best_epsilon():
  with pytest.raises(UsageError, match=r"unreachable.*best achievable here is about epsilon=\d"):
    accounting.calibrate_noise_multiplier(target_epsilon=1e-9, delta=1e-5, dataset_size=100, batch_sizes=[10] * 10)


def test_huge_target_returns_the_lower_end_of_the_range(accountant="rdp"):
  """Every σ in [1e-2, 1e6] meets ε = 1e6: the smallest, 1e-2, is evaluated and returned (not a σ above it)."""
  kw = dict(delta=1e-5, dataset_size=1000, batch_sizes=[10] * 5, num_steps=None)
  sigma = accounting.calibrate_noise_multiplier(target_epsilon=1e6, accountant=accountant,
                                                **{k: v for k, v in kw.items() if k != "num_steps"})
  assert _eps(sigma, accountant, **kw) <= 1e6
  assert sigma == pytest.approx(calibrate_lib._SIGMA_MIN, rel=1e-12)  # pylint: disable=protected-access


def test_target_met_only_near_the_upper_end_is_found():
  """A target RDP meets only for σ between 3.3e4 and 1.76e5 (just above its floor): bracketed, not skipped."""
  kw = {k: v for k, v in ISSUE.items() if k != "target_epsilon"}
  target = _eps(1e5, "rdp", **kw)
  sigma = accounting.calibrate_noise_multiplier(accountant="rdp", **{**ISSUE, "target_epsilon": target})
  assert 0 < _eps(sigma, "rdp", **kw) <= target


def test_progress_reports_every_evaluation_with_its_sigma_and_epsilon():
  calls = []
  plan = accounting.Plan(dataset_size=60_000, schedule=256, num_steps=100, delta=1e-5)
  sigma = plan.calibrate(2.0, progress=lambda n, s, e: calls.append((n, s, e)))
  assert [n for n, _, _ in calls] == list(range(1, len(calls) + 1)) and len(calls) > 3
  n, s, e = calls[len(calls) // 2]
  assert e == plan.epsilon(s)
  assert plan.epsilon(sigma) <= 2.0


def test_progress_printer_is_silent_for_quick_work_and_prints_lines_otherwise(capsys):
  quiet = calibrate_lib.progress_printer(every=3600)
  quiet(1, 1.0, 2.0)
  loud = calibrate_lib.progress_printer(every=0, label="dpmega calibrate")
  loud(7, 1.5, 2.25)
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "dpmega calibrate: 7 evaluations" in err and "noise_multiplier=1.5" in err
