"""Tests for `dpmega audit` (dpmega/cli/audit.py)."""

import json
import os
import subprocess
import sys

import pytest

from dpmega import cli


def _run(argv, capsys):
  """Runs the CLI in-process; returns (exit code, stdout, stderr)."""
  try:
    code = cli.main(argv)
  except SystemExit as e:  # argparse errors
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def test_audit_prints_table_and_writes_json(tmp_path, capsys):
  path = tmp_path / "audit.json"
  code, out, err = _run(["audit", "--noise_multiplier", "1.1", "--trials", "2000", "--json", str(path)],
                        capsys)
  assert code == 0, err
  header = out.splitlines()[0]
  for column in ("claimed ε", "audited ε ≥", "confidence", "trials"):
    assert column in header
  (audit_row,) = [line for line in out.splitlines() if line.startswith("mechanism")]
  assert audit_row.split()[-1] == "ok"
  (result,) = json.loads(path.read_text())["audits"]
  assert result["method"] == "mechanism" and result["num_trials"] == 2000
  assert result["confidence"] == 0.95 and result["delta"] == 1e-5
  assert 0 <= result["epsilon_lower_bound"] < result["claimed_epsilon"]
  assert result["claimed_epsilon"] == pytest.approx(result["exact_epsilon"], abs=1e-2)
  assert not result["violation"] and result["noise_scale_for_testing"] == 1.0


def test_audit_one_run_and_sampling_rate(tmp_path, capsys):
  pytest.importorskip("jax_privacy.auditing")
  path = tmp_path / "one_run.json"
  code, out, err = _run(["audit", "--kind", "one-run", "--noise_multiplier", "4", "--canaries", "200",
                         "--background", "32", "--steps", "2", "--batch_size", "116",
                         "--json", str(path)], capsys)
  assert code == 0, err
  (result,) = json.loads(path.read_text())["audits"]
  assert result["method"] == "one_run" and result["num_trials"] == 200 and result["steps"] == 2
  assert result["sampling_rate"] == pytest.approx(0.5)
  assert result["epsilon_lower_bound"] <= result["claimed_epsilon"]


def test_audit_replace_one_claims_sensitivity_2c(tmp_path, capsys):
  path = tmp_path / "audit.json"
  code, out, err = _run(["audit", "--noise_multiplier", "2", "--trials", "2000", "--sampling",
                         "without_replacement", "--json", str(path)], capsys)
  assert code == 0, err
  assert "replace-one" in out
  (result,) = json.loads(path.read_text())["audits"]
  assert result["neighbours"] == "replace-one"
  # σ = 2 with sensitivity 2C is the Gaussian with μ = 1: ε = 4.377 at δ = 1e-5, not 2.17.
  assert result["exact_epsilon"] == pytest.approx(4.377, abs=1e-3)
  assert result["claimed_epsilon"] == pytest.approx(result["exact_epsilon"], rel=1e-3)
  assert result["epsilon_lower_bound"] < result["claimed_epsilon"]


@pytest.mark.parametrize("argv, expect", [
    (["--kind", "one-run"], "--sampling without_replacement applies to --kind mechanism"),
    (["--sampling_rate", "0.5"], "--sampling_rate must be omitted"),
])
def test_audit_replace_one_bad_combinations_exit_2(argv, expect, capsys):
  code, _, err = _run(["audit", "--noise_multiplier", "1", "--sampling", "without_replacement", *argv], capsys)
  assert code == 2 and expect in err and "Traceback" not in err


def test_audit_has_no_user_facing_noise_knob(capsys):
  code, _, err = _run(["audit", "--noise_multiplier", "1", "--noise_scale_for_testing", "0.1"], capsys)
  assert code == 2 and "unrecognized arguments" in err


@pytest.mark.parametrize("argv, flag", [
    (["--noise_multiplier", "0"], "--noise_multiplier"),
    (["--noise_multiplier", "nan"], "--noise_multiplier"),
    (["--noise_multiplier", "1", "--trials", "19"], "--trials"),
    (["--noise_multiplier", "1", "--trials", "2.5"], "--trials"),
    (["--noise_multiplier", "1", "--confidence", "1"], "--confidence"),
    (["--noise_multiplier", "1", "--delta", "0"], "--delta"),
    (["--noise_multiplier", "1", "--sampling_rate", "1.01"], "--sampling_rate"),
    (["--noise_multiplier", "1", "--clip_norm", "-1"], "--clip_norm"),
    (["--noise_multiplier", "1", "--json", ""], "--json"),
    (["--noise_multiplier", "1", "--json", "{tmp}"], "--json"),
    (["--noise_multiplier", "1", "--json", "{tmp}/no/such/dir/a.json"], "--json"),
    (["--noise_multiplier", "1", "--kind", "one-run", "--sampling_rate", "0.1"], "--sampling_rate"),
    (["--noise_multiplier", "1", "--kind", "one-run", "--canaries", "10", "--background", "0",
      "--batch_size", "11"], "--batch_size"),
    ([], "--noise_multiplier"),
])
def test_audit_bad_input_exits_2_naming_the_flag(argv, flag, tmp_path, capsys):
  argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
  code, out, err = _run(["audit", *argv], capsys)
  assert code == 2
  assert flag in err and "Traceback" not in err
  assert out == ""
  assert os.listdir(tmp_path) == []


def test_audit_subprocess_exit_codes_and_no_traceback(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  bad = subprocess.run([sys.executable, "-m", "dpmega", "audit", "--noise_multiplier", "inf",
                        "--json", str(tmp_path / "a.json")],
                       capture_output=True, text=True, env=env, timeout=120)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stdout == ""
  assert "--noise_multiplier" in bad.stderr
  good = subprocess.run([sys.executable, "-m", "dpmega", "audit", "--noise_multiplier", "2",
                         "--trials", "500", "--json", str(tmp_path / "a.json")],
                        capture_output=True, text=True, env=env, timeout=300)
  assert good.returncode == 0, good.stderr
  assert "Traceback" not in good.stderr
  assert json.loads((tmp_path / "a.json").read_text())["audits"][0]["num_trials"] == 500


def test_one_run_without_the_audit_extra_is_a_clear_error(monkeypatch, capsys, tmp_path):
  # As if jax-privacy were not installed: importing it fails.
  monkeypatch.setitem(sys.modules, "jax_privacy", None)
  monkeypatch.setitem(sys.modules, "jax_privacy.auditing", None)
  code, out, err = _run(["audit", "--kind", "one-run", "--noise_multiplier", "1",
                         "--json", str(tmp_path / "a.json")], capsys)
  assert code == 2 and "pip install 'dpmega[audit]'" in err and "Traceback" not in err
  assert out == "" and os.listdir(tmp_path) == []
  from dpmega import audit
  with pytest.raises(ImportError, match=r"dpmega\[audit\]"):
    audit.one_run_epsilon_lower_bound([1.0, 2.0], [0.0, 1.0], delta=1e-5)
