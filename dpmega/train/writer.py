"""What a run logs: ``<workdir>/metrics.jsonl`` (always) and TensorBoard (optional).

Each record is one JSON line, appended whole or not at all; on resume the lines
of the steps after the restored checkpoint (which are redone and logged again)
are dropped, and TensorBoard is told to purge them; records missing before the
checkpoint (a truncated or deleted file) are named in :attr:`MetricsWriter.missing`
for the loop to warn about, never a silent gap. Process 0 writes; every
other process gets a :class:`NullWriter`.

.. warning::
   With ``metrics="raw"`` the records hold statistics of the private batch
   without noise (see :mod:`dpmega.train`): they are for the operator, not for
   release.
"""

from __future__ import annotations

import json
import math
import os
import time
from typing import Any


class MetricsWriter:
  """``metrics.jsonl`` (always) and TensorBoard (when ``tensorboardX`` is installed and enabled)."""

  def __init__(self, workdir: str, *, resume_step: int | None, tensorboard: bool):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.missing = ""  # the steps up to the restored checkpoint whose records are gone, e.g. "3..5, 9"
    keep = []
    if resume_step is None:
      open(self.path, "w").close()
    elif os.path.exists(self.path):
      # Drop what the interrupted process logged after its last checkpoint (those
      # steps are redone bit-for-bit and logged again), and a line torn by the kill.
      with open(self.path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue
          if line.endswith("\n") and record.get("step", 0) <= resume_step and not record.get("final"):
            keep.append(line)
      with open(self.path, "w") as f:
        f.writelines(keep)
    if resume_step is not None:
      # Every step up to the checkpoint logged one record: a truncated or deleted file leaves a gap, said aloud.
      logged = {json.loads(line).get("step") for line in keep}
      self.missing = _ranges(sorted(set(range(1, resume_step + 1)) - logged))
    self._tb = None
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # optional
      except ImportError:
        SummaryWriter = None  # pylint: disable=invalid-name
      if SummaryWriter is not None:
        # On resume, TensorBoard hides what the interrupted process logged after its
        # checkpoint (those steps are redone and logged again), as metrics.jsonl does.
        # Event files are named by the second they start in: a suffix keeps a quick
        # restart from truncating the interrupted process's file.
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"),
                                 purge_step=None if resume_step is None else resume_step + 1,
                                 filename_suffix=f".{time.time_ns()}.{os.getpid()}")

  def write(self, record: dict[str, Any]) -> None:
    """Appends one record, whole or not at all (a failed write is truncated away, then raised)."""
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
      start = os.lseek(fd, 0, os.SEEK_END)
      try:
        done = 0
        while done < len(data):  # a short write (file size limit) fails on the next call
          done += os.write(fd, data[done:])
      except OSError:
        os.ftruncate(fd, start)
        raise
    finally:
      os.close(fd)
    if self._tb is not None:
      for k, v in record.items():
        if isinstance(v, (int, float)) and k != "step" and math.isfinite(v):
          self._tb.add_scalar(k, v, record["step"])
      self._tb.flush()  # a killed process must not lose steps that its checkpoint covers

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _ranges(steps: list[int]) -> str:
  """``[3, 4, 5, 9]`` -> ``"3..5, 9"``.

  >>> _ranges([3, 4, 5, 9])
  '3..5, 9'
  """
  parts, i = [], 0
  while i < len(steps):
    j = i
    while j + 1 < len(steps) and steps[j + 1] == steps[j] + 1:
      j += 1
    parts.append(str(steps[i]) if i == j else f"{steps[i]}..{steps[j]}")
    i = j + 1
  return ", ".join(parts)


class NullWriter:
  """What processes other than 0 log to: nothing (process 0 writes the run's files)."""

  path = None
  missing = ""

  def write(self, record: dict[str, Any]) -> None:
    pass

  def close(self) -> None:
    pass
