"""Shared test settings."""

import os

# Tests run on the CPU with one device unless a test starts its own process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent XLA compilation cache for the whole test run: the pytest process that first imports this file
# (the xdist controller, or the only process) makes a fresh directory, its workers and every `dpmega` process a
# test starts inherit it through the environment, and it is removed when that process exits. Many tests compile
# the same programs (the CLI tests each start a trainer that compiles the same step); this cut their time by a
# third. It caches compiled programs only: every test still traces, runs and checks what it did before. A
# directory set by the caller (JAX_COMPILATION_CACHE_DIR) is used as it is and kept. Tests only: the library
# never enables this cache, since a compiled program may embed constants of the run.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit  # noqa: E402
  import shutil  # noqa: E402
  import tempfile  # noqa: E402
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE = tempfile.mkdtemp(prefix="dpmega-tests-xla-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)

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
