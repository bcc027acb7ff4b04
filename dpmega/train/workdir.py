"""The workdir: one run at a time, usable before any compute, and what ``--overwrite`` discards.

* :func:`locked` -- an exclusive lock on ``<workdir>/.dpmega.lock`` for the whole run. A second run in the
  same workdir stops at once (:class:`WorkdirBusy`, exit code 2) naming the process that holds it, instead of
  truncating the first run's ``metrics.jsonl`` and overwriting its checkpoints. The lock is a POSIX record lock
  (``fcntl``): the kernel drops it when its process ends, however it ends (exit, exception, ``kill -9``), so a
  stale lock file never blocks the next run. The lock file is created empty and never written, so taking the
  lock changes nothing in an existing workdir.
* :func:`check_usable` -- the workdir can be created and written (not under a file, not read-only, not in
  ``/proc``): checked, with one clear line, before the dataset is built. A run refused before it wrote
  anything leaves no workdir it created.
* :func:`discard_run` -- what ``--overwrite`` deletes: the checkpoints and the journal of spent privacy.

.. warning::
   POSIX locks belong to a process: a second :func:`locked` on the same workdir *in the same process* does not
   conflict (and closing it would drop the first). :func:`dpmega.train.train` takes the lock once per run.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import struct
import tempfile
from typing import Iterator

from dpmega.errors import UsageError

LOCK_NAME = ".dpmega.lock"
_FLOCK = "hhqqi"  # struct flock on Linux: l_type, l_whence, l_start, l_len, l_pid


class WorkdirBusy(UsageError):
  """Another process is running in the workdir."""


def _unusable(workdir: str, e: OSError) -> UsageError:
  reason = e.strerror or type(e).__name__
  name = str(e.filename or "")
  where = f" ({name})" if name and ".dpmega-probe-" not in name and os.path.abspath(name) != os.path.abspath(
      workdir) else ""
  return UsageError(f"workdir {workdir!r} cannot be used: {reason}{where}. Choose a directory you can write "
                    "with --workdir.")


def _missing_dirs(workdir: str) -> list[str]:
  """The directories from the deepest existing ancestor down to ``workdir`` that do not exist yet, outermost first."""
  missing, path = [], os.path.abspath(workdir)
  while not os.path.exists(path):
    missing.insert(0, path)
    path = os.path.dirname(path)
  return missing


def check_usable(workdir: str) -> None:
  """Checks that ``workdir`` is (or can be created as) a directory that takes new files; changes nothing.

  Probes by creating and removing a temporary entry in the workdir, or in its deepest existing ancestor.

  Raises:
    UsageError: one line naming the workdir and why (it or an ancestor is a file, read-only, no such place).
  """
  missing = _missing_dirs(workdir)
  probe_in = os.path.dirname(missing[0]) if missing else os.path.abspath(workdir)
  if not os.path.isdir(probe_in):
    what = "it is a file" if not missing else f"{probe_in} is a file, not a directory"
    raise UsageError(f"workdir {workdir!r} cannot be used: {what}. Choose another --workdir.")
  try:
    os.rmdir(tempfile.mkdtemp(prefix=".dpmega-probe-", dir=probe_in))
  except OSError as e:
    raise _unusable(workdir, e) from None


def _holder(fd: int) -> int | None:
  """The pid of the process holding a conflicting lock on ``fd``'s file, if the kernel says."""
  try:
    query = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    l_type, _, _, _, pid = struct.unpack(_FLOCK, fcntl.fcntl(fd, fcntl.F_GETLK, query))
  except (OSError, struct.error):
    return None
  return pid if l_type != fcntl.F_UNLCK and pid > 0 else None


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
  """Holds the workdir's exclusive lock for the ``with`` body (checks :func:`check_usable` first).

  Raises:
    WorkdirBusy: another process holds it; the message names its pid.
    UsageError: the workdir cannot be used.
  """
  check_usable(workdir)
  created = _missing_dirs(workdir)
  path = os.path.join(workdir, LOCK_NAME)
  try:
    os.makedirs(workdir, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise _unusable(workdir, e) from None
  try:
    try:
      fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise _unusable(workdir, e) from None
      pid = _holder(fd)
      raise WorkdirBusy(f"workdir {workdir!r} is in use by another dpmega run "
                        f"({'process ' + str(pid) if pid else 'another process'}, holding {path}): wait for it to "
                        "finish or stop it, or choose another --workdir.") from None
    yield
    created = []  # the run went through: its workdir stays
  finally:
    # A run refused before it wrote anything (a bad config, a dataset too small) leaves no workdir behind.
    if created and os.listdir(workdir) == [LOCK_NAME]:
      os.remove(path)
      for d in reversed(created):
        with contextlib.suppress(OSError):
          os.rmdir(d)
    os.close(fd)  # releases the lock (the kernel also does when the process dies)


def discard_run(workdir: str, *, journal_name: str) -> None:
  """Deletes the checkpoints (also those set aside) and the journal of spent privacy: ``--overwrite``.

  The one place the journal is deleted: the operator discards the run's history.
  """
  for name in ("checkpoints", "checkpoints.set_aside"):
    shutil.rmtree(os.path.join(workdir, name), ignore_errors=True)
  journal = os.path.join(workdir, journal_name)
  if os.path.exists(journal):
    os.remove(journal)
