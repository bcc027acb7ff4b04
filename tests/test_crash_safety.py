"""Crash safety: faults during training and checkpointing lose nothing already written.

Faults (subprocesses, Linux): SIGKILL in the middle of a checkpoint write;
disk full (``RLIMIT_FSIZE``) while writing a checkpoint or metrics; a loss that
turns NaN; and determinism -- two runs with one ``insecure_reproducible_seed``
and config give bit-identical parameters. (Bad command-line input:
``tests/test_cli_fuzz.py``.)
"""

import os
import subprocess
import sys

import pytest

from tests import train_configs

_SYNTHETIC_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "synthetic_ctr.py")


# ------------------------------------------------------------------ faults
# A tiny private run of the built-in synthetic CTR task (a few seconds of compute).
_SMALL_TRAIN_CONFIG = train_configs.small_train_config(num_train=2000, num_eval=500, num_steps=12)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture()
def small_train_config(train_cli, tmp_path):
  path = tmp_path / "small_config.py"
  path.write_text(_SMALL_TRAIN_CONFIG)
  return str(path)


# Runs a Python command with RLIMIT_FSIZE set: a write past the limit fails with EFBIG
# (SIGXFSZ ignored) -- a disk that fills up, file by file. A launcher sets the limit and
# exec()s, so the test process never forks with JAX's threads running.
_LIMITED_LAUNCHER = (
    "import os, resource, signal, sys; "
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
    "limit = int(sys.argv[1]); resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)); "
    "os.execv(sys.executable, [sys.executable] + sys.argv[2:])")


def _python(args, *, file_size_limit=None, timeout=300):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  args = list(args)
  if file_size_limit is not None:
    args = ["-c", _LIMITED_LAUNCHER, str(file_size_limit), *args]
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=_ROOT,
                        timeout=timeout)


_SAVE_SCRIPT = '''
import sys, numpy as np
from dpmega.train.checkpoint import Checkpointer
directory, size = sys.argv[1], int(sys.argv[2])
with Checkpointer(directory) as ckpt:
  ckpt.save(1, {"w": np.arange(100, dtype=np.float32)}, {"at": 1})
  print("saved 1", flush=True)
  big = np.random.default_rng(0).normal(size=size).astype(np.float32)  # incompressible
  try:
    ckpt.save(2, {"w": big}, {"at": 2})
    print("saved 2", flush=True)
  except Exception as e:
    print("save 2 failed:", type(e).__name__, flush=True)
    sys.exit(3)
'''


def _restore_w(directory, step=None, size=100):
  from dpmega.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  with Checkpointer(str(directory)) as ckpt:
    steps = ckpt.steps()
    tree, meta = ckpt.restore({"w": np.zeros((size,), np.float32)}, step=step)
  return steps, tree["w"], meta


@pytest.mark.skipif(sys.platform != "linux", reason="SIGKILL timing and rlimits as on Linux")
def test_sigkill_during_checkpoint_write_leaves_previous_checkpoint_usable(tmp_path):
  import signal  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  directory = tmp_path / "ckpt"
  script = tmp_path / "save.py"
  script.write_text(_SAVE_SCRIPT)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, str(script), str(directory), str(16_000_000)], cwd=_ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  # Kill as soon as the write of checkpoint 2 is under way (Orbax's temporary folder exists).
  deadline = time.time() + 240
  killed_mid_write = False
  while time.time() < deadline and proc.poll() is None:
    if any(name.startswith("2.") and "tmp" in name for name in os.listdir(directory) if directory.exists()) \
        if directory.exists() else False:
      proc.send_signal(signal.SIGKILL)
      killed_mid_write = True
      break
    time.sleep(0.001)
  proc.wait()
  out = proc.stdout.read()
  assert killed_mid_write and proc.returncode == -signal.SIGKILL, (proc.returncode, out)
  assert "saved 2" not in out
  steps, w, meta = _restore_w(directory)
  assert steps == [1] and meta["at"] == 1
  np.testing.assert_array_equal(w, np.arange(100, dtype=np.float32))
  # The run can go on: checkpoint 2 is written over the debris of the killed write.
  from dpmega.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  with Checkpointer(str(directory)) as ckpt:
    ckpt.save(2, {"w": np.ones(100, np.float32)}, {"at": 2})
  assert _restore_w(directory)[0] == [1, 2]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as on Linux")
def test_disk_full_during_checkpoint_write_loses_no_earlier_checkpoint(tmp_path):
  import numpy as np  # pylint: disable=import-outside-toplevel

  directory = tmp_path / "ckpt"
  script = tmp_path / "save.py"
  script.write_text(_SAVE_SCRIPT)
  # Checkpoint 2 needs ~4 MB in one file; no file may exceed 200 kB.
  p = _python([str(script), str(directory), str(1_000_000)], file_size_limit=200_000)
  assert p.returncode == 3 and "saved 1" in p.stdout and "save 2 failed" in p.stdout, p.stdout + p.stderr[-2000:]
  steps, w, meta = _restore_w(directory)
  assert steps == [1] and meta["at"] == 1
  np.testing.assert_array_equal(w, np.arange(100, dtype=np.float32))
  # Space is back: the same save now succeeds and both checkpoints read back.
  p = _python([str(script), str(tmp_path / "again"), str(1_000_000)])
  assert p.returncode == 0, p.stderr[-2000:]


def _metrics_lines(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), "rb") as f:
    return f.read().split(b"\n")


# metrics.jsonl grows ~430 bytes a step and passes 20 kB around step 46 of 60; each
# checkpoint file stays under 20 kB, so the checkpoints at steps 10..40 are written.
_DISK_FULL_RUN = ["--set", "num_steps=60", "checkpoint_every=10"]


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as on Linux")
def test_disk_full_while_writing_metrics_keeps_every_record_already_written(small_train_config, tmp_path):
  import json  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / "run")
  p = _python(["-m", "dpmega", "train", "--config", small_train_config, "--workdir", workdir, *_DISK_FULL_RUN],
              file_size_limit=20_000)
  assert p.returncode != 0, p.stdout[-2000:]
  *complete, _ = _metrics_lines(workdir)
  records = [json.loads(line) for line in complete]
  n = len(records)
  assert [r["step"] for r in records] == list(range(1, n + 1)) and 40 <= n < 60, n
  for r in records:  # every step logged completely also printed its progress line
    assert f"step {r['step']}/60 " in p.stdout
  from dpmega.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    steps = ckpt.steps()
  assert steps == [20, 30, 40], steps
  _, meta = _restore_train_checkpoint(small_train_config, workdir)  # the newest one reads back whole
  assert meta["step"] == 40


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE as on Linux")
def test_disk_full_while_writing_metrics_is_a_clear_error_and_the_run_resumes(small_train_config, tmp_path):
  workdir = str(tmp_path / "run")
  p = _python(["-m", "dpmega", "train", "--config", small_train_config, "--workdir", workdir, *_DISK_FULL_RUN],
              file_size_limit=20_000)
  assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
  assert _metrics_lines(workdir)[-1] == b""  # no partial record
  resumed = _python(["-m", "dpmega", "train", "--config", small_train_config, "--workdir", workdir,
                     "--resume", *_DISK_FULL_RUN])
  assert resumed.returncode == 0, resumed.stderr[-3000:]


def _restore_train_checkpoint(config_path, workdir, step=None, overrides=()):
  from dpmega.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from dpmega import train as train_lib  # pylint: disable=import-outside-toplevel
  from dpmega.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  from dpmega.tasks import build_task  # pylint: disable=import-outside-toplevel

  config = config_lib.apply_overrides(config_lib.load_config(config_path), list(overrides))
  config.workdir = workdir
  trainer = train_lib.Trainer(config_lib.validate(config), build_task(config))
  with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    template = trainer._checkpoint_tree(trainer.initial_state())  # pylint: disable=protected-access
    return ckpt.restore(template, step=step)


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(small_train_config, tmp_path):
  import numpy as np  # pylint: disable=import-outside-toplevel

  workdir = str(tmp_path / "run")
  # Adam with a learning rate of 3e38: the first update sends the parameters to ~3e38 (the loss to NaN), the
  # second past the float32 maximum. Only non-finite PARAMETERS stop a run (non-finite example gradients are
  # zeroed and counted: tests/test_resume_privacy.py).
  p = _python(["-m", "dpmega", "train", "--config", small_train_config, "--workdir", workdir, "--set",
               "num_steps=4", "checkpoint_every=1", "optimizer.name=adam", "optimizer.learning_rate=3e38"])
  assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr[-3000:]
  assert "finite" in p.stderr.lower() and "step 1" in p.stderr, p.stderr[-3000:]  # names the last good one
  from dpmega.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    assert ckpt.steps() == [1]
  tree, _ = _restore_train_checkpoint(small_train_config, workdir, overrides=["optimizer.name=adam"])
  import jax  # pylint: disable=import-outside-toplevel
  assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(tree["params"]))


def test_same_insecure_seed_and_config_give_bit_identical_params_across_processes(small_train_config, tmp_path):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from dpmega.train import config as config_lib  # pylint: disable=import-outside-toplevel
  from dpmega import train as train_lib  # pylint: disable=import-outside-toplevel
  from dpmega.tasks import build_task  # pylint: disable=import-outside-toplevel

  def run_in_subprocess(name):
    workdir = str(tmp_path / name)
    p = _python(["-m", "dpmega", "train", "--config", small_train_config, "--workdir", workdir,
                 "--insecure_reproducible_seed", "3", "--set", "num_steps=6", "checkpoint_every=0"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "NOT a private release" in p.stdout
    tree, meta = _restore_train_checkpoint(small_train_config, workdir, overrides=["insecure_reproducible_seed=3"])
    return tree["params"], meta

  a, meta_a = run_in_subprocess("a")
  b, meta_b = run_in_subprocess("b")
  leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    assert x.dtype == y.dtype and x.shape == y.shape
    assert np.array_equal(x, y) and x.tobytes() == y.tobytes()  # bit-identical, not merely close
  assert meta_a["ledger"] == meta_b["ledger"]
  # ... and not because nothing happened: the run moved the parameters.
  config = config_lib.load_config(small_train_config)
  initial = train_lib.Trainer(config_lib.validate(config), build_task(config)).initial_state().params
  assert any(not np.array_equal(np.asarray(x), y) for x, y in zip(jax.tree_util.tree_leaves(initial), leaves_a))
