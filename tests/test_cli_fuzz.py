"""CLI fuzzing: bad input to every entry point is one clear line and exit code 2.

Each CLI sub-command is fuzzed with hypothesis, flag by flag: a valid base
command line with ONE flag replaced by a bad value (wrong type, out of range,
NaN, infinities, huge numbers, empty strings, wrong paths). The command must
exit with code 2, print no traceback, name the flag, and leave no output file.
The CLI runs in-process through ``dpmega.cli.main`` (fast); a few cases run it
in a subprocess to check what a user sees. Config files (missing, empty, broken,
binary) and ``--set`` overrides of every trainer field get the same treatment.

Crash safety (SIGKILL, disk full, NaN loss, determinism) is in
``tests/test_crash_safety.py``.
"""

import math
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dpmega import cli

_FUZZ = settings(max_examples=40, deadline=None, derandomize=True,
                 suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

_JUNK = ["", " ", "nan", "NaN", "inf", "-inf", "+inf", "1e400", "-1e400", "abc", "1,5", "0x10", "None",
         "[]", "{}", "1e", "--", "é", "1/2", "true", "\t", "9" * 400, "-" + "9" * 400]


def _as_number(text: str):
  try:
    return float(text.replace("_", ""))
  except (ValueError, OverflowError):
    return None


def bad_values(lo: float, hi: float, *, integer: bool = False, lo_open: bool = False,
               hi_open: bool = False) -> st.SearchStrategy[str]:
  """Command-line strings that are NOT a number in the range (an int if ``integer``)."""

  def ok(text: str) -> bool:
    v = _as_number(text)
    if v is None or not math.isfinite(v):
      return False
    if integer and not v.is_integer():
      return False
    return (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)

  out_of_range = st.one_of(
      st.floats(allow_nan=True, allow_infinity=True).map(repr),
      st.integers(min_value=-10**30, max_value=10**30).map(str),
  )
  candidates = [st.sampled_from(_JUNK), out_of_range, st.text(max_size=8)]
  if integer:
    candidates.append(st.floats(min_value=max(lo, -1e9), max_value=min(hi, 1e9)).map(lambda v: repr(v + 0.5)))
  return st.one_of(*candidates).filter(lambda s: not ok(s) and "\x00" not in s)


def _run(argv, capsys):
  try:
    code = cli.main(argv)
  except SystemExit as e:
    code = e.code
  out, err = capsys.readouterr()
  return code, out, err


def _replace(argv: list[str], flag: str, value: str) -> list[str]:
  argv = list(argv)
  if flag in argv:
    argv[argv.index(flag) + 1] = value
  else:
    argv += [flag, value]
  # "--flag=value" keeps values that start with "-" from being read as flags.
  i = argv.index(flag)
  return argv[:i] + [f"{flag}={value}"] + argv[i + 2:]


def _check_rejected(argv, flag, capsys, out_dir):
  before = sorted(os.listdir(out_dir))
  code, out, err = _run(argv, capsys)
  assert code == 2, (argv, code, err)
  assert "Traceback" not in err and err.strip(), (argv, err)
  assert flag.lstrip("-") in err or flag in err, (argv, err)
  assert out == "", (argv, out)
  assert sorted(os.listdir(out_dir)) == before, (argv, os.listdir(out_dir))


# ------------------------------------------------------------------ dpmega audit
_AUDIT_FLAGS = {
    "--noise_multiplier": bad_values(0, 1e6, lo_open=True),
    "--clip_norm": bad_values(0, 1e12, lo_open=True),
    "--sampling_rate": bad_values(0, 1, lo_open=True),
    "--trials": bad_values(20, 10**7, integer=True),
    "--confidence": bad_values(0.5, 1, hi_open=True),
    "--delta": bad_values(0, 1, lo_open=True, hi_open=True),
    "--seed": bad_values(0, 2**31 - 1, integer=True),
    "--canaries": bad_values(2, 10**4, integer=True),
    "--steps": bad_values(1, 10**5, integer=True),
    "--background": bad_values(0, 10**4, integer=True),
    "--batch_size": bad_values(1, 2 * 10**4, integer=True),
    "--kind": st.text(max_size=10).filter(lambda s: s not in ("mechanism", "one-run", "both")),
    "--accountant": st.text(max_size=10).filter(lambda s: s not in ("pld", "rdp")),
}


@_FUZZ
@given(data=st.data())
def test_audit_rejects_any_bad_flag_value(data, tmp_path_factory, capsys):
  out_dir = tmp_path_factory.mktemp("audit")
  flag = data.draw(st.sampled_from(sorted(_AUDIT_FLAGS)), label="flag")
  value = data.draw(_AUDIT_FLAGS[flag], label="value")
  base = ["audit", "--noise_multiplier", "1", "--trials", "20", "--json", str(out_dir / "a.json")]
  _check_rejected(_replace(base, flag, value), flag, capsys, out_dir)


@pytest.mark.parametrize("path", ["", "{dir}", "{dir}/missing/a.json", "/proc/no/such/file.json"])
def test_audit_rejects_bad_json_paths(path, tmp_path, capsys):
  argv = ["audit", "--noise_multiplier", "1", "--trials", "20", "--json", path.format(dir=tmp_path)]
  _check_rejected(argv, "--json", capsys, tmp_path)


# ------------------------------------------------------------------ dpmega epsilon / calibrate
_ACCOUNTING_BASE = ["--dataset_size", "60000", "--batch_size", "256", "--steps", "100", "--delta", "1e-5"]
_ACCOUNTING_FLAGS = {
    "--dataset_size": bad_values(1, math.inf, integer=True),
    "--batch_size": bad_values(1, 60000, integer=True),
    "--steps": bad_values(0, math.inf, integer=True),
    "--delta": bad_values(0, 1, lo_open=True, hi_open=True),
    "--points": bad_values(1, math.inf, integer=True),
    "--pld_discretization": bad_values(0, 1, lo_open=True),
    "--accountant": st.text(max_size=10).filter(lambda s: s not in ("rdp", "pld", "both")),
    "--sampling": st.text(max_size=10).filter(lambda s: s not in ("poisson", "without_replacement")),
    "--batch_schedule": st.one_of(st.sampled_from(_JUNK), st.text(max_size=12)).filter(
        lambda s: s.strip() and not s.strip().lower().startswith(("constant", "steps", "linear", "geometric"))),
}


def _draw_accounting_flag_and_check(data, flags, base, capsys, out_dir):
  """Replaces one flag of ``base`` by a drawn bad value and checks the CLI rejects it, naming the flag."""
  flag = data.draw(st.sampled_from(sorted(flags)), label="flag")
  value = data.draw(flags[flag], label="value")
  if flag == "--batch_schedule":  # the schedule replaces --batch_size
    base.remove("--batch_size"), base.remove("256")
  _check_rejected(_replace(base, flag, value), flag, capsys, out_dir)


@pytest.fixture(scope="module")
def accounting_cli():
  return pytest.importorskip("dpmega.cli.accounting")


@_FUZZ
@given(data=st.data())
def test_epsilon_rejects_any_bad_flag_value(data, accounting_cli, tmp_path_factory, capsys):
  out_dir = tmp_path_factory.mktemp("epsilon")
  flags = {**_ACCOUNTING_FLAGS, "--noise_multiplier": bad_values(0, math.inf)}
  base = ["epsilon", *_ACCOUNTING_BASE, "--noise_multiplier", "1.1", "--plot", str(out_dir / "e.png")]
  _draw_accounting_flag_and_check(data, flags, base, capsys, out_dir)


@_FUZZ
@given(data=st.data())
def test_calibrate_rejects_any_bad_flag_value(data, accounting_cli, tmp_path_factory, capsys):
  out_dir = tmp_path_factory.mktemp("calibrate")
  flags = {**_ACCOUNTING_FLAGS, "--target_epsilon": bad_values(0, math.inf, lo_open=True)}
  flags["--accountant"] = st.text(max_size=10).filter(lambda s: s not in ("rdp", "pld"))
  base = ["calibrate", *_ACCOUNTING_BASE, "--target_epsilon", "3", "--plot", str(out_dir / "c.png")]
  _draw_accounting_flag_and_check(data, flags, base, capsys, out_dir)


@pytest.mark.parametrize("argv, flag", [
    (["epsilon", "--dataset_size", "100", "--batch_size", "101", "--steps", "1", "--delta", "1e-5",
      "--noise_multiplier", "1"], "batch"),
    (["calibrate", "--dataset_size", "100", "--batch_size", "10", "--steps", "0", "--delta", "1e-5",
      "--target_epsilon", "1"], "--steps"),
    (["calibrate", "--dataset_size", "100", "--batch_size", "10", "--steps", "10", "--delta", "1e-5",
      "--target_epsilon", "1", "--sampling", "without_replacement", "--accountant", "pld"], "pld"),
])
def test_accounting_cross_flag_errors_exit_2(argv, flag, accounting_cli, capsys, tmp_path):
  code, out, err = _run(argv, capsys)
  assert code == 2 and "Traceback" not in err and flag.lower() in err.lower(), err


# ------------------------------------------------------------------ dpmega criteo-convert
@pytest.fixture(scope="module")
def criteo_cli():
  return pytest.importorskip("dpmega.cli.criteo")


def _criteo_inputs(d):
  import gzip  # pylint: disable=import-outside-toplevel

  (d / "empty.tsv").write_bytes(b"")
  (d / "binary.tsv").write_bytes(bytes(range(256)) * 4)
  (d / "short.tsv").write_text("1\t2\n")
  (d / "not_gzip.gz").write_text("1\t2\n")
  (d / "truncated.gz").write_bytes(gzip.compress(b"1\t2\t3\n" * 100)[:30])
  (d / "a_dir").mkdir()


@pytest.mark.parametrize("name", ["empty.tsv", "binary.tsv", "short.tsv", "not_gzip.gz", "truncated.gz",
                                  "a_dir", "missing.tsv"])
def test_criteo_convert_rejects_bad_input_files_without_output(name, criteo_cli, tmp_path, capsys):
  _criteo_inputs(tmp_path)
  out = tmp_path / "out"
  code, stdout, err = _run(["criteo-convert", "--files", str(tmp_path / name), "--out", str(out),
                            "--no_progress"], capsys)
  assert code == 2 and "Traceback" not in err and err.strip() and stdout == "", err
  assert not out.exists() and not (tmp_path / "out.partial").exists()


@_FUZZ
@given(data=st.data())
def test_criteo_convert_rejects_bad_flag_values(data, criteo_cli, tmp_path_factory, capsys):
  d = tmp_path_factory.mktemp("criteo")
  (d / "short.tsv").write_text("1\t2\n")
  flag = data.draw(st.sampled_from(["--max_rows", "--days", "--layout", "--out"]), label="flag")
  bad = {"--max_rows": bad_values(1, math.inf, integer=True),
         "--days": bad_values(0, 23, integer=True),
         "--layout": st.text(max_size=8).filter(lambda s: s not in ("kaggle", "terabyte")),
         "--out": st.sampled_from(["/proc/no/such/dir", str(d / "short.tsv")])}[flag]
  value = data.draw(bad, label="value")
  if flag in ("--days", "--layout"):
    base = ["criteo-convert", "--layout", "terabyte", "--root", str(d), "--out", str(d / "out"), "--no_progress"]
  else:
    base = ["criteo-convert", "--files", str(d / "short.tsv"), "--out", str(d / "out"), "--no_progress"]
  before = sorted(os.listdir(d))
  code, stdout, err = _run(_replace(base, flag, value), capsys)
  assert code == 2 and "Traceback" not in err and err.strip() and stdout == "", (flag, value, err)
  assert sorted(os.listdir(d)) == before


# ------------------------------------------------------------------ what a user sees
@pytest.mark.parametrize("argv", [
    ["audit", "--noise_multiplier", "1", "--trials", "1e400"],
    ["epsilon", "--dataset_size", "1e400", "--batch_size", "1", "--steps", "1", "--delta", "1e-5",
     "--noise_multiplier", "1"],
    ["nonexistent-command"],
])
def test_subprocess_bad_input_is_one_line_exit_2(argv, tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  p = subprocess.run([sys.executable, "-m", "dpmega", *argv], capture_output=True, text=True, env=env,
                     timeout=120, cwd=tmp_path)
  assert p.returncode == 2, p.stderr
  assert "Traceback" not in p.stderr and p.stdout == ""
  assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------ dpmega train: config entry points
_SYNTHETIC_CONFIG = os.path.join(os.path.dirname(__file__), os.pardir, "configs", "synthetic_ctr.py")

# field -> (kind, lo, hi, lo_open, hi_open): the allowed values (see dpmega/train/config.py).
_TRAIN_FIELDS = {
    "init_seed": ("int", 0, 2**31 - 1),
    "insecure_reproducible_seed": ("optional_int", 0, 2**63 - 1),
    "num_steps": ("int", 1, 10**9),
    "microbatch_size": ("int", 1, 2**20),
    "max_microbatches": ("int", 1, 2**16),
    "log_every": ("int", 0, 10**9),
    "eval_every": ("int", 0, 10**9),
    "checkpoint_every": ("int", 0, 10**9),
    "keep_checkpoints": ("int", 2, 10**6),
    "optimizer.warmup_steps": ("int", 0, 1),  # at most num_steps, 1 in these tests
    "clip_norm": ("float", 0, math.inf, True, True),
    "delta": ("float", 0, 1, True, True),
    "optimizer.learning_rate": ("float", 0, math.inf, True, True),
    "optimizer.final_lr_fraction": ("float", 0, 1, False, False),
    "optimizer.momentum": ("float", 0, 1, False, True),
    "optimizer.b1": ("float", 0, 1, False, True),
    "optimizer.b2": ("float", 0, 1, False, True),
    "optimizer.eps": ("float", 0, math.inf, False, True),
    "tensorboard": ("bool",),
    "optimizer.nesterov": ("bool",),
    "accountant": ("choice", "rdp", "pld"),
    "sampling": ("choice", "poisson", "without_replacement"),
    "clipping": ("clipping",),  # the registered modes, looked up when checking
    "optimizer.name": ("choice", "sgd", "momentum", "adam", "adamw", "lamb"),
    "optimizer.schedule": ("choice", "constant", "cosine", "linear", "exponential"),
}


def _literal(text: str):
  import ast  # pylint: disable=import-outside-toplevel
  if text.strip().lower() in ("none", "null"):
    return None
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
    return text


def _valid_train_value(field: str, text: str) -> bool:
  kind, *spec = _TRAIN_FIELDS[field]
  v = _literal(text)
  if kind == "clipping":
    import dpmega.train  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import  (registers modes)
    from dpmega.clipping import clipping_modes  # pylint: disable=import-outside-toplevel
    kind, spec = "choice", list(clipping_modes())
  if kind == "bool":
    return isinstance(v, bool)
  if kind == "choice":
    return (text.strip() if not isinstance(v, str) else v) in spec
  if kind == "optional_int" and v is None:
    return True
  if kind in ("int", "optional_int"):
    lo, hi = spec
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
  if not isinstance(v, (int, float)):
    return False
  try:
    v = float(v)  # ConfigDict turns ints (and bools) into floats for a float field
  except OverflowError:
    return False
  lo, hi, lo_open, hi_open = spec
  return not math.isnan(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)


_override_text = st.one_of(
    st.sampled_from(_JUNK + ["True", "False", "[1, 2]", "(1,)", "{'a': 1}", "'x'", "-1", "0", "1.5", "2**70"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(min_value=-10**30, max_value=10**30).map(str),
    st.text(max_size=8),
)


@_FUZZ
@given(data=st.data())
def test_train_rejects_any_bad_config_override(data, train_cli, tmp_path_factory, capsys):
  out_dir = tmp_path_factory.mktemp("train")
  field = data.draw(st.sampled_from(sorted(_TRAIN_FIELDS)), label="field")
  text = data.draw(_override_text.filter(lambda t, f=field: "\x00" not in t and not _valid_train_value(f, t)),
                   label="value")
  # num_steps=1 first: should a value slip through as valid, the run stays short.
  argv = ["train", "--config", _SYNTHETIC_CONFIG, "--workdir", str(out_dir / "run"),
          "--noise_multiplier", "1", "--set", "num_steps=1", f"{field}={text}"]
  code, out, err = _run(argv, capsys)
  assert code == 2, (argv, code, err[-2000:])
  assert "Traceback" not in err and field.rsplit(".", 1)[-1] in err, (argv, err)
  assert os.listdir(out_dir) == [], (argv, os.listdir(out_dir))


@_FUZZ
@given(flag=st.sampled_from(["--noise_multiplier", "--target_epsilon", "--delta", "--resume_step"]),
       text=st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e400", "abc", "", "1e-400", "2"]))
def test_train_rejects_bad_budget_flags(flag, text, train_cli, tmp_path_factory, capsys):
  out_dir = tmp_path_factory.mktemp("train_flags")
  valid = {"--noise_multiplier": ("2",), "--target_epsilon": ("2",), "--delta": (), "--resume_step": ()}
  if text in valid[flag]:
    return
  argv = ["train", "--config", _SYNTHETIC_CONFIG, "--workdir", str(out_dir / "run"), "--noise_multiplier", "1"]
  argv = _replace(argv, flag, text)
  if flag == "--delta" and text == "1e-400":
    pass  # 1e-400 parses as 0.0: out of (0, 1)
  code, out, err = _run(argv, capsys)
  assert code == 2, (argv, code, err[-2000:])
  assert "Traceback" not in err, err
  assert os.listdir(out_dir) == [] or flag == "--resume_step", os.listdir(out_dir)


@pytest.mark.parametrize("content, message", [
    (None, "existing Python file"),                        # no such file
    ("", "get_config"),                                    # empty file
    ("def get_config(:\n", "SyntaxError"),
    ("x = 1\x00\n", "null bytes"),
    ("def get_config():\n  raise RuntimeError('boom')\n", "boom"),
    ("import no_such_module_for_dpmega\n", "no_such_module_for_dpmega"),
    ("def get_config():\n  return 3\n", "ConfigDict"),
    ("from dpmega.train import config as c\ndef get_config():\n  return c.base_config()\n", "task.name"),
    ("DIRECTORY", "existing Python file"),
])
def test_train_rejects_broken_config_files(content, message, train_cli, tmp_path, capsys):
  path = tmp_path / "config.py"
  if content == "DIRECTORY":
    path = tmp_path / "configdir"
    path.mkdir()
  elif content is not None:
    path.write_bytes(content.encode())
  workdir = tmp_path / "run"
  code, out, err = _run(["train", "--config", str(path), "--workdir", str(workdir), "--noise_multiplier", "1"],
                        capsys)
  assert code == 2 and "Traceback" not in err and message in err, err
  assert not workdir.exists()


@pytest.mark.parametrize("item, message", [
    ("num_steps", "field=value"), ("=3", "field=value"), ("no_such_field=1", "no_such_field"),
    ("optimizer.no_such=1", "no_such"), ("task.nope.deeper=1", "nope"), ("num_steps=", "num_steps"),
])
def test_train_rejects_malformed_overrides(item, message, train_cli, tmp_path, capsys):
  workdir = tmp_path / "run"
  code, out, err = _run(["train", "--config", _SYNTHETIC_CONFIG, "--workdir", str(workdir),
                         "--noise_multiplier", "1", "--set", item], capsys)
  assert code == 2 and "Traceback" not in err and message in err, err
  assert not workdir.exists()
