"""argparse types for numeric flags: ``1e6`` and ``1_000_000`` accepted, the range in the message."""

from __future__ import annotations

import argparse
import math


def number(text: str) -> float:
  """``text`` as a float (underscores allowed), or an argparse error."""
  try:
    return float(text.replace("_", ""))
  except ValueError:
    raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None


def int_flag(lo: int):
  """An argparse type: an int >= ``lo`` (``1e6`` and ``1_000_000`` accepted)."""
  def parse(text: str) -> int:
    value = number(text)
    if not (math.isfinite(value) and value.is_integer() and value >= lo):
      raise argparse.ArgumentTypeError(f"must be an int in [{lo}, inf], got {text!r}")
    return int(value)
  return parse


def real_flag(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = True):
  """An argparse type: a finite number in the range (ends open or closed)."""
  def parse(text: str) -> float:
    value = number(text)
    if not (math.isfinite(value) and (value > lo if lo_open else value >= lo)
            and (value < hi if hi_open else value <= hi)):
      rng = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
      raise argparse.ArgumentTypeError(f"must be a number in {rng}, got {text!r}")
    return value
  return parse


positive_int, non_negative_int = int_flag(1), int_flag(0)
positive_float, non_negative_float = real_flag(0, lo_open=True), real_flag(0)
open_unit = real_flag(0, 1, lo_open=True)
unit = real_flag(0, 1, lo_open=True, hi_open=False)  # (0, 1]: --pld_discretization, --q_grid
