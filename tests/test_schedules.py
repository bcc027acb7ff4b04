"""Tests for dpmega/schedules.py."""

import json

import numpy as np
import pytest

from dpmega import schedules
from dpmega.schedules import Constant, Geometric, Linear, Steps, parse_schedule

ALL = [
    Constant(4096),
    Steps(((0, 1000), (5, 5000), (9, 20000))),
    Linear(1000, 2_000_000, 12),
    Geometric(1000, 2_000_000, 12),
    Linear(1000, 2_000_000, 12, round_to=1024),
    Geometric(3, 5, 1),
    Linear(5000, 1000, 7),  # decreasing is allowed
]


@pytest.mark.parametrize("schedule", ALL, ids=repr)
@pytest.mark.parametrize("num_steps", [0, 1, 7, 20])
def test_vectorised_batch_sizes_equal_per_step(schedule, num_steps):
  sizes = schedule.batch_sizes(num_steps)
  assert sizes.dtype == np.int64 and sizes.shape == (num_steps,)
  assert sizes.tolist() == [schedule.batch_size(t) for t in range(num_steps)]


@pytest.mark.parametrize("schedule", ALL, ids=repr)
@pytest.mark.parametrize("num_steps", [0, 1, 7, 20, 1000])
def test_batch_size_counts_match_unique_of_batch_sizes(schedule, num_steps):
  sizes, counts = schedule.batch_size_counts(num_steps)
  u, c = np.unique(schedule.batch_sizes(num_steps), return_counts=True)
  np.testing.assert_array_equal(sizes, u)
  np.testing.assert_array_equal(counts, c)
  assert counts.sum() == num_steps


@pytest.mark.parametrize("schedule", ALL, ids=repr)
def test_dict_and_spec_round_trip(schedule):
  assert schedules.from_dict(json.loads(json.dumps(schedule.to_dict()))) == schedule
  assert parse_schedule(schedule.to_spec()) == schedule


def test_ramps_hit_endpoints_and_stay():
  for cls in (Linear, Geometric):
    s = cls(1000, 2_000_000, 5)
    assert s.batch_size(0) == 1000
    assert s.batch_size(4) == 2_000_000
    assert s.batch_size(10**9) == 2_000_000
    assert np.all(np.diff(s.batch_sizes(10)) >= 0)
  assert Linear(1000, 2000, 1).batch_size(0) == 2000  # one-step ramp is at END at once
  g = Geometric(1000, 8000, 4)
  assert g.batch_sizes(4).tolist() == [1000, 2000, 4000, 8000]
  assert Linear(1000, 4000, 4).batch_sizes(4).tolist() == [1000, 2000, 3000, 4000]


def test_round_to_gives_positive_multiples():
  s = Linear(1, 10_000, 50, round_to=64)
  sizes = s.batch_sizes(60)
  assert np.all(sizes % 64 == 0) and sizes.min() == 64


def test_steps_schedule():
  s = Steps(((0, 1000), (100, 5000)))
  assert [s.batch_size(t) for t in (0, 99, 100, 10**6)] == [1000, 1000, 5000, 5000]


@pytest.mark.parametrize("spec,expected", [
    ("4096", Constant(4096)),
    ("constant:4096", Constant(4096)),
    (" constant : 4096 ", Constant(4096)),
    ("steps:1000@1,5000@101", Steps(((0, 1000), (100, 5000)))),
    ("linear:1000->2000000@5000", Linear(1000, 2_000_000, 5000)),
    ("geometric:1000->2e6@5000", Geometric(1000, 2_000_000, 5000)),
    ("linear:1000->2000000@5000,round_to=1024", Linear(1000, 2_000_000, 5000, 1024)),
])
def test_parse_schedule(spec, expected):
  assert parse_schedule(spec) == expected


def test_parse_ramp_without_length_uses_num_steps():
  assert parse_schedule("geometric:512->2048", num_steps=60) == Geometric(512, 2048, 60)
  with pytest.raises(ValueError, match="ramp length"):
    parse_schedule("geometric:512->2048")


@pytest.mark.parametrize("spec,match", [
    ("", "non-empty"),
    ("constant:0", r"batch_size must be an int in \[1, "),
    ("constant:-5", r"batch_size must be an int in \[1, "),
    ("constant:abc", "batch size .* must be an integer"),
    ("constant:1.5", "must be an integer"),
    ("steps:1000@5", r"stage 0 of schedule .* must start at step 1 \(steps count from 1\), got @5"),
    ("steps:1000@1,500@1", "strictly increase"),
    ("steps:1000@1,500@-3", "must be >= 1"),
    ("steps:1000", "BATCH@FIRST_STEP"),
    ("steps:0@1", r"stages\[0\] batch size must be an int in \[1, "),
    ("linear:1000", "START->END"),
    ("linear:0->10@5", r"start must be an int in \[1, "),
    ("linear:1->10@0", r"ramp_steps must be an int in \[1, "),
    ("linear:1->10@5,foo=3", "unknown option"),
    ("cosine:1->10", "kind must be one of"),
])
def test_malformed_specs_name_the_part(spec, match):
  with pytest.raises(ValueError, match=match):
    parse_schedule(spec)


@pytest.mark.parametrize("d,match", [
    ({"kind": "constant"}, "needs field"),
    ({"kind": "constant", "batch_size": 4, "extra": 1}, "unknown field"),
    ({"kind": "nope"}, "kind must be one of"),
    ([1, 2], "mapping"),
    ({"kind": "steps", "stages": [[0, 1], [0, 2]]}, "strictly increase"),
])
def test_from_dict_errors(d, match):
  with pytest.raises(ValueError, match=match):
    schedules.from_dict(d)


@pytest.mark.parametrize("bad", [-1, 1.5, "3", True])
def test_bad_step_arguments(bad):
  with pytest.raises(ValueError, match="step"):
    Constant(4).batch_size(bad)
  with pytest.raises(ValueError, match="num_steps"):
    Constant(4).batch_sizes(bad)


def test_steps_for_epochs():
  assert schedules.steps_for_epochs(Constant(256), 60, 60000) == 14063  # Abadi et al. MNIST
  assert schedules.steps_for_epochs(Constant(100), 1, 1000) == 10
  s = Steps(((0, 100), (5, 1000)))
  n = schedules.steps_for_epochs(s, 2, 1000)  # 500 in the first 5 steps, then 1000 per step
  assert n == 7
  for bad in (0, -1, float("inf")):
    with pytest.raises(ValueError, match="epochs"):
      schedules.steps_for_epochs(s, bad, 1000)


def test_spec_steps_count_from_one_like_the_progress_lines():
  s = parse_schedule("steps:1000@1,5000@101")
  sizes = s.batch_sizes(101)  # index i is step i + 1
  assert sizes[99] == 1000 and sizes[100] == 5000  # step 100 still 1000, step 101 the first at 5000
  assert s.to_spec() == "steps:1000@1,5000@101"
  assert parse_schedule(s.to_spec()) == s


@pytest.mark.parametrize("spec, meant", [
    ("steps:1000@0,5000@100", "steps:1000@1,5000@101"),
    ("steps:65536@0,131072@200,262144@400", "steps:65536@1,131072@201,262144@401"),
])
def test_a_spec_counting_from_zero_is_refused_never_reread(spec, meant):
  """Every spec written when steps counted from 0 starts at @0: refused with the field, the rule and the fix."""
  with pytest.raises(ValueError) as info:
    parse_schedule(spec)
  message = str(info.value)
  assert "stage 0 first step" in message and "steps count from 1" in message and repr(meant) in message
  assert parse_schedule(meant).batch_sizes(500).tolist() == Steps(
      tuple((int(p.split("@")[1]), int(p.split("@")[0].removeprefix("steps:"))) for p in spec.split(","))
  ).batch_sizes(500).tolist()  # the suggested spec is the old one's schedule
