"""Batch-size schedules: constant, piecewise steps, linear and geometric ramps.

A schedule maps a training step to the *expected* logical batch size of that
step. Steps count from 1 in the spec syntax below, as everywhere a person reads
them (progress lines, ``--steps``, checkpoints); the Python methods take the
0-based index ``step - 1`` (``batch_sizes(n)[i]`` is step ``i + 1``). Under Poisson sampling the step's sampling probability is
``batch_size(step) / dataset_size``; the accountant (:mod:`dpmega.accounting`)
and the trainer read the same schedule, so what is accounted is what runs.

Every schedule is a frozen dataclass with

* ``batch_size(step) -> int`` for one step,
* ``batch_sizes(num_steps) -> np.ndarray`` (int64, shape ``[num_steps]``) for
  steps ``0 .. num_steps - 1``, vectorised and equal to ``batch_size`` step by
  step,
* ``batch_size_counts(num_steps) -> (sizes, counts)``: the distinct batch
  sizes of the first ``num_steps`` steps (ascending) and how many steps use
  each, without materialising a long constant tail (the accountant composes
  each distinct size once, with ``count=``),
* ``to_dict()`` / :func:`from_dict` (JSON-able) and ``to_spec()`` /
  :func:`parse_schedule` (the command-line syntax below).

Command-line syntax (:func:`parse_schedule`)::

  4096                                 constant
  constant:4096                        constant
  steps:1000@1,5000@101,20000@401      BATCH@FIRST_STEP: steps 1-100 at 1000, 101-400 at 5000, ...
  linear:1000->2000000@5000            START at step 1 -> END reached at step RAMP
  geometric:1000->2000000@5000         same, interpolated in log space
  linear:1000->2000000@5000,round_to=1024

For ``linear`` and ``geometric`` the ``@RAMP`` part may be left out when the
caller passes ``num_steps``: the ramp then spans the whole run. After the ramp
the batch size stays at ``END``. ``round_to=M`` rounds every batch size to the
nearest positive multiple of ``M`` (fewer distinct shapes to compile, and fewer
distinct sampling probabilities to account).

Edge cases: a step index before 0 or a non-integer step is a ``ValueError``; a
spec stage at ``@0`` is a ``ValueError`` saying that steps count from 1 (specs
written when they counted from 0 all start at ``@0``: none changes meaning
silently); a ramp of one step is at ``END`` from step 1; ``batch_sizes(0)`` is
an empty array.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping, Union

import numpy as np

from dpmega import validation

__all__ = [
    "Constant",
    "Steps",
    "Linear",
    "Geometric",
    "Schedule",
    "parse_schedule",
    "from_dict",
    "as_schedule",
    "steps_for_epochs",
]


# Sizes and step counts are stored as int64; anything larger is a typo, not a schedule.
_MAX_INT = 2**62


def _size(name: str, value: Any) -> int:
  """A batch size or a step count of a schedule: an int in ``[1, 2**62]`` (``4096.0`` accepted)."""
  return validation.check_int(name, value, 1, _MAX_INT, integral_floats=True)


def _num_steps(num_steps: Any) -> int:
  return validation.check_int("num_steps", num_steps, 0, _MAX_INT)


def _round_to(x: np.ndarray, multiple: int) -> np.ndarray:
  """Nearest positive multiple of ``multiple`` (half rounds up), as int64."""
  units = np.floor(np.asarray(x, dtype=np.float64) / multiple + 0.5)
  return (np.maximum(units, 1.0) * multiple).astype(np.int64)


def _merge_counts(sizes: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  keep = counts > 0
  unique, inverse = np.unique(sizes[keep], return_inverse=True)
  totals = np.zeros(unique.shape, np.int64)
  np.add.at(totals, inverse, counts[keep])
  return unique.astype(np.int64), totals


@dataclasses.dataclass(frozen=True)
class Constant:
  """The same batch size at every step."""

  size: int

  def __post_init__(self):
    object.__setattr__(self, "size", _size("batch_size", self.size))

  def batch_size(self, step: int) -> int:
    validation.check_int("step", step, 0)
    return self.size

  def batch_sizes(self, num_steps: int) -> np.ndarray:
    return np.full(_num_steps(num_steps), self.size, dtype=np.int64)

  def batch_size_counts(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    num_steps = _num_steps(num_steps)
    if num_steps == 0:
      return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.array([self.size], np.int64), np.array([num_steps], np.int64)

  def to_dict(self) -> dict:
    return {"kind": "constant", "batch_size": self.size}

  def to_spec(self) -> str:
    return f"constant:{self.size}"


@dataclasses.dataclass(frozen=True)
class Steps:
  """Piecewise-constant batch size.

  ``stages`` is a tuple of ``(first_index, batch_size)`` pairs, ``first_index``
  the 0-based index of the stage's first step (the spec ``B@S`` is ``(S - 1, B)``):
  the first stage starts at index 0, first indices strictly increase, and each
  stage lasts until the next one starts (the last one forever).
  """

  stages: tuple[tuple[int, int], ...]

  def __post_init__(self):
    try:
      stages = tuple((s[0], s[1]) for s in self.stages)
    except (TypeError, IndexError, KeyError):
      raise ValueError(
          f"stages must be a sequence of (first_step, batch_size) pairs, got {self.stages!r}."
      ) from None
    if not stages:
      raise ValueError("stages must hold at least one (first_step, batch_size) pair, got none.")
    checked = []
    for i, (start, size) in enumerate(stages):
      checked.append((validation.check_int(f"stages[{i}] first step", start, 0),
                      _size(f"stages[{i}] batch size", size)))
    if checked[0][0] != 0:
      raise ValueError(f"stages[0] must start at step 0, got first step {checked[0][0]}.")
    for i in range(1, len(checked)):
      if checked[i][0] <= checked[i - 1][0]:
        raise ValueError(
            f"stages first steps must strictly increase, got {checked[i - 1][0]} then "
            f"{checked[i][0]} at stages[{i}].")
    object.__setattr__(self, "stages", tuple(checked))

  def batch_size(self, step: int) -> int:
    step = validation.check_int("step", step, 0)
    size = self.stages[0][1]
    for start, s in self.stages:
      if start > step:
        break
      size = s
    return size

  def batch_sizes(self, num_steps: int) -> np.ndarray:
    num_steps = _num_steps(num_steps)
    starts = np.array([s for s, _ in self.stages], dtype=np.int64)
    sizes = np.array([b for _, b in self.stages], dtype=np.int64)
    idx = np.searchsorted(starts, np.arange(num_steps, dtype=np.int64), side="right") - 1
    return sizes[idx]

  def batch_size_counts(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    num_steps = _num_steps(num_steps)
    starts = np.array([st for st, _ in self.stages] + [num_steps], dtype=np.int64)
    sizes = np.array([b for _, b in self.stages], dtype=np.int64)
    lengths = np.clip(np.minimum(starts[1:], num_steps) - np.minimum(starts[:-1], num_steps), 0, None)
    return _merge_counts(sizes, lengths)

  def to_dict(self) -> dict:
    return {"kind": "steps", "stages": [[s, b] for s, b in self.stages]}

  def to_spec(self) -> str:
    return "steps:" + ",".join(f"{b}@{s + 1}" for s, b in self.stages)  # the spec counts steps from 1


@dataclasses.dataclass(frozen=True)
class _Ramp:
  """Shared fields of the linear and geometric ramps."""

  start: int
  end: int
  ramp_steps: int
  round_to: int = 1

  def __post_init__(self):
    object.__setattr__(self, "start", _size("start", self.start))
    object.__setattr__(self, "end", _size("end", self.end))
    object.__setattr__(self, "ramp_steps", _size("ramp_steps", self.ramp_steps))
    object.__setattr__(self, "round_to", _size("round_to", self.round_to))

  def _fraction(self, steps: np.ndarray) -> np.ndarray:
    if self.ramp_steps == 1:
      return np.ones_like(steps, dtype=np.float64)
    return np.minimum(steps / (self.ramp_steps - 1), 1.0)

  def _interpolate(self, frac: np.ndarray) -> np.ndarray:
    raise NotImplementedError

  def batch_size(self, step: int) -> int:
    step = validation.check_int("step", step, 0)
    return int(self.batch_sizes_at(np.array([step], dtype=np.int64))[0])

  def batch_sizes_at(self, steps: np.ndarray) -> np.ndarray:
    frac = self._fraction(np.asarray(steps, dtype=np.float64))
    values = self._interpolate(frac)
    # The endpoints are exact whatever the floating-point path.
    values = np.where(frac <= 0.0, float(self.start), values)
    values = np.where(frac >= 1.0, float(self.end), values)
    return _round_to(values, self.round_to)

  def batch_sizes(self, num_steps: int) -> np.ndarray:
    num_steps = _num_steps(num_steps)
    return self.batch_sizes_at(np.arange(num_steps, dtype=np.int64))

  def batch_size_counts(self, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
    num_steps = _num_steps(num_steps)
    head = min(num_steps, self.ramp_steps)
    sizes = self.batch_sizes(head)
    counts = np.ones_like(sizes)
    if num_steps > head:
      sizes = np.append(sizes, self.batch_sizes_at(np.array([self.ramp_steps]))[0])
      counts = np.append(counts, num_steps - head)
    return _merge_counts(sizes, counts)

  def to_dict(self) -> dict:
    return {"kind": self._kind, "start": self.start, "end": self.end,
            "ramp_steps": self.ramp_steps, "round_to": self.round_to}

  def to_spec(self) -> str:
    spec = f"{self._kind}:{self.start}->{self.end}@{self.ramp_steps}"
    if self.round_to != 1:
      spec += f",round_to={self.round_to}"
    return spec


@dataclasses.dataclass(frozen=True)
class Linear(_Ramp):
  """``start`` at step 0 to ``end`` at step ``ramp_steps - 1``, linearly; then ``end``."""

  _kind = "linear"

  def _interpolate(self, frac):
    return self.start + (self.end - self.start) * frac


@dataclasses.dataclass(frozen=True)
class Geometric(_Ramp):
  """``start`` at step 0 to ``end`` at step ``ramp_steps - 1``, with a constant ratio per step."""

  _kind = "geometric"

  def _interpolate(self, frac):
    return np.exp(math.log(self.start) + (math.log(self.end) - math.log(self.start)) * frac)


Schedule = Union[Constant, Steps, Linear, Geometric]
_KINDS = ("constant", "steps", "linear", "geometric")


def from_dict(d: Mapping[str, Any]) -> Schedule:
  """Inverse of ``to_dict``; ``ValueError`` naming the field on bad input."""
  if not isinstance(d, Mapping):
    raise ValueError(f"schedule must be a mapping with a 'kind' field, got {d!r}.")
  kind = d.get("kind")
  fields = {k: v for k, v in d.items() if k != "kind"}

  def need(*names, optional=()):
    missing = [n for n in names if n not in fields]
    extra = [n for n in fields if n not in names and n not in optional]
    if missing:
      raise ValueError(f"schedule of kind {kind!r} needs field(s) {missing}, got {sorted(fields)}.")
    if extra:
      raise ValueError(f"schedule of kind {kind!r} has unknown field(s) {extra}.")

  if kind == "constant":
    need("batch_size")
    return Constant(fields["batch_size"])
  if kind == "steps":
    need("stages")
    return Steps(tuple(tuple(s) for s in fields["stages"]))
  if kind in ("linear", "geometric"):
    need("start", "end", "ramp_steps", optional=("round_to",))
    cls = Linear if kind == "linear" else Geometric
    return cls(fields["start"], fields["end"], fields["ramp_steps"], fields.get("round_to", 1))
  raise ValueError(f"schedule kind must be one of {list(_KINDS)}, got {kind!r}.")


def _parse_int(text: str, what: str, spec: str) -> int:
  text = text.strip()
  try:
    value = float(text) if any(c in text for c in ".eE") else int(text)
  except ValueError:
    raise ValueError(f"{what} in schedule {spec!r} must be an integer, got {text!r}.") from None
  if isinstance(value, float):
    if not value.is_integer():
      raise ValueError(f"{what} in schedule {spec!r} must be an integer, got {text!r}.")
    value = int(value)
  return value


def _check_one_based(stages: list[tuple[int, int]], spec: str) -> None:
  """``(first_step, batch_size)`` of a ``steps`` spec: step numbers from 1, the first stage at 1, increasing."""
  for i, (first, _) in enumerate(stages):
    if first == 0:
      meant = "steps:" + ",".join(f"{b}@{s + 1}" for s, b in stages)
      raise ValueError(
          f"stage {i} first step in schedule {spec!r} is 0, but steps count from 1 (the first step is step 1): "
          f"write {meant!r} (every first step + 1) for the schedule it meant when steps counted from 0.")
    if first < 0:
      raise ValueError(f"stage {i} first step in schedule {spec!r} must be >= 1 (steps count from 1), got {first}.")
    if i and first <= stages[i - 1][0]:
      raise ValueError(f"stage first steps in schedule {spec!r} must strictly increase, got {stages[i - 1][0]} "
                       f"then {first} at stage {i}.")
  if stages[0][0] != 1:
    raise ValueError(f"stage 0 of schedule {spec!r} must start at step 1 (steps count from 1), got "
                     f"@{stages[0][0]}.")


def parse_schedule(spec: str, num_steps: int | None = None) -> Schedule:
  """Parses the command-line schedule syntax (see the module docstring).

  Args:
    spec: e.g. ``"constant:4096"``, ``"steps:1000@1,5000@101"`` (steps count from 1),
      ``"linear:1000->2000000@5000"``, ``"geometric:1000->2000000"``.
    num_steps: length of the run; used as the ramp length of a ``linear`` or
      ``geometric`` spec without ``@RAMP``.

  Returns:
    The schedule.

  Raises:
    ValueError: a malformed spec, naming the offending part and the expected
      form; a ``steps`` stage at ``@0`` (steps count from 1).

  Example:
    >>> parse_schedule("steps:1000@1,5000@101").batch_sizes(102)[99:].tolist()   # steps 100, 101, 102
    [1000, 5000, 5000]
    >>> try:
    ...   parse_schedule("steps:1000@0,5000@100")
    ... except ValueError as e:
    ...   print(e)
    stage 0 first step in schedule 'steps:1000@0,5000@100' is 0, but steps count from 1 (the first step is step 1): write 'steps:1000@1,5000@101' (every first step + 1) for the schedule it meant when steps counted from 0.
  """
  if not isinstance(spec, str) or not spec.strip():
    raise ValueError(f"batch schedule must be a non-empty string, got {spec!r}.")
  text = spec.strip()
  kind, sep, body = text.partition(":")
  kind = kind.strip().lower()
  if not sep:
    return Constant(_parse_int(text, "batch size", spec))
  if kind == "constant":
    return Constant(_parse_int(body, "batch size", spec))
  if kind == "steps":
    stages = []
    for i, part in enumerate(body.split(",")):
      size, at, start = part.partition("@")
      if not at:
        raise ValueError(
            f"stage {i} of schedule {spec!r} must look like BATCH@FIRST_STEP, got {part!r}.")
      stages.append((_parse_int(start, f"stage {i} first step", spec),
                     _parse_int(size, f"stage {i} batch size", spec)))
    _check_one_based(stages, spec)
    return Steps(tuple((first - 1, size) for first, size in stages))
  if kind in ("linear", "geometric"):
    main, *options = body.split(",")
    round_to = 1
    for opt in options:
      key, eq, value = opt.partition("=")
      if key.strip() != "round_to" or not eq:
        raise ValueError(f"unknown option {opt!r} in schedule {spec!r}; the only one is round_to=M.")
      round_to = _parse_int(value, "round_to", spec)
    ends, at, ramp = main.partition("@")
    start, arrow, end = ends.partition("->")
    if not arrow:
      raise ValueError(
          f"schedule {spec!r} must look like {kind}:START->END[@RAMP_STEPS], got {body!r}.")
    if at:
      ramp_steps = _parse_int(ramp, "ramp steps", spec)
    elif num_steps is not None:
      ramp_steps = max(int(num_steps), 1)
    else:
      raise ValueError(
          f"schedule {spec!r} needs its ramp length: write {kind}:START->END@RAMP_STEPS "
          "or give the number of steps.")
    cls = Linear if kind == "linear" else Geometric
    return cls(_parse_int(start, "start", spec), _parse_int(end, "end", spec), ramp_steps, round_to)
  raise ValueError(
      f"batch schedule kind must be one of {list(_KINDS)} (or a plain integer), got {kind!r} "
      f"in {spec!r}.")


def as_schedule(value: Any, num_steps: int | None = None) -> Schedule:
  """A schedule from a schedule, an int (constant), a spec string or a dict."""
  if isinstance(value, (Constant, Steps, Linear, Geometric)):
    return value
  if isinstance(value, numbers.Integral) and not isinstance(value, bool):
    return Constant(int(value))
  if isinstance(value, str):
    return parse_schedule(value, num_steps=num_steps)
  if isinstance(value, Mapping):
    return from_dict(value)
  raise ValueError(f"batch schedule must be a schedule, int, spec string or dict, got {value!r}.")


def steps_for_epochs(schedule: Schedule, epochs: float, dataset_size: int) -> int:
  """Fewest steps whose expected batch sizes add up to ``epochs * dataset_size``.

  With a constant batch ``B`` this is ``ceil(epochs * dataset_size / B)``
  (MNIST: 60 epochs of 60000 at 256 is 14063 steps). ``epochs`` must be
  positive and finite; ``dataset_size`` a positive integer.
  """
  dataset_size = _size("dataset_size", dataset_size)
  epochs = validation.check_real("epochs", epochs, 0.0, math.inf, lo_open=True, hi_open=True)
  target = epochs * dataset_size
  # Examples seen after n steps is increasing in n: double, then bisect.
  def seen(n: int) -> float:
    sizes, counts = schedule.batch_size_counts(n)
    return float(np.dot(sizes.astype(np.float64), counts))
  hi = 1
  while seen(hi) < target * (1 - 1e-12):
    hi *= 2
    if hi > 2**50:
      raise ValueError(f"epochs={epochs} needs more than 2**50 steps.")
  lo = hi // 2  # seen(lo) < target unless lo == 0
  while hi - lo > 1:
    mid = (lo + hi) // 2
    if seen(mid) < target * (1 - 1e-12):
      lo = mid
    else:
      hi = mid
  return hi
