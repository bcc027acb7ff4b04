"""Flax's own MNIST examples (Linen and NNX, vendored in tests/flax_upstream/) made private in <= 10 lines."""

import importlib
import logging
import math
import pathlib
import re
import subprocess
import types

import ml_collections
import pytest

HERE = pathlib.Path(__file__).resolve().parent / "flax_upstream"
PAIRS = {"linen": (9, 6), "nnx": (7, 5)}  # the README states these counts


def changed_lines(name):
  """``(added, removed)`` lines of ``diff -U0`` upstream -> private, blank lines and headers excluded."""
  out = subprocess.run(["diff", "-U0", f"flax_mnist_{name}.py", f"flax_mnist_{name}_private.py"], cwd=HERE,
                       capture_output=True, text=True, check=False).stdout
  lines = [l for l in out.splitlines() if not l.startswith(("---", "+++", "@@"))]
  added = [l for l in lines if l.startswith("+") and l[1:].strip()]
  removed = [l for l in lines if l.startswith("-") and l[1:].strip()]
  return len(added), len(removed)


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_the_private_copy_differs_from_upstream_in_at_most_ten_lines(name):
  added, removed = changed_lines(name)
  assert (added, removed) == PAIRS[name]
  assert added <= 10 and removed <= 10


def test_the_vendored_files_are_upstream_but_for_the_marked_swaps():
  for name in PAIRS:
    text = (HERE / f"flax_mnist_{name}.py").read_text()
    assert "Licensed under the Apache License, Version 2.0" in text and "commit" in text.splitlines()[0]
    assert "import tensorflow" not in re.sub(r"#.*", "", text) and "import dpmega" not in text


def run_private(name, monkeypatch, caplog, epochs=1):
  monkeypatch.syspath_prepend(str(HERE))
  monkeypatch.setenv("MNIST_SWAP_TRAIN", "384")
  monkeypatch.setenv("MNIST_SWAP_TEST", "128")
  module = importlib.import_module(f"flax_mnist_{name}_private")
  swap = importlib.import_module("mnist_swap")
  writers = []

  class Writer(swap.SummaryWriter):
    def __init__(self, log_dir):
      super().__init__(log_dir)
      writers.append(self)

  monkeypatch.setattr(module, "tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
  config = ml_collections.ConfigDict(dict(learning_rate=0.1, momentum=0.9, batch_size=48, num_epochs=epochs))
  # absl's logger at INFO for this run: an in-process `dpmega train` earlier in the session raises it to ERROR.
  with caplog.at_level(logging.INFO), caplog.at_level(logging.INFO, logger="absl"):
    module.train_and_evaluate(config, "unused-workdir")
  eps = [float(m.group(1)) for r in caplog.records for m in [re.search(r"epsilon = ([\d.]+)", r.getMessage())] if m]
  return {k: v[-1][1] for k, v in writers[0].scalars.items()}, eps


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_the_private_copy_runs_learns_and_reports_epsilon(name, monkeypatch, caplog):
  scalars, eps = run_private(name, monkeypatch, caplog)
  assert len(eps) == 1 and 0 < eps[0] < 20  # through dpmega's ledger, for the Poisson steps that ran
  assert all(math.isfinite(v) for v in scalars.values())
  assert scalars["test_loss"] < math.log(10)  # better than chance after 8 noisy steps
