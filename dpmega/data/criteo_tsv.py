"""Criteo TSV click logs: the strict line reader and the streaming conversion to memory-mapped columns.

The Criteo display-advertising format is one example per line, 40 tab-separated
fields::

    label \\t I1 .. I13 \\t C1 .. C26 \\n

``label`` is ``0`` or ``1``; ``I*`` are integer counts (may be empty =
missing, may be negative in Kaggle's I2); ``C*`` are categorical values,
8-character hex strings in the released data (may be empty = missing).

Layouts (the line format is the same in both; what differs is the files):

* ``Layout.KAGGLE`` -- the Display Advertising Challenge (``dac.tar.gz``):
  ``train.txt``, ~45.8M labelled lines over 7 days, in time order. Its
  ``test.txt`` has NO label column (39 fields) and is rejected by the reader.
  Convention (DLRM): the last 1/7 of ``train.txt`` is the evaluation split.
* ``Layout.TERABYTE`` -- the Criteo 1TB click logs: ``day_0`` .. ``day_23``,
  ~4.4B lines in total, usually gzip-compressed (``day_N.gz``); 40 fields as
  above. Convention (DLRM/MLPerf): ``day_23`` is held out for evaluation.
  We assume the released files are unmodified (not the MLPerf pre-shuffled
  or pre-hashed binaries, which are a different, integer-only format).

Conversion (:func:`convert`) reads the text once, streaming in chunks (memory
is bounded by ``chunk_rows``, not the file size), with a progress bar on
stderr, and writes the columns of :mod:`dpmega.data.criteo` (which reads them).

Strictness: a line with other than 40 fields, a label not in ``{0, 1}``, or
an integer field that does not parse as a 32-bit integer raises
:class:`CriteoFormatError` naming the file and line -- columns are never
realigned or guessed. With ``on_error=OnError.SKIP`` such lines are skipped
and counted instead (``ConversionStats.skipped``, also in ``meta.json``).
Only ``\\n`` (and a ``\\r`` before it) is stripped from a line: trailing
tabs are empty fields, not whitespace.
"""

from __future__ import annotations

import dataclasses
import enum
import gzip
import itertools
import json
import os
import re
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

import numpy as np

from dpmega.data.criteo import FORMAT_VERSION
from dpmega.data.criteo import INT_MISSING
from dpmega.data.criteo import NUM_CAT
from dpmega.data.criteo import NUM_FIELDS
from dpmega.data.criteo import NUM_INT
from dpmega.data.criteo import fnv1a32
from dpmega.errors import UsageError


class Layout(enum.Enum):
  """Which release of the Criteo data a directory holds (see the module docstring)."""

  KAGGLE = "kaggle"
  TERABYTE = "terabyte"


class OnError(enum.Enum):
  """What to do with a malformed line."""

  RAISE = "raise"
  SKIP = "skip"


class CriteoFormatError(UsageError):
  """A malformed line: ``path`` and 1-based ``line_number`` say where."""

  def __init__(self, path: str, line_number: int, reason: str):
    super().__init__(f"{path}:{line_number}: {reason}")
    self.path = path
    self.line_number = line_number
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class ConversionStats:
  """What :func:`convert` did.

  Attributes:
    rows: lines written.
    skipped: malformed lines skipped (only with ``OnError.SKIP``).
    first_skipped: ``"path:line: reason"`` of the first few skipped lines.
    seconds: wall time of the conversion.
  """

  rows: int
  skipped: int
  first_skipped: tuple[str, ...]
  seconds: float


def layout_files(root: str | os.PathLike, layout: Layout | str, days: Sequence[int] | None = None) -> list[Path]:
  """The input files of a layout under ``root``, in time order.

  Args:
    root: directory holding the release's files.
    layout: ``Layout.KAGGLE`` (``train.txt``) or ``Layout.TERABYTE``
      (``day_N`` or ``day_N.gz``).
    days: Terabyte only: which days (0..23); None: every ``day_N`` present.

  Raises:
    UsageError: a file is missing, or ``days`` is given for Kaggle.
  """
  layout = Layout(layout)
  root = Path(root)
  if layout is Layout.KAGGLE:
    if days is not None:
      raise UsageError(f"days applies to the terabyte layout only, got {days=} for kaggle.")
    path = root / "train.txt"
    if not path.exists():
      raise UsageError(f"{path} not found: the kaggle layout expects train.txt from dac.tar.gz.")
    return [path]
  found = {}
  for p in root.iterdir():
    m = re.fullmatch(r"day_(\d+)(\.gz)?", p.name)
    if m:
      found[int(m.group(1))] = p
  wanted = sorted(found) if days is None else list(days)
  bad = [d for d in wanted if not 0 <= d <= 23]
  if bad:
    raise UsageError(f"days must be in [0, 23], got {bad}.")
  missing = [d for d in wanted if d not in found]
  if missing or not wanted:
    raise UsageError(f"terabyte layout: day file(s) {missing or 'day_0..day_23'} not found under {root}.")
  return [found[d] for d in wanted]


# ---------------------------------------------------------------------------
# Parsing.


def _open_binary(path: Path) -> tuple[BinaryIO, BinaryIO]:
  """(reader, raw file) -- the raw file's position drives the progress bar."""
  raw = open(path, "rb")
  if path.suffix == ".gz":
    return gzip.GzipFile(fileobj=raw, mode="rb"), raw
  return raw, raw


class _Progress:
  """A minimal bytes progress bar on stderr (no dependency), at most 2 updates/s."""

  def __init__(self, total_bytes: int, enabled: bool):
    self.total = max(total_bytes, 1)
    self.enabled = enabled
    self.start = time.monotonic()
    self.last = 0.0

  def update(self, done_bytes: int, rows: int, final: bool = False) -> None:
    if not self.enabled:
      return
    now = time.monotonic()
    if not final and now - self.last < 0.5:
      return
    self.last = now
    frac = min(done_bytes / self.total, 1.0)
    elapsed = now - self.start
    eta = elapsed * (1 - frac) / frac if frac > 0 else float("nan")
    bar = "#" * int(30 * frac)
    sys.stderr.write(f"\rcriteo [{bar:<30}] {100 * frac:5.1f}% {rows:,} rows "
                     f"{rows / max(elapsed, 1e-9):,.0f} rows/s eta {eta:,.0f}s")
    if final:
      sys.stderr.write("\n")
    sys.stderr.flush()


def _split(line: bytes) -> list[bytes]:
  if line.endswith(b"\n"):
    line = line[:-1]
  if line.endswith(b"\r"):
    line = line[:-1]
  return line.split(b"\t")


def _parse_int(field: bytes) -> int | None:
  if not field:
    return INT_MISSING
  try:
    v = int(field)
  except ValueError:
    return None
  return v if INT_MISSING < v <= np.iinfo(np.int32).max else None


def _text(field: bytes) -> str:
  """A field as the user sees it in the file: quoted text, not a Python bytes literal."""
  return repr(field[:20].decode("utf-8", errors="replace"))


def _line_error(fields: list[bytes]) -> str | None:
  """Why a split line is malformed, or None (the slow, exact path)."""
  if len(fields) != NUM_FIELDS:
    hint = ""
    if len(fields) == NUM_FIELDS - 1:
      hint = " (a 39-field line is an unlabelled test line, e.g. Kaggle test.txt)"
    return (f"expected {NUM_FIELDS} tab-separated fields (label, {NUM_INT} integer, {NUM_CAT} categorical), "
            f"got {len(fields)}{hint}")
  if fields[0] not in (b"0", b"1"):
    hint = " (a header line? Criteo files have none)" if fields[0].strip().lower() in (b"label", b"clicked") else ""
    return f"label (field 1) must be 0 or 1, got {_text(fields[0])}{hint}"
  for j in range(NUM_INT):
    if _parse_int(fields[1 + j]) is None:
      return f"integer feature I{j + 1} (field {j + 2}) must be empty or a 32-bit integer, got {_text(fields[1 + j])}"
  return None


def _parse_chunk(lines: list[bytes], path: str, first_line: int, on_error: OnError, skipped: list[str]):
  """Parses lines into (labels uint8 [n], ints int32 [n,13], cats uint32 [n,26])."""
  rows = [_split(line) for line in lines]
  ok = np.fromiter((len(r) == NUM_FIELDS for r in rows), bool, len(rows))
  good_rows = [r for r, g in zip(rows, ok) if g] if not ok.all() else rows
  if good_rows:
    arr = np.array(good_rows, dtype=bytes)
    labels_ok = (arr[:, 0] == b"0") | (arr[:, 0] == b"1")
    ints_raw = arr[:, 1:1 + NUM_INT]
    missing = ints_raw == b""
    try:
      ints = np.where(missing, b"0", ints_raw).astype(np.int64)
      ints_ok = np.all((ints > INT_MISSING) & (ints <= np.iinfo(np.int32).max), axis=1)
    except (ValueError, OverflowError):
      ints, ints_ok = None, None
    if ints is None:
      # Some field does not parse: find which rows, exactly, one by one.
      ints_ok = np.array([all(_parse_int(f) is not None for f in r[1:1 + NUM_INT]) for r in good_rows])
      ints = np.zeros(ints_raw.shape, np.int64)
      for i in np.flatnonzero(ints_ok):
        ints[i] = [0 if f == b"" else int(f) for f in ints_raw[i]]
    ints = np.where(missing, INT_MISSING, ints)
    row_ok = labels_ok & ints_ok
    ok[np.flatnonzero(ok)] = row_ok
  if not ok.all():
    bad = np.flatnonzero(~ok)
    if on_error is OnError.RAISE:
      i = int(bad[0])
      raise CriteoFormatError(path, first_line + i, _line_error(rows[i]) or "malformed line")
    for i in bad[:max(0, 5 - len(skipped))]:
      skipped.append(f"{path}:{first_line + int(i)}: {_line_error(rows[int(i)])}")
  if not good_rows:
    empty = np.zeros((0,), np.uint8), np.zeros((0, NUM_INT), np.int32), np.zeros((0, NUM_CAT), np.uint32)
    return empty + (len(lines),)
  arr, ints = arr[row_ok], ints[row_ok]
  labels = (arr[:, 0] == b"1").astype(np.uint8)
  cats = fnv1a32(arr[:, 1 + NUM_INT:])
  return labels, ints.astype(np.int32), cats, int((~ok).sum())


def _read_chunks(paths: Sequence[Path], chunk_rows: int) -> Iterator[tuple[str, int, list[bytes], int]]:
  """Yields (path, first line number, lines, bytes of input consumed so far)."""
  done_before = 0
  for path in paths:
    reader, raw = _open_binary(path)
    with reader, raw:
      line_no = 1
      while True:
        try:
          lines = list(itertools.islice(reader, chunk_rows))
        except (OSError, EOFError, zlib.error) as e:  # a truncated or corrupt .gz, a read error
          raise UsageError(f"cannot read {path} after line {line_no - 1}: {type(e).__name__}: {e}"
                           + (" (a truncated or corrupt gzip file?)" if path.suffix == ".gz" else "")) from None
        if not lines:
          break
        yield str(path), line_no, lines, done_before + raw.tell()
        line_no += len(lines)
    done_before += path.stat().st_size


def convert(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    on_error: OnError | str = OnError.RAISE,
    chunk_rows: int = 100_000,
    max_rows: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
    layout: Layout | str | None = None,
) -> ConversionStats:
  """Converts Criteo TSV file(s) to the memory-mapped columnar format, streaming.

  Files are read in the given order (``.gz`` decompressed on the fly) and
  concatenated; memory stays ``O(chunk_rows)`` whatever the file sizes. The
  output appears atomically: written to ``out_dir + ".partial"``, then renamed,
  ``meta.json`` last, so a crashed conversion never looks complete.

  Args:
    inputs: one path or a list of paths (e.g. from :func:`layout_files`).
    out_dir: directory to create.
    on_error: ``OnError.RAISE`` (default): a malformed line raises
      :class:`CriteoFormatError` naming it. ``OnError.SKIP``: skip and count.
    chunk_rows: lines parsed per vectorized chunk, >= 1.
    max_rows: stop after this many written rows (None: all).
    progress: draw a progress bar on stderr.
    overwrite: replace an existing ``out_dir``.
    layout: recorded in ``meta.json`` for provenance only.

  Returns:
    :class:`ConversionStats`.

  Raises:
    CriteoFormatError: a malformed line (with ``OnError.RAISE``).
    UsageError: bad arguments, missing input, ``out_dir`` exists, an unreadable input (named, with the last
      good line), or no row at all to write (every line malformed).
  """
  on_error = OnError(on_error)
  if isinstance(inputs, (str, os.PathLike)):
    inputs = [inputs]
  paths = [Path(p) for p in inputs]
  if not paths:
    raise UsageError("inputs must name at least one file.")
  for p in paths:
    if not p.is_file():
      raise UsageError(f"inputs: {p} is not a file.")
  if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
    raise UsageError(f"chunk_rows must be an int >= 1, got {chunk_rows=!r}.")
  if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
    raise UsageError(f"max_rows must be None or an int >= 1, got {max_rows=!r}.")
  out = Path(out_dir)
  if out.exists():
    if not overwrite:
      raise UsageError(f"out_dir {out} exists; pass overwrite=True to replace it.")
    shutil.rmtree(out)
  tmp = out.with_name(out.name + ".partial")
  if tmp.exists():
    shutil.rmtree(tmp)
  tmp.mkdir(parents=True)

  start = time.monotonic()
  bar = _Progress(sum(p.stat().st_size for p in paths), progress)
  rows, skipped, first_skipped = 0, 0, []
  try:
    with open(tmp / "label.bin", "wb") as fl, open(tmp / "int.bin", "wb") as fi, open(tmp / "cat.bin", "wb") as fc:
      for path, first_line, lines, done_bytes in _read_chunks(paths, chunk_rows):
        labels, ints, cats, n_bad = _parse_chunk(lines, path, first_line, on_error, first_skipped)
        skipped += n_bad
        if max_rows is not None and rows + len(labels) > max_rows:
          keep = max_rows - rows
          labels, ints, cats = labels[:keep], ints[:keep], cats[:keep]
        fl.write(labels.astype("<u1").tobytes())
        fi.write(ints.astype("<i4").tobytes())
        fc.write(cats.astype("<u4").tobytes())
        rows += len(labels)
        bar.update(done_bytes, rows)
        if max_rows is not None and rows >= max_rows:
          break
  except BaseException:
    if progress:
      sys.stderr.write("\n")
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  bar.update(bar.total, rows, final=True)
  if rows == 0:
    shutil.rmtree(tmp, ignore_errors=True)
    first = f"; first: {first_skipped[0]}" if first_skipped else ""
    raise UsageError(f"no rows to write: all {skipped:,} line(s) of {', '.join(str(p) for p in paths)} are "
                     f"malformed{first}.")
  seconds = time.monotonic() - start
  meta = {
      "format": "dpmega-criteo",
      "version": FORMAT_VERSION,
      "rows": rows,
      "num_int": NUM_INT,
      "num_cat": NUM_CAT,
      "int_missing": int(INT_MISSING),
      "cat_hash": "fnv1a32",
      "skipped": skipped,
      "first_skipped": first_skipped,
      "inputs": [str(p) for p in paths],
      "layout": None if layout is None else Layout(layout).value,
  }
  (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
  tmp.rename(out)
  return ConversionStats(rows=rows, skipped=skipped, first_skipped=tuple(first_skipped), seconds=seconds)
