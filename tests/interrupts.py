"""A trainer ``out`` that kills a run after a given step, as a crash would (shared by the resume tests); and the
``preexec_fn`` that lets a child process be interrupted with Ctrl-C whatever this process inherited."""

import signal


class Interrupt(Exception):
  """Raised from the progress line of the step to die after."""


def interrupt_at(step: int):
  """An ``out`` callback that raises :class:`Interrupt` at the progress line of ``step`` (after it ran)."""

  def out(line: str) -> None:
    if line.startswith(f"step {step}/"):
      raise Interrupt()

  return out


def sigint_default() -> None:
  """``Popen(preexec_fn=...)``: SIGINT back to its default in the child, so Python there turns it into
  KeyboardInterrupt. A background job of a non-interactive shell (``cmd &``, ``nohup``) starts with SIGINT
  ignored, and a child that inherits that never sees the Ctrl-C a test sends."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)
