"""Tests for `dpmega epsilon` and `dpmega calibrate` (dpmega/cli/accounting.py)."""

import json
import os
import subprocess
import sys

import pytest

from dpmega import accounting
from dpmega import cli
from dpmega import noise
from dpmega import schedules
from dpmega import truncation

MNIST = ["--dataset_size", "60000", "--batch_size", "256", "--epochs", "60", "--delta", "1e-5"]


def _run(argv, capsys):
  rc = cli.main(argv)
  out, err = capsys.readouterr()
  return rc, out, err


def test_epsilon_table_names_delta_accountant_and_relation(capsys):
  rc, out, err = _run(["epsilon", *MNIST, "--noise_multiplier", "1.1", "--points", "4"], capsys)
  assert rc == 0, err
  assert "delta = 1e-05" in out and "add/remove-one" in out and "RDP" in out
  assert "steps = 14063" in out
  lines = [l for l in out.splitlines() if l.strip().startswith(("3516", "7032", "10547", "14063"))]
  assert len(lines) == 4
  assert "2.5967" in lines[-1]


def test_epsilon_json_matches_library(capsys):
  rc, out, _ = _run(["epsilon", "--dataset_size", "1e6", "--batch_schedule",
                     "steps:1000@0,4000@50,16000@80", "--steps", "100", "--noise_multiplier",
                     "0.9", "--delta", "1e-6", "--json", "--points", "5"], capsys)
  assert rc == 0
  result = json.loads(out)
  assert result["neighbouring_relation"] == "add/remove-one"
  assert result["sampling"] == "poisson" and result["accountants"] == ["rdp"]
  assert [p["step"] for p in result["points"]] == [20, 40, 60, 80, 100]
  assert result["points"][-1]["batch_size"] == 16000
  ledger = accounting.Ledger()
  schedule = schedules.parse_schedule("steps:1000@0,4000@50,16000@80")
  for t in range(100):
    ledger.record(batch_size=schedule.batch_size(t), dataset_size=10**6, noise_multiplier=0.9,
                  scheme="poisson")
  # The default sampler's δ_tail is taken out of δ: the ledger with the same tail model agrees.
  tail = truncation.TailModel(noise.sampler_support("wide_tail"), 10**9)
  assert result["epsilon"]["rdp"] == pytest.approx(accounting.compute_epsilon(ledger, 1e-6, tail=tail),
                                                   rel=1e-12)
  assert result["epsilon"]["rdp"] == pytest.approx(accounting.compute_epsilon(ledger, 1e-6), rel=1e-6)
  eps = [p["epsilon"]["rdp"] for p in result["points"]]
  assert eps == sorted(eps)


def test_epsilon_both_accountants_and_pld_not_above_rdp(capsys):
  rc, out, _ = _run(["epsilon", *MNIST, "--noise_multiplier", "1.1", "--accountant", "both",
                     "--points", "2", "--json"], capsys)
  assert rc == 0
  e = json.loads(out)["epsilon"]
  assert e["pld"] <= e["rdp"]


def test_without_replacement_says_replace_one(capsys):
  rc, out, _ = _run(["epsilon", "--dataset_size", "60000", "--batch_size", "256", "--steps", "100",
                     "--delta", "1e-5", "--noise_multiplier", "1.1", "--sampling",
                     "without_replacement", "--points", "1"], capsys)
  assert rc == 0 and "replace-one" in out and "add/remove-one" not in out


def test_calibrate_reaches_target(capsys):
  rc, out, _ = _run(["calibrate", "--target_epsilon", "2", "--dataset_size", "60000",
                     "--batch_schedule", "steps:128@0,512@200", "--steps", "500", "--delta",
                     "1e-5", "--json", "--points", "2"], capsys)
  assert rc == 0
  result = json.loads(out)
  sigma = result["noise_multiplier"]
  assert 0.99 * 2 <= result["epsilon"]["rdp"] <= 2
  direct = accounting.epsilon_for_schedule(
      noise_multiplier=sigma, delta=1e-5, dataset_size=60000,
      batch_sizes=schedules.Steps(((0, 128), (200, 512))), num_steps=500,
      tail=truncation.TailModel(noise.sampler_support("wide_tail"), 10**9))
  assert direct == pytest.approx(result["epsilon"]["rdp"], rel=1e-12)


def test_calibrate_unreachable_reports_best(capsys):
  rc, _, err = _run(["calibrate", "--target_epsilon", "1e-9", "--dataset_size", "100",
                     "--batch_size", "100", "--steps", "10", "--delta", "1e-5"], capsys)
  assert rc == 2
  assert "unreachable" in err and "best achievable" in err and "Traceback" not in err


_BASE = ["--dataset_size", "1000", "--batch_size", "10", "--steps", "5", "--delta", "1e-5",
         "--noise_multiplier", "1.0"]


def _replace(flag, value):
  argv = list(_BASE)
  if flag in argv:
    i = argv.index(flag)
    if value is None:
      del argv[i:i + 2]
    else:
      argv[i + 1] = value
  else:
    argv += [flag, value]
  return argv


@pytest.mark.parametrize("flag,value,expect", [
    ("--batch_size", "2000", "--batch_size"),       # q > 1
    ("--batch_size", "0", "--batch_size"),
    ("--batch_size", "-4", "--batch_size"),
    ("--dataset_size", "0", "--dataset_size"),
    ("--dataset_size", "abc", "--dataset_size"),
    ("--noise_multiplier", "-0.1", "--noise_multiplier"),
    ("--noise_multiplier", "nan", "--noise_multiplier"),
    ("--delta", "0", "--delta"),
    ("--delta", "1", "--delta"),
    ("--delta", "2", "--delta"),
    ("--steps", "-1", "--steps"),
    ("--steps", "1.5", "--steps"),
    ("--pld_discretization", "0", "--pld_discretization"),
    ("--accountant", "moments", "--accountant"),
    ("--sampling", "shuffle", "--sampling"),
])
def test_bad_flags_exit_2_naming_the_flag(flag, value, expect, capsys):
  with pytest.raises(SystemExit) as e:  # argparse-level errors exit directly
    rc = cli.main(["epsilon", *_replace(flag, value)])
    raise SystemExit(rc)
  _, err = capsys.readouterr()
  assert e.value.code == 2
  assert expect in err and "Traceback" not in err
  assert len([l for l in err.splitlines() if "error:" in l]) == 1  # (after argparse's usage)


@pytest.mark.parametrize("schedule,expect", [
    ("steps:10@5", "stages[0] must start at step 0"),
    ("steps:10@0,20@0", "strictly increase"),
    ("linear:10", "START->END"),
    ("cosine:1->2", "kind must be one of"),
    ("linear:10->5000@3", "larger than --dataset_size"),
])
def test_malformed_schedule_exit_2(schedule, expect, capsys):
  argv = ["epsilon", *_replace("--batch_size", None), "--batch_schedule", schedule]
  rc, _, err = _run(argv, capsys)
  assert rc == 2
  assert "--batch_schedule" in err and expect in err and "Traceback" not in err


def test_ramp_without_length_needs_steps(capsys):
  argv = ["epsilon", "--dataset_size", "1000", "--batch_schedule", "linear:10->100",
          "--epochs", "2", "--delta", "1e-5", "--noise_multiplier", "1"]
  rc, _, err = _run(argv, capsys)
  assert rc == 2 and "--steps" in err


def test_pld_without_replacement_is_an_error(capsys):
  rc, _, err = _run(["epsilon", *_BASE, "--sampling", "without_replacement", "--accountant",
                     "pld"], capsys)
  assert rc == 2 and "without_replacement" in err and "rdp" in err


def test_zero_steps_is_zero_epsilon(capsys):
  rc, out, _ = _run(["epsilon", *_replace("--steps", "0"), "--json"], capsys)
  assert rc == 0 and json.loads(out)["epsilon"] == {"rdp": 0.0}


def test_plot_writes_png(tmp_path, capsys):
  pytest.importorskip("matplotlib")
  path = tmp_path / "eps.png"
  rc, _, err = _run(["epsilon", *_BASE, "--plot", str(path)], capsys)
  assert rc == 0, err
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_python_dash_m_works():
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  proc = subprocess.run([sys.executable, "-m", "dpmega", "epsilon", *_BASE, "--json"],
                        capture_output=True, text=True, env=env, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  assert json.loads(proc.stdout)["command"] == "epsilon"
  proc = subprocess.run([sys.executable, "-m", "dpmega", "epsilon", *_replace("--delta", "5")],
                        capture_output=True, text=True, env=env, timeout=120, check=False)
  assert proc.returncode == 2 and "--delta" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------- without replacement: sensitivity 2C


def test_without_replacement_epsilon_is_dp_accounting_at_half_sigma_and_the_ledgers(capsys):
  """`dpmega epsilon`, a Ledger filled step by step (as the trainer does) and dp-accounting at σ / 2 agree."""
  import dp_accounting  # pylint: disable=import-outside-toplevel
  from dp_accounting.rdp import rdp_privacy_accountant  # pylint: disable=import-outside-toplevel
  n, b, steps, sigma = 10_000, 500, 50, 1.5
  rc, out, err = _run(["epsilon", "--dataset_size", str(n), "--batch_size", str(b), "--steps", str(steps),
                       "--delta", "1e-5", "--noise_multiplier", str(sigma), "--sampling", "without_replacement",
                       "--points", "1", "--json"], capsys)
  assert rc == 0, err
  cli_eps = json.loads(out)["epsilon"]["rdp"]
  direct = rdp_privacy_accountant.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  direct.compose(dp_accounting.SampledWithoutReplacementDpEvent(n, b, dp_accounting.GaussianDpEvent(sigma / 2)),
                 steps)
  ledger = accounting.Ledger()
  for _ in range(steps):
    ledger.record(batch_size=b, dataset_size=n, noise_multiplier=sigma, scheme="without_replacement")
  assert cli_eps == pytest.approx(direct.get_epsilon(1e-5), rel=1e-6)
  assert cli_eps == pytest.approx(accounting.compute_epsilon(ledger, 1e-5), rel=1e-6)


def test_full_batch_without_replacement_prints_the_exact_gaussian_epsilon(capsys):
  """q = 1, σ = 2, δ = 1e-5, one step: the mechanism (Δ = 2C, std 2C) has ε = 4.377 (Balle & Wang 2018)."""
  from dpmega import audit  # pylint: disable=import-outside-toplevel
  exact = audit.gaussian_mechanism_epsilon(1.0, 1e-5)  # Δ/std = 2C / 2C: sensitivity 1 at σ = 1
  assert exact == pytest.approx(4.377, abs=1e-3)
  eps = {}
  for accountant in ("rdp", "pld"):
    rc, out, err = _run(["epsilon", "--dataset_size", "1000", "--batch_size", "1000", "--steps", "1",
                         "--delta", "1e-5", "--noise_multiplier", "2", "--sampling", "without_replacement",
                         "--accountant", accountant, "--points", "1", "--json"], capsys)
    assert rc == 0, err
    eps.update(json.loads(out)["epsilon"])
    assert eps[accountant] >= exact * (1 - 1e-6)  # never below the mechanism that runs
  assert eps["pld"] == pytest.approx(exact, rel=1e-3)


def test_calibrate_without_replacement_sigma_meets_target_for_the_real_mechanism(capsys):
  from dpmega import audit  # pylint: disable=import-outside-toplevel
  rc, out, err = _run(["calibrate", "--target_epsilon", "3", "--dataset_size", "1000", "--batch_size", "1000",
                       "--steps", "1", "--delta", "1e-5", "--sampling", "without_replacement", "--points", "1",
                       "--json"], capsys)
  assert rc == 0, err
  sigma = json.loads(out)["noise_multiplier"]
  assert audit.gaussian_mechanism_epsilon(sigma / 2, 1e-5) <= 3.0  # std σC, sensitivity 2C


# ------------------------------------------------------------------ δ_tail


def test_delta_tail_always_in_json_and_printed_only_when_not_negligible(capsys):
  base = ["epsilon", "--dataset_size", "60000", "--batch_size", "256", "--steps", "1000",
          "--noise_multiplier", "1.1", "--points", "2"]
  rc, out, _ = _run([*base, "--delta", "1e-5", "--json"], capsys)
  result = json.loads(out)
  assert rc == 0 and result["noise_sampler"] == "wide_tail" and result["num_noised_coordinates"] == 10**9
  assert 0 < result["delta_tail"] < 1e-3 * 1e-5  # the default sampler's tail is negligible here
  assert all("delta_tail" in p for p in result["points"])
  rc, out, _ = _run([*base, "--delta", "1e-5"], capsys)
  assert rc == 0 and "delta_tail" not in out
  # jax.random.normal's support on few coordinates, a large δ: finite, not negligible, printed.
  bounded = [*base, "--delta", "1e-2", "--noise_sampler", "jax_bounded", "--num_noised_coordinates", "100"]
  rc, out, _ = _run(bounded, capsys)
  assert rc == 0 and "delta_tail = 0.000414" in out and "--num_noised_coordinates" in out
  rc, out, _ = _run([*bounded, "--json"], capsys)
  result = json.loads(out)
  assert result["delta_tail"] == pytest.approx(4.14e-4, rel=1e-2)
  ideal = accounting.epsilon_for_schedule(noise_multiplier=1.1, delta=1e-2 - result["delta_tail"], dataset_size=60000,
                                          batch_sizes=256, num_steps=1000)
  assert result["epsilon"]["rdp"] == pytest.approx(ideal, rel=1e-9)


@pytest.mark.parametrize("command", ["epsilon", "calibrate"])
def test_jax_bounded_sampler_whose_tail_exceeds_delta_is_a_clear_error(command, capsys):
  argv = [command, "--dataset_size", "60000", "--batch_size", "256", "--steps", "1000", "--delta", "1e-5",
          "--noise_sampler", "jax_bounded", "--points", "1"]
  argv += ["--noise_multiplier", "1.1"] if command == "epsilon" else ["--target_epsilon", "3"]
  rc, out, err = _run(argv, capsys)
  assert rc == 2 and not out
  assert "--noise_sampler jax_bounded" in err and "delta_tail" in err and "wide_tail" in err
  assert "Traceback" not in err
