"""The workdir's spent-privacy journal: every step whose noisy update was ever computed, in any generation.

A checkpoint's ledger is the trajectory that led to ITS model. A workdir spends
more than that: a rewind (``--resume_step``) or a retry discards steps that were
computed and could have been released (logged, checkpointed, copied). The
journal, ``<workdir>/spent.jsonl``, is append-only and fsync'd; it is never set
aside or truncated by a resume (only ``--overwrite`` deletes it with the rest
of the run). It holds two kinds of JSON lines:

* ``{"kind": "generation", "generation": g, "from_step": s, "from_generation": h,
  "fingerprint": <sha256>, "reason": ...}`` when a generation starts (a fresh
  run is generation 0 from step 0);
* ``{"kind": "step", "generation": g, "step": t, "batch_size": B, "dataset_size": N,
  "noise_multiplier": σ, "scheme": ...}`` written BEFORE step ``t``'s noisy
  update is computed.

Guarantee: :meth:`Journal.ledger` composes every DISTINCT ``(generation, step)``
once, so the workdir's ε (the ε of that ledger) never decreases over its
history: records are only added, and each one is on disk before the quantity it
pays for exists. A crash resume that replays generation ``g`` bit for bit (same
keys, same data, same computation) adds nothing new; any other recomputation
runs in a new generation, with new keys and new samples, and is paid again.
Steps of different generations use independent noise and independent Poisson
samples, so composing them as independent subsampled Gaussian steps is exact
accounting of adaptive composition.

Edge cases:

==================================  ===============================================
situation                           behaviour
==================================  ===============================================
no journal file                     empty: ε = 0, generation 0 is next
last line torn (killed mid-write)   ignored (the step it announced was not computed);
                                    the next append first ends the torn line and
                                    records the repair
an unreadable line elsewhere        :class:`JournalError` (never under-count)
steps of two sampling schemes       :class:`JournalError` (one neighbouring relation)
==================================  ===============================================
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from dpmega.errors import UsageError
from dpmega.sampling import SamplingScheme

if TYPE_CHECKING:
  from dpmega.accounting.ledger import Ledger

FILENAME = "spent.jsonl"
_STEP_FIELDS = ("generation", "step", "batch_size", "dataset_size", "noise_multiplier", "scheme")


class JournalError(UsageError):
  """The journal cannot be read back completely; the message names the file and the line."""


def _fsync_append(path: str, data: bytes) -> None:
  fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
  try:
    done = 0
    while done < len(data):
      done += os.write(fd, data[done:])
    os.fsync(fd)
  finally:
    os.close(fd)


class Journal:
  """``<workdir>/spent.jsonl`` (see the module docstring).

  Args:
    workdir: the run's directory (created if needed).
    writable: False on processes other than 0: they read, never write.
  """

  def __init__(self, workdir: str, *, writable: bool = True):
    self.path = os.path.join(workdir, FILENAME)
    self.writable = writable
    self.records: list[dict[str, Any]] = []
    self._steps: dict[tuple[int, int], dict[str, Any]] = {}
    self._torn = 0
    self._read()

  def _read(self) -> None:
    if not os.path.exists(self.path):
      return
    with open(self.path, "rb") as f:
      data = f.read()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: b"" when the file ends with a newline
    self._torn = len(tail)
    for i, line in enumerate(complete):
      try:
        record = json.loads(line)
        if not isinstance(record, dict):
          raise ValueError("not an object")
      except ValueError:
        following = complete[i + 1] if i + 1 < len(complete) else b""
        if b'"repair"' in following:  # a line torn by a kill, ended by the next append
          continue
        raise JournalError(f"{self.path} line {i + 1} is not a journal record ({line[:80]!r}); the spent "
                           "privacy of this workdir cannot be established: restore the file or start afresh "
                           "with --overwrite.") from None
      try:
        self._add(record)
      except (KeyError, TypeError, ValueError):
        raise JournalError(f"{self.path} line {i + 1} is a step record without an integer generation and step "
                           f"({line[:80]!r}); restore the file or start afresh with --overwrite.") from None

  def _add(self, record: dict[str, Any]) -> None:
    self.records.append(record)
    if record.get("kind") == "step":
      self._steps.setdefault((int(record["generation"]), int(record["step"])), record)

  def _append(self, record: dict[str, Any]) -> None:
    if not self.writable:
      self._add(record)
      return
    os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
    prefix = b""
    if self._torn:
      prefix = b"\n" + (json.dumps({"kind": "repair", "torn_bytes": self._torn}) + "\n").encode()
      self._torn = 0
    _fsync_append(self.path, prefix + (json.dumps(record, sort_keys=True) + "\n").encode())
    self._add(record)

  # ----------------------------------------------------------------- writing
  def start_generation(self, generation: int, *, from_step: int, from_generation: int | None,
                       fingerprint: str, reason: str) -> None:
    """Records that ``generation`` starts at checkpoint ``from_step`` (of ``from_generation``)."""
    self._append({"kind": "generation", "generation": int(generation), "from_step": int(from_step),
                  "from_generation": from_generation, "fingerprint": fingerprint, "reason": reason})

  def record_step(self, *, generation: int, step: int, batch_size: int, dataset_size: int,
                  noise_multiplier: float, scheme: SamplingScheme) -> bool:
    """Records, durably, that step ``step`` of ``generation`` is about to be computed (call BEFORE the noise).

    Returns:
      Whether ``(generation, step)`` is new to the journal (a bit-identical
      replay of a recorded step spends nothing new).
    """
    new = (int(generation), int(step)) not in self._steps
    self._append({"kind": "step", "generation": int(generation), "step": int(step), "batch_size": int(batch_size),
                  "dataset_size": int(dataset_size), "noise_multiplier": float(noise_multiplier),
                  "scheme": SamplingScheme(scheme).value})
    return new

  # ----------------------------------------------------------------- reading
  def generations(self) -> list[dict[str, Any]]:
    return [r for r in self.records if r.get("kind") == "generation"]

  @property
  def latest_generation(self) -> dict[str, Any] | None:
    gens = self.generations()
    return max(gens, key=lambda r: r["generation"]) if gens else None

  def steps(self) -> dict[tuple[int, int], dict[str, Any]]:
    """Distinct ``(generation, step)`` -> its record (the first one written); a copy."""
    return dict(self._steps)

  def ledger(self) -> Ledger:
    """Every distinct ``(generation, step)`` as one step of a :class:`dpmega.accounting.Ledger`."""
    # Imported here: opening a journal (and importing the trainer, and its config) does not load dp-accounting.
    from dpmega.accounting.ledger import Ledger  # pylint: disable=import-outside-toplevel
    ledger = Ledger()
    for (g, t), r in sorted(self.steps().items()):
      try:
        ledger.record(batch_size=r["batch_size"], dataset_size=r["dataset_size"],
                      noise_multiplier=r["noise_multiplier"], scheme=r["scheme"])
      except (KeyError, ValueError) as e:
        raise JournalError(f"{self.path}: the record of generation {g} step {t} is unusable ({e}).") from None
    return ledger

  def __len__(self) -> int:
    return len(self.steps())

