"""``dpmega train``: config files and overrides, clear errors before compute, SIGKILL + exact resume."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from dpmega import cli
from dpmega.train import config as config_lib
from dpmega import train as train_lib
from dpmega.tasks import build_task
from tests import train_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTR_CONFIG = os.path.join(ROOT, "configs", "synthetic_ctr.py")

SMALL_CONFIG = train_configs.small_train_config(num_train=4000, num_eval=1000, num_steps=24)


@pytest.fixture()
def small_config(tmp_path):
  path = tmp_path / "small.py"
  path.write_text(SMALL_CONFIG)
  return str(path)


def _final_params(config_path, workdir, step=None):
  config = config_lib.load_config(config_path)
  config.workdir = workdir
  trainer = train_lib.Trainer(config_lib.validate(config), build_task(config))
  from dpmega.train.checkpoint import Checkpointer

  with Checkpointer(os.path.join(workdir, "checkpoints")) as ckpt:
    tree, meta = ckpt.restore(trainer._checkpoint_tree(trainer.initial_state()), step=step)
  return tree["params"], meta


def _assert_params_close(a, b):
  import jax

  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_readme_command_prints_final_epsilon_delta_relation_and_metric(tmp_path, capsys):
  rc = cli.main(["train", "--config", CTR_CONFIG, "--target_epsilon", "3", "--delta", "1e-6",
                 "--workdir", str(tmp_path / "w"), "--set", "task.num_train=8000", "task.num_eval=2000",
                 "num_steps=6", "batch_schedule='geometric:512->2048'", "microbatch_size=64",
                 "max_microbatches=8", "eval_every=0", "checkpoint_every=0"])
  out = capsys.readouterr().out
  assert rc == 0
  assert "calibrated to epsilon <= 3" in out
  done = [line for line in out.splitlines() if line.startswith("done:")]
  assert done and "epsilon = " in done[0] and "delta = 1e-06" in done[0] and "add/remove-one" in done[0]
  assert any(line.startswith("eval: ") and "auc" in line for line in out.splitlines())
  summary = json.load(open(tmp_path / "w" / "summary.json"))
  assert summary["epsilon"] <= 3.0 and summary["steps"] == 6
  records = [json.loads(line) for line in open(tmp_path / "w" / "metrics.jsonl")]
  assert {"step", "batch_size", "examples_per_s", "loss", "epsilon"} <= set(records[0])


@pytest.mark.slow
def test_readme_command_as_written(tmp_path, capsys):
  rc = cli.main(["train", "--config", CTR_CONFIG, "--target_epsilon", "3", "--delta", "1e-6",
                 "--workdir", str(tmp_path / "w")])
  out = capsys.readouterr().out
  assert rc == 0 and "done: 40 steps" in out


@pytest.mark.parametrize("args, message", [
    (["--set", "clip_norm=-1"], "clip_norm must be a number in (0.0, inf)"),
    (["--set", "delta=1.5"], "delta must be a number in (0.0, 1.0)"),
    (["--set", "sampling='shuffle'"], "sampling must be one of ['poisson', 'without_replacement']"),
    (["--set", "microbatch_size=0"], "microbatch_size must be an int in [1, "),
    (["--set", "optimizer.name='rmsprop'"], "optimizer.name must be one of"),
    (["--set", "accountant='gdp'"], "accountant must be one of ['rdp', 'pld']"),
    (["--set", "batch_schedule='linear:10'"], "batch_schedule"),
    (["--set", "batch_schedule='constant:5000'"], "within the dataset size 4,000"),
    (["--set", "nosuchfield=1"], "unknown config field 'nosuchfield'"),
    (["--set", "optimizer.nosuch=1"], "unknown config field 'optimizer.nosuch'"),
    (["--set", "num_steps='ten'"], "--set num_steps"),
    (["--set", "num_steps=0"], "num_steps must be an int in [1, "),
    (["--set", "task.name='nope'"], "task.name must be one of"),
    (["--set", "noise_multiplier=None"], "set noise_multiplier (fixed sigma) or target_epsilon"),
    (["--noise_multiplier", "-1"], "noise_multiplier must be a number in (0.0, inf)"),
    (["--set", "workers"], "--set must look like field=value"),
    (["--set", "task.vocab_size=1"], "task.vocab_size must be an int in [2, "),
    (["--set", "sampling='without_replacement'", "accountant='pld'"], "accountant 'pld' cannot account for sampling 'without_replacement'"),
])
def test_bad_input_is_one_clear_line_and_no_compute(tmp_path, capsys, small_config, args, message):
  workdir = tmp_path / "never"
  rc = cli.main(["train", "--config", small_config, "--workdir", str(workdir)] + args)
  err = capsys.readouterr().err
  assert rc == 2
  assert message in err, err
  assert len(err.strip().splitlines()) == 1
  assert not workdir.exists()


def test_missing_config_file_is_a_clear_error(tmp_path, capsys):
  assert cli.main(["train", "--config", str(tmp_path / "nope.py")]) == 2
  assert "--config must be an existing Python file" in capsys.readouterr().err


def test_budget_flags_replace_the_config_pair(small_config):
  parser = cli.build_parser()
  from dpmega.cli import train as cli_train

  args = parser.parse_args(["train", "--config", small_config, "--target_epsilon", "2", "--set", "init_seed=4"])
  config = cli_train.build_config(args)
  assert config.target_epsilon == 2.0 and config.noise_multiplier is None and config.init_seed == 4
  assert config.insecure_reproducible_seed is None  # a secret noise key unless asked explicitly
  config = cli_train.build_config(parser.parse_args(["train", "--config", small_config,
                                                     "--insecure_reproducible_seed", "6"]))
  assert config.insecure_reproducible_seed == 6
  args = parser.parse_args(["train", "--config", small_config, "--noise_multiplier", "0.9", "--target_epsilon",
                            "5"])
  config = cli_train.build_config(args)
  assert config.noise_multiplier == 0.9 and config.target_epsilon == 5.0


def _cli(capsys, *args):
  """``dpmega train *args`` in this process: its exit status and output, as ``subprocess.run`` gives them."""
  capsys.readouterr()
  rc = cli.main(["train", *args])
  out, err = capsys.readouterr()
  return subprocess.CompletedProcess(["dpmega", "train", *args], rc, out, err)


def test_sigkill_mid_run_then_resume_matches_an_uninterrupted_run(tmp_path, small_config, capsys):
  # Two workdirs compared bit for bit need one noise secret: a public seed (test-only, not private).
  seed = ("--insecure_reproducible_seed", "1")
  # The uninterrupted reference, in this process.
  ref_dir = str(tmp_path / "ref")
  assert cli.main(["train", "--config", small_config, "--workdir", ref_dir, *seed]) == 0
  capsys.readouterr()
  ref_params, ref_meta = _final_params(small_config, ref_dir)
  ref_summary = json.load(open(os.path.join(ref_dir, "summary.json")))

  # The same run, killed with SIGKILL mid-run (after the step-8 checkpoint, before the end).
  workdir = str(tmp_path / "cut")
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "dpmega", "train", "--config", small_config, "--workdir", workdir,
                           *seed], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  last = 0
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics):
      with open(metrics) as f:
        steps = [json.loads(line)["step"] for line in f if line.endswith("\n")]
      last = max(steps, default=0)
      if last >= 10:
        break
    time.sleep(0.005)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
  assert 10 <= last < 24

  # The resume, the corrupt checkpoint and the rewind run in this process (the kill needed its own; the rest
  # reads only the workdir, as a fresh process would, and saves a process start and JAX import each).
  resumed = _cli(capsys, "--config", small_config, "--workdir", workdir, "--resume", *seed)
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from the checkpoint at step" in resumed.stdout
  params, meta = _final_params(small_config, workdir)
  _assert_params_close(params, ref_params)
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["epsilon"] == ref_summary["epsilon"] and summary["ledger"] == ref_summary["ledger"]
  assert meta["ledger"] == ref_meta["ledger"]
  records = [json.loads(line) for line in open(metrics)]
  steps = [r["step"] for r in records if not r.get("final")]
  assert steps == list(range(1, 25))
  eps = [r["epsilon"] for r in records]
  assert all(a <= b for a, b in zip(eps, eps[1:]))

  # Corrupt the newest checkpoint: a clear one-line error; the previous one is kept and usable.
  with open(os.path.join(workdir, "checkpoints", "24", "meta", "metadata"), "w") as f:
    f.write('{"step": 24, "ledger": {}, "digest": "x"')  # truncated JSON
  bad = _cli(capsys, "--config", small_config, "--workdir", workdir, "--resume", *seed)
  assert bad.returncode == 2
  assert "checkpoint at step 24" in bad.stderr and "corrupt" in bad.stderr and "--resume_step 20" in bad.stderr
  again = _cli(capsys, "--config", small_config, "--workdir", workdir, "--resume_step", "20", *seed)
  assert again.returncode == 0, again.stderr
  # Steps 21-24 were computed (and checkpointed) once: redoing them from step 20 is a rewind, so they run in a
  # new generation with new keys (no key serves two computations) and the workdir pays for them again.
  assert "generation 1" in again.stdout and "rewind" in again.stdout
  summary = json.load(open(os.path.join(workdir, "summary.json")))
  assert summary["generation"] == 1 and summary["ledger"] == ref_summary["ledger"]
  assert summary["trajectory_epsilon"] == ref_summary["epsilon"] < summary["epsilon"]
