"""What ``dpmega train`` says when it stops early: one whole line naming the step ``--resume`` continues from.

Real ``dpmega train`` processes (Linux): a full disk (``RLIMIT_FSIZE``, writes fail with EFBIG) during a
checkpoint save, SIGTERM (a preemption: the run saves and exits 143), Ctrl-C (SIGINT). In process: the warmup
is checked against the steps ``--epochs`` works out, and a model worse than a constant predictor (normalized
entropy >= 1) is warned about.
"""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests import train_configs
from tests.interrupts import sigint_default

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CONFIG = train_configs.small_train_config(num_train=2000, num_eval=500, num_steps=12)
# Sets RLIMIT_FSIZE (SIGXFSZ ignored: a write past it fails with EFBIG) and exec()s the command.
_LIMITED = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "limit = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
            "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="rlimits and signals as on Linux")


@pytest.fixture()
def config_path(train_cli, tmp_path):
  path = tmp_path / "small_config.py"
  path.write_text(_CONFIG)
  return str(path)


def _env():
  # Without the test run's shared compilation cache (tests/conftest.py): these processes hit a file-size limit or
  # are interrupted, and JAX would leave truncated cache entries that warn in every later process reading them
  # (seen: the disk-full test ran first with a cold cache, then the Ctrl-C test's stderr had 6 extra lines).
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  return {**env, "JAX_PLATFORMS": "cpu"}


def _steps(workdir):
  from dpmega.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    return ckpt.steps()


def test_disk_full_during_a_checkpoint_save_is_one_whole_line_and_no_traceback(config_path, tmp_path):
  workdir = str(tmp_path / "run")
  # Each checkpoint file of this model passes 3 kB; metrics.jsonl stays under it for 3 steps.
  p = subprocess.run([sys.executable, "-c", _LIMITED, "3000", "-m", "dpmega", "train", "--config", config_path,
                      "--workdir", workdir, "--set", "num_steps=6", "checkpoint_every=3", "log_every=0"],
                     capture_output=True, text=True, env=_env(), cwd=_ROOT, timeout=300)
  lines = [line for line in p.stderr.splitlines() if line.strip()]
  assert p.returncode == 1 and len(lines) == 1, p.stderr[-3000:]
  line = lines[0]
  assert line.startswith("dpmega train: error: could not write the checkpoint of step 3 (ValueError: File too "
                         "large (errno 27) writing " + os.path.join(workdir, "checkpoints")), line
  # Whole: the path is not cut, and the line ends with what to do next.
  assert line.endswith("no checkpoint was written yet, so --resume has nothing to continue from: run again "
                       "without --resume."), line
  assert _steps(workdir) == []


def _start(config_path, workdir, *args):
  return subprocess.Popen([sys.executable, "-m", "dpmega", "train", "--config", config_path, "--workdir", workdir,
                           "--set", "num_steps=100000", "checkpoint_every=4", "log_every=1", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=_ROOT,
                          preexec_fn=sigint_default)


def _signal_after_step(proc, step, signum):
  deadline = time.time() + 240
  for line in proc.stdout:
    if line.startswith(f"step {step}/"):
      proc.send_signal(signum)
      break
    assert time.time() < deadline, "no progress"
  out, err = proc.communicate(timeout=240)
  return out, err


def test_sigterm_saves_a_checkpoint_and_says_which_step_resume_continues_from(config_path, tmp_path):
  workdir = str(tmp_path / "run")
  proc = _start(config_path, workdir)
  _, err = _signal_after_step(proc, 6, signal.SIGTERM)
  assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err[-3000:]
  last = err.strip().splitlines()[-1]
  assert last.startswith("dpmega train: stopped by SIGTERM: the checkpoint of step "), last
  step = int(last.split("the checkpoint of step ")[1].split(" ")[0])
  assert step >= 6 and last.endswith(f"run again with --resume, which continues from step {step}."), last
  assert _steps(workdir)[-1] == step  # saved, though checkpoint_every=4 would not have saved it


def test_ctrl_c_says_which_step_resume_continues_from(config_path, tmp_path):
  workdir = str(tmp_path / "run")
  proc = _start(config_path, workdir)
  _, err = _signal_after_step(proc, 9, signal.SIGINT)
  assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
  lines = [line for line in err.splitlines() if line.strip()]
  saved = _steps(workdir)[-1]
  assert saved >= 8 and lines == [f"dpmega train: interrupted; the last checkpoint is at step {saved}: run again "
                                  f"with --resume, which continues from step {saved}."], err


def test_warmup_is_checked_against_the_steps_epochs_works_out(config_path, tmp_path, capsys):
  from dpmega import cli  # pylint: disable=import-outside-toplevel
  base = ["train", "--config", config_path, "--epochs", "1", "--set", "log_every=0"]
  # 1 epoch of N = 2000 at batch 200 is 10 steps; the config's num_steps (12) would have allowed 12.
  assert cli.main([*base, "--workdir", str(tmp_path / "a"), "--set", "optimizer.warmup_steps=12"]) == 2
  assert "optimizer.warmup_steps must be in [0, 10] (the steps epochs = 1 works out), got 12" in capsys.readouterr().err
  # ... and num_steps = 3, which epochs replaces, does not refuse a warmup of 8 of the 10 steps.
  assert cli.main([*base, "--workdir", str(tmp_path / "b"), "--set", "num_steps=3", "optimizer.warmup_steps=8"]) == 0
  assert "done: 10 steps" in capsys.readouterr().out


@pytest.mark.parametrize("ne, warned", [(1.26, True), (1.0, True), (0.97, False)])
def test_a_model_worse_than_a_constant_predictor_is_warned_about(config_path, ne, warned):
  from dpmega import accounting  # pylint: disable=import-outside-toplevel
  from dpmega.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from dpmega.train import report  # pylint: disable=import-outside-toplevel
  cfg = config_lib.validate(config_lib.load_config(config_path))
  result = report.TrainResult(5, 1.0, 1e-6, 1.0, None, {"auc": 0.6, "normalized_entropy": ne}, {},
                              accounting.Ledger(), [], 1.0, accounting.Ledger())
  lines = report.closing_lines(cfg, result)
  assert any(line.startswith(f"warning: normalized entropy {ne:.4f} >= 1: this model predicts worse than a constant "
                             "predictor") for line in lines) == warned, lines
