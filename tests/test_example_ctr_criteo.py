"""examples/ctr_criteo.py can be run twice as written (issue 21, item 12): a real subprocess, in a fresh directory."""

import os
import pathlib
import subprocess
import sys

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "ctr_criteo.py"
SMALL = ["--rows", "2000", "--eval_rows", "500", "--steps", "6", "--batch_size", "256", "--quiet",
         "--insecure_reproducible_seed", "0"]


def _run(cwd, *argv):
  env = dict(os.environ, PYTHONPATH=str(EXAMPLE.parents[1]))
  return subprocess.run([sys.executable, str(EXAMPLE), *SMALL, *argv], cwd=cwd, capture_output=True, text=True,
                        env=env, timeout=900, check=False)


@pytest.mark.slow
def test_example_runs_twice_in_its_own_workdir_and_refuses_to_clobber_another(tmp_path):
  first = _run(tmp_path)
  assert first.returncode == 0, first.stderr[-2000:]
  second = _run(tmp_path)
  assert second.returncode == 0, second.stderr[-2000:]
  assert "starting afresh in the demo workdir" in second.stdout and "Traceback" not in second.stderr
  other = tmp_path / "mine"
  assert _run(tmp_path, "--workdir", str(other)).returncode == 0
  refused = _run(tmp_path, "--workdir", str(other))
  assert refused.returncode != 0 and "Traceback" not in refused.stderr[-300:]
