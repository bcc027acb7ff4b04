"""Checks of user-given values: one place, one message shape.

Every check names the field and the allowed range and shows the value it got,
``"<name> must be <what> in <range>, got <name>=<value>."``, and raises before
any compute (the caller runs it first). ``error`` picks the exception class:
``ValueError`` for library calls, :class:`dpmega.errors.UsageError` (a
``ValueError``) for config and CLI input, which the CLI prints as one line.

>>> check_int("steps", 3, 1)
3
>>> check_real("delta", 1.5, 0, 1, lo_open=True, hi_open=True)
Traceback (most recent call last):
...
ValueError: delta must be a number in (0, 1), got delta=1.5.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Iterable

import numpy as np


def _range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> str:
  return f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def check_int(name: str, value: Any, lo: int, hi: float = math.inf, *, integral_floats: bool = False,
              error: type[Exception] = ValueError) -> int:
  """``value`` as an ``int`` in ``[lo, hi]`` (bools refused; ``3.0`` accepted only with ``integral_floats``)."""
  if integral_floats and isinstance(value, (float, np.floating)) and math.isfinite(value) and value == int(value):
    value = int(value)
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral) or not lo <= value <= hi:
    raise error(f"{name} must be an int in {_range(lo, hi)}, got {name}={value!r}.")
  return int(value)


def check_real(name: str, value: Any, lo: float, hi: float = math.inf, *, lo_open: bool = False,
               hi_open: bool = False, optional: bool = False, error: type[Exception] = ValueError) -> float | None:
  """``value`` as a finite ``float`` in the range (``None`` passes through when ``optional``)."""
  if value is None and optional:
    return None
  ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
  v = float(value) if ok else math.nan
  ok = ok and math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
  if not ok:
    tail = " or None" if optional else ""
    raise error(f"{name} must be a number in {_range(lo, hi, lo_open, hi_open)}{tail}, got {name}={value!r}.")
  return v


def check_choice(name: str, value: Any, allowed: Iterable[Any], *, error: type[Exception] = ValueError) -> Any:
  """``value`` if it is one of ``allowed``."""
  allowed = list(allowed)
  if value not in allowed:
    raise error(f"{name} must be one of {allowed}, got {name}={value!r}.")
  return value


def check_bool(name: str, value: Any, *, error: type[Exception] = ValueError) -> bool:
  """``value`` if it is ``True`` or ``False`` (not ``0``/``1``, not a string)."""
  if not isinstance(value, bool):
    raise error(f"{name} must be True or False, got {name}={value!r}.")
  return value
