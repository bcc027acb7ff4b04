"""The shipped examples run and learn (small sizes)."""

import ast
import importlib.util
import pathlib


ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_example(name):
  spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_flax_private_loop_learns_with_linen_and_nnx():
  results = load_example("flax_private_loop").main(["--steps", "60"])
  for api in ("linen", "nnx"):
    private = results[f"{api}/private"]
    assert private["last_loss"] < 0.5 * private["first_loss"]
    assert private["accuracy"] > 0.85
    assert results[f"{api}/non-private"]["accuracy"] > 0.85
  assert 0 < results["epsilon"] < 10
  code = ast.parse((ROOT / "examples" / "flax_private_loop.py").read_text())
  code.body = code.body[1:]  # the docstring names jax.random.key(step) as what not to do
  code = ast.unparse(code)
  assert "dp_accounting" not in code and "jax.random.key(step" not in code  # epsilon and keys via dpmega
