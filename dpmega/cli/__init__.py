"""The ``dpmega`` command line: one sub-command per module.

Each sub-command lives in its own module exposing ``add_parser(subparsers)``
(which registers the sub-command and sets ``func`` on it) and a function
``run(args) -> int``. Bad input raises :class:`dpmega.errors.UsageError` (or
``ValueError`` during validation); both print one clear line and exit with
code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import sys
import warnings
from typing import Sequence

from dpmega.errors import UsageError

# Sub-command modules, imported lazily so `dpmega epsilon` does not import Flax.
_COMMAND_MODULES = (
    "dpmega.cli.accounting",
    "dpmega.cli.train",
    "dpmega.cli.audit",
    "dpmega.cli.criteo",
)


class _Parser(argparse.ArgumentParser):
  """argparse with exit code 2 and a single-line error (its default already is 2)."""

  def error(self, message: str):  # noqa: D401 - argparse API
    self.print_usage(sys.stderr)
    self.exit(2, f"dpmega: error: {message}\n")

  def _get_values(self, action, arg_strings):
    # argparse drops a "--" value (`--flag=--`) and stores [] instead of failing.
    if action.option_strings and action.nargs is None and arg_strings == ["--"]:
      self.error(f"argument {'/'.join(action.option_strings)}: expected one value, got '--'")
    return super()._get_values(action, arg_strings)


def _version() -> str:
  try:
    return importlib.metadata.version("dpmega")
  except importlib.metadata.PackageNotFoundError:  # a source tree that was not installed
    return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="dpmega", description=__doc__.splitlines()[0])
  parser.add_argument("--version", action="version", version=f"dpmega {_version()}")
  subparsers = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
  for name in _COMMAND_MODULES:
    try:
      module = importlib.import_module(name)
    except ModuleNotFoundError as e:
      if e.name == name:  # that sub-command is not part of this build
        continue
      raise
    module.add_parser(subparsers)
  return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ARG001
  # A library warning reaches the operator as one line, without the source line Python would quote.
  print(f"dpmega: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  with warnings.catch_warnings():  # restores the caller's warning display on return
    warnings.showwarning = _show_warning
    return _run(args)


def _run(args: argparse.Namespace) -> int:
  try:
    return int(args.func(args) or 0)
  except (UsageError, ValueError) as e:
    print(f"dpmega {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt as e:  # its text, when there is one, says what to do next (dpmega.train.report)
    print(f"dpmega {args.command}: interrupted" + (f"; {e}." if str(e) else ""), file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
