"""dp-accounting's per-order "failed to converge" warnings: summarised, filterable, no module-level state."""

import logging
import warnings

import pytest

from dpmega.accounting import events
from dpmega.sampling import SamplingScheme


class _Count(logging.Handler):
  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(autouse=True)
def absl_warnings_enabled():
  """dp-accounting logs through absl at WARNING; `dpmega train` raises that logger to ERROR (so may a test)."""
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.WARNING)
  yield
  absl.setLevel(level)


def _rdp(q_per_mille, sigma):
  events.rdp_of_event.cache_clear()  # recompute: the warning comes with the computation
  return events.rdp_of_event(events.event_key(SamplingScheme.POISSON, q_per_mille, 1000, sigma))


def test_unconverged_orders_become_one_warning_and_no_absl_lines():
  absl, handler = logging.getLogger("absl"), _Count()
  absl.addHandler(handler)
  try:
    with pytest.warns(events.ExcludedOrdersWarning, match="epsilon stays a valid upper bound") as record:
      curve = _rdp(900, 0.8)
  finally:
    absl.removeHandler(handler)
  assert len([w for w in record if w.category is events.ExcludedOrdersWarning]) == 1
  assert not [m for m in handler.messages if "failed to converge" in m]
  assert (curve == float("inf")).any() and (curve < float("inf")).any()  # orders dropped, others kept


def test_the_warning_is_the_callers_to_filter_and_shows_again_in_a_fresh_context():
  # No "warned once" flag in the module: each recording context sees it again; "ignore" silences it.
  for _ in range(2):
    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter("always")
      _rdp(700, 1.0)
    assert [w.category for w in record] == [events.ExcludedOrdersWarning]
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    warnings.simplefilter("ignore", events.ExcludedOrdersWarning)
    _rdp(700, 1.0)
  assert record == []


def test_no_module_level_flag():
  assert not [name for name, value in vars(events).items() if name.startswith("_warned")]
