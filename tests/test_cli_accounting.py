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
                     "steps:1000@1,4000@51,16000@81", "--steps", "100", "--noise_multiplier",
                     "0.9", "--delta", "1e-6", "--json", "--points", "5"], capsys)
  assert rc == 0
  result = json.loads(out)
  assert result["neighbouring_relation"] == "add/remove-one"
  assert result["sampling"] == "poisson" and result["accountants"] == ["rdp"]
  assert [p["step"] for p in result["points"]] == [20, 40, 60, 80, 100]
  assert result["points"][-1]["batch_size"] == 16000
  ledger = accounting.Ledger()
  schedule = schedules.parse_schedule("steps:1000@1,4000@51,16000@81")
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
                     "--batch_schedule", "steps:128@1,512@201", "--steps", "500", "--delta",
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
    ("steps:10@5", "must start at step 1 (steps count from 1)"),
    ("steps:10@1,20@1", "strictly increase"),
    ("steps:10@0,20@50", "is 0, but steps count from 1"),
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


# ----------------------------------------- issue 21: CLI habits (items 5, 9, 11, 13)


def _dpmega(*argv, timeout=300):
  """A real subprocess of the CLI (logging and warnings as a user sees them)."""
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  return subprocess.run([sys.executable, "-m", "dpmega", *argv], capture_output=True, text=True, env=env,
                        timeout=timeout, check=False)


_ISSUE_CAL = ["calibrate", "--target_epsilon", "0.005", "--delta", "1e-6", "--dataset_size", "100000",
              "--batch_schedule", "geometric:2048->16384,round_to=2048", "--steps", "3"]


def test_calibrate_issue_case_is_reached_by_pld_and_says_why_not_by_rdp():
  proc = _dpmega(*_ISSUE_CAL, "--accountant", "pld", "--json", "--points", "1")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  assert 0 < result["epsilon"]["pld"] <= 0.005
  # The search starts at σ = 1.0: dp-accounting's warnings about it are not the user's (issue 21, item 9).
  assert "noise_multiplier=1.0" not in proc.stderr and "failed to converge" not in proc.stderr
  assert "WARNING" not in proc.stderr
  proc = _dpmega(*_ISSUE_CAL)
  assert proc.returncode == 2 and "unreachable" in proc.stderr and "epsilon=0 " not in proc.stderr
  assert "pld" in proc.stderr and "Traceback" not in proc.stderr


def test_calibrate_prints_progress_lines_while_it_searches():
  proc = _dpmega("calibrate", "--target_epsilon", "2", "--delta", "1e-5", "--dataset_size", "60000",
                 "--batch_size", "256", "--steps", "100", "--progress_every", "0", "--points", "1")
  assert proc.returncode == 0, proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith("dpmega calibrate: ") and "evaluations" in l]
  assert len(lines) >= 3 and "noise_multiplier=" in lines[-1]


@pytest.mark.parametrize("command", ["epsilon", "calibrate"])
def test_delta_not_below_one_over_n_is_warned(command, capsys):
  extra = ["--noise_multiplier", "1"] if command == "epsilon" else ["--target_epsilon", "5"]
  base = [command, "--dataset_size", "1000", "--batch_size", "10", "--steps", "10", "--points", "1", *extra]
  rc, out, err = _run([*base, "--delta", "0.5"], capsys)
  assert rc == 0 and "warning: delta = 0.5 is not below 1/dataset_size = 0.001" in err and "warning" not in out
  rc, _, err = _run([*base, "--delta", "1e-5"], capsys)
  assert rc == 0 and "warning" not in err


def test_q_is_the_batch_size_over_the_dataset_size_under_each_alias(capsys):
  base = ["epsilon", "--dataset_size", "1000", "--steps", "20", "--delta", "1e-5", "--noise_multiplier", "1",
          "--json", "--points", "1"]
  results = []
  for flags in (["--batch_size", "25"], ["--q", "0.025"], ["--sampling_rate", "0.025"],
                ["--sampling_probability", "0.025"]):
    rc, out, err = _run([*base, *flags], capsys)
    assert rc == 0, err
    results.append(json.loads(out)["epsilon"]["rdp"])
  assert len(set(results)) == 1 and results[0] > 0


def test_q_between_whole_batches_is_rounded_up_and_said(capsys):
  base = ["epsilon", "--dataset_size", "1000", "--steps", "20", "--delta", "1e-5", "--noise_multiplier", "1",
          "--json", "--points", "1"]
  rc, out, err = _run([*base, "--q", "0.0245"], capsys)
  assert rc == 0 and "accounted as batch size 25" in err and "upper bound" in err
  rc, up, _ = _run([*base, "--batch_size", "25"], capsys)
  assert json.loads(out)["epsilon"] == json.loads(up)["epsilon"]


def test_old_and_new_flag_spellings_are_the_same_flag(capsys):
  base = ["--dataset_size", "1000", "--batch_size", "10", "--delta", "1e-5", "--json", "--points", "1"]
  outs = []
  for argv in (["epsilon", *base, "--steps", "7", "--noise_multiplier", "1.3"],
               ["epsilon", *base, "--num_steps", "7", "--sigma", "1.3"]):
    rc, out, err = _run(argv, capsys)
    assert rc == 0, err
    outs.append(json.loads(out)["epsilon"])
  assert outs[0] == outs[1]
  rc, out, err = _run(["calibrate", *base, "--steps", "7", "--epsilon", "2"], capsys)
  assert rc == 0 and json.loads(out)["target_epsilon"] == 2


def test_epsilon_of_a_workdir_is_its_journal_at_the_delta_asked_and_touches_nothing(tmp_path):
  from dpmega.accounting import journal  # pylint: disable=import-outside-toplevel
  j = journal.Journal(str(tmp_path))
  j.start_generation(0, from_step=0, from_generation=None, fingerprint="0" * 64, reason="test")
  for step in range(1, 31):
    j.record_step(generation=0, step=step, batch_size=64 if step < 20 else 128, dataset_size=10_000,
                  noise_multiplier=1.2, scheme="poisson")
  before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
  proc = _dpmega("epsilon", "--workdir", str(tmp_path), "--delta", "1e-6", "--accountant", "both", "--json")
  assert proc.returncode == 0, proc.stderr
  result = json.loads(proc.stdout)
  tail = truncation.TailModel(noise.sampler_support("wide_tail"), 10**9)
  ledger = journal.Journal(str(tmp_path), writable=False).ledger()
  for acc in ("rdp", "pld"):
    assert result["epsilon"][acc] == accounting.compute_epsilon(ledger, 1e-6, acc, tail=tail)
  assert result["steps"] == 30 and result["epsilon"]["pld"] > 0
  assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
  proc = _dpmega("epsilon", "--workdir", str(tmp_path), "--delta", "1e-6", "--steps", "5")
  assert proc.returncode == 2 and "drop --steps" in proc.stderr
  proc = _dpmega("epsilon", "--workdir", str(tmp_path / "nothing"), "--delta", "1e-6")
  assert proc.returncode == 2 and "not a directory" in proc.stderr and not (tmp_path / "nothing").exists()


def test_version_flag():
  import importlib.metadata  # pylint: disable=import-outside-toplevel
  proc = _dpmega("--version")
  assert proc.returncode == 0 and proc.stdout.strip() == f"dpmega {importlib.metadata.version('dpmega')}"


def test_every_arrow_in_an_example_command_is_quoted():
  """Unquoted, `--batch_schedule geometric:1000->65536` makes the shell create a file named 65536."""
  import pathlib  # pylint: disable=import-outside-toplevel
  import re  # pylint: disable=import-outside-toplevel
  roots = [pathlib.Path("dpmega/cli"), pathlib.Path("examples"), pathlib.Path("accounting")]
  files = [p for r in roots for p in r.rglob("*") if p.suffix in (".py", ".md")]
  bad = [f"{p}: {line.strip()}" for p in files for line in p.read_text().splitlines()
         if "dpmega " in line and re.search(r"(^|\s)[^'\"\s]+->", line)]
  assert not bad
  for command in ("epsilon", "calibrate"):
    assert "'geometric:1024->65536'" in _dpmega(command, "--help").stdout


def test_train_plan_warns_when_delta_is_not_below_one_over_n(train_cli, tmp_path, capsys):
  config = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "synthetic_ctr.py")
  argv = ["train", "--config", config, "--target_epsilon", "3", "--workdir", str(tmp_path / "w"),
          "--set", "task.num_train=2000", "task.num_eval=500", "num_steps=2", "batch_schedule='constant:256'",
          "microbatch_size=64", "max_microbatches=4", "eval_every=0", "checkpoint_every=0"]
  rc, out, err = _run([*argv, "--delta", "0.5"], capsys)
  assert rc == 0, err
  assert "plan: warning: delta = 0.5 is not below 1/dataset_size = 0.0005" in out


# ------------------------------------------------------------------ sparse tables

_SPARSE = ["--dataset_size", "100000", "--batch_size", "1000", "--steps", "200", "--delta", "1e-6", "--json",
           "--points", "1"]


def test_sigma1_sigma2_is_the_run_at_sigma_eff_with_its_split(capsys):
  from dpmega.sparse import selection  # pylint: disable=import-outside-toplevel

  rc, out, err = _run(["epsilon", *_SPARSE, "--sigma1", "2.0", "--sigma2", "1.0"], capsys)
  assert rc == 0, err
  split = json.loads(out)
  sigma_eff = selection.effective_noise_multiplier(2.0, 1.0)
  assert split["noise_multiplier"] == pytest.approx(sigma_eff, rel=1e-12)
  assert split["sparse"] == pytest.approx({"selection_fraction": 0.2, "selection_noise_multiplier": 2.0,
                                           "gradient_noise_multiplier": 1.0}, rel=1e-12)
  rc, out, _ = _run(["epsilon", *_SPARSE, "--noise_multiplier", repr(sigma_eff)], capsys)
  dense = json.loads(out)
  assert dense["sparse"] is None and split["epsilon"] == dense["epsilon"]
  # sigma_eff < sigma2 = 1: the selection and the gradient together cost more than the gradient's release alone.
  rc, out, _ = _run(["epsilon", *_SPARSE, "--noise_multiplier", "1.0"], capsys)
  assert split["epsilon"]["rdp"] > json.loads(out)["epsilon"]["rdp"]


def test_sparse_table_rows_count_in_delta_tail(capsys):
  base = ["epsilon", *_SPARSE, "--noise_multiplier", "1.0", "--noise_sampler", "jax_bounded", "--delta", "0.5",
          "--num_noised_coordinates", "1000", "--sparse_selection_fraction", "0.5"]
  rc, out, _ = _run(base, capsys)
  without = json.loads(out)
  rc, out, err = _run([*base, "--sparse_table_rows", "1000000"], capsys)
  assert rc == 0, err
  with_rows = json.loads(out)
  assert with_rows["num_noised_coordinates"] == 1_001_000
  assert with_rows["delta_tail"] > without["delta_tail"] * 1.5 > 0


def test_calibrate_prints_the_split_of_the_calibrated_sigma(capsys):
  from dpmega.sparse import selection  # pylint: disable=import-outside-toplevel

  rc, out, err = _run(["calibrate", *_SPARSE[:-3], "--target_epsilon", "3", "--sparse_selection_fraction", "0.2"],
                      capsys)
  assert rc == 0, err
  sigma = float(out.split("noise_multiplier = ")[1].split()[0])
  line = next(l for l in out.splitlines() if l.startswith("sparse tables:"))
  printed = [float(line.split(f"{name} = ")[1].split()[0]) for name in ("sigma1", "sigma2")]
  assert printed == pytest.approx(selection.split_noise_multiplier(sigma, 0.2), rel=1e-5)
  assert "f = 0.2" in line and "the ledger records sigma_eff" in line


@pytest.mark.parametrize("extra, expect", [
    (["--sigma1", "2.0"], "--sigma1 and --sigma2 go together"),
    (["--sigma2", "2.0"], "--sigma1 and --sigma2 go together"),
    (["--sigma1", "2.0", "--sigma2", "1.0", "--noise_multiplier", "1.0"], "not with --noise_multiplier"),
    (["--sigma1", "2.0", "--sigma2", "1.0", "--sparse_selection_fraction", "0.5"], "not with --noise_multiplier"),
    (["--noise_multiplier", "1.0", "--sparse_table_rows", "10"], "--sparse_table_rows needs"),
    (["--noise_multiplier", "1.0", "--sparse_selection_fraction", "1"], "--sparse_selection_fraction"),
    (["--sigma1", "0", "--sigma2", "1.0"], "--selection_noise_multiplier"),
])
def test_bad_sparse_flags_exit_2_naming_the_flag(extra, expect, capsys):
  with pytest.raises(SystemExit) as e:
    raise SystemExit(cli.main(["epsilon", *_SPARSE, *extra]))
  _, err = capsys.readouterr()
  assert e.value.code == 2 and expect in err and "Traceback" not in err


def test_workdir_refuses_the_sparse_plan_flags(tmp_path, capsys):
  rc = cli.main(["epsilon", "--workdir", str(tmp_path), "--delta", "1e-5", "--sparse_selection_fraction", "0.5"])
  assert rc == 2 and "drop --sparse_selection_fraction" in capsys.readouterr().err
