"""Shared test settings."""

import os

# Tests run on the CPU with one device unless a test starts its own process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


# The shipped config the CLI tests train with (test_cli_fuzz.py, test_crash_safety.py).
SYNTHETIC_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "synthetic_ctr.py")


@pytest.fixture(scope="module")
def train_cli():
  """Skips a module's CLI training tests when the trainer or its config is not part of this build."""
  pytest.importorskip("dpmega.cli.train")
  pytest.importorskip("dpmega.train")
  if not os.path.isfile(SYNTHETIC_CONFIG):
    pytest.skip("configs/synthetic_ctr.py is not in this build")
