"""The one validation module: every check names the field, the range and the value it got."""

import math

import numpy as np
import pytest

from dpmega import validation
from dpmega.errors import UsageError


@pytest.mark.parametrize("value", [0, 11, True, 2.5, "3", None, math.nan])
def test_check_int_refuses_with_field_and_range(value):
  with pytest.raises(ValueError, match=r"steps must be an int in \[1, 10\], got steps="):
    validation.check_int("steps", value, 1, 10)


def test_check_int_accepts_numpy_and_integral_floats_only_when_asked():
  assert validation.check_int("n", np.int64(5), 1) == 5
  with pytest.raises(ValueError, match="n must be an int"):
    validation.check_int("n", 5.0, 1)
  assert validation.check_int("n", 5.0, 1, integral_floats=True) == 5
  with pytest.raises(ValueError, match="n must be an int"):
    validation.check_int("n", 5.5, 1, integral_floats=True)


@pytest.mark.parametrize("value", [0.0, 1.0, math.inf, math.nan, -1, True, "0.5"])
def test_check_real_open_interval(value):
  with pytest.raises(ValueError, match=r"delta must be a number in \(0, 1\), got delta="):
    validation.check_real("delta", value, 0, 1, lo_open=True, hi_open=True)


def test_check_real_optional_and_error_class():
  assert validation.check_real("x", None, 0, optional=True) is None
  assert validation.check_real("x", np.float32(0.5), 0, 1) == 0.5
  with pytest.raises(UsageError, match=r"x must be a number in \[0, inf\] or None, got x=-1"):
    validation.check_real("x", -1, 0, optional=True, error=UsageError)


def test_check_choice_and_bool():
  assert validation.check_choice("mode", "a", ["a", "b"]) == "a"
  with pytest.raises(ValueError, match=r"mode must be one of \['a', 'b'\], got mode='c'"):
    validation.check_choice("mode", "c", ["a", "b"])
  assert validation.check_bool("flag", False) is False
  with pytest.raises(ValueError, match="flag must be True or False, got flag=1"):
    validation.check_bool("flag", 1)
