"""A trainer ``out`` that kills a run after a given step, as a crash would (shared by the resume tests)."""


class Interrupt(Exception):
  """Raised from the progress line of the step to die after."""


def interrupt_at(step: int):
  """An ``out`` callback that raises :class:`Interrupt` at the progress line of ``step`` (after it ran)."""

  def out(line: str) -> None:
    if line.startswith(f"step {step}/"):
      raise Interrupt()

  return out
