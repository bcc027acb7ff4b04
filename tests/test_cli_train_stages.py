"""``dpmega train`` before and at its first step (issue 21, items 8 and 6): the first call's compile is said and
timed apart from examples/s; SIGTERM and Ctrl-C before the loop (dataset, calibration) stop at once with one line
naming the stage and what the workdir holds. Real subprocesses, as in tests/test_cli_train_safety.py."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests import train_configs
from tests.interrupts import sigint_default

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FAST = ["--insecure_reproducible_seed", "3"]
_ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
# A ramp of ~10,000 distinct batch sizes: calibrating sigma to a target takes minutes on this machine.
_SLOW_CALIBRATION = ["--target_epsilon", "2", "--delta", "1e-6", "--set", "task.num_train=20000",
                     "--set", "batch_schedule=linear:10->10000", "--set", "num_steps=10000"]


@pytest.fixture()
def config_path(train_cli, tmp_path):
  path = tmp_path / "small_config.py"
  path.write_text(train_configs.small_train_config(num_train=4000, num_eval=500, num_steps=3))
  return str(path)


def test_first_call_compile_is_said_and_not_counted_in_examples_per_second(config_path, tmp_path):
  workdir = tmp_path / "w"
  proc = subprocess.run([sys.executable, "-m", "dpmega", "train", "--config", config_path, "--workdir", str(workdir),
                         *_FAST], capture_output=True, text=True, env=_ENV, cwd=_ROOT, timeout=600)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.splitlines()
  said = lines.index("compiling the step (first call) ...")
  assert lines[said + 1].startswith("compiled the step (first call) in ") and "not counted in examples/s" in \
      lines[said + 1]
  assert lines[said + 2].startswith("step 1/3"), lines
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"final"' not in line]
  first, second = records[0], records[1]
  assert first["compile_seconds"] > first["seconds"]  # a tiny model: the compile dominates the first call
  assert second["compile_seconds"] < first["compile_seconds"]
  assert first["examples_per_s"] == pytest.approx(first["sampled"] / first["seconds"])


def _start(config_path, workdir, *args):
  return subprocess.Popen([sys.executable, "-m", "dpmega", "train", "--config", config_path, "--workdir",
                           str(workdir), *_FAST, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=_ENV, cwd=_ROOT, preexec_fn=sigint_default)


def _wait_for_calibration(proc, workdir, seconds=25.0):
  """Until the lock exists (the dataset is next, then calibration), then a few seconds into calibrating."""
  deadline = time.monotonic() + 300
  while not os.path.exists(workdir / ".dpmega.lock"):
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
    time.sleep(0.2)
  time.sleep(seconds)
  assert proc.poll() is None  # still before the loop: the calibration takes minutes


@pytest.mark.parametrize("signum, rc, how", [(signal.SIGTERM, 143, "stopped by SIGTERM"),
                                             (signal.SIGINT, 130, "interrupted (Ctrl-C)")])
def test_a_signal_before_the_loop_stops_at_once_naming_the_stage_and_the_workdir(config_path, tmp_path, signum, rc,
                                                                                 how):
  workdir = tmp_path / "w"
  proc = _start(config_path, workdir, *_SLOW_CALIBRATION)
  try:
    _wait_for_calibration(proc, workdir)
    sent = time.monotonic()
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)  # the old code went on calibrating for minutes
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert time.monotonic() - sent < 60
  assert proc.returncode == rc, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert lines == [f"dpmega train: {how} while calibrating sigma to the target epsilon, before the first step: no "
                   "step ran and no privacy was spent; nothing was written to the workdir; run the same command "
                   "again."], err
  assert "step 1/" not in out
  assert [f for _, _, files in os.walk(workdir) for f in files] == [".dpmega.lock"]
