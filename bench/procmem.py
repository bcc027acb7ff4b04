"""Process memory from Linux ``/proc/self``, for the benchmarks that report peak RSS.

``VmHWM`` is the peak resident set size; :func:`reset_peak_rss` sets it back to
the current RSS (Linux >= 4.0), so the peak of a measured phase can exclude
what came before it (imports, compilation).
"""

from __future__ import annotations


def status_kib(field: str) -> int | None:
  """A ``/proc/self/status`` field in KiB (``VmRSS``, ``VmHWM``, ...), or None if absent."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  return None


def reset_peak_rss() -> bool:
  """Resets ``VmHWM`` to the current RSS; False where the kernel does not allow it."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False
