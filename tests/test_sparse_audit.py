"""The audit of the sparse step (dpmega.audit.sparse, `dpmega audit --kind sparse`)."""

import json

import pytest

from dpmega import audit
from dpmega import cli


@pytest.mark.slow
def test_sparse_audit_stays_below_the_claim_at_sigma_eff_and_detects_noise_scaled_down():
  honest = audit.sparse_mechanism_audit(noise_multiplier=1.0, trials=10_000, seed=0)
  assert not honest.violation and honest.method == "sparse"
  assert 0.5 < honest.epsilon_lower_bound < honest.claimed_epsilon
  d = honest.details
  assert d["selection_sigma"] == pytest.approx(2 ** 0.5) and d["gradient_sigma"] == pytest.approx(2 ** 0.5)
  # tau = 0: the canary's row passes half the time without the canary, more often with it (count C1 = 1).
  assert d["canary_row_selected_out"] == pytest.approx(0.5, abs=0.03)
  assert d["canary_row_selected_in"] == pytest.approx(0.76, abs=0.03)  # P(N(1, 2) > 0)
  # The library gets sigma_eff / 4 (both sigma1 and sigma2), the accountant is told sigma_eff: caught.
  weak = audit.sparse_mechanism_audit(noise_multiplier=2.0, trials=10_000, seed=1, noise_scale_for_testing=0.25)
  assert weak.violation and weak.epsilon_lower_bound > weak.claimed_epsilon + 0.5


@pytest.mark.slow
def test_sparse_audit_with_poisson_sampling():
  honest = audit.sparse_mechanism_audit(noise_multiplier=1.0, sampling_rate=0.5, trials=10_000, seed=2)
  assert honest.exact_epsilon is None and not honest.violation
  weak = audit.sparse_mechanism_audit(noise_multiplier=1.0, sampling_rate=0.5, trials=10_000, seed=2,
                                      noise_scale_for_testing=0.2)
  assert weak.violation


@pytest.mark.parametrize("kwargs, name", [
    (dict(noise_multiplier=0.0), "noise_multiplier"),
    (dict(noise_multiplier=1.0, selection_fraction=1.0), "selection_fraction"),
    (dict(noise_multiplier=1.0, threshold=11.0), "threshold"),
    (dict(noise_multiplier=1.0, count_clip=0.0), "count_clip"),
    (dict(noise_multiplier=1.0, rows=1), "rows"),
    (dict(noise_multiplier=1.0, noise_scale_for_testing=1.5), "noise_scale_for_testing"),
    (dict(noise_multiplier=1.0, accountant="gdp"), "accountant"),
])
def test_sparse_audit_rejects_bad_input_by_name(kwargs, name):
  with pytest.raises(ValueError, match=name):
    audit.sparse_mechanism_audit(**kwargs)


def _run(argv, capsys):
  try:
    code = cli.main(argv)
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


@pytest.mark.slow
def test_cli_audits_the_sparse_step(tmp_path, capsys):
  path = tmp_path / "audit.json"
  code, out, err = _run(["audit", "--kind", "sparse", "--noise_multiplier", "1.5", "--selection_fraction", "0.3",
                         "--threshold", "0.5", "--trials", "2000", "--json", str(path)], capsys)
  assert code == 0, err
  (row,) = [line for line in out.splitlines() if line.startswith("sparse")]
  assert row.split()[-1] == "ok"
  (result,) = json.loads(path.read_text())["audits"]
  assert result["method"] == "sparse" and result["noise_multiplier"] == 1.5
  assert result["details"]["selection_sigma"] == pytest.approx(1.5 / 0.3 ** 0.5)
  assert result["details"]["gradient_sigma"] == pytest.approx(1.5 / 0.7 ** 0.5)


def test_cli_sparse_audit_refuses_replace_one(capsys):
  code, _, err = _run(["audit", "--kind", "sparse", "--noise_multiplier", "1", "--sampling", "without_replacement"],
                      capsys)
  assert code == 2 and "--kind sparse" in err
