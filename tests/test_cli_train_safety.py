"""``dpmega train`` operator safety (issue 21): one run per workdir, no silent config typos, no late damage on a
refused resume, an unusable workdir refused first, no silent metrics gap; and the flags DP users expect
(``--epochs``, ``--clip_norm``, ``--batch_size``, extending a finished run, the mesh in the plan,
``--noise_multiplier`` replacing a config's target said aloud)."""

import json
import os
import subprocess
import sys

import pytest

from dpmega import accounting
from dpmega import cli
from tests import train_configs

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = train_configs.small_train_config(num_train=4000, num_eval=500, num_steps=8)
_FAST = ["--insecure_reproducible_seed", "3"]


@pytest.fixture()
def config_path(train_cli, tmp_path):
  path = tmp_path / "small_config.py"
  path.write_text(_CONFIG)
  return str(path)


def _python(args, *, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=_ROOT,
                        timeout=timeout)


def _train(config_path, workdir, *args):
  return _python(["-m", "dpmega", "train", "--config", config_path, "--workdir", str(workdir), *_FAST, *args])


def _train_here(capsys, config_path, workdir, *args):
  """:func:`_train` in this process (no JAX import and compile of its own): exit status and output alike."""
  capsys.readouterr()
  argv = ["train", "--config", config_path, "--workdir", str(workdir), *_FAST, *args]
  rc = cli.main(argv)
  out, err = capsys.readouterr()
  return subprocess.CompletedProcess(argv, rc, out, err)


def _snapshot(directory):
  """Every file under ``directory``: relative path -> bytes."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


# ------------------------------------------------------------------------------------------------ 1. the lock
def test_second_run_in_a_busy_workdir_exits_2_naming_the_holder_and_a_killed_holder_leaves_no_stale_lock(
    config_path, tmp_path, capsys):
  # The holder is a process of its own (it must be killed); the second and third runs are this process's.
  workdir = tmp_path / "w"
  holder = subprocess.Popen(
      [sys.executable, "-m", "dpmega", "train", "--config", config_path, "--workdir", str(workdir), *_FAST,
       "--set", "num_steps=100000"],
      cwd=_ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  try:
    for line in holder.stdout:  # the plan comes after the lock and the dataset: the holder is training
      if line.startswith("plan:"):
        break
    assert holder.poll() is None
    second = _train_here(capsys, config_path, workdir, "--set", "num_steps=2")
    assert second.returncode == 2, second.stderr
    assert f"process {holder.pid}" in second.stderr and "in use by another dpmega run" in second.stderr
    assert "Traceback" not in second.stderr
    assert holder.poll() is None
  finally:
    holder.kill()  # SIGKILL: the lock file stays, the kernel drops the lock
    holder.wait()
  assert os.path.exists(workdir / ".dpmega.lock")
  third = _train_here(capsys, config_path, workdir, "--overwrite", "--set", "num_steps=2")
  assert third.returncode == 0, third.stderr
  assert json.load(open(workdir / "summary.json"))["steps"] == 2


# ------------------------------------------------------------------------------------- 2. typos in a config file
@pytest.mark.parametrize("line, message", [
    ("c.num_step = 4", "unknown config field 'num_step'; did you mean 'num_steps'?"),
    ("c.clip_nrom = 2.0", "unknown config field 'clip_nrom'; did you mean 'clip_norm'?"),
    ("c.optimizer.learnin_rate = 0.5", "unknown config field 'optimizer.learnin_rate'; did you mean "
     "'optimizer.learning_rate'?"),
    ("c.task.num_trian = 10", "unknown config field 'task.num_trian'; did you mean 'task.num_train'?"),
])
def test_unknown_field_in_a_config_file_is_refused_with_a_did_you_mean(config_path, tmp_path, capsys, line, message):
  path = tmp_path / "typo.py"
  path.write_text(_CONFIG.replace("  return c\n", f"  {line}\n  return c\n"))
  rc = cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "w"), *_FAST])
  err = capsys.readouterr().err
  assert rc == 2 and message in err, err
  assert not os.path.exists(tmp_path / "w")


def test_unknown_field_in_a_config_file_exits_2_in_a_real_process(config_path, tmp_path):
  path = tmp_path / "typo.py"
  path.write_text(_CONFIG.replace("  return c\n", "  c.num_step = 4\n  return c\n"))
  p = _python(["-m", "dpmega", "train", "--config", str(path), "--workdir", str(tmp_path / "w")])
  assert p.returncode == 2 and "did you mean 'num_steps'?" in p.stderr and "Traceback" not in p.stderr


def test_set_suggests_the_closest_field(config_path, tmp_path, capsys):
  rc = cli.main(["train", "--config", config_path, "--workdir", str(tmp_path / "w"), "--set", "num_step=4"])
  assert rc == 2 and "did you mean 'num_steps'?" in capsys.readouterr().err


# --------------------------------------------------------------- 3. a refused resume leaves the workdir untouched
@pytest.mark.parametrize("hidden", ["(16,)", "(8, 8)"])  # other shapes; another structure (one more layer)
def test_resume_after_a_model_change_exits_2_and_leaves_the_workdir_byte_identical(config_path, tmp_path, capsys,
                                                                                    hidden):
  workdir = tmp_path / "w"
  assert cli.main(["train", "--config", config_path, "--workdir", str(workdir), *_FAST,
                   "--set", "checkpoint_every=2", "keep_checkpoints=10"]) == 0
  capsys.readouterr()
  before = _snapshot(workdir)
  assert "metrics.jsonl" in before and "config.json" in before and any(k.startswith("checkpoints/8/") for k in before)
  p = _train(config_path, workdir, "--resume_step", "4", "--set", f"task.hidden={hidden}", "checkpoint_every=2",
             "keep_checkpoints=10")
  assert p.returncode == 2, p.stderr
  # The fingerprint is checked before any array is read: the refusal names the field, not an array structure.
  assert "computed differently" in p.stderr and "task.hidden" in p.stderr and "Traceback" not in p.stderr
  assert _snapshot(workdir) == before


# ------------------------------------------------------------------------------------ 4. an unusable workdir
def _unusable_workdirs(tmp_path):
  a_file = tmp_path / "a_file"
  a_file.write_text("")
  cases = [("under a file", str(a_file / "w"), "is a file, not a directory"),
           ("a file", str(a_file), "it is a file"),
           ("/proc", "/proc/dpmega_no_such_place/w", "cannot be used")]
  if os.geteuid() != 0:  # root writes into read-only directories
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    cases.append(("read-only", str(read_only / "w"), "cannot be used"))
  return cases


def test_unusable_workdir_exits_2_with_one_line_before_the_dataset_is_built(config_path, tmp_path):
  for what, workdir, message in _unusable_workdirs(tmp_path):
    p = _train(config_path, workdir, "--set", "task.num_train=3000000")
    assert p.returncode == 2, (what, p.stderr)
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and repr(workdir) in lines[0], (what, p.stderr)
    assert "plan:" not in p.stdout, what  # the plan comes after the dataset: it was never built


# ------------------------------------------------------------------------------------ 7. no silent metrics gap
def test_resume_warns_about_a_truncated_or_deleted_metrics_log(config_path, tmp_path, capsys):
  workdir = tmp_path / "w"
  assert cli.main(["train", "--config", config_path, "--workdir", str(workdir), *_FAST]) == 0
  lines = open(workdir / "metrics.jsonl").readlines()
  with open(workdir / "metrics.jsonl", "w") as f:
    f.writelines(lines[:2])
  capsys.readouterr()
  assert cli.main(["train", "--config", config_path, "--workdir", str(workdir), *_FAST, "--resume"]) == 0
  out = capsys.readouterr().out
  assert "lacks the records of step(s) 3..8" in out
  os.remove(workdir / "metrics.jsonl")
  assert cli.main(["train", "--config", config_path, "--workdir", str(workdir), *_FAST, "--resume"]) == 0
  assert "lacks the records of step(s) 1..8" in capsys.readouterr().out


def test_a_complete_metrics_log_gives_no_warning(config_path, tmp_path, capsys):
  workdir = tmp_path / "w"
  assert cli.main(["train", "--config", config_path, "--workdir", str(workdir), *_FAST]) == 0
  assert cli.main(["train", "--config", config_path, "--workdir", str(workdir), *_FAST, "--resume"]) == 0
  assert "lacks the records" not in capsys.readouterr().out


# ---------------------------------------------------------------------------- 13. the flags DP users look for
def test_epochs_batch_size_and_clip_norm_flags(config_path, tmp_path, capsys):
  workdir = tmp_path / "w"
  rc = cli.main(["train", "--config", config_path, "--workdir", str(workdir), *_FAST,
                 "--batch_size", "100", "--epochs", "0.5", "--clip_norm", "0.25"])
  out = capsys.readouterr().out
  assert rc == 0
  summary = json.load(open(workdir / "summary.json"))
  assert summary["steps"] == 20 and summary["num_steps"] == 20  # 0.5 * 4000 / 100
  assert summary["clip_norm"] == 0.25 and "clip norm C = 0.25" in out
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl") if "batch_size" in line]
  assert {r["batch_size"] for r in records} == {100}
  assert "0.5 epochs of N = 4,000 examples are 20 steps" in out


@pytest.mark.parametrize("args, message", [
    (["--clip_norm", "-1"], "clip_norm must be a number in (0.0, inf)"),
    (["--batch_size", "0"], "batch_schedule"),
    (["--epochs", "0"], "epochs must be a number in (0.0, inf)"),
])
def test_bad_flag_values_exit_2_naming_the_field(config_path, tmp_path, capsys, args, message):
  rc = cli.main(["train", "--config", config_path, "--workdir", str(tmp_path / "w"), *_FAST, *args])
  assert rc == 2 and message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "w")


def test_plan_states_the_mesh_and_that_noise_multiplier_replaces_the_configs_target(config_path, tmp_path, capsys):
  path = tmp_path / "with_target.py"
  path.write_text(_CONFIG.replace("  return c\n", "  c.noise_multiplier = None\n  c.target_epsilon = 3.0\n"
                                  "  return c\n"))
  rc = cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "w"), *_FAST,
                 "--noise_multiplier", "1.1", "--set", "num_steps=2"])
  out = capsys.readouterr().out
  assert rc == 0
  assert "--noise_multiplier 1.1 replaces the config's target epsilon 3" in out
  assert any(line.startswith("plan: mesh ") and "1 device(s)" in line for line in out.splitlines())


def _schedule_epsilon(steps):
  return accounting.epsilon_for_schedule(noise_multiplier=1.0, delta=1e-6, dataset_size=4000,
                                         batch_sizes="constant:200", num_steps=steps)


def test_extending_a_finished_run_accumulates_the_ledger_and_keeps_the_budget(config_path, tmp_path, capsys):
  workdir = tmp_path / "w"
  budget = (_schedule_epsilon(6) + _schedule_epsilon(7)) / 2  # allows 6 steps, not 7
  flags = [*_FAST, "--noise_multiplier", "1.0", "--target_epsilon", f"{budget!r}"]
  assert cli.main(["train", "--config", config_path, "--workdir", str(workdir), *flags, "--set", "num_steps=4"]) == 0
  first = json.load(open(workdir / "summary.json"))
  capsys.readouterr()
  rc = cli.main(["train", "--config", config_path, "--workdir", str(workdir), *flags, "--resume",
                 "--set", "num_steps=10"])
  out = capsys.readouterr().out
  second = json.load(open(workdir / "summary.json"))
  assert rc == 0
  assert second["steps"] == 6 and second["spent_steps"] == 6 and second["ledger"] != first["ledger"]
  assert "stopped before step 7 of 10" in out and second["epsilon"] <= budget < _schedule_epsilon(7)
  assert first["epsilon"] < second["epsilon"]
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records if not r.get("final")] == [1, 2, 3, 4, 5, 6]  # one log, no gap


def test_resume_that_shrinks_num_steps_is_still_refused(config_path, tmp_path, capsys):
  workdir = tmp_path / "w"
  assert cli.main(["train", "--config", config_path, "--workdir", str(workdir), *_FAST]) == 0
  capsys.readouterr()
  rc = cli.main(["train", "--config", config_path, "--workdir", str(workdir), *_FAST, "--resume",
                 "--set", "num_steps=4"])
  assert rc == 2 and "num_steps: checkpoint 8 vs now 4" in capsys.readouterr().err
